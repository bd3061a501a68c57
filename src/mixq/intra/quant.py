"""Quantize a weight with a :class:`~mixq.config.CompositeSpec`, by RTN or GPTQ.

:func:`quantize_composite` ``(W, spec, H=None, method="rtn"|"gptq")`` returns the stored parts
(:class:`CompositeQTensor`) and ``Ŵ``.  Steps, for ``W [R, C]`` (``H = XᵀX/N``, damped as GPTQ does):

1. **fp16 columns** (``+cK``, OWQ): input column j's sensitivity is ``s_j = H_jj · ‖W_:j − Q(W)_:j‖²``
   (OWQ's weak-column score, ``Q`` = RTN on the base grid; ``H_jj = 1`` without ``H``); the K largest
   are kept in fp16.  The dense part is the other ``n = C − K`` columns, in their natural order,
   grouped in ``gN`` group columns (the last one may be partial).
2. **Outliers** (``+oP``): the ``K_o`` weights with the largest quantization damage ``d_ij (w_ij − q(w_ij))²``
   are kept in fp16 (CSR).  ``d_ij`` is the OBS weight of the coordinate: ``1 / [H⁻¹]_jj`` for GPTQ
   (the loss increase of quantizing that one weight with the others free to compensate, as SpQR),
   ``diag(H)_j`` (or the Fisher ``F_ij`` when given) for RTN, 1 without statistics.  The set is refined
   (up to 3 rounds) by refitting the groups with the current outliers excluded, so that the grid is
   not stretched by what is stored apart.
3. **SliM bits** (``SLIM``): group columns are ranked by salience ``Σ d_ij w_ij²``; the top k take
   b+1 bits and the bottom k b−1 (so the mean is exactly b), with k chosen to minimise the summed
   ``d``-weighted RTN error (k = 0 is a candidate, so SLIM never predicts worse than its base).
4. **Dense part**: each group is fitted with the outliers excluded (they are replaced by the mean of the
   group's other weights, which moves no min/max, and weighted 0 by k-means and ``-mse`` clipping);
   k-means codebooks (``KM``, SqueezeLLM) are fitted with weights ``diag(H)`` (or ``F``).  With ``+sq``
   each group column's scales (and fp16 offsets) are quantized along the rows, ``sq_group`` at a
   time, to ``sq_bits`` with an fp16 scale and offset per second-level group (SpQR), and the codes are
   encoded against the quantized scales.
   With ``+dD`` each group takes its fp16 absmax scale and the least-error table of the dialect
   formatbook (:mod:`mixq.intra.dialects`), decoded as a per-row codebook ``scale · T_d``.
   RTN encodes every group directly.  GPTQ visits the dense columns in order and the fp16 columns
   last; a kept value (outlier or fp16 column) is fixed to its *current* (already compensated)
   value rounded to fp16 and, like every other column, its rounding error is spread over the columns
   not yet visited (``W_:,k −= e_j U_jk``) -- so the fp16 columns absorb compensation, as in OWQ.

``+h`` specs (MixLLM high-precision output rows) take a separate path: :mod:`mixq.intra.rows`;
``BIN`` bases (BiLLM / PB-LLM binarization) another: :mod:`mixq.intra.binary`.

Everything stored is exactly what :meth:`CompositeSpec.cost` counts; :meth:`CompositeQTensor.stored_bits`
recounts it from the tensors themselves and :meth:`CompositeQTensor.dequantize` rebuilds ``Ŵ`` bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .. import formats
from ..algorithms.gptq import _one_thread, _proxy, inverse_cholesky
from ..config import SCALE_BITS, BitCost, QuantSpec, parse_spec
from ..config.composite import FP16_BITS, SLIM_MAP_BITS, CompositeSpec, index_bits
from ..formats import QParams, lut
from ..granularity import PerChannel
from .binary import quantize_binary
from .vq import quantize_vq
from .importance import importances
from .dialects import dialect_codebook, fit_dialects
from .rows import quantize_rows
from .sparse import CSR

OUTLIER_ROUNDS = 4
SELECT_KMEANS_ITERS = 8  # Lloyd iterations of the k-means fits that only rank outlier candidates
SCALE_FLOOR = 2.0**-24  # a second-level-decoded scale never reaches 0


@dataclass
class CompositeQTensor:
    """The stored parts of one ``[R, C]`` weight quantized with a composite spec.

    codes        uint8 ``[R, n]``: the dense columns (all but ``fp16_cols``, natural order)
    params       per group column ``j``, rows ``[R, ...]`` (``QParams`` of the base format); with
                 ``+sq`` the scales / offsets are those decoded from ``l2``, which is what is stored
    group_bits   bits of each group column (SLIM: b-1, b or b+1; stored as a 2-bit map)
    fp16_cols    int64 ``[K_c]`` ascending input columns kept in fp16, values float16 ``[R, K_c]``
    sparse       :class:`CSR` outliers (original column indices) or None
    l2           ``+sq``: per group column ``{"scale": (codes uint8 [R], QParams [ceil(R/m), 1]),
                 "offset": ...}`` (second-level int grid with fp16 scale and offset per m rows)
    """

    spec: CompositeSpec
    shape: tuple[int, int]
    codes: torch.Tensor
    params: list[QParams]
    group_bits: tuple[int, ...]
    fp16_cols: torch.Tensor
    fp16_values: torch.Tensor
    sparse: CSR | None = None
    l2: list[dict] | None = None
    proxy_loss: float | None = None

    def cost(self) -> BitCost:
        return self.spec.cost(self.shape)

    def group_params(self, j: int) -> QParams:
        """The parameters group column ``j`` decodes with (from the second-level codes under ``+sq``)."""
        p = self.params[j]
        if self.spec.dialects:  # the codebook is derived from the stored scale and dialect index
            return QParams(scale=p.scale, zero=p.zero, codebook=dialect_codebook(p.scale, p.zero, self.spec))
        if self.l2 is None:
            return p
        return _l2_params(p, self.l2[j], self.spec, self.shape[0])

    def dequantize(self) -> torch.Tensor:
        """float32 ``[R, C]`` from the stored parts alone."""
        R, C = self.shape
        n, bounds = self.spec.layout(self.shape)
        dense = _dense_cols(C, self.fp16_cols)
        Qd = torch.empty(R, n)
        for j, (s, e) in enumerate(bounds):
            sp = _group_spec(self.spec, self.group_bits[j])
            Qd[:, s:e] = formats.decode(self.codes[:, s:e], self.group_params(j), sp)
        W = torch.zeros(R, C)
        W[:, dense] = Qd
        W[:, self.fp16_cols] = self.fp16_values.float()
        if self.sparse is not None:
            self.sparse.apply(W)
        return W

    def stored_bits(self) -> int:
        """Bits counted from the stored tensors themselves (must equal ``cost().total``)."""
        R, C = self.shape
        cs = self.spec
        n, bounds = cs.layout(self.shape)
        if tuple(self.codes.shape) != (R, n) or len(self.params) != len(bounds) or len(self.group_bits) != len(bounds):
            raise ValueError("stored parts do not match the spec's layout")
        bits = 0
        for j, (s, e) in enumerate(bounds):
            bj = self.group_bits[j]
            if int(self.codes[:, s:e].max()) >= 2**bj:
                raise ValueError(f"group column {j} has codes wider than {bj} bits")
            bits += R * (e - s) * bj
            p = self.params[j]
            if self.l2 is not None:
                for c2, p2 in self.l2[j].values():
                    bits += c2.numel() * cs.sq_bits + (p2.scale.numel() + p2.offset.numel()) * FP16_BITS
            else:
                bits += p.scale.numel() * SCALE_BITS[cs.scale_dtype] if p.scale is not None else 0
                bits += p.offset.numel() * FP16_BITS if p.offset is not None else 0
            if cs.dialects:  # zero holds the dialect index, the codebook is derived
                bits += p.zero.numel() * cs.dialect_bits
                continue
            bits += p.zero.numel() * bj if p.zero is not None else 0
            bits += p.codebook.numel() * FP16_BITS if p.codebook is not None else 0
        if self.params and self.params[0].tensor_scale is not None:
            bits += 32
        bits += self.fp16_values.numel() * FP16_BITS + self.fp16_cols.numel() * index_bits(C)
        if self.sparse is not None:
            bits += self.sparse.bits()
        if cs.slim:
            bits += len(bounds) * SLIM_MAP_BITS
        return bits


# ---------------------------------------------------------------------- entry point
@torch.no_grad()
def quantize_composite(W: torch.Tensor, spec: CompositeSpec | str, H: torch.Tensor | None = None,
                       method: str = "rtn", *, fisher: torch.Tensor | None = None, damp: float = 0.01,
                       block_size: int = 128, hinv_chol: tuple[torch.Tensor, float] | None = None,
                       row_weight: torch.Tensor | None = None) -> tuple[CompositeQTensor, torch.Tensor]:
    """Quantize ``W [R, C]`` with a composite spec (steps in the module docstring).

    H          ``[C, C]`` input second moment ``XᵀX/N``; needed by GPTQ, optional for RTN (then it
               weights the outlier / column / SLIM choices and the k-means fit by ``diag(H)``)
    fisher     optional ``[R, C]`` diagonal Fisher: the RTN importance instead of ``diag(H)`` (SqueezeLLM)
    hinv_chol  :func:`mixq.algorithms.gptq.prepare_hessian` of ``H`` to reuse across specs (natural order)
    row_weight optional ``[R]`` output-gradient energy ``G``: weights the choice of ``+h`` rows
    Returns ``(stored parts, Ŵ float32)``; for ``+h`` specs the parts are a :class:`~mixq.intra.rows.RowSplitQTensor`,
    for ``BIN`` bases a :class:`~mixq.intra.binary.BinaryQTensor`.
    """
    spec = parse_spec(spec)
    if not isinstance(spec, CompositeSpec):
        raise ValueError(f"{spec.name} is not a composite spec: use rtn_quantize / gptq_quantize")
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(W.shape)}")
    W0 = W.detach().to(torch.float32).cpu()
    R, C = W0.shape
    spec.cost((R, C))  # validates the shape (group size, column / outlier counts)
    n, bounds = spec.layout((R, C))
    if method == "gptq" and H is None:
        raise ValueError("GPTQ needs the layer's H = XᵀX/N")
    if H is not None and tuple(H.shape) != (C, C):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({C}, {C})")
    if fisher is not None and tuple(fisher.shape) != (R, C):
        raise ValueError(f"fisher has shape {tuple(fisher.shape)}, expected ({R}, {C})")

    if spec.vq_dim:  # vector codebooks (mixq.intra.vq)
        return quantize_vq(W0, spec, H, method, damp=damp, block_size=block_size, hinv_chol=hinv_chol)
    if spec.binary:  # BiLLM / PB-LLM binarization (mixq.intra.binary)
        return quantize_binary(W0, spec, None if H is None else H.detach().float().cpu(), method, fisher=fisher,
                               damp=damp, block_size=block_size, hinv_chol=hinv_chol)
    if spec.hi_rows:
        qt, W_hat = quantize_rows(W0, spec, None if H is None else H.detach().float().cpu(), method,
                                  row_weight=row_weight, damp=damp, block_size=block_size, hinv_chol=hinv_chol)
        if H is not None:
            qt.proxy_loss = _proxy(W0 - W_hat, H.detach().float().cpu())
        return qt, W_hat
    W0, Hf, Hfix, fit_imp, score_imp, U_nat = importances(W0, H, method, fisher, damp, hinv_chol)
    base = spec.base

    # 1. fp16 input columns (OWQ)
    if spec.columns:
        E2 = (W0 - formats.fake_quantize(W0, base)) ** 2
        colscore = (E2 * (torch.diagonal(Hf)[None] if Hf is not None else 1.0)).sum(0)
        fp16_cols = torch.topk(colscore, spec.columns).indices.sort().values
    else:
        fp16_cols = torch.zeros(0, dtype=torch.long)
    dense = _dense_cols(C, fp16_cols)
    Wd = W0[:, dense]
    imp_d = None if fit_imp is None else fit_imp[:, dense]
    sc_d = None if score_imp is None else score_imp[:, dense]

    # 2. outliers, 3. SliM bits
    mask = _select_outliers(Wd, spec.n_outliers((R, C)), bounds, spec, sc_d, imp_d)
    bits = _slim_bits(Wd, mask, bounds, spec, sc_d, imp_d) if spec.slim else (base.bits,) * len(bounds)
    ts = formats.compute_tensor_scale(Wd.masked_fill(mask, 0.0), base)

    # 4. dense part
    if method == "rtn":
        codes, params, l2, Qd = _rtn_dense(Wd, mask, bounds, spec, bits, imp_d, ts)
        Qd = torch.where(mask, Wd.half().float(), Qd)
        fp16_values = W0[:, fp16_cols].half()
    else:
        perm = torch.cat([dense, fp16_cols])
        if spec.columns:
            U, _ = inverse_cholesky(Hfix[perm][:, perm], damp)
        else:
            U = U_nat
        codes, params, l2, Qp = _gptq(W0[:, perm], U, n, bounds, spec, bits, mask, imp_d, ts, block_size)
        Qd, fp16_values = Qp[:, :n], Qp[:, n:].half()
    W_hat = torch.empty(R, C)
    W_hat[:, dense] = Qd
    W_hat[:, fp16_cols] = fp16_values.float()
    sparse = None
    if spec.outliers:
        full = torch.zeros(R, C, dtype=torch.bool)
        full[:, dense] = mask
        sparse = CSR.from_mask(W_hat, full)
    qt = CompositeQTensor(spec, (R, C), codes, params, tuple(bits), fp16_cols, fp16_values, sparse,
                          l2 if spec.sq_bits else None)
    if Hf is not None:
        qt.proxy_loss = _proxy(W.detach().float().cpu() - W_hat, Hf)
    return qt, W_hat


def dequantize_composite(qt: CompositeQTensor) -> torch.Tensor:
    return qt.dequantize()


# ---------------------------------------------------------------------- helpers
def _dense_cols(C: int, fp16_cols: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(C, dtype=torch.bool)
    keep[fp16_cols] = False
    return keep.nonzero().flatten()


def _group_spec(cs: CompositeSpec, bits: int) -> QuantSpec:
    b = cs.base
    if cs.dialects:  # decoded through a per-row codebook: scale * table[dialect]
        return QuantSpec(dtype="kmeans", bits=bits, granularity=PerChannel(), scale_dtype="none")
    if bits == b.bits:
        return b
    if bits == 1 and not b.symmetric and b.clip == "mse":
        # mixq.formats cannot fit W1-asym-mse (its binary L2 candidate has no zero point): minmax there
        return replace(b, bits=1, clip="minmax")
    return replace(b, bits=bits)


def _fit_rows(x, mask, spec_j: QuantSpec, imp, ts, kmeans_iters: int = lut.KMEANS_ITERS, cs=None) -> QParams:
    """Params of rows ``x [N, g]`` with the ``mask``ed weights excluded: they are replaced by the mean of
    the row's other weights (which moves no min / max) and weighted 0 (k-means, ``-mse`` clipping)."""
    w = imp
    if mask is not None and bool(mask.any()):
        keep = ~mask
        mean = (x * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
        x = torch.where(mask, mean, x)
        w = (torch.ones(1, x.shape[1]) if w is None else w).expand_as(x) * keep
    if cs is not None and cs.dialects:
        return fit_dialects(x, cs, w)
    if spec_j.dtype == "kmeans":
        return lut.fit_kmeans(x, spec_j, w, iters=kmeans_iters)
    return formats.fit(x, spec_j, weight=w if spec_j.clip == "mse" else None, tensor_scale=ts)


def _second_level(p: QParams, cs: CompositeSpec) -> tuple[QParams, dict | None]:
    """``+sq``: quantize one group column's scales (and fp16 offsets) along the rows."""
    if not cs.sq_bits:
        return p, None
    l2 = {"scale": _l2_quantize(p.scale, cs)}
    if p.offset is not None:
        l2["offset"] = _l2_quantize(p.offset, cs)
    return _l2_params(p, l2, cs, p.scale.shape[0]), l2


def _fit_group(span, mask, spec_j: QuantSpec, imp, ts, cs: CompositeSpec, kmeans_iters: int = lut.KMEANS_ITERS):
    """Params of one group column ``span [R, g]`` (outliers excluded, + second level)."""
    return _second_level(_fit_rows(span, mask, spec_j, imp, ts, kmeans_iters, cs), cs)


def _l2_spec(cs: CompositeSpec) -> QuantSpec:
    return QuantSpec(dtype="int", bits=cs.sq_bits, granularity=PerChannel(), symmetric=False, zero_dtype="fp16")


def _l2_quantize(v: torch.Tensor, cs: CompositeSpec) -> tuple[torch.Tensor, QParams]:
    """Second-level grid of a ``[R, 1]`` statistic: rows in chunks of ``sq_group`` (last one padded by
    repeating its final value), ``sq_bits`` codes with an fp16 scale and offset per chunk."""
    m, R = cs.sq_group, v.shape[0]
    nc = -(-R // m)
    x = v[:, 0]
    if nc * m > R:
        x = torch.cat([x, x[-1:].expand(nc * m - R)])
    rows = x.reshape(nc, m)
    sp = _l2_spec(cs)
    p2 = formats.fit(rows, sp)
    return formats.encode(rows, p2, sp).reshape(-1)[:R].contiguous(), p2


def _l2_decode(codes: torch.Tensor, p2: QParams, cs: CompositeSpec) -> torch.Tensor:
    m, R = cs.sq_group, codes.shape[0]
    nc = p2.offset.shape[0]
    c = torch.zeros(nc * m, dtype=torch.uint8)
    c[:R] = codes
    return formats.decode(c.reshape(nc, m), p2, _l2_spec(cs)).reshape(-1)[:R, None]


def _l2_params(p: QParams, l2: dict, cs: CompositeSpec, R: int) -> QParams:
    scale = _l2_decode(*l2["scale"], cs).clamp(min=SCALE_FLOOR)
    offset = _l2_decode(*l2["offset"], cs) if "offset" in l2 else None
    return QParams(scale=scale, zero=p.zero, offset=offset, codebook=p.codebook, tensor_scale=p.tensor_scale)


def _rtn_dense(Wd, mask, bounds, cs, bits, imp, ts, kmeans_iters: int = lut.KMEANS_ITERS):
    """RTN of the dense part; returns ``(codes, params, l2, Q)``.  Group columns of equal length and
    bits are fitted together as one batch of rows (row ``r * J + jj`` = row r of the batch's jj-th)."""
    R, n = Wd.shape
    codes = torch.empty(R, n, dtype=torch.uint8)
    Q = torch.empty(R, n)
    G = len(bounds)
    params: list = [None] * G
    l2s: list = [None] * G
    batches: dict[tuple[int, int], list[int]] = {}
    for j, (s, e) in enumerate(bounds):
        batches.setdefault((e - s, bits[j]), []).append(j)
    for (L, b), js in batches.items():
        sp = _group_spec(cs, b)
        J = len(js)
        idx = torch.cat([torch.arange(bounds[j][0], bounds[j][1]) for j in js])
        x = Wd[:, idx].reshape(R * J, L)
        m = None if mask is None else mask[:, idx].reshape(R * J, L)
        w = None if imp is None else imp[:, idx].expand(R, -1).reshape(R * J, L)
        p = _fit_rows(x, m, sp, w, ts, kmeans_iters, cs)
        parts = [p.select(slice(jj, None, J)) for jj in range(J)]
        if cs.sq_bits:
            done = [_second_level(pj, cs) for pj in parts]
            parts = [d[0] for d in done]
            for jj, j in enumerate(js):
                l2s[j] = done[jj][1]
            p = _interleave(parts, p.tensor_scale)
        for jj, j in enumerate(js):
            params[j] = parts[jj]
        c = formats.encode(x, p, sp)
        codes[:, idx] = c.reshape(R, -1)
        Q[:, idx] = formats.decode(c, p, sp).reshape(R, -1)
    return codes, params, l2s, Q


def _interleave(parts: list[QParams], tensor_scale) -> QParams:
    """Inverse of ``p.select(slice(jj, None, J))`` over ``jj``: rows ``r * J + jj``."""
    def cat(f):
        ts_ = [getattr(q, f) for q in parts]
        return None if ts_[0] is None else torch.stack(ts_, 1).reshape(-1, ts_[0].shape[1])
    return QParams(scale=cat("scale"), zero=cat("zero"), offset=cat("offset"), codebook=cat("codebook"),
                   tensor_scale=tensor_scale)


def _select_outliers(Wd, k, bounds, cs, score_imp, imp) -> torch.Tensor:
    """The ``k`` weights whose removal saves the most ``d``-weighted error, peeled in rounds.

    A weight's score is its own damage ``d (w - q(w))²`` plus, for the extreme of its (row, group)
    (farthest from the centre of the group's range), the error the *other* weights of the group lose
    when the group is refitted without it (SpQR's leave-one-out criterion, evaluated for the one weight
    per group that can move the range).  Each of ``OUTLIER_ROUNDS`` rounds refits with the outliers so
    far excluded and adds its share of the ``k``, so groups with several outliers are peeled in turn.
    """
    R, n = Wd.shape
    mask = torch.zeros(R, n, dtype=torch.bool)
    if k == 0:
        return mask
    bits = (cs.bits,) * len(bounds)
    ts = formats.compute_tensor_scale(Wd, cs.base)
    d = (torch.ones(1, n) if score_imp is None else score_imp).expand(R, n)
    cs = replace(cs, clip="minmax")  # ranking only: the range effect is what matters, and it is 21x cheaper
    centred = cs.dtype != "kmeans" and cs.symmetric
    for r in range(OUTLIER_ROUNDS):
        take = -(-(k - int(mask.sum())) // (OUTLIER_ROUNDS - r))
        if take <= 0:
            break
        Q0 = _rtn_dense(Wd, mask, bounds, cs, bits, imp, ts, SELECT_KMEANS_ITERS)[3]
        ext = _extremes(Wd, mask, bounds, centred)
        Q1 = _rtn_dense(Wd, mask | ext, bounds, cs, bits, imp, ts, SELECT_KMEANS_ITERS)[3]
        others = ~(mask | ext)
        saved = d * ((Wd - Q0) ** 2 - (Wd - Q1) ** 2) * others
        score = d * (Wd - Q0) ** 2
        for s, e in bounds:
            score[:, s:e] += ext[:, s:e] * saved[:, s:e].sum(1, keepdim=True)
        score = score.masked_fill(mask, -float("inf"))
        mask.view(-1)[torch.topk(score.reshape(-1), take).indices] = True
    return mask


def _extremes(Wd, mask, bounds, centred: bool) -> torch.Tensor:
    """One-hot per (row, group) of the unmasked weight farthest from the range centre (0 for symmetric
    grids, the midrange otherwise); none where fewer than two weights are unmasked."""
    out = torch.zeros_like(mask)
    for s, e in bounds:
        x, m = Wd[:, s:e], mask[:, s:e]
        if centred:
            c = torch.zeros(x.shape[0], 1)
        else:
            lo = x.masked_fill(m, float("inf")).amin(1, keepdim=True)
            c = (lo + x.masked_fill(m, -float("inf")).amax(1, keepdim=True)) / 2
        dist = (x - c).abs().masked_fill(m, -1.0)
        j = dist.argmax(1)
        ok = (~m).sum(1) >= 2
        out[ok.nonzero().flatten(), s + j[ok]] = True
    return out


def _slim_bits(Wd, mask, bounds, cs, score_imp, imp) -> tuple[int, ...]:
    """SliM-LLM bit map: the k most salient full group columns take b+1 bits, the k least b-1."""
    b, G = cs.bits, len(bounds)
    glen = cs.granularity.size
    d = torch.ones(1, Wd.shape[1]) if score_imp is None else score_imp
    keep = (~mask).float()
    dk = d * keep
    ts = formats.compute_tensor_scale(Wd.masked_fill(mask, 0.0), cs.base)

    def per_group(x):
        return torch.stack([x[:, s:e].sum(dtype=torch.float64) for s, e in bounds])

    sal = per_group(dk * Wd**2)
    err = {bb: per_group(dk * (Wd - _rtn_dense(Wd, mask, bounds, cs, (bb,) * G, imp, ts)[3]) ** 2)
           for bb in (b - 1, b, b + 1)}
    full = [j for j, (s, e) in enumerate(bounds) if e - s == glen]
    order = sorted(full, key=lambda j: -float(sal[j]))
    gain = torch.tensor([float(err[b + 1][j] - err[b][j]) for j in order], dtype=torch.float64)  # <= 0 mostly
    loss = torch.tensor([float(err[b - 1][j] - err[b][j]) for j in order[::-1]], dtype=torch.float64)
    best_k, best = 0, 0.0
    for k in range(1, len(full) // 2 + 1):
        delta = float(gain[:k].sum() + loss[:k].sum())
        if delta < best:
            best_k, best = k, delta
    bits = [b] * G
    for j in order[:best_k]:
        bits[j] = b + 1
    for j in order[len(order) - best_k:] if best_k else []:
        bits[j] = b - 1
    return tuple(bits)


def _gptq(Wp, U, n, bounds, cs, bits, mask, imp, ts, block_size):
    """GPTQ over permuted columns ``[dense..., fp16...]``; kept values are fixed at fp16 of their
    compensated value.  Returns ``(codes, params, l2, Q)`` with ``Q [R, C]`` in permuted order."""
    R, C = Wp.shape
    Wk = Wp.clone()
    codes = torch.zeros(R, n, dtype=torch.uint8)
    Q = torch.zeros(R, C)
    G = len(bounds)
    params: list = [None] * G
    l2s: list = [None] * G
    group_of = torch.empty(n, dtype=torch.long)
    for j, (s, e) in enumerate(bounds):
        group_of[s:e] = j
    specs = [_group_spec(cs, bb) for bb in bits]
    has_out = mask.any(0)
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        W1 = Wk[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        with _one_thread():
            for i in range(i1, i2):
                ii = i - i1
                w = W1[:, ii]
                if i < n:
                    j = int(group_of[i])
                    if params[j] is None:  # entering group column j (i == its start)
                        s, e = bounds[j]
                        span = W1[:, ii: ii + (e - s)]
                        if span.shape[1] < e - s:
                            span = torch.cat([span, Wk[:, i2:e]], 1)
                        params[j], l2s[j] = _fit_group(span, mask[:, s:e], specs[j],
                                                       None if imp is None else imp[:, s:e], ts, cs)
                    c = formats.encode(w[:, None], params[j], specs[j])[:, 0]
                    q = formats.decode(c[:, None], params[j], specs[j])[:, 0]
                    codes[:, i] = c
                    if bool(has_out[i]):
                        q = torch.where(mask[:, i], w.half().float(), q)
                else:
                    q = w.half().float()
                Q[:, i] = q
                err = (w - q) / U1[ii, ii]
                W1[:, ii:].addr_(err, U1[ii, ii:], alpha=-1.0)
                E1[:, ii] = err
        Wk[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes, params, l2s, Q
