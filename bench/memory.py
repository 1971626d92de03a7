"""Peak extra memory of one global-threshold call, measured in a fresh process.

``python bench/memory.py METHOD N`` prints the bytes by which the process's peak resident
set grew during one call of ``METHOD`` on ``N`` weights (above what the weights take).
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def peak_extra_bytes(fn) -> int:
    """Bytes by which this process's peak resident set grows during one ``fn()`` (freed heap
    memory handed back first, so that reusing it counts)."""
    _reset_peak()
    baseline = _status_bytes("VmRSS")
    fn()
    return max(_status_bytes("VmHWM") - baseline, 0)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # hand freed heap memory back first, so that reusing it counts as growth
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set (VmHWM) to the current one


def measure(method: str, n: int) -> int:
    """Peak extra bytes of ``method`` on ``n`` weights, from a fresh Python process."""
    out = subprocess.run([sys.executable, str(HERE / "memory.py"), method, str(n)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def main() -> None:
    method, n = sys.argv[1], int(sys.argv[2])
    sys.path.insert(0, str(HERE))
    from workloads import THRESHOLD_METHODS, weight_set

    weights = weight_set(n)
    fn = THRESHOLD_METHODS[method]
    fn(weight_set(1000))  # load kernels and libraries before the baseline
    print(json.dumps({"peak_extra_bytes": peak_extra_bytes(lambda: fn(weights))}))


if __name__ == "__main__":
    main()
