"""What evaluation takes as a target: a mixq directory or a model (hub id, local path, embedded name)."""
from __future__ import annotations

from .export.native import is_quantized_dir, load_quantized
from .models import load_model


def load_target(target: str):
    """A mixq directory or a model name → ``(model, tokenizer, info | None)`` (``info``: the directory's metadata)."""
    if is_quantized_dir(target):
        return load_quantized(target)
    m, t = load_model(target)
    return m, t, None
