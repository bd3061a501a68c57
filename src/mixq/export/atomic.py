"""Writing an output directory so that nobody ever sees half of it."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..fsmode import publish


@contextmanager
def atomic_dir(out: Path):
    """Yield a fresh temporary sibling of ``out``; on success it replaces ``out`` in one rename.

    An existing ``out`` is moved aside first and removed only after the new directory is in place;
    on any error (or interrupt) the temporary directory is deleted and ``out`` is left as it was.
    The caller decides beforehand whether replacing an existing ``out`` is allowed.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        publish(tmp)  # mkdtemp, mkstemp and safetensors make things private; the result is an ordinary directory
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, backup / "d")
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
