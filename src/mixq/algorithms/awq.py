"""AWQ: activation-aware weight scaling and clipping (Lin et al., 2023, arXiv:2306.00978).

For an input group (linears ``W_k`` reading the same ``X [N, in]``) with activation magnitude
``a_j = mean_t |X_tj|``, AWQ searches (eq. 4–5)

    s(α) = a^α / √(max a^α · min a^α),      α ∈ {0, 1/n, …, 1}
    α*   = argmin_α Σ_k ‖X W_kᵀ − (X diag(s)⁻¹) Q(W_k diag(s))ᵀ‖²

then folds ``s`` into the op producing ``X`` (:mod:`mixq.algorithms.transforms`).  ``α = 0``
(``s = 1``) is plain RTN, so the chosen error is never above RTN's.  Then the weights are
clipped (AWQ ``auto_clip``): per output row and quantization group, the range ``max|w|`` is
shrunk by ``r ∈ {1, 0.95, …, 0.55}``, keeping the ``r`` with the least group output error.

Both searches need only ``H = XᵀX/N``:  ``‖X ΔWᵀ‖²/N = tr(ΔW H ΔWᵀ)`` with
``ΔW = W − Q(W diag(s)) diag(s)⁻¹``, and a group's partial output error is
``Δ_g H_gg Δ_gᵀ`` (``H_gg`` the diagonal block of the group).  So the model walk uses the
float64-accumulated ``H`` and ``absmean`` of :class:`~mixq.calib.stats.LayerStats` over *all*
calibration tokens — the same objective as capturing ``X``, with no token subsample and no
``[N, in]`` buffers.  :func:`awq_search_scale` / :func:`awq_clip` take ``X`` for convenience.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .. import formats
from ..arch import arch_for, block_linears, get_weight, set_weight
from ..calib.capture import walk_blocks
from ..config import QuantSpec
from ..formats import QTensor
from ..granularity import PerChannel, PerGroup
from .gptq import gptq_quantize
from .rtn import rtn_quantize
from .transforms import fold_scale, head_dim_of, input_rotation, kv_expand, kv_reduce, kv_repeat

log = logging.getLogger(__name__)

THEN = ("rtn", "gptq", None)


def _hessian(X: torch.Tensor) -> torch.Tensor:
    X = X.reshape(-1, X.shape[-1]).to(torch.float64)
    return (X.T @ X / max(X.shape[0], 1)).to(torch.float32)


def _out_err(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)``: mean squared output error × out_features."""
    D = W.to(torch.float32) - Wq.to(torch.float32)
    return float(((D @ H) * D).sum())


@torch.no_grad()
def awq_search_scale_h(H: torch.Tensor, a: torch.Tensor, weights: Sequence[torch.Tensor],
                       spec: QuantSpec | Sequence[QuantSpec], n_grid: int = 20,
                       *, kv: tuple[int, int] | None = None) -> tuple[torch.Tensor, float, float]:
    """AWQ scale search from ``H [in, in]`` and ``a [in]`` (mean |x|); see the module docstring.

    ``weights``: the group's ``[out_k, in]`` matrices; ``spec``: one for all or one per weight.
    ``kv=(n_rep, head_dim)``: a GQA ``v → o`` group; ``a`` is averaged over the repeated heads and
    ``s`` is shared by them (:func:`~mixq.algorithms.transforms.kv_expand`).
    Returns ``(s [in] float32, α, error)`` with ``error = Σ_k tr(ΔW_k H ΔW_kᵀ)`` at ``α``.
    """
    specs = [spec] * len(weights) if isinstance(spec, QuantSpec) else list(spec)
    if len(specs) != len(weights) or not weights:
        raise ValueError(f"awq_search_scale: {len(weights)} weights but {len(specs)} specs")
    H = H.to(torch.float32)
    Ws = [W.to(H.device, torch.float32) for W in weights]
    base = a.to(H.device, torch.float32).abs()
    if kv is not None:
        base = kv_reduce(base, *kv, how="mean")
    best = (float("inf"), torch.ones_like(a, dtype=torch.float32), 0.0)
    for i in range(n_grid + 1):
        alpha = i / n_grid
        s = base.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if kv is not None:
            s = kv_expand(s, *kv)
        err = sum(_out_err(W, formats.fake_quantize(W * s, sp) / s, H) for W, sp in zip(Ws, specs))
        if err < best[0]:
            best = (err, s, alpha)
    return best[1].cpu(), best[2], best[0]


def awq_search_scale(X: torch.Tensor, weights: Sequence[torch.Tensor], spec: QuantSpec | Sequence[QuantSpec],
                     n_grid: int = 20, *, kv: tuple[int, int] | None = None) -> tuple[torch.Tensor, float, float]:
    """:func:`awq_search_scale_h` from the group input ``X [..., in]``; error as ``Σ_k ‖ΔY_k‖²/N``."""
    X = X.reshape(-1, X.shape[-1])
    return awq_search_scale_h(_hessian(X), X.abs().mean(0), weights, spec, n_grid, kv=kv)


def _clip_group_len(spec: QuantSpec, cols: int) -> int | None:
    g = spec.granularity
    if isinstance(g, PerGroup):
        return g.size
    return cols if isinstance(g, PerChannel) else None


