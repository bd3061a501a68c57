"""ResQ-style activations: the high-variance subspace at 8 bits, the rest at 4 (Saxena et al., 2024,
arXiv:2412.14363, "ResQ: Mixed-precision quantization of LLMs with low-rank residuals").

For a linear ``y = x Wᵀ`` with input ``x ∈ Rⁿ`` and calibration second moment
``H = E[x xᵀ] = U Λ Uᵀ`` (eigenvalues decreasing; uncentred, like GPTQ's ``H``)::

    P  = [U_hi R_hi | U_lo R_lo]        U_hi: the top r = round(fraction·n) eigenvectors (PCA),
                                        R_hi, R_lo: randomised Hadamard (else Haar orthogonal) of
                                        orders r and n − r, mixing the channels *inside* each subspace
    x' = x P                            (P orthogonal: x = x' Pᵀ)
    x̂' = [Q_hi(x'[:, :r]) | Q_lo(x'[:, r:])]     per-token dynamic scales of each part
    y  = x̂' (W P)ᵀ

The subspace that carries most of the energy gets ``hi`` (8-bit) codes, the residual subspace —
low variance and, after the rotation, without outlier channels — ``lo`` (4-bit) codes.  Mean code
bits per element: ``(r·b_hi + (n − r)·b_lo)/n`` (4.5 for 1/8 at 8/4).

Two ways to install it (:func:`apply_resq`, the adapter to :func:`mixq.runtime.act_quant.apply_act_quant`'s model:
same layer selection, same :class:`~mixq.runtime.act_quant.ActQuantHandle`, hooks after any existing pre-hook):

``fold=False``  the weight stays ``W`` and the hook hands the layer ``x̂ = x̂' Pᵀ`` (activation
                error only; composes with weights quantized in the original basis)
``fold=True``   ``W ← W P`` is written into the layer (call :func:`fold_resq` *before* quantizing
                the weights, so they are quantized in the rotated basis as in ResQ) and the hook
                hands it ``x̂'``

With both parts at 16 bits (``hi=lo=None``) the hook is ``x P Pᵀ`` (fold: ``(x P)(W P)ᵀ``): the output is
unchanged up to float32 rounding.  Not done here: ResQ's rotation of the KV cache / attention
internals (only linear inputs), and static scales (dynamic per token only).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..hadamard import dense, random_orthogonal_factors
from ..arch import get_weight, set_weight
from ..config import QuantSpec
from ..runtime.act_quant import ActQuantHandle, input_stats, select_linears
from ..formats.act import fake_quant_act, parse_act_spec

KEEP_NAMES = {None, 16, "16", "A16", "FP32", "NONE", "KEEP"}


def resq_spec(x) -> QuantSpec | None:
    """``None`` (kept: 16 bits, identity) or the dynamic activation spec of ``x`` (``A8``, ``A4``, ``FP8``...)."""
    if isinstance(x, QuantSpec):
        return x
    if isinstance(x, int) and not isinstance(x, bool) and x != 16:
        x = f"A{x}"
    key = x.strip().upper() if isinstance(x, str) else x
    if key in KEEP_NAMES:
        return None
    return parse_act_spec(x, "dynamic")


def resq_basis(H: torch.Tensor, fraction: float = 1 / 8, *, seed: int = 0, rotate: bool = True) -> tuple[torch.Tensor, int]:
    """``(P [n, n] float32, r)``: the PCA basis of ``H`` with random rotations inside both subspaces."""
    n = H.shape[0]
    if H.dim() != 2 or H.shape[1] != n:
        raise ValueError(f"H must be square, got {tuple(H.shape)}")
    if not 0 < fraction < 1:
        raise ValueError(f"the high-precision fraction must be in (0, 1), got {fraction}")
    r = min(max(1, round(fraction * n)), n - 1)
    Hd = H.detach().double().cpu()
    _, U = torch.linalg.eigh((Hd + Hd.T) / 2)
    U = U.flip(1)  # decreasing eigenvalues
    if rotate:
        blocks = []
        for k, (a, b) in enumerate(((0, r), (r, n))):
            f, s, _ = random_orthogonal_factors(b - a, seed + k)
            blocks.append(U[:, a:b] @ dense(f, s))
        U = torch.cat(blocks, 1)
    return U.float(), r


@dataclass
class ResQQuantizer:
    """One linear's ResQ activation quantizer (module doc); ``__call__`` maps ``x [..., n]``."""

    P: torch.Tensor
    r: int
    hi: QuantSpec | None
    lo: QuantSpec | None
    fold: bool = False
    calls: int = field(default=0, repr=False)
    _last: tuple | None = field(default=None, repr=False)

    @classmethod
    def fit(cls, H: torch.Tensor, *, fraction: float = 1 / 8, hi="A8", lo="A4", seed: int = 0, rotate: bool = True,
            fold: bool = False) -> "ResQQuantizer":
        P, r = resq_basis(H, fraction, seed=seed, rotate=rotate)
        return cls(P, r, resq_spec(hi), resq_spec(lo), fold)

    def bits_per_element(self, hi_bits: int = 16, lo_bits: int = 16) -> float:
        """Mean code bits of one input element (specs' ``bits``; a kept part counts ``hi_bits``/``lo_bits``)."""
        n = self.P.shape[0]
        bh = self.hi.bits if self.hi is not None else hi_bits
        bl = self.lo.bits if self.lo is not None else lo_bits
        return (self.r * bh + (n - self.r) * bl) / n

    def rotated(self, x: torch.Tensor) -> torch.Tensor:
        """``x̂' [T, n]``: the quantized input in the rotated basis."""
        P = self.P.to(x.device)
        y = x.reshape(-1, x.shape[-1]).float() @ P
        parts = [y[:, : self.r], y[:, self.r:]]
        out = [p if s is None else fake_quant_act(p.contiguous(), s) for p, s in zip(parts, (self.hi, self.lo))]
        return torch.cat(out, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self._last is not None and self._last[0] is x:  # q/k/v (gate/up) share one quantizer and one input
            return self._last[1]
        out = self._apply(x)
        self._last = (x, out)
        return out

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        xd = x.detach()
        y = self.rotated(xd)
        if not self.fold:
            y = y @ self.P.to(y.device).T
        y = y.to(x.dtype).reshape(x.shape)
        if x.requires_grad and not self.fold:
            return x + (y - x).detach()
        return y


@torch.no_grad()
def calibrate_hessians(model: nn.Module, calib_ids: torch.Tensor, layers=None, *, device="cpu") -> dict[str, torch.Tensor]:
    """``fqn → H = E[x xᵀ]`` (float32) of each chosen block linear's input over ``calib_ids``."""
    return input_stats(model, calib_ids, layers, lambda s: s.H.clone(), hessian=True, device=device)


def fit_resq(model: nn.Module, calib_ids: torch.Tensor | None = None, *, hessians: dict | None = None, layers=None,
             fraction: float = 1 / 8, hi="A8", lo="A4", seed: int = 0, rotate: bool = True, fold: bool = False,
             device="cpu") -> dict[str, ResQQuantizer]:
    """One :class:`ResQQuantizer` per chosen block linear, from ``hessians`` or a calibration pass.

    Layers reading the same input (q/k/v, gate/up: identical ``H``) share one quantizer, which
    quantizes that input once per forward.
    """
    chosen = select_linears(model, layers)
    if hessians is None:
        if calib_ids is None:
            raise ValueError("ResQ needs calib_ids=... (or hessians=...) for its PCA basis")
        hessians = calibrate_hessians(model, calib_ids, chosen, device=device)
    out, cache = {}, []
    for fqn in chosen:
        if fqn not in hessians:
            raise ValueError(f"no calibration statistics for {fqn}")
        H = hessians[fqn]
        n = get_weight(model.get_submodule(fqn)).shape[1]
        if H.shape != (n, n):
            raise ValueError(f"{fqn}: H is {tuple(H.shape)}, the layer reads {n} features")
        q = next((q for h, q in cache if h is H or (h.shape == H.shape and torch.equal(h, H))), None)
        if q is None:
            P, r = resq_basis(H, fraction, seed=seed, rotate=rotate)
            q = ResQQuantizer(P, r, resq_spec(hi), resq_spec(lo), fold)
            cache.append((H, q))
        out[fqn] = q
    return out


@torch.no_grad()
def fold_resq(model: nn.Module, quantizers: dict[str, ResQQuantizer]) -> None:
    """``W ← W P`` for every quantizer with ``fold=True`` (before the weights are quantized)."""
    for fqn, q in quantizers.items():
        if q.fold:
            lin = model.get_submodule(fqn)
            W = get_weight(lin)
            set_weight(lin, (W.double() @ q.P.double().to(W.device)).to(W.dtype))


def apply_resq(model: nn.Module, calib_ids: torch.Tensor | None = None, *, quantizers: dict | None = None,
               layers=None, fraction: float = 1 / 8, hi="A8", lo="A4", seed: int = 0, rotate: bool = True,
               fold: bool = False, device="cpu") -> ActQuantHandle:
    """Install ResQ activation quantization on the chosen block linears (module doc).

    Give ``quantizers`` (from :func:`fit_resq`, already folded with :func:`fold_resq` when
    ``fold=True``) or ``calib_ids`` (fits them; with ``fold=True`` the weights are folded here — so
    quantize the weights afterwards).  Returns an :class:`ActQuantHandle`; ``remove()`` removes the
    hooks (a folded weight stays ``W P``: fold only on a model copy).
    """
    if quantizers is None:
        quantizers = fit_resq(model, calib_ids, layers=layers, fraction=fraction, hi=hi, lo=lo, seed=seed,
                              rotate=rotate, fold=fold, device=device)
        fold_resq(model, quantizers)
    handle = ActQuantHandle(dict(quantizers))
    for fqn, q in quantizers.items():
        lin = model.get_submodule(fqn)
        handle.hooks.append(lin.register_forward_pre_hook(_hook(q)))
    return handle


def _hook(q):
    def pre_hook(module, args):
        return (q(args[0]), *args[1:])
    return pre_hook


__all__ = ["ResQQuantizer", "apply_resq", "calibrate_hessians", "fit_resq", "fold_resq", "resq_basis", "resq_spec"]
