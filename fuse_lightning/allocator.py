"""Keep freed memory in the process heap (glibc `mallopt`), a CPU speed-up for large batches.

why: glibc serves every allocation above its mmap threshold (at most 32 MiB, adjusted at run time)
with a fresh `mmap` and hands it back with `munmap` when freed. A training step at 64x64 with batch
128 allocates and frees dozens of such activation tensors, so every step page-faults and zeroes
them again: on this project's 2-core CPU that kernel time was 5.7 of the 7.5 s of a FUSE step (and
0.6 of 1.5 s at 32x32). Raising the mmap and trim thresholds lets freed blocks be reused from the
heap; the price is that the process keeps its peak memory until it exits, which a training run
does anyway. Measured by `make bench` (docs/benchmarks.md).

Set `FUSE_MALLOC_TUNING=off` to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 2**30  # 1 GiB: larger than any single activation tensor of the shipped configs


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process.

    Returns:
        True when both settings were applied; False on a C library other than glibc (macOS,
        musl, Windows), when `FUSE_MALLOC_TUNING=off`, or when `mallopt` refused them.
    """
    if os.environ.get("FUSE_MALLOC_TUNING", "").lower() in ("off", "0", "false", "no"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: other C libraries' mallopt differ
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
