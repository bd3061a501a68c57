"""SmoothQuant: migrate activation outliers into the weights (Xiao et al., 2023, arXiv:2211.10438).

Per input channel ``j`` of an input group (eq. 4)::

    s_j = max_t |X_tj|^α / max_k max_o |W_k[o, j]|^(1−α)

then ``X ← X diag(s)⁻¹`` (folded into the producing op) and ``W_k ← W_k diag(s)``
(:func:`~mixq.algorithms.transforms.fold_scale`), which flattens the activation channels
(``α = 0.5`` balances the difficulty between activations and weights) and leaves the fp
model unchanged.  By default only ``norm → linears`` groups are smoothed (the paper's setting
for OPT/BLOOM/Llama); ``include_linear`` also smooths ``linear → linear`` groups (``v → o``,
``up → down``) and ``include_act`` GELU → fc2 groups (wrapped activations).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from ..arch import arch_for, get_weight
from ..calib.capture import walk_blocks
from .transforms import fold_scale, head_dim_of, input_rotation, kv_expand, kv_reduce, kv_repeat

log = logging.getLogger(__name__)


@torch.no_grad()
def smoothquant_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = 0.5,
                       *, kv: tuple[int, int] | None = None) -> torch.Tensor:
    """``s [in] = act_absmax^α / max|W_:,j|^(1−α)`` (clamped to ≥ 1e-5), float32.

    ``act_absmax [in]``: ``max_t |X_tj|``; ``weights``: the group's ``[out_k, in]`` matrices.
    ``kv=(n_rep, head_dim)``: GQA ``v → o`` group, maxima taken over the repeated heads and ``s``
    shared by them.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    a = act_absmax.to(torch.float32).abs()
    w = torch.stack([W.detach().to(torch.float32).abs().amax(0).to(a.device) for W in weights]).amax(0)
    if kv is not None:
        a, w = kv_reduce(a, *kv, how="max"), kv_reduce(w, *kv, how="max")
    s = (a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1.0 - alpha)).clamp_min(1e-5)
    return kv_expand(s, *kv) if kv is not None else s


@torch.no_grad()
def smooth_model(model: nn.Module, calib_ids: torch.Tensor, alpha: float = 0.5, *, include_linear: bool = False,
                 include_act: bool = False, device="cpu", progress: bool = True) -> dict[str, torch.Tensor]:
    """Smooth every eligible input group of ``model`` in place (fp function unchanged).

    Activation maxima come from one block walk over ``calib_ids [n, L]``
    (:class:`~mixq.calib.stats.LayerStats` ``absmax``, no Hessians).  Returns the scale of each
    smoothed group, keyed ``"<blocks>.<i>.<prev>"``.
    """
    arch = arch_for(model)
    if not arch.input_groups:
        raise ValueError(f"{type(model).__name__} has no input groups in mixq.arch_table.ARCH_TABLE: "
                         "add the family's groups there to smooth it")
    kinds = {"norm"} | ({"linear"} if include_linear else set()) | ({"act"} if include_act else set())
    hd = head_dim_of(model)
    out: dict[str, torch.Tensor] = {}

    def on_block(i: int, block: nn.Module, stats) -> None:
        for g in arch.input_groups:
            if g.prev_kind not in kinds:
                continue
            rotated = input_rotation(block.get_submodule(g.linears[0])) is not None
            n_rep = 1 if rotated else kv_repeat(block, g)
            Ws = [get_weight(block.get_submodule(n)) for n in g.linears]
            s = smoothquant_scales(stats[g.linears[0]].absmax, Ws, alpha, kv=(n_rep, hd) if n_rep > 1 else None)
            fold_scale(block, g, s, norm_offset=arch.norm_offset, head_dim=hd)
            out[f"{arch.blocks}.{i}.{g.prev}"] = s

    # the fold is exact, so the next block's inputs need no recomputation (sequential=False)
    walk_blocks(model, calib_ids, on_block, device=device, sequential=False, keep_hessian=False, progress=progress)
    log.info("SmoothQuant (alpha=%g) smoothed %d groups", alpha, len(out))
    return out
