"""The allocator behaviour ``dino`` and ``launch.py`` start with: glibc malloc keeps freed memory for reuse.

By default glibc serves every allocation above a (dynamic, at most 32 MiB) threshold with its own ``mmap`` and
returns it with ``munmap`` when freed, and trims the heap's free top back to the OS. A forward pass allocates and
frees tensors of tens of MiB over and over, so each new tensor page-faults all its memory in again; on the VMs this
project is measured on that cost as much as the arithmetic (docs/benchmarks.md: an R50 800x1333 CPU forward
6.9 -> 4.15 s with the thresholds raised on an idle VM, 1.29x in a same-run table on a loaded one). ``tune_malloc`` raises both thresholds with ``mallopt`` at start-up, which
is what ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...`` does, without
restarting the process. The price: the process keeps its peak heap until it exits.

Only the command-line entry points call it; importing ``dino`` as a library changes nothing. ``DINO_MALLOC_TUNING=0``
keeps glibc's defaults, and so do a user's own malloc settings (``GLIBC_TUNABLES`` with ``glibc.malloc``,
``MALLOC_*_`` variables) and a preloaded allocator (``LD_PRELOAD``, e.g. jemalloc or tcmalloc).
"""
from __future__ import annotations

import ctypes
import os
import platform

ENV_VAR = "DINO_MALLOC_TUNING"
HELP = (f"On Linux/glibc, dino keeps freed memory in the process for reuse (mallopt: mmap and trim thresholds at "
        f"2 GiB): faster CPU work where page faults are slow (docs/benchmarks.md); {ENV_VAR}=0 keeps glibc's "
        f"defaults.")

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 2**31 - 1  # mallopt takes an int; larger than any single tensor of a DINO forward


def _skip_reason(environ: dict[str, str]) -> str | None:
    if environ.get(ENV_VAR) == "0":
        return f"{ENV_VAR}=0"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", "") or any(
            k.startswith("MALLOC_") and k.endswith("_") for k in environ):
        return "the user's own malloc settings"
    if environ.get("LD_PRELOAD", ""):
        return "a preloaded library (LD_PRELOAD)"
    return None


def tune_malloc(environ: dict[str, str] | None = None) -> bool:
    """Raises glibc's mmap and trim thresholds unless switched off or not applicable; True when applied."""
    if _skip_reason(os.environ if environ is None else environ) is not None:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
