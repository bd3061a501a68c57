"""Lookup-table formats: NormalFloat (QLoRA) and per-row k-means codebooks.

Codes index a sorted level table; encoding picks the nearest level (ties go to the lower one).

NormalFloat (Dettmers et al. 2023, QLoRA §3; bitsandbytes ``create_normal_map``), ``bits`` = k, ``n = 2^k``::

    x̂ = scale * NF[q],   scale = absmax (rounded to scale_dtype),  NF ⊂ [-1, 1], NF ∋ 0
    NF = sort({Φ⁻¹(p) : p ∈ linspace(o, 1/2, n/2 + 1)[:-1]}          (n/2 positive levels)
              ∪ {0} ∪ {-Φ⁻¹(p) : p ∈ linspace(o, 1/2, n/2)[:-1]}) / Φ⁻¹(o)   (n/2 - 1 negative)
    o = (1 - 1/(2(n-1)) + 1 - 1/(2n)) / 2, rounded to 7 decimals   (NF4: o = 0.9677083)

This reproduces the canonical NF4 table (:data:`NF4`) bit for bit.

k-means (weighted Lloyd, 1-D, vectorized over rows), ``K = 2^bits`` centroids per row::

    minimise Σ_i w_i (x_i - c[q_i])²;   init c_k = weighted quantile (k + 1/2)/K of the row
    repeat: q_i = argmin_k |x_i - c_k|;  c_k = Σ_{q_i=k} w_i x_i / Σ_{q_i=k} w_i  (empty: keep c_k)
    codebook = fp16(c), sorted ascending;   x̂ = codebook[q]
"""
from __future__ import annotations

import torch

from .mx import round_scale
from .params import QParams

NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230850220947, 0.33791524171066284,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # bitsandbytes / QLoRA NF4, exactly as float32
KMEANS_ITERS = 25


def normal_float_levels(bits: int) -> torch.Tensor:
    """float32 ``[2^bits]`` NormalFloat levels, ascending (construction in the module docstring)."""
    if bits < 1:
        raise ValueError(f"NormalFloat needs bits >= 1, got {bits}")
    n = 2**bits
    o = round(0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n))), 7)
    pos = torch.special.ndtri(torch.linspace(o, 0.5, n // 2 + 1)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(o, 0.5, n // 2)[:-1].double())
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return v / v.max()


def nf_levels(bits: int, device=None) -> torch.Tensor:
    """The NF table used by ``dtype="nf"``: :data:`NF4` for 4 bits, :func:`normal_float_levels` otherwise."""
    t = torch.tensor(NF4) if bits == 4 else normal_float_levels(bits)
    return t.to(device)


def _nearest(levels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of ascending ``levels`` (``[L]`` or ``[R, L]``) for ``x`` (``[R, k]``)."""
    mids = (levels[..., 1:] + levels[..., :-1]) / 2
    if mids.dim() == 1:
        return torch.bucketize(x.contiguous(), mids)
    return torch.searchsorted(mids.expand(x.shape[0], -1).contiguous(), x.contiguous())


# ---------------------------------------------------------------------- NormalFloat
def nf_scale_unit(spec) -> float:
    return 1.0


def fit_nf(rows: torch.Tensor, spec, shrink: float = 1.0, tensor_scale=None):
    """``scale = absmax * shrink`` per row, ``[R, 1]``, rounded to ``spec.scale_dtype`` (e8m0 rounds up)."""
    ts = tensor_scale if spec.tensor_scale else None
    amax = rows.abs().amax(-1, keepdim=True) * shrink
    return QParams(scale=round_scale(amax, spec.scale_dtype, ts), tensor_scale=ts)


def encode_nf(x: torch.Tensor, p, spec) -> torch.Tensor:
    """``q = argmin_k |x / scale - NF[k]|`` (uint8 ``[R, k]``)."""
    x = x.float() / p.scale
    return _nearest(nf_levels(spec.bits, x.device), x).to(torch.uint8)


def decode_nf(codes: torch.Tensor, p, spec) -> torch.Tensor:
    return nf_levels(spec.bits, codes.device)[codes.long()] * p.scale


# ---------------------------------------------------------------------- k-means codebooks
def fit_kmeans(rows: torch.Tensor, spec, weight: torch.Tensor | None = None, iters: int = KMEANS_ITERS):
    """Per-row fp16 codebook ``[R, 2^bits]`` by weighted Lloyd (module docstring), no loop over rows.

    ``weight``: non-negative importance ``[R, n]`` or ``[1, n]``; a row whose weights sum to 0 is
    treated as unweighted.
    """
    x = rows.float()
    r, n = x.shape
    k = 2**spec.bits
    if weight is None:
        w = torch.ones_like(x)
    else:
        w = weight.float().clamp(min=0).expand(r, n)
        w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
    xs, order = x.sort(-1)
    ws = w.gather(-1, order)
    cw = ws.cumsum(-1)
    targets = (torch.arange(k, device=x.device, dtype=torch.float32) + 0.5) / k * cw[:, -1:]
    c = xs.gather(-1, torch.searchsorted(cw, targets.contiguous()).clamp(max=n - 1))
    for _ in range(iters):
        q = _nearest(c, xs)
        sw = torch.zeros(r, k, device=x.device).scatter_add_(1, q, ws)
        swx = torch.zeros(r, k, device=x.device).scatter_add_(1, q, ws * xs)
        new = torch.where(sw > 0, swx / sw.clamp(min=1e-30), c).sort(-1).values
        if torch.equal(new, c):
            break
        c = new
    codebook = c.clamp(-65504, 65504).to(torch.float16).float()
    return QParams(codebook=codebook)


def encode_kmeans(x: torch.Tensor, p, spec) -> torch.Tensor:
    """``q = argmin_k |x - codebook[k]|`` per row (uint8 ``[R, k]``)."""
    return _nearest(p.codebook, x.float()).to(torch.uint8)


def decode_kmeans(codes: torch.Tensor, p, spec) -> torch.Tensor:
    cb = p.codebook.expand(codes.shape[0], -1)
    return cb.gather(1, codes.long())
