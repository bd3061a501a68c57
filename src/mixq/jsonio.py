"""JSON artifacts on disk: atomic writes (temp file + fsync + rename) and reads with clear errors."""
from __future__ import annotations

import json
from pathlib import Path

from .atomic import write_bytes_atomic


def read_json(path: str | Path):
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {p}: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None


def write_json_atomic(path: str | Path, obj, *, overwrite: bool = False) -> Path:
    """Write JSON atomically (:func:`mixq.atomic.write_bytes_atomic`: a temporary sibling, fsync, one rename).

    Objects with ``to_dict()`` and paths are serialized; an existing file is replaced only with
    ``overwrite=True`` (CLI: ``--force``).
    """
    return write_bytes_atomic(path, json_bytes(obj), overwrite=overwrite)


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
