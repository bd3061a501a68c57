"""Trellis-coded bases (``TCQ<rate>-GRAN``, meant for ``+ip``): RTN and GPTQ/LDLQ with the Viterbi search
(:mod:`mixq.algorithms.composite.tcq_search`) through the trellis of :mod:`mixq.formats.composite.tcq_codebook`.

Each **column** ``j`` of ``W [R, C]`` is one trellis sequence, top row first: its ``R`` weights divided by their
row's group scale are the targets, and ``R · rate`` bits encode them (state ``s_t``, value ``lut[s_t]``)::

    ŵ[r, j] = s[r, g(j)] · lut[state_j(r)]                          s fp16, one per row and group

Running the trellis down a column is what makes it exact under GPTQ: the proxy ``tr(ΔW H ΔWᵀ)`` with the
column's error fed forward (LDLQ) is, for one column, ``Σ_r (w_rj - ŵ_rj)²`` times a constant, separable over the
rows, so the Viterbi search over the column (weights ``s_r²``) minimizes exactly what GPTQ's rounding step
minimizes for a scalar grid -- and GPTQ's sweep (:func:`mixq.algorithms.sweep.sweep`) carries the rest.

Rows weighted (``row_weight``, ``+ip1``): the rows of one column share its path, so the search can trade error between
them.  With each row's error weighted by its output-gradient energy ``G_r`` (the K-FAC metric's output factor: what
an error in that row costs the model) the search keeps the rows that matter closer and lets the others go; the
weights are ``G_r ** ROW_WEIGHT_POWER`` at mean 1.  Only the one-sided transform keeps the model's rows (under two
transforms each row of ``W'`` mixes all of them; :mod:`mixq.algorithms.composite.incoherence`).

Scales (``fit_scales``): from each row's RMS over the group (the table is trained for unit variance), then the
least-squares scale on the decoded values, ``SCALE_ITERS`` passes, keeping the pass of least error.  Under GPTQ a
group's scales are fitted when its first column is reached, on the weights as updated so far, through the spec's
own trellis up to ``FIT_STATE_BITS`` state bits: a ``TCQ<rate>L12`` layer's scales are fitted through the 10-bit
trellis (its search is a quarter of the cost) and its codes found at 12.  (Fitting a ``TCQ<rate>L10`` layer's
scales through the 8-bit trellis was tried: within 0.1-0.4 % of the proxy on Gaussian layers; uniform GPTQ
``TCQ3L10-channel+ip`` on SmolLM2 gave KL 0.189 / 0.294 (PTB / fortunes) against 0.182 / 0.289 and 0.191 / 0.290
fitting at L = 10 -- the last two differ only in the search's float rounding, so the fit's effect is inside
run-to-run variation; runs ``g_tcq3_L10*`` of generalization.md.)
Where the native kernel builds, GPTQ's column steps run in it a block at a time (:func:`mixq.algorithms.sweep.sweep_runs`,
:class:`mixq.runtime.kernels.tcq_cpu.SweepSearch`): the same searches and arithmetic as the torch column loop, to the bit.
Cost (:meth:`CompositeSpec.cost`): ``R · C · rate`` bits plus ``R · G`` fp16 scales.  The stored parts
(:class:`~mixq.formats.composite.tcq_storage.TCQQTensor`), their decoding and packing:
:mod:`mixq.formats.composite.tcq_storage`.
"""
from __future__ import annotations

import torch

from ...config import CompositeSpec
from ...formats.composite.scales import group_len, round_scale
from ...formats.composite.tcq_codebook import lut as tcq_lut, schedule
from ...formats.composite.tcq_storage import TCQQTensor, apply_scale, unit_values
from ...runtime.kernels import tcq_cpu
from ..sweep import sweep, sweep_runs
from .tcq_search import viterbi

SCALE_ITERS = 2
FIT_STATE_BITS = 10  # the scale fit's trellis has at most this many state bits (module doc)
# the search weighs row r by G_r ** this (module doc): on SmolLM2 (every layer TCQ+ip1 at one rate, GPTQ, L = 10;
# KL PTB / fortunes) 1 gave 0.1879 / 0.3041 at 3 bits and 0.0520 / 0.0810 at 4, 0.5 gave 0.1880 / 0.2881 and
# 0.0510 / 0.0778 (no weights: 0.2170 / 0.3124 and 0.0606 / 0.0880): G is measured on the calibration text, and
# the square root trusts its spread less where other text moves it
ROW_WEIGHT_POWER = 0.5


def _search_weights(s: torch.Tensor, rw: torch.Tensor | None) -> torch.Tensor:
    """``[R]``: each row's weight in the search of targets ``w / s`` (``s²``, times the row weight ``rw``)."""
    return s * s if rw is None else s * s * rw


def _encode(Wg: torch.Tensor, s: torch.Tensor, rate, table: torch.Tensor, rw: torch.Tensor | None = None):
    """``(bits [n, R], unit values [R, n])`` of the columns of ``Wg [R, n]`` at row scales ``s [R]``; ``rw [R]``:
    each row's weight in the search (ones when None)."""
    X = (Wg / s[:, None]).T.contiguous()
    w = _search_weights(s, rw)[None].expand_as(X).contiguous()
    bits, vals, _ = viterbi(X, w, rate, table)
    return bits, vals.T


