"""Keep freed large CPU buffers for reuse (glibc ``mallopt``) while training on the CPU.

A training step allocates and frees several ``[d_sae, d_in]`` buffers (gradients, the sparse
backward's outputs). glibc serves blocks above its mmap threshold with a fresh ``mmap`` and returns
them on free, so every step page-faults ~0.5 GB back in at d_sae 8192 × d_in 2304. Raising the mmap
threshold to 1 GiB and the trim threshold to 2 GiB keeps those blocks in the heap for the next step:
the TopK step at d_in 2304, d_sae 8192, B 2048 went from 652–666 ms to 569–573 ms on this 2-core
machine (two runs each, ``benchmarks/scale.py`` measures it). The cost: the process's resident size
stays at its peak instead of shrinking between steps. CUDA memory is unaffected (PyTorch's caching
allocator already reuses it). Opt out with ``SAE_KEEP_FREED_MEMORY=0``.

The thresholds only govern glibc's main arena: a thread's own arena is a heap of at most 64 MiB, so
any larger block a thread allocates (the loader's producer thread allocates every window: 150–300
MB at d_model 2304) is still a fresh ``mmap``. So the arenas are also capped at one
(``M_ARENA_MAX``), which makes every thread allocate from the main heap: the shuffled read of a
bf16 store at d_model 2304 in 8 192-token chunks went from 189–191 k tokens/s (1 and 2 decode
threads) to 283 k and 582 k on this 2-core machine (``benchmarks/read.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_done = False


def keep_freed_memory() -> bool:
    """Apply the thresholds once per process (Linux/glibc only). Returns whether they are in effect."""
    global _done
    if _done:
        return True
    if os.environ.get("SAE_KEEP_FREED_MEMORY", "1") == "0" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31) == 1
        ok = ok and libc.mallopt(_M_ARENA_MAX, 1) == 1
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
