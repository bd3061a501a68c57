"""Triton kernels jitted on first use: the one lazy ``triton.jit`` the Triton kernels share (importing a kernel
module must not need triton, nor compile anything)."""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def jitted(fn, what: str):
    """``triton.jit(fn)``, made once per kernel function; ``what`` names the kernel in the error without triton."""
    try:
        import triton
    except Exception:  # noqa: BLE001 - optional dependency: pip install 'mixq[gpu]'
        triton = None
    if triton is None:
        raise RuntimeError(f"the {what} Triton kernel needs triton: pip install 'mixq[gpu]'")
    return triton.jit(fn)
