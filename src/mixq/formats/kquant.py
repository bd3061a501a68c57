"""llama.cpp's K-quants (Q2_K ... Q6_K) as mixq grids: fit, encode, decode (layouts in :mod:`mixq.config.ggml_types`).

A row of ``rows [N, 256]`` is one super-block.  :func:`fit_weighted` chooses its two-level scales as llama.cpp's
quantizers do, written here from the format, not from their code:

1. per sub-block, a real scale (and min, for the affine types) by a weighted least-squares search over candidate
   inverse scales around the range (affine: ``[min(x, 0), max(x)]`` onto ``0..qmax``; symmetric: the element of
   largest magnitude onto either end of the code range);
2. per super-block, those reals as ``d * sc_j`` (and ``dmin * m_j``) with fp16 ``d`` and integers ``sc_j`` in the
   type's range: a search over ``d = ext / j`` for the largest codes ``j``, then a least-squares ``d``;
3. with the sub-block integers fixed, ``d`` (and ``dmin``) refit jointly by weighted least squares on the codes,
   kept when the super-block's weighted error drops.

The element weights are ``sqrt(2 mean(x^2) + x^2)`` (per super-block), times the importance when one is given
(GPTQ passes ``diag(H)``, as llama.cpp's imatrix).  Values decode exactly as ``gguf.quants.dequantize`` computes
them: ``(d * sc_j)`` in float32 (an exact product), times the code, minus ``dmin * m_j``.
"""
from __future__ import annotations

import torch

from ..config.ggml_types import K_LAYOUTS, KLayout
from .params import QParams

# candidate inverse scales per sub-block, spread over _SPAN codes of range around the extreme codes; element weights
# sqrt(_SIGMA * mean(x^2) + x^2).  Chosen on heavy-tailed random weights against llama.cpp's own quantizer
# (bench/kquant_fit.py): wider than one code and sigma 2 took mixq's error from 3-4 % above llama.cpp's to below it.
_STEPS, _SPAN, _SIGMA = 24, 3.0, 2.0


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Nearest fp16 value (saturating), as float32."""
    return x.clamp(-65504.0, 65504.0).to(torch.float16).to(torch.float32)


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` with 0 where ``b == 0``."""
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.zeros_like(a))


