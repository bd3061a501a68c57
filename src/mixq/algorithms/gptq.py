"""GPTQ: second-order error compensation (Frantar et al., 2023, arXiv:2210.17323).

Minimise the layer-wise output error ``‖X Wᵀ − X Ŵᵀ‖²`` column by column.  With
``H = XᵀX/N`` and its inverse Cholesky factor ``U`` (``H⁻¹ = UᵀU``, upper triangular), column j
is rounded to the grid and the rounding error is spread over the not-yet-quantized columns:

    e_j   = (w_j − q(w_j)) / U_jj
    W_{:,k} -= e_j · U_{j,k}            for k > j           (OBS update, eq. 3 of the paper)

Updates are applied lazily in blocks of ``block_size`` columns.  The grid is any
:mod:`mixq.formats` spec: group parameters are fitted when the walk enters a group (or, with
``act_order``, fitted up front on the original weights — "static groups" — so that group
boundaries stay aligned with the stored layout even though columns are visited in order of
decreasing ``diag(H)``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import formats
from ..config import QuantSpec, family_of
from ..config.families import IntFormat
from ..formats import QParams, QTensor
from ..granularity import PerChannel, PerGroup, PerTensor, PerToken
from ..runtime.kernels.grid_sweep import GridSweep
from .sweep import sweep, sweep_runs

log = logging.getLogger(__name__)


class GPTQError(RuntimeError):
    pass


@dataclass
class GPTQResult:
    qtensor: QTensor          # codes [out, in] in the original column order + group params
    weight: torch.Tensor      # dequantized Ŵ [out, in], float32
    proxy_loss: float         # tr(ΔW H ΔWᵀ) with the undamped H  (= mean squared output error × out)
    damp: float               # relative dampening finally used


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp·mean(diag H)``.

    Retries with ten times more dampening when H is not numerically positive definite.
    Returns ``(U, damp_used)``.
    """
    n = H.shape[0]
    mean_diag = torch.diagonal(H).mean().clamp_min(1e-12)
    d = damp
    for _ in range(max_tries):
        Hd = H.to(torch.float64) + d * mean_diag * torch.eye(n, dtype=torch.float64, device=H.device)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0:
                return U.to(torch.float32), d
        log.warning("Cholesky of H failed with damp=%g; retrying with damp=%g", d, d * 10)
        d *= 10
    raise GPTQError(
        f"H is not positive definite even with dampening {d / 10:g}·mean(diag H): the calibration data "
        f"probably has too few tokens for a {n}-dim layer; use more --nsamples or a larger --damp"
    )


