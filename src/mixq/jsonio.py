"""JSON artifacts on disk: atomic writes (temp file + fsync + rename) and reads with clear errors."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .fsmode import publish


def read_json(path: str | Path):
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {p}: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None


def write_json_atomic(path: str | Path, obj, *, overwrite: bool = False) -> Path:
    """Write JSON to a temporary file in the same folder, then ``os.replace`` it into place.

    Objects with ``to_dict()`` and paths are serialized; an existing file is replaced only with
    ``overwrite=True`` (CLI: ``--force``).
    """
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} already exists: choose another path or pass --force to replace it")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json_bytes(obj))
            f.flush()
            os.fsync(f.fileno())
        publish(tmp)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def json_bytes(obj) -> bytes:
    """The bytes :func:`write_json_atomic` writes for ``obj`` (e.g. for a file inside an atomically written
    directory: ``save_quantized(side_files=...)``)."""
    return (json.dumps(obj, indent=1, default=_default) + "\n").encode()


def _default(o):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
