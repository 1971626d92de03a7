import sys
from pathlib import Path

from dpf_ext.allocator import retain_freed_memory

sys.path.insert(0, str(Path(__file__).parent))

# Every case of a run allocates as dpf-train does: freed memory stays in the process, so that
# no case pays page faults for memory an earlier one handed back (see dpf_ext.allocator).
retain_freed_memory()