@torch.no_grad()
def awq_clip_h(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, n_grid: int = 20,
               max_shrink: float = 0.5) -> torch.Tensor:
    """AWQ ``auto_clip``: clamp each (row, group) of ``W [out, in]`` to ``±r·max|w|`` with the ``r``
    minimising ``Δ H_gg Δᵀ``, ``Δ = w − Q(clamp(w))``, ``r ∈ {1 − i/n_grid : i < max_shrink·n_grid}``.

    Needs groups along the input (per-group or per-channel specs); other specs, keep dtypes: ``W``
    unchanged.  Returns the clipped float32 weight.
    """
    W = W.to(torch.float32)
    out_f, in_f = W.shape
    glen = _clip_group_len(spec, in_f)
    if spec.is_float_keep or glen is None:
        return W.clone()
    ng = in_f // glen
    Hb = torch.stack([H[j * glen:(j + 1) * glen, j * glen:(j + 1) * glen] for j in range(ng)]).to(W)
    Wg = W.reshape(out_f, ng, glen)
    wmax = Wg.abs().amax(-1, keepdim=True)
    best_err = torch.full((out_f, ng), float("inf"), device=W.device)
    best = Wg.clone()
    for i in range(max(1, int(max_shrink * n_grid))):
        m = wmax * (1.0 - i / n_grid)
        Wc = torch.maximum(torch.minimum(Wg, m), -m)
        D = Wg - formats.fake_quantize(Wc.reshape(out_f, in_f), spec).reshape(out_f, ng, glen)
        err = torch.einsum("ojk,jkl,ojl->oj", D, Hb, D)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[..., None], Wc, best)
    return best.reshape(out_f, in_f)


def awq_clip(W: torch.Tensor, X: torch.Tensor, spec: QuantSpec, **kw) -> torch.Tensor:
    """:func:`awq_clip_h` from the layer input ``X [..., in]``."""
    return awq_clip_h(W, _hessian(X), spec, **kw)


@dataclass
class AWQResult:
    """Stored form and output error (``tr(ΔW H ΔWᵀ)``, scaled basis) of every quantized block linear,
    and the chosen ``α`` and error per scaled group (key ``"<blocks>.<i>.<prev>"``)."""

    qtensors: dict[str, QTensor] = field(default_factory=dict)
    proxy_loss: dict[str, float] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    group_loss: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def apply_awq(model: nn.Module, calib_ids: torch.Tensor, specs: dict[str, QuantSpec], *,
              then: str | None = "rtn", n_grid: int = 20, clip: bool = True, device="cpu",
              damp: float = 0.01, act_order: bool = False, block_size: int = 128,
              source=None, progress: bool = True) -> AWQResult:
    """Scale (and clip) every block linear named in ``specs``, then quantize it with ``then``.

    Walks the decoder block by block (:func:`~mixq.calib.capture.walk_blocks`, sequential: each
    block is calibrated on the quantized outputs of the previous one).  Per block: search and
    fold all groups' scales on the fp weights, then clip and quantize each linear — RTN, or GPTQ
    with ``H_s = diag(s)⁻¹ H diag(s)⁻¹``, the Hessian of the scaled inputs.  ``then=None``
    only folds the scales (and clips).  Groups with no ``prev`` are not scaled (logged).
    Layers outside the blocks (lm_head, embeddings) are left to the caller.  ``source``: a
    :class:`~mixq.calib.capture.BlockSource` (where blocks live between visits).
    """
    if then not in THEN:
        raise ValueError(f"apply_awq: then must be one of {THEN}, got {then!r}")
    arch = arch_for(model)
    hd = head_dim_of(model)
    res = AWQResult()
    if not arch.input_groups:
        log.warning("%s has no input groups in mixq.arch_table.ARCH_TABLE: AWQ scaling skipped", type(model).__name__)

    def on_block(i: int, block: nn.Module, stats) -> None:
        pre = f"{arch.blocks}.{i}"
        scales: dict[str, torch.Tensor] = {}
        for g in arch.input_groups:
            names = [n for n in g.linears if f"{pre}.{n}" in specs]
            if not names:
                continue
            st = stats[g.linears[0]]
            if g.prev is None:
                log.info("%s.%s: no prev op to fold a scale into; AWQ scaling skipped", pre, g.linears[0])
                continue
            rotated = input_rotation(block.get_submodule(g.linears[0])) is not None
            n_rep = 1 if rotated else kv_repeat(block, g)
            kv = (n_rep, hd) if n_rep > 1 else None
            Ws = [get_weight(block.get_submodule(n)) for n in names]
            s, alpha, err = awq_search_scale_h(st.H.to(Ws[0].device), st.absmean, Ws,
                                               [specs[f"{pre}.{n}"] for n in names], n_grid, kv=kv)
            fold_scale(block, g, s, norm_offset=arch.norm_offset, head_dim=hd)
            res.alphas[f"{pre}.{g.prev}"], res.group_loss[f"{pre}.{g.prev}"] = alpha, err
            scales.update({n: s for n in g.linears})
        for name, mod in block_linears(block, arch).items():
            fqn = f"{pre}.{name}"
            if fqn not in specs:
                continue
            s = scales.get(name)
            H = stats[name].H.to(get_weight(mod).device)
            if s is not None:
                s = s.to(H.device)
                H = H / (s[:, None] * s[None, :])
            W = get_weight(mod).to(torch.float32)
            Wc = awq_clip_h(W, H, specs[fqn], n_grid=n_grid) if clip else W
            if then is None:
                set_weight(mod, Wc)
                continue
            if then == "rtn":
                qt, Wq = rtn_quantize(Wc, specs[fqn])
            else:
                r = gptq_quantize(Wc, H, specs[fqn], damp=damp, act_order=act_order, block_size=block_size)
                qt, Wq = r.qtensor, r.weight
            set_weight(mod, Wq)
            res.qtensors[fqn], res.proxy_loss[fqn] = qt, _out_err(W, Wq, H)

    walk_blocks(model, calib_ids, on_block, device=device, source=source, progress=progress)
    return res
