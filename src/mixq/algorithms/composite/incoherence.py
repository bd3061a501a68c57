"""Incoherence processing (QuIP, QuIP#): quantize a weight seen through random Hadamard transforms.

For ``W [R, C]`` and seeded orthogonal ``Q_in [C, C]``, ``Q_out [R, R]`` (:func:`transform`: a Kronecker
product of normalised Hadamard factors times a random ±1 diagonal, :mod:`mixq.hadamard`)::

    W'  = Q_out W Q_inᵀ           what is quantized (by the rest of the spec: any plain grid or composite)
    H'  = Q_in H Q_inᵀ            its input second moment (``x' = Q_in x``), for GPTQ
    Ŵ   = Q_outᵀ Ŵ' Q_in          the weight the model computes with
    y   = Q_outᵀ (Ŵ' (Q_in x))    the runtime (:class:`~mixq.runtime.composite_linear.IncoherentLinear`): two fast transforms
                                  around the inner layer's own kernel

The transforms spread every row's and column's outliers over all of them, so the transformed weight is close
to Gaussian with no heavy tails and a low-bit grid fits it far better; GPTQ then works on ``H'`` (LDLQ in
QuIP's terms).  Only the two 32-bit seeds are stored (``+ip`` costs 64 bits per tensor); the factors and signs
are rebuilt from them.  A layer whose row or column count has no constructible Hadamard order takes no
``+ip`` candidate (its cost raises).

``+ip1`` is one-sided: ``W' = W Q_inᵀ`` (one seed, ``Q_out = I``).  The output rows stay the model's own rows, so a
quantizer that codes rows jointly (the trellis, whose path runs down a column) can weight each row by what its error
costs the model: the ``row_weight`` (output-gradient energy ``G``, the K-FAC metric's output factor) passed here
reaches the inner quantizer; with two transforms it describes no row of ``W'`` and is dropped.

Applying ``Q`` to a vector costs ``n · Σ mᵢ`` multiply-adds for factors of orders ``mᵢ`` (e.g. 576 = 36·16:
52 per element) -- :func:`rotate` reshapes to the factors' axes and multiplies each by its small matrix; at
decode on CPU a native kernel does the same with butterflies for the power-of-two factor (16 · 4 additions
instead of 16² multiply-adds), never reading a dense ``Q``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ...config import BitCost, CompositeSpec
from ...config.composite import IP_SEED_BITS
from ...hadamard import dense, random_orthogonal_factors

SEED_IN = 0x1F00
SEED_OUT = 0x2F00


@lru_cache(maxsize=64)
def _factors(n: int, seed: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    factors, signs, kind = random_orthogonal_factors(n, seed)
    if kind != "hadamard":
        raise ValueError(f"no Hadamard matrix of order {n} is constructible: +ip cannot hold this layer")
    return tuple(f.to(torch.float32).contiguous() for f in factors), signs.to(torch.float32)


def transform(n: int, seed: int) -> torch.Tensor:
    """The dense orthogonal ``Q [n, n]`` (float32) of ``seed`` (reference path; :func:`rotate` is the fast one)."""
    factors, signs = _factors(n, seed)
    return dense(list(factors), signs).to(torch.float32)


DENSE_MAX_ROWS = 16   # up to this many vectors (decode steps) of an order up to DENSE_MAX_ORDER, one product
DENSE_MAX_ORDER = 1024  # with the cached dense Q beats the per-factor steps (measured on a 2-core EPYC, fp32)


@lru_cache(maxsize=32)
def _dense_t(n: int, seed: int, dtype: torch.dtype, device: str, transpose: bool) -> torch.Tensor:
    Q = transform(n, seed).to(device=device, dtype=dtype)
    return (Q if transpose else Q.T).contiguous()


def rotate(x: torch.Tensor, seed: int, *, transpose: bool = False) -> torch.Tensor:
    """``Q x`` along the last dim of ``x`` (``Qᵀ x`` with ``transpose``), in ``x``'s dtype and device.

    ``Q = (F₁ ⊗ … ⊗ F_k) diag(s)``: the signs first, then each factor on its axis of ``x`` reshaped to
    ``[..., m₁, …, m_k]`` (``Qᵀ = diag(s) (F₁ᵀ ⊗ … ⊗ F_kᵀ)``: the factors transposed, then the signs) --
    ``n · Σ mᵢ`` multiply-adds per vector.  On CPU outside autograd the native kernel does that
    (:mod:`mixq.runtime.kernels.kron_cpu`: butterflies for the Sylvester factors, a register-blocked product for
    the others; 2-7x faster than torch's per-factor products at 64-512 rows, measured on 576 and 1536).
    Otherwise, for a few vectors the per-factor steps cost more in overhead than they save, and one product
    with the dense ``Q`` (cached per order, seed, dtype and device: every ``+ip`` layer of one shape shares it)
    is used instead.
    """
    n = x.shape[-1]
    native = _native(x, seed, transpose)
    if native is not None:
        return native.apply(x)
    if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu":  # no fast half GEMM on most CPUs
        return rotate(x.float(), seed, transpose=transpose).to(x.dtype)
    if x.numel() <= DENSE_MAX_ROWS * n and n <= DENSE_MAX_ORDER:
        return x @ _dense_t(n, seed, x.dtype, str(x.device), transpose)
    factors, signs = _factors(n, seed)
    lead = x.shape[:-1]
    s = signs.to(device=x.device, dtype=x.dtype)
    y = x if transpose else x * s
    dims = [f.shape[0] for f in factors]
    y = y.reshape(-1, *dims)
    for i, f in enumerate(factors):
        f = f.to(device=x.device, dtype=y.dtype)  # y's: under autocast a product comes back in bf16
        # contract axis i+1 of y with f (y_i' = Σ_j f[i', j] y_j); with transpose, fᵀ
        y = torch.movedim(torch.tensordot(y, f if transpose else f.T, dims=([i + 1], [0])), -1, i + 1)
    y = y.reshape(*lead, n)
    return y * s if transpose else y


def _native(x: torch.Tensor, seed: int, transpose: bool):
    """The native kernel's plan for ``Q`` (:mod:`mixq.runtime.kernels.kron_cpu`) for float32 or bfloat16 CPU
    inputs outside autograd (None elsewhere, or without a compiler)."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16)
            or (x.requires_grad and torch.is_grad_enabled())):
        return None
    return kron_plan(x.shape[-1], seed, transpose)


