"""What evaluation takes as a target: a mixq directory or a model (hub id, local path, embedded name)."""
from __future__ import annotations

from pathlib import Path

from .export.native import is_quantized_dir, load_quantized, read_info
from .models import load_model

# Files only a mixq directory holds: a directory with one of them but no mixq.json lost its metadata.
_MIXQ_ONLY = ("quantized.safetensors", "rest.safetensors")


def load_target(target: str):
    """A mixq directory or a model name → ``(model, tokenizer, info | None)`` (``info``: the directory's metadata).

    A directory holding mixq tensor files but no ``mixq.json`` raises the same
    :class:`~mixq.export.native.CheckpointError` as ``mixq generate`` / ``mixq export`` ("not a mixq directory").
    """
    if is_quantized_dir(target):
        return load_quantized(target)
    p = Path(target).expanduser()
    if p.is_dir() and any((p / f).is_file() for f in _MIXQ_ONLY) and not (p / "model.safetensors").is_file():
        read_info(p)  # raises "… is not a mixq directory (no mixq.json) …"
    m, t = load_model(target)
    return m, t, None
