"""Native CPU kernels written in C: compiled on first use into mixq's cache and loaded with ctypes.

:func:`load` compiles a C source with the system compiler (``$CC``, else ``cc``; ``-O3 -march=native
-fopenmp``, then the flags of ``$MIXQ_KERNEL_CFLAGS``) into ``<cache>/kernels/<name>_<hash>.so``, keyed by the
source, the extra flags and the machine (``-march=native`` code does not travel), and returns the library, or None
(with a warning naming the fallback) when no compiler works.  The ``.so`` appears atomically, so concurrent
processes see a whole file or none.

``MIXQ_KERNEL_CFLAGS`` builds the kernels a CPU would get without some of this one's instructions, e.g.
``-mno-avx512f`` for the AVX2 paths on an AVX-512 machine (how ``bench/results/deploy_avx2.md`` was measured).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


VOID_P, INT = ctypes.c_void_p, ctypes.c_int

# bfloat16 <-> float32 in C, as torch converts (round to nearest even; a NaN stays a quiet NaN): put before the
# sources that read or write bf16 tensors
BF16_C = r"""
#include <stdint.h>
#include <string.h>
static inline float bf2f(uint16_t h) { const uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
"""


def load(name: str, source: str, fallback: str, signatures: dict[str, tuple]) -> ctypes.CDLL | None:
    """The compiled ``source`` as a ctypes library (``name``: the file stem; ``fallback``: what callers use
    instead, for the warning when it cannot be built); ``signatures``: ``{function: (restype, [argtypes])}``."""
    from ...models import cache_dir

    extra = os.environ.get("MIXQ_KERNEL_CFLAGS", "").split()
    tag = hashlib.sha256((source + platform.node() + platform.machine() + " ".join(extra)).encode()).hexdigest()[:16]
    out = Path(cache_dir()) / "kernels" / f"{name}_{tag}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        cc = os.environ.get("CC", "cc")
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # same filesystem: os.replace is atomic there
            src = Path(tmp) / f"{name}.c"
            src.write_text(source)
            so = Path(tmp) / f"{name}.so"
            try:
                subprocess.run([cc, "-O3", "-march=native", "-fopenmp", *extra, "-shared", "-fPIC", str(src), "-o", str(so)],
                               check=True, capture_output=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("%s kernel not compiled (%s): %s", name, e, fallback)
                return None
            os.replace(so, out)
    try:
        lib = ctypes.CDLL(str(out))
    except OSError as e:
        log.warning("%s kernel not loaded (%s): %s", name, e, fallback)
        return None
    for fn, (res, args) in signatures.items():
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = list(args)
    return lib
