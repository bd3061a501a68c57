"""Outlier handling for activation quantization; each piece composes with the others.

(a) LLM.int8() decomposition (Dettmers et al., 2022, arXiv:2208.07339, §3.2)::

        X Wᵀ = X[:, O] W[:, O]ᵀ  (16-bit)  +  Q(X[:, ¬O]) W[:, ¬O]ᵀ  (8-bit)
        O = { j : max_t |X_tj| ≥ τ }           (τ = 6 in the paper)

    :class:`FPOutliers` ``source="batch"`` decides ``O`` from the current batch (bitsandbytes),
    ``source="calib"`` from the calibrated ``absmax``.  The quantized part is computed with the
    ``O`` columns zeroed in place (so they move no scale and keep the dense layout); ``τ = 0``
    puts every feature in ``O``: the layer output is exact.
(b) Atom / QUIK (arXiv:2310.19102, arXiv:2310.09259): the ``k`` channels with the largest
    calibrated ``absmax`` are reordered to the end and quantized with a higher-precision spec
    (:class:`HiChannels`, e.g. ``W8-token`` or ``FP16``), the rest with the main 4-bit spec.
    The matching weight columns should get the same precision (a weight plan concern: the indices
    are :func:`top_k_channels` of the same ``absmax``).
(c) SmoothQuant: :func:`mixq.algorithms.smoothquant.smooth_model` migrates activation outliers
    into the weights before anything is quantized (fp function unchanged).
(d) Rotation: :func:`mixq.algorithms.rotation.rotate_model` (QuaRot) spreads residual-stream
    outliers over all channels (fp function unchanged up to rounding); the online rotation of the
    down-projection input is a forward pre-hook registered before the activation quantizer, so
    the quantizer sees the rotated input.  Not rotated (unlike QuaRot): the attention output
    (``o_proj`` input, QuaRot's per-head online Hadamard) and the KV cache.

Order (:func:`prepare_for_act_quant`): rotate → smooth → quantize weights → calibrate → hooks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..config import QuantSpec, parse_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FPOutliers:
    """LLM.int8()-style: feature columns with magnitude ``≥ threshold`` bypass quantization."""

    threshold: float = 6.0
    source: str = "batch"  # "batch" (per forward, bitsandbytes) | "calib" (fixed from calibrated absmax)

    def __post_init__(self):
        if self.source not in ("batch", "calib"):
            raise ValueError(f"FPOutliers.source must be 'batch' or 'calib', got {self.source!r}")
        if not self.threshold >= 0:
            raise ValueError(f"FPOutliers.threshold must be >= 0, got {self.threshold}")


@dataclass(frozen=True)
class HiChannels:
    """Atom/QUIK-style: the ``k`` largest-absmax input channels use ``spec`` (8-bit or fp16)."""

    k: int = 128
    spec: QuantSpec | str = "W8-token"

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"HiChannels.k must be a positive integer, got {self.k!r}")
        object.__setattr__(self, "spec", parse_spec(self.spec))


def fp_columns(cfg: FPOutliers, x2: torch.Tensor, absmax: torch.Tensor | None) -> torch.Tensor:
    """Bool ``[n]``: the columns of ``x2 [T, n]`` kept in floating point under ``cfg``."""
    if cfg.source == "calib":
        if absmax is None:
            raise ValueError("FPOutliers(source='calib') needs a calibrated absmax")
        mag = absmax.to(x2.device, torch.float32)
    else:
        mag = x2.detach().abs().amax(0).float() if x2.shape[0] else torch.zeros(x2.shape[1], device=x2.device)
    return mag >= cfg.threshold


def top_k_channels(absmax: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending, int64) of the ``k`` largest entries of ``absmax [n]`` (ties: lower index)."""
    n = absmax.numel()
    if not 1 <= k < n:
        raise ValueError(f"need 1 <= k < {n} outlier channels, got k={k}")
    order = torch.sort(absmax.float().flatten(), descending=True, stable=True).indices
    return order[:k].sort().values


def act_bits_per_feature(n: int, lo_bits: int, *, hi: tuple[int, int] | None = None, n_fp: int = 0,
                         fp_bits: int = 16) -> float:
    """Mean element bits of one token's input with ``hi = (k, bits)`` channels and ``n_fp`` fp columns
    (codes only; scales are per token/group and counted by the spec)."""
    k, hb = hi or (0, 0)
    if k + n_fp > n:
        raise ValueError(f"{k} hi + {n_fp} fp channels exceed the {n} features")
    return (k * hb + n_fp * fp_bits + (n - k - n_fp) * lo_bits) / n


@torch.no_grad()
def prepare_for_act_quant(model: nn.Module, *, rotate: bool = False, smooth_alpha: float | None = None,
                          calib_ids: torch.Tensor | None = None, seed: int = 0, online_down: bool = True,
                          device="cpu") -> dict:
    """Function-preserving transforms before activation quantization, in the right order.

    1. ``rotate``: QuaRot residual rotation (+ online rotation of the down-projection input)
    2. ``smooth_alpha``: SmoothQuant scale migration with ``calib_ids`` (after the rotation, so the
       scales fit the rotated activations; folded into the online rotation where there is one)
    Then quantize the weights, then :func:`mixq.runtime.act_quant.apply_act_quant`.  Returns
    ``{"rotation": RotationInfo | None, "smooth": {group: scale} | None}``.
    """
    from ..algorithms.rotation import rotate_model  # noqa: PLC0415
    from ..algorithms.smoothquant import smooth_model  # noqa: PLC0415

    out: dict = {"rotation": None, "smooth": None}
    if rotate:
        out["rotation"] = rotate_model(model, seed=seed, online_down=online_down)
    if smooth_alpha is not None:
        if calib_ids is None:
            raise ValueError("SmoothQuant needs calib_ids")
        out["smooth"] = smooth_model(model, calib_ids, alpha=smooth_alpha, device=device, progress=False)
    return out
