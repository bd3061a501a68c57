"""What the Triton kernels share: the one lazy ``triton.jit`` (importing a kernel module must not need triton, nor
compile anything) and whether triton runs in its CPU interpreter."""
from __future__ import annotations

import os
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


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` before triton was imported)."""
    try:
        import triton
    except Exception:  # noqa: BLE001 - optional dependency
        return False
    knobs = getattr(triton, "knobs", None)
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"
