"""Hand the C heap's free memory back to the operating system between large steps.

glibc keeps freed heap memory mapped (it is reused, not returned) and a long CPU job that allocates tensors of many
sizes -- one backward pass per calibration row, one decoder block after another -- fragments it: on SmolLM2 the 16
gradient rows of the sensitivity measurement left 1.6 GB resident that nothing referenced, and the process's peak
grew with every row.  :func:`release_free_memory` calls glibc's ``malloc_trim(0)`` (a few ms); elsewhere (macOS,
musl, Windows) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache


@lru_cache(maxsize=1)
def _trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc); a no-op where that is not available."""
    f = _trim()
    if f is not None:
        f(0)
