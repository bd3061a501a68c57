"""How other runtimes name the experts and routers mixq exposes (for the Hugging Face / vLLM exports).

mixq names expert projections after the transformers 5 module tree (``model.layers.0.mlp.experts.3.down_proj``).
For Qwen2/3-MoE and OLMoE that is also the name in the families' own checkpoints, which vLLM and
transformers' checkpoint conversion read.  Mixtral's checkpoints say ``block_sparse_moe.experts.E.w1`` (gate),
``w3`` (up) and ``w2`` (down), with the router at ``block_sparse_moe.gate``: :func:`checkpoint_name` maps to
those, so an exported Mixtral has the tensor and module names vLLM's loader expects (transformers 5 maps them
back with its own ``block_sparse_moe`` -> ``mlp`` conversion).
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from .experts import ExpertList, split_expert_name

_B = r"(?=\.|$)"
CHECKPOINT_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "mixtral": (
        (r"\.mlp\.experts\.(\d+)\.gate_proj" + _B, r".block_sparse_moe.experts.\1.w1"),
        (r"\.mlp\.experts\.(\d+)\.up_proj" + _B, r".block_sparse_moe.experts.\1.w3"),
        (r"\.mlp\.experts\.(\d+)\.down_proj" + _B, r".block_sparse_moe.experts.\1.w2"),
        (r"\.mlp\.gate" + _B, ".block_sparse_moe.gate"),
    ),
}


def checkpoint_name(model_type: str | None, name: str) -> str:
    """``name`` (a module or tensor name as mixq sees it) as the family's checkpoints spell it."""
    for pattern, repl in CHECKPOINT_RENAMES.get(model_type or "", ()):
        name = re.sub(pattern, repl, name)
    return name


def routers(model: nn.Module) -> list[str]:
    """Names of the MoE routers: the ``gate`` (with a 2-D weight) next to each :class:`~mixq.moe.experts.ExpertList`."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, ExpertList):
            parent_name = name.rpartition(".")[0]
            parent = model.get_submodule(parent_name) if parent_name else model
            w = getattr(getattr(parent, "gate", None), "weight", None)
            if isinstance(w, torch.Tensor) and w.ndim == 2:
                out.append(f"{parent_name}.gate" if parent_name else "gate")
    return out


def stored_as(key: str, names) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None:
    """Where the per-expert tensor ``key`` (``...mlp.experts.E.gate_proj.weight``) lives in a checkpoint whose
    tensor ``names`` (a set or a dict keyed by name) spell it otherwise: ``(name, select)`` with ``select(stored) -> the [out, in] weight``.

    Tried in order: a family's checkpoint spelling (:data:`CHECKPOINT_RENAMES`, e.g. Mixtral's
    ``block_sparse_moe.experts.E.w1``), then transformers 5's stacked ``experts.gate_up_proj`` (rows ``[:I]``
    gate, ``[I:]`` up of expert E) / ``experts.down_proj``.  None when neither is there.
    """
    for mt in CHECKPOINT_RENAMES:
        alt = checkpoint_name(mt, key)
        if alt != key and alt in names:
            return alt, lambda t: t
    parts = split_expert_name(key.removesuffix(".weight")) if key.endswith(".weight") else None
    if parts is None:
        return None
    module, e, proj = parts
    if proj in ("gate_proj", "up_proj") and f"{module}.gate_up_proj" in names:
        first = proj == "gate_proj"
        return f"{module}.gate_up_proj", lambda t: (t[e, : t.shape[1] // 2] if first else t[e, t.shape[1] // 2:])
    if proj == "down_proj" and f"{module}.down_proj" in names:
        return f"{module}.down_proj", lambda t: t[e]
    return None
