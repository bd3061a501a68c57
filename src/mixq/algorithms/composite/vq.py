"""Vector-codebook bases (``VQ<rate>[x<d>]-GRAN``, meant for ``+ip``): RTN and GPTQ with vector error feedback.

A row of ``W [R, C]`` is cut into ``C/d`` vectors of ``d`` consecutive weights; vector ``v`` of row ``r`` in
quantization group ``g`` (``gN``: N consecutive columns, or the whole row for ``channel``) is stored as a
``k``-bit index into the fixed codebook ``B [2^k, d]`` (:mod:`mixq.formats.composite.vq_codebook`) and decoded as::

    ŵ[r, v] = s[r, g] · B[code[r, v]]            k = d · rate,  s fp16

The scale of a group (``fit_scales``) starts at the group's RMS (the codebook is built for unit variance) and
alternates nearest codes with the least-squares scale.

GPTQ (``method="gptq"``), GPTVQ's vector form of the OBS update on the upper Cholesky factor ``U`` of
``(H + λI)⁻¹`` (``λ = damp · mean diag H``): columns are taken ``d`` at a time; with ``U_vv`` the ``d × d``
diagonal block of the vector's columns ``J``::

    code   = argmin_c ‖(w_J - s·B[c]) U_vv⁻¹‖²      the H-weighted error of the vector (LDLQ's metric)
    E      = (w_J - ŵ_J) U_vv⁻¹                       [R, d]
    W_rest -= E · U[J, rest]                        (lazily per block of ``block_size`` columns, as GPTQ)

and a group's scale is fitted when its first column is reached, on the weights as updated so far.
Cost (:meth:`CompositeSpec.cost`): ``R · C · rate`` code bits plus ``R · G`` fp16 scales.  The stored parts
(:class:`~mixq.formats.composite.vq_storage.VQQTensor`), their decoding and packing:
:mod:`mixq.formats.composite.vq_storage`.
"""
from __future__ import annotations

import torch

from ...config import CompositeSpec
from ...formats.composite.scales import group_len, round_scale
from ...formats.composite.vq_storage import VQQTensor, decode, spec_codebook
from ..sweep import sweep
from .vq_search import nearest

SCALE_ITERS = 3  # code / least-squares-scale alternations per group


def fit_scales(Wg: torch.Tensor, B: torch.Tensor, spec: CompositeSpec) -> torch.Tensor:
    """``[R]`` scale of each row of one group ``Wg [R, glen]`` (rounded to the scale dtype): alternate nearest-entry
    codes and the least-squares scale ``s = Σ w·B[c] / Σ ‖B[c]‖²`` from ``s = RMS``, ``SCALE_ITERS`` times, keeping
    each row's best (Lloyd-style: the group's squared error never increases)."""
    R, n = Wg.shape
    d = B.shape[1]
    V = Wg.reshape(R, n // d, d)
    s = round_scale(Wg.pow(2).mean(1).sqrt(), spec)
    best = torch.full((R,), float("inf"))
    best_s = s.clone()
    for _ in range(SCALE_ITERS):
        q = B[nearest((V / s[:, None, None]).reshape(-1, d), B)].reshape(R, n // d, d)
        err = (V - q * s[:, None, None]).pow(2).sum((1, 2))
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
        s = round_scale((V * q).sum((1, 2)) / q.pow(2).sum((1, 2)).clamp_min(1e-12), spec)
    return best_s


@torch.no_grad()
def quantize_vq(W: torch.Tensor, spec: CompositeSpec, H: torch.Tensor | None = None, method: str = "rtn", *,
                damp: float = 0.01, block_size: int = 128, hinv_chol=None, codebook: torch.Tensor | None = None,
                **_) -> tuple[VQQTensor, torch.Tensor]:
    """``(stored parts, Ŵ float32)`` of ``W [R, C]`` under a VQ spec (RTN, or GPTQ with ``H [C, C]``).

    ``codebook``: a ``[2^k, d]`` codebook instead of the spec's fixed one (experiments, e.g. a per-tensor learned
    codebook; the stored parts then do not decode without it)."""
    if not spec.vq_dim:
        raise ValueError(f"{spec.name} is not a VQ spec")
    W0 = W.detach().to(torch.float32).cpu()
    R, C = W0.shape
    spec.cost((R, C))
    B = spec_codebook(spec) if codebook is None else codebook.float()
    d, glen = spec.vq_dim, group_len(spec, C)
    if method == "gptq":
        if H is None:
            raise ValueError("GPTQ needs the layer's H = XᵀX/N")
        codes, scale, W_hat = _gptq(W0, H.detach().float().cpu(), B, spec, glen, damp, block_size, hinv_chol)
    elif method == "rtn":
        scale = torch.stack([fit_scales(W0[:, j:j + glen], B, spec) for j in range(0, C, glen)], 1)
        s_col = scale.repeat_interleave(glen, 1)
        X = (W0 / s_col).reshape(-1, d)
        codes = nearest(X, B).reshape(R, C // d)
        W_hat = decode(codes, scale, B, glen)
    else:
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    qt = VQQTensor(spec, (R, C), codes.to(torch.uint8), scale)
    if H is not None:
        dW = (W0 - W_hat).double()
        qt.proxy_loss = float(((dW @ H.double().cpu()) * dW).sum())
    return qt, W_hat


def _gptq(W0, H, B, spec, glen, damp, block_size, hinv_chol):
    from ..gptq import prepare_hessian

    R, C = W0.shape
    d = spec.vq_dim
    Wk = W0.clone()
    dead = torch.diagonal(H) == 0
    Wk[:, dead] = 0.0
    U, _ = hinv_chol if hinv_chol is not None else prepare_hessian(H, damp)
    U = U.float()
    codes = torch.empty(R, C // d, dtype=torch.long)
    scale = torch.empty(R, C // glen)
    Q = torch.empty_like(Wk)

    def round_vector(col, w, ahead):
        if col % glen == 0:  # a new group: its scale from the weights as updated so far
            scale[:, col // glen] = fit_scales(ahead(glen), B, spec)
        s = scale[:, col // glen]
        Vinv = torch.linalg.solve_triangular(U[col:col + d, col:col + d], torch.eye(d, device=U.device), upper=True)  # U_vv⁻¹
        # argmin_c ‖(w - s c) V‖² = s² ‖w V / s - c V‖²: nearest in the transformed codebook
        idx = nearest((w / s[:, None]) @ Vinv, B @ Vinv)
        q = B[idx] * s[:, None]
        codes[:, col // d] = idx
        Q[:, col:col + d] = q
        return q

    sweep(Wk, U, round_vector, block_size=block_size, width=d, single_thread=False)
    return codes, scale, Q