def _live(H: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy of ``H`` in ``dtype`` with the diagonal of dead inputs (never active) set to 1."""
    Hk = H.detach().to(dtype).clone()
    dead = torch.diagonal(Hk) == 0
    Hk[dead, dead] = 1.0
    return Hk


def prepare_hessian(H: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, float]:
    """The ``hinv_chol`` argument of :func:`gptq_quantize` for one layer (natural column order)."""
    return inverse_cholesky(_live(H, torch.float32), damp)


def check_shrink(shrink: float) -> float:
    """``shrink`` if it is a fraction in [0, 1] (see :func:`shrink_hessian`), else ValueError."""
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"hessian shrink must be in [0, 1], got {shrink}")
    return shrink


def shrink_hessian(H: torch.Tensor, shrink: float) -> torch.Tensor:
    """``(1 - shrink) · H + shrink · diag(H)``: the input Gram matrix with its off-diagonal part scaled down.

    GPTQ moves each column's rounding error onto the columns it correlates with *in the calibration text*; where
    another text correlates the inputs otherwise, that compensation misses.  The diagonal (each input's energy,
    what llama.cpp's importance matrix keeps) is kept whole, the correlations trusted by ``1 - shrink``
    (bench/results/generalization.md, "Hessian shrunk toward its diagonal")."""
    if check_shrink(shrink) == 0.0:
        return H
    out = H * (1.0 - shrink)
    out.diagonal().add_(torch.diagonal(H), alpha=shrink)
    return out


def fp_target(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The weight GPTQ should aim at when the layer's inputs drift from the full-precision model's.

    With ``X`` the layer's inputs in the fp model and ``X̃`` those it sees in the model being quantized (token
    rows), the least-squares weight for ``‖X Wᵀ - X̃ Ŵᵀ‖²`` is ``W* = W + W D H⁻¹`` (``H = X̃ᵀX̃ / N``,
    ``D = (X - X̃)ᵀ X̃ / N``), and that loss is ``‖X Wᵀ - X̃ W*ᵀ‖² + tr((W* - Ŵ) H (W* - Ŵ)ᵀ) N``: GPTQ on ``W*``
    with ``H`` minimises it (the asymmetric calibration of GPTAQ, Li et al. 2025).  ``H`` is damped by
    ``damp · mean(diag H)`` for the solve, so ``W* = W`` where the inputs do not drift."""
    Hd = _live(H, torch.float64)
    Hd.diagonal().add_(damp * float(torch.diagonal(Hd).mean()))
    WD = W.to(torch.float64) @ D.to(torch.float64)                  # [out, in]
    corr = torch.linalg.solve(Hd, WD.T).T                           # W D H⁻¹ (H symmetric)
    return (W.to(torch.float64) + corr).to(W.dtype)


def _group_len(spec: QuantSpec, cols: int) -> int:
    g = spec.granularity
    if isinstance(g, PerGroup):
        if cols % g.size:
            raise ValueError(f"group size {g.size} does not divide {cols} input columns")
        return g.size
    return cols


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    hinv_chol: tuple[torch.Tensor, float] | None = None,
) -> GPTQResult:
    """Quantize ``W [out, in]`` against ``H [in, in]`` (``XᵀX/N``) on the grid of ``spec``.

    Returns the codes and parameters in the storage layout of :func:`mixq.formats.quantize`, the
    dequantized weight and the proxy loss ``tr(ΔW H ΔWᵀ)``.
    ``hinv_chol``: ``inverse_cholesky(H', damp)`` of the dead-column-fixed H, to reuse across many
    specs of one layer (measurement); only without ``act_order``.  See :func:`prepare_hessian`.
    """
    if spec.is_float_keep:
        Wq = formats.fake_quantize(W, spec).float()
        return GPTQResult(formats.quantize(W, spec), Wq, _proxy(W.float() - Wq, H), 0.0)
    if isinstance(spec.granularity, PerToken):
        raise ValueError("per-token granularity is for activations; weights use channel, group or tensor")
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({in_f}, {in_f}) for W of shape {tuple(W.shape)}")
    W0 = W.detach().to(torch.float32)
    Wk = W0.clone()
    Hk = H.detach().to(torch.float32).clone()
    dead = torch.diagonal(Hk) == 0
    Hk[dead, dead] = 1.0
    Wk[:, dead] = 0.0

    glen = _group_len(spec, in_f)
    n_grp = in_f // glen
    tscale = formats.compute_tensor_scale(W0, spec)
    per_tensor = isinstance(spec.granularity, PerTensor)
    # formats whose fit weighs elements by importance (llama.cpp's types, as with an imatrix) get diag(H)
    imp = torch.diagonal(Hk).clone() if family_of(spec).importance_fit else None
    params: list[QParams | None] = [None] * n_grp
    if per_tensor:
        params = [formats.fit(W0.reshape(1, -1), spec, tensor_scale=tscale)]
    elif act_order or isinstance(spec.granularity, PerChannel):
        # static groups: parameters from the original weights, in storage order
        params = [formats.fit(W0[:, j * glen : (j + 1) * glen], spec, tensor_scale=tscale,
                              weight=None if imp is None else imp[None, j * glen : (j + 1) * glen])
                  for j in range(n_grp)]

    perm = torch.argsort(torch.diagonal(Hk), descending=True) if act_order else torch.arange(in_f)
    Wk = Wk[:, perm]
    Hk = Hk[perm][:, perm]
    if hinv_chol is not None and not act_order:
        U, damp_used = hinv_chol
    else:
        U, damp_used = inverse_cholesky(Hk, damp)

    def group_params(col: int, w: torch.Tensor) -> QParams:
        """The params of the group that column ``col`` (natural order) opens, fit on its current weights ``w``
        when the group has none yet (entering a group in natural order: fit on the updated weights)."""
        g = 0 if per_tensor else col // glen
        if params[g] is None:
            params[g] = formats.fit(w, spec, tensor_scale=tscale,
                                    weight=None if imp is None else imp[None, col : col + glen])
        return params[g]

    native = None
    if (not (act_order or per_tensor or spec.tensor_scale or imp is not None) and U.dtype == torch.float32
            and isinstance(family_of(spec), IntFormat)):  # int grids: the native sweep (mixq.runtime.kernels.grid_sweep)
        native = GridSweep.make(spec.bits, spec.symmetric, out_f)
    if native is not None:  # the same rounding and arithmetic as round_column's below, a block's columns a call
        codes_t, Q_t = torch.empty(in_f, out_f, dtype=torch.uint8), torch.empty(in_f, out_f)
        sweep_runs(Wk, U, lambda Wt, Et, Ub, j, jb, i1: native.run(Wt, Et, Ub, j, jb, codes_t[i1:i1 + len(Wt)],
                                                                  Q_t[i1:i1 + len(Wt)]),
                   lambda col, w: native.params(group_params(col, w)), group_len=glen, block_size=block_size)
        codes, Q = codes_t.T.contiguous(), Q_t.T.contiguous()  # perm is the identity here
    else:
        codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
        Q = torch.zeros_like(Wk)

        def round_column(i, w, ahead):
            """Column ``i`` of the sweep to its group's grid.  A group's params are fit when the sweep enters it (a
            K-quant super-block: all its sub-block scales at once, before its columns are swept); each column then
            uses its own part of them (:func:`mixq.formats.column_params`)."""
            col = int(perm[i])
            g = 0 if per_tensor else col // glen
            pc = group_params(col, ahead(glen)) if params[g] is None else params[g]
            pc = pc if per_tensor else formats.column_params(pc, spec, col - g * glen)
            c = formats.encode(w[:, None], pc, spec)[:, 0]
            q = formats.decode(c[:, None], pc, spec)[:, 0]
            codes[:, col] = c
            Q[:, i] = q
            return q

        sweep(Wk, U, round_column, block_size=block_size)

    Wq = torch.empty_like(Q)
    Wq[:, perm] = Q
    qt = QTensor(codes=codes, params=_stack_params(params, out_f, per_tensor), spec=spec, shape=(out_f, in_f))
    return GPTQResult(qt, Wq, _proxy(W0 - Wq, H), damp_used)


def _proxy(dW: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)`` in float64."""
    d = dW.to(torch.float64)
    return float(((d @ H.to(torch.float64)) * d).sum())


def _stack_params(params: list[QParams], out_f: int, per_tensor: bool) -> QParams:
    """Interleave per-group params ``[out, 1]`` into the ``[out * n_groups, ...]`` row layout."""
    if per_tensor:
        return params[0]

    def cat(field: str):
        ts = [getattr(p, field) for p in params]
        if ts[0] is None:
            return None
        t = torch.stack(ts, 1)  # [out, n_groups, k]
        return t.reshape(out_f * len(params), -1)

    return QParams(scale=cat("scale"), zero=cat("zero"), offset=cat("offset"), codebook=cat("codebook"),
                   tensor_scale=params[0].tensor_scale)
