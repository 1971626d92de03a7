"""CPU memory for training steps: keep freed memory in the process instead of handing it
back to the system.

With glibc's default settings a large tensor freed by one step is returned to the system and
the next step's tensor of that size is mapped again, page by page: every step then pays a
page fault per 4 KiB of each large activation, gradient and output it allocates. On a 2-core
AMD EPYC (1 thread) that cost 2.3 ms of a 3.6 ms sparse ResNet-20 3x3 convolution step
(16 channels at 32x32, 98%) and about 10 ms of its 21 ms dense one (``docs/results.md``). :func:`retain_freed_memory`
sets glibc's thresholds so that allocations up to 32 MiB come from the heap and freed memory
stays there for the next step (what caching allocators such as jemalloc or PyTorch's own
CUDA allocator do); the process then keeps its peak memory. ``dpf-train`` calls it at start.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
"""Allocations of at most this many bytes come from the heap (glibc's largest setting)."""


def retain_freed_memory() -> bool:
    """Keep freed memory in this process (glibc's ``mallopt``: no trimming, no mapping of
    allocations up to :data:`MMAP_THRESHOLD`); ``False`` where the C library is not glibc
    (nothing changed)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
