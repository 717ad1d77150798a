"""Keep freed memory in the process: a training step's large temporaries are then reused instead of page-faulted in.

glibc serves every allocation over 32 MB (its largest mmap threshold) with a fresh mmap and unmaps it at free().
A training step at 768 → 24,576 allocates several such blocks each time (gradients of 75 MB, the encoder's
[4,096 × 24,576] products, the encoder gradient's transposed copy), so every step the kernel zero-fills ~80k new pages: 240 ms
of system time a step across both cores, 20-30% of the step (measured with getrusage on this machine). PyTorch's
CPU tuning guide answers the same cost with jemalloc or tcmalloc through LD_PRELOAD; glibc's own knobs do it from
inside the process, with nothing to install: no mmap for large blocks (they come from the heap) and a trim
threshold of 1 GB (the heap keeps what is freed, so the next step's blocks land on pages already mapped).

The cost: a process's resident memory stays near its high-water mark (+20% at 768 → 24,576: 1.6 → 1.9 GB, then
flat over the run) instead of falling between steps. Process-wide, so `monosemantic-train train` sets it, not an
import: from a notebook, call `keep_freed_memory()` before `Trainer(...).run()` for the same speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 1 << 30
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (once per process); False where the C library is not glibc."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):  # musl has a mallopt that ignores these parameters
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