def _expand(t: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sub-block ``[R, n]`` -> per element ``[R, k]`` (``k`` columns split evenly over the ``n`` sub-blocks)."""
    n = t.shape[1]
    if k % n:
        raise ValueError(f"{k} columns do not split over {n} sub-block scales")
    return t.repeat_interleave(k // n, dim=1)


def _eff(p: QParams, lay: KLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ggml's float32 ``d * sc_j`` and ``dmin * m_j`` per sub-block ``[R, n]``."""
    eff = p.scale[:, :1] * p.scale[:, 1:]
    return eff, (p.offset[:, :1] * p.offset[:, 1:] if lay.affine else None)


def encode(x: torch.Tensor, p: QParams, spec) -> torch.Tensor:
    """Nearest codes of ``x [R, k]`` (``k`` = 256, or the columns of the sub-blocks ``p`` holds)."""
    lay = K_LAYOUTS[spec.dtype]
    eff, dm = _eff(p, lay)
    k = x.shape[1]
    y = x + _expand(dm, k) if lay.affine else x
    q = torch.round(_div(y, _expand(eff, k))) + lay.mid
    return q.clamp(0, lay.qmax).to(torch.uint8)


def decode(codes: torch.Tensor, p: QParams, spec) -> torch.Tensor:
    lay = K_LAYOUTS[spec.dtype]
    eff, dm = _eff(p, lay)
    k = codes.shape[1]
    v = _expand(eff, k) * (codes.to(torch.float32) - lay.mid)
    return v - _expand(dm, k) if lay.affine else v


def column_params(p: QParams, spec, j: int) -> QParams:
    """The params of column ``j`` (0..255) of a super-block: its sub-block's scale (and min) alone, so
    :func:`encode`/:func:`decode` take that one column (GPTQ's sweep)."""
    lay = K_LAYOUTS[spec.dtype]
    idx = [0, 1 + j // lay.sub]
    return QParams(scale=p.scale[:, idx], offset=p.offset[:, idx] if lay.affine else None)


# ---------------------------------------------------------------------------- fitting
def _weights(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    w = torch.sqrt(_SIGMA * (x * x).mean(1, keepdim=True) + x * x)
    if weight is not None:
        h = weight.clamp_min(0).expand_as(x)
        w = w * (h + 1e-6 * h.mean(1, keepdim=True).clamp_min(1e-30))
    return w


def _err(x, w, v) -> torch.Tensor:
    return (w * (v - x) ** 2).sum(-1)


def _sub_affine(x: torch.Tensor, w: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x [M, s]``: ``(a >= 0, b <= 0)`` for ``a * c + b``, ``c`` in ``0..qmax``, least weighted error."""
    lo, hi = x.amin(1).clamp_max(0), x.amax(1)
    rng = hi - lo

    def err(a, b):
        c = torch.round(_div(x - b[:, None], a[:, None].expand_as(x))).clamp(0, qmax)
        return _err(x, w, a[:, None] * c + b[:, None])

    best_a, best_b = rng / qmax, lo
    best_e = err(best_a, best_b)
    for t in range(_STEPS + 1):
        iscale = _div(torch.full_like(rng, qmax + _SPAN * (t / _STEPS - 0.5)), rng)
        c = torch.round((x - lo[:, None]) * iscale[:, None]).clamp(0, qmax)
        sw, swc, swcc = w.sum(1), (w * c).sum(1), (w * c * c).sum(1)
        swx, swcx = (w * x).sum(1), (w * c * x).sum(1)
        det = sw * swcc - swc * swc
        a = _div(sw * swcx - swc * swx, det)
        b = _div(swcc * swx - swc * swcx, det)
        pos = b > 0  # the min is stored as -dmin * m with m >= 0: clamp b to 0 and refit a alone
        a = torch.where(pos, _div(swcx, swcc), a)
        b = torch.where(pos, torch.zeros_like(b), b)
        ok = (det > 0) & (a > 0) & torch.isfinite(a) & torch.isfinite(b)
        e = torch.where(ok, err(torch.where(ok, a, best_a), torch.where(ok, b, best_b)), best_e)
        better = e < best_e
        best_a, best_b = torch.where(better, a, best_a), torch.where(better, b, best_b)
        best_e = torch.where(better, e, best_e)
    return best_a, best_b


def _sub_sym(x: torch.Tensor, w: torch.Tensor, mid: int) -> torch.Tensor:
    """Per row of ``x [M, s]``: a signed scale ``a`` for ``a * q``, ``q`` in ``-mid..mid-1``, least weighted error."""
    ext = x.gather(1, x.abs().argmax(1, keepdim=True))[:, 0]

    def err(a):
        q = torch.round(_div(x, a[:, None].expand_as(x))).clamp(-mid, mid - 1)
        return _err(x, w, a[:, None] * q)

    best_a = _div(ext, torch.full_like(ext, -mid))
    best_e = err(best_a)
    for t in range(-_STEPS // 2, _STEPS // 2 + 1):
        for target in (-mid, mid - 1):
            iscale = _div(torch.full_like(ext, target + _SPAN * t / _STEPS), ext)
            q = torch.round(x * iscale[:, None]).clamp(-mid, mid - 1)
            a = _div((w * q * x).sum(1), (w * q * q).sum(1))
            e = err(a)
            better = e < best_e
            best_a, best_e = torch.where(better, a, best_a), torch.where(better, e, best_e)
    return best_a


def _two_level(a: torch.Tensor, wt: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``a [N, n]`` as ``d * q`` with fp16 ``d [N]`` and integers ``q`` in ``lo..hi``, least ``sum wt (d q - a)^2``."""
    ext = a.gather(1, a.abs().argmax(1, keepdim=True))[:, 0]

    def quant(d):
        q = torch.round(_div(a, d[:, None].expand_as(a))).clamp(lo, hi) + 0.0  # no -0.0: stored as integers
        return q, (wt * (d[:, None] * q - a) ** 2).sum(1)

    best_d = torch.zeros_like(ext)
    best_q, best_e = quant(best_d)
    tops = [j for j in range(hi, max(hi - 8, 0), -1)] + [j for j in range(lo, min(lo + 8, 0))]
    for j in tops:
        for d in (_fp16(ext / j),):
            q, e = quant(d)
            d2 = _fp16(_div((wt * q * a).sum(1), (wt * q * q).sum(1)))  # least squares on these integers
            q2, e2 = quant(d2)
            for dd, qq, ee in ((d, q, e), (d2, q2, e2)):
                better = ee < best_e
                best_d, best_e = torch.where(better, dd, best_d), torch.where(better, ee, best_e)
                best_q = torch.where(better[:, None], qq, best_q)
    return best_d, best_q


def fit_weighted(rows: torch.Tensor, spec, weight: torch.Tensor | None = None) -> QParams:
    """Two-level scales of ``rows [N, 256]`` (one super-block each); ``weight`` the importance ``[1|N, 256]``."""
    lay = K_LAYOUTS[spec.dtype]
    x = rows.to(torch.float32)
    n, nsub, s = x.shape[0], lay.nsub, lay.sub
    w = _weights(x, None if weight is None else weight.to(torch.float32))
    xs, ws = x.reshape(n * nsub, s), w.reshape(n * nsub, s)
    if lay.affine:
        a, b = _sub_affine(xs, ws, lay.qmax)
        c_mean = ((xs - b[:, None]) / a.clamp_min(1e-30)[:, None]).clamp(0, lay.qmax)
        wa = (ws * c_mean * c_mean).sum(1).reshape(n, nsub)  # a scale error moves each value by c * delta
        d, sc = _two_level(a.reshape(n, nsub), wa, lay.sc_lo, lay.sc_hi)
        dmin, m = _two_level((-b).reshape(n, nsub), ws.sum(1).reshape(n, nsub), lay.sc_lo, lay.sc_hi)
        p = QParams(scale=torch.cat([d[:, None], sc], 1), offset=torch.cat([dmin[:, None], m], 1))
    else:
        a = _sub_sym(xs, ws, lay.mid)
        q = torch.round(_div(xs, a[:, None].expand_as(xs))).clamp(-lay.mid, lay.mid - 1)
        d, sc = _two_level(a.reshape(n, nsub), (ws * q * q).sum(1).reshape(n, nsub), lay.sc_lo, lay.sc_hi)
        p = QParams(scale=torch.cat([d[:, None], sc], 1))
    return _refit_super(x, w, p, spec, lay)


def _refit_super(x: torch.Tensor, w: torch.Tensor, p: QParams, spec, lay: KLayout, rounds: int = 2) -> QParams:
    """With the sub-block integers fixed, refit ``d`` (and ``dmin``) by weighted least squares on the codes."""
    best_e = _err(x, w, decode(encode(x, p, spec), p, spec))
    for _ in range(rounds):
        c = encode(x, p, spec).to(torch.float32) - lay.mid
        u = _expand(p.scale[:, 1:], 256) * c  # x ~ d * u - dmin * v
        if lay.affine:
            v = _expand(p.offset[:, 1:], 256)
            suu, suv, svv = (w * u * u).sum(1), (w * u * v).sum(1), (w * v * v).sum(1)
            sux, svx = (w * u * x).sum(1), (w * v * x).sum(1)
            det = suu * svv - suv * suv
            d = _fp16(_div(sux * svv - suv * svx, det))
            dmin = _fp16(_div(sux * suv - suu * svx, det))
            cand = QParams(scale=torch.cat([torch.where(det > 0, d, p.scale[:, 0])[:, None], p.scale[:, 1:]], 1),
                           offset=torch.cat([torch.where(det > 0, dmin, p.offset[:, 0])[:, None], p.offset[:, 1:]], 1))
        else:
            d = _fp16(_div((w * u * x).sum(1), (w * u * u).sum(1)))
            cand = QParams(scale=torch.cat([d[:, None], p.scale[:, 1:]], 1))
        e = _err(x, w, decode(encode(x, cand, spec), cand, spec))
        better = (e < best_e)[:, None]
        p = QParams(scale=torch.where(better, cand.scale, p.scale),
                    offset=None if not lay.affine else torch.where(better, cand.offset, p.offset))
        best_e = torch.minimum(e, best_e)
    return p