def fit_scales(Wg: torch.Tensor, spec: CompositeSpec, table: torch.Tensor, iters: int = SCALE_ITERS,
               rw: torch.Tensor | None = None):
    """``(scale [R], bits [n, R], unit values [R, n])`` of one group ``Wg [R, n]``: the scales (rounded to the scale
    dtype) start at each row's RMS and are refitted by least squares on the decoded values, ``iters`` passes
    in all; the pass of least total squared error is kept with its encoding.  (Rows share a column's trellis path,
    so scales are compared pass against pass, not row by row.)"""
    s = round_scale(Wg.pow(2).mean(1).sqrt(), spec)
    best = None
    for it in range(iters):
        bits, U = _encode(Wg, s, spec.tcq_rate, table, rw)
        d2 = (Wg - U * s[:, None]).pow(2)
        err = float(d2.sum() if rw is None else (d2 * rw[:, None]).sum())
        if best is None or err < best[0]:
            best = (err, s, bits, U)
        if it + 1 < iters:
            s = round_scale((Wg * U).sum(1) / U.pow(2).sum(1).clamp_min(1e-12), spec)
    return best[1], best[2], best[3]


@torch.no_grad()
def quantize_tcq(W: torch.Tensor, spec: CompositeSpec, H: torch.Tensor | None = None, method: str = "rtn", *,
                 damp: float = 0.01, block_size: int = 128, hinv_chol=None, scale_iters: int = SCALE_ITERS,
                 row_weight: torch.Tensor | None = None, **_) -> tuple[TCQQTensor, torch.Tensor]:
    """``(stored parts, Ŵ float32)`` of ``W [R, C]`` under a TCQ spec (RTN, or GPTQ with ``H [C, C]``);
    ``scale_iters``: the scale-fitting passes of each group (:func:`fit_scales`)."""
    if not spec.trellis:
        raise ValueError(f"{spec.name} is not a TCQ spec")
    W0 = W.detach().to(torch.float32).cpu()
    R, C = W0.shape
    spec.cost((R, C))
    table = tcq_lut(spec.tcq_rate, spec.state_bits)
    fit_table = tcq_lut(spec.tcq_rate, min(spec.state_bits, FIT_STATE_BITS))
    glen = group_len(spec, C)
    rw = _row_weight(row_weight, R)
    if method == "gptq":
        if H is None:
            raise ValueError("GPTQ needs the layer's H = XᵀX/N")
        bits, scale, W_hat = _gptq(W0, H.detach().float().cpu(), spec, table, fit_table, glen, damp, block_size,
                                   hinv_chol, scale_iters, rw)
    elif method == "rtn":
        fits = [fit_scales(W0[:, j:j + glen], spec, fit_table, scale_iters, rw) for j in range(0, C, glen)]
        scale = torch.stack([f[0] for f in fits], 1)
        if fit_table.numel() != table.numel():  # fitted through fewer states: the codes at the spec's own
            fits = [(None, *_encode(W0[:, j:j + glen], scale[:, j // glen], spec.tcq_rate, table, rw))
                    for j in range(0, C, glen)]
        bits = torch.cat([f[1] for f in fits], 0)
        W_hat = apply_scale(torch.cat([f[2] for f in fits], 1), scale, glen)
    else:
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    qt = TCQQTensor(spec, (R, C), bits, scale)
    if H is not None:
        dW = (W0 - W_hat).double()
        qt.proxy_loss = float(((dW @ H.double().cpu()) * dW).sum())
    return qt, W_hat


def _row_weight(row_weight, R: int) -> torch.Tensor | None:
    """The search's row weights: ``row_weight`` (``G``) to the power :data:`ROW_WEIGHT_POWER`, at mean 1 (None:
    every row alike)."""
    if row_weight is None:
        return None
    g = torch.as_tensor(row_weight).detach().float().cpu().reshape(-1)
    if g.numel() != R:
        raise ValueError(f"row_weight has {g.numel()} entries for {R} rows")
    g = g.clamp_min(0) ** ROW_WEIGHT_POWER
    m = float(g.mean())
    return None if not m > 0 else (g / m).clamp_min(1e-6)


def _gptq(W0, H, spec, table, fit_table, glen, damp, block_size, hinv_chol, scale_iters, rw):
    from ..gptq import prepare_hessian

    R, C = W0.shape
    Wk = W0.clone()
    dead = torch.diagonal(H) == 0
    Wk[:, dead] = 0.0
    U, _ = hinv_chol if hinv_chol is not None else prepare_hessian(H, damp)
    bits = torch.empty(C, R, dtype=torch.uint8)
    scale = torch.empty(R, C // glen)
    native = tcq_cpu.SweepSearch.make(schedule(spec.tcq_rate, R), table, spec.state_bits)
    if native is not None:  # the same searches and arithmetic as round_column's below, a block's columns a call
        def start(col, w):
            scale[:, col // glen] = fit_scales(w, spec, fit_table, scale_iters, rw)[0]
            s = scale[:, col // glen]
            native.scales(s, _search_weights(s, rw))

        vals = torch.empty(C, R)  # each column's table values (what unit_values(bits) decodes)
        sweep_runs(Wk, U.float(), lambda Wt, Et, Ub, j, jb, i1: native.run(Wt, Et, Ub, j, jb, bits[i1:i1 + len(Wt)],
                                                                           vals[i1:i1 + len(Wt)]),
                   start, group_len=glen, block_size=block_size)
        return bits, scale, apply_scale(vals.T.contiguous(), scale, glen)

    def round_column(col, w, ahead):
        if col % glen == 0:  # a new group: its scales from the weights as updated so far
            scale[:, col // glen] = fit_scales(ahead(glen), spec, fit_table, scale_iters, rw)[0]
        s = scale[:, col // glen]
        b, u = _encode(w[:, None], s, spec.tcq_rate, table, rw)
        bits[col] = b[0]
        return u[:, 0] * s

    sweep(Wk, U.float(), round_column, block_size=block_size)
    return bits, scale, apply_scale(unit_values(bits, spec), scale, glen)