@lru_cache(maxsize=64)
def kron_plan(n: int, seed: int, transpose: bool):
    """The native kernel's :class:`~mixq.runtime.kernels.kron_cpu.KronPlan` of ``Q`` (``Qᵀ`` with ``transpose``)
    for order ``n`` and ``seed``, made once; None without a compiler."""
    from ...runtime.kernels import kron_cpu

    if not kron_cpu.available():
        return None
    factors, signs = _factors(n, seed)
    return kron_cpu.KronPlan(factors, signs, transpose=transpose)


@dataclass
class IncoherentQTensor:
    """The stored parts of one ``+ip`` weight: the inner quantized ``W'`` and the seeds."""

    spec: CompositeSpec
    shape: tuple[int, int]
    inner: object           # QTensor (plain inner spec) or a composite's stored parts
    seeds: tuple[int, ...]  # (input transform, output transform); +ip1: (input transform,)
    proxy_loss: float | None = None

    def cost(self) -> BitCost:
        return self.spec.cost(self.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 ``Ŵ = Q_outᵀ Ŵ' Q_in`` from the stored parts alone."""
        Wp = _dequantize_inner(self.inner)
        return unrotate_weight(Wp, self.seeds)

    def stored_bits(self) -> int:
        inner = self.inner
        bits = inner.stored_bits() if hasattr(inner, "stored_bits") else inner.spec.cost(tuple(inner.shape)).total
        return bits + IP_SEED_BITS * len(self.seeds)


def _dequantize_inner(inner) -> torch.Tensor:
    if isinstance(inner.spec, CompositeSpec):
        return inner.dequantize().float()
    from ... import formats

    return formats.dequantize(inner).float()


def rotate_weight(W: torch.Tensor, seeds: tuple[int, ...]) -> torch.Tensor:
    """``W' = Q_out W Q_inᵀ``: rows rotated by ``Q_in`` (``W Q_inᵀ`` = rows of ``W`` as vectors), then columns
    (one seed: ``W Q_inᵀ``)."""
    Wr = rotate(W, seeds[0])                      # each row w ↦ Q_in w   (= W Q_inᵀ)
    if len(seeds) == 1:
        return Wr.contiguous()
    return rotate(Wr.T, seeds[1]).T.contiguous()  # each column ↦ Q_out · (= Q_out W Q_inᵀ)


def unrotate_weight(Wp: torch.Tensor, seeds: tuple[int, ...]) -> torch.Tensor:
    """``Ŵ = Q_outᵀ Ŵ' Q_in`` (the inverse of :func:`rotate_weight`)."""
    Wr = Wp if len(seeds) == 1 else rotate(Wp.T, seeds[1], transpose=True).T
    return rotate(Wr, seeds[0], transpose=True).contiguous()


def rotate_hessian(H: torch.Tensor, seed: int) -> torch.Tensor:
    """``H' = Q_in H Q_inᵀ`` (float32, symmetrised): the input second moment of the transformed inputs."""
    Hf = H.detach().to(torch.float32).cpu()
    Hp = rotate(rotate(Hf, seed).T.contiguous(), seed)
    return 0.5 * (Hp + Hp.T)


def seeds_for(spec: CompositeSpec) -> tuple[int, ...]:
    """The seeds a new ``+ip`` weight gets (fixed: any pair works, and what is used is stored; ``+ip1``: the
    input's alone)."""
    return (SEED_IN, SEED_OUT)[:spec.ip_sides]


@torch.no_grad()
def quantize_incoherent(W: torch.Tensor, spec: CompositeSpec, H: torch.Tensor | None, method: str, *,
                        quantize_inner, damp: float = 0.01, **kw) -> tuple[IncoherentQTensor, torch.Tensor]:
    """``(stored parts, Ŵ float32)`` of ``W [R, C]`` under an ``+ip`` spec.

    ``quantize_inner(W', inner_spec, H', method, damp=..., **kw)`` quantizes the transformed weight (plain
    grids and composites alike: :func:`mixq.algorithms.composite.hooks.quantize_layer` passes its own dispatch).  A
    Fisher matrix or a prepared Hessian of the untransformed weight does not describe ``W'`` and is dropped, and so
    is ``row_weight`` under two transforms (``+ip1`` keeps the rows: it passes on).
    """
    if not spec.incoherent:
        raise ValueError(f"{spec.name} has no +ip")
    W0 = W.detach().to(torch.float32).cpu()
    R, C = W0.shape
    spec.cost((R, C))  # raises when R or C has no Hadamard order
    seeds = seeds_for(spec)
    Wp = rotate_weight(W0, seeds)
    Hp = None if H is None else rotate_hessian(H, seeds[0])
    for k in ("fisher", "hinv_chol") if len(seeds) == 1 else ("fisher", "hinv_chol", "row_weight"):
        kw.pop(k, None)
    inner_q, Wp_hat = quantize_inner(Wp, spec.inner, Hp, method, damp=damp, **kw)
    W_hat = unrotate_weight(Wp_hat.float(), seeds)
    qt = IncoherentQTensor(spec, (R, C), inner_q, seeds)
    if H is not None:
        from ..gptq import _proxy

        qt.proxy_loss = _proxy(W0 - W_hat, H.detach().float().cpu())
    return qt, W_hat
