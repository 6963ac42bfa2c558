"""The C allocator under torch's CPU tensors: keep freed memory for the next allocation.

Torch-free (standard library only), so the command line sets it before any command runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 512 << 20), (_M_TOP_PAD, 64 << 20))
_kept = False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep the memory a network frees for its next allocation instead of
    handing it back to the kernel; returns whether that setting is in force.

    A forward pass allocates and frees the same activations, several MB each, layer after layer.
    Under glibc's defaults each comes back from the kernel as fresh pages, and their page faults
    took a quarter of `minidiff sample reduced-2step --n 10000` on a 2-core AMD EPYC Zen 3
    (docs/speed.md). Set here: blocks up to 32 MB (glibc's largest ``M_MMAP_THRESHOLD``) come
    from the heap, and up to 512 MB of freed heap stay mapped; the peak memory barely moves
    (a training step of `reduced` at batch 128: 802-831 MB against 795).
    The command line calls this once; a notebook may too. Linux with glibc only, and never where
    the user tuned the allocator already (``MALLOC_*`` or ``GLIBC_TUNABLES`` set, or a library
    in ``LD_PRELOAD``, such as jemalloc or tcmalloc).
    """
    global _kept
    if _kept:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or any(
            k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    _kept = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
    return _kept


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` is in force in this process (recorded with timings)."""
    return _kept
