"""Process-wide host memory settings, applied with `--cpu_kernels on` (`setup_cpu_kernels`) and
by `revjepa bench` before its kernels-on figures; never on import (no torch import here)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit

_malloc_tuned = False


def tune_glibc_malloc() -> bool:
    """Keep freed activation buffers in the process instead of returning them to the kernel.

    glibc serves large blocks with fresh mmap pages and trims the heap on free, so every step
    page-faults its big buffers (logits, MLP activations) back in: ~10% of a CPU step here.
    Fixing the mmap threshold at its maximum (32 MiB) and never trimming reuses the memory.
    Returns whether the settings took effect (False off glibc, e.g. macOS).
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    _malloc_tuned = ok
    return ok
