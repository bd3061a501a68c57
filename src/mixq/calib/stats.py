"""Per-layer calibration statistics accumulated from a linear layer's inputs.

For a layer ``y = x Wᵀ`` with inputs ``X ∈ R^{N×in}`` (N tokens) we keep

* ``H = (1/N) XᵀX``           the (scaled) Hessian of the layer-wise loss ``‖XΔWᵀ‖²/N``  (GPTQ/OBS)
* ``absmax[j] = max_t |X_tj|``  per input channel (SmoothQuant, outlier detection)
* ``absmean[j] = mean_t |X_tj|`` per input channel (AWQ's activation magnitude)

``H`` is accumulated in float64 across calls (sums of many small outer products lose precision
in float32); within one call, chunks of at most 2048 tokens are multiplied in float32.  Layers
that read the same input tensor (q/k/v, gate/up) share one computation of its moments.  Statistics can be saved with safetensors and loaded back, so one
calibration pass serves many measurements.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..amp import full_precision


@dataclass
class LayerStats:
    """Running statistics of one layer's input.  ``update`` takes ``x[..., in]``."""

    in_features: int
    keep_hessian: bool = True
    n_tokens: int = 0
    _xtx: torch.Tensor | None = field(default=None, repr=False)
    _absmax: torch.Tensor | None = field(default=None, repr=False)
    _abssum: torch.Tensor | None = field(default=None, repr=False)
    _dxx: torch.Tensor | None = field(default=None, repr=False)
    cross_tokens: int = 0

    def update_cross(self, x_fp: torch.Tensor, x: torch.Tensor) -> None:
        """Accumulate ``Σ_t (x_fp,t - x_t) x_tᵀ``: the layer's input in the full-precision model (``x_fp``) against
        the input it sees now (``x``, token for token).  A pair of other shapes (MoE experts routed differently in
        the two models, or ``x_fp`` None: not called there) makes the statistic unusable for this layer (``D`` is
        then None)."""
        if self.cross_tokens < 0:
            return
        if x_fp is None:  # not called in the full-precision model on these tokens
            self.cross_tokens, self._dxx = -1, None
            return
        a, b = x_fp.detach().reshape(-1, self.in_features), x.detach().reshape(-1, self.in_features)
        if a.shape != b.shape:
            self.cross_tokens, self._dxx = -1, None
            return
        d = _cross(x_fp, x, a, b)
        self._dxx = d.clone() if self._dxx is None else self._dxx + d
        self.cross_tokens += a.shape[0]

    @property
    def D(self) -> torch.Tensor | None:
        """``(1/N) (X_fp - X)ᵀ X`` as float32 ``[in, in]`` (the scale of :attr:`H`), or None when no usable cross
        statistics were accumulated (see :meth:`update_cross`)."""
        if self._dxx is None or self.cross_tokens != self.n_tokens:
            return None
        return (self._dxx / max(self.n_tokens, 1)).to(torch.float32)

    def update(self, x: torch.Tensor) -> None:
        xt = x.detach()
        x = xt.reshape(-1, xt.shape[-1])
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        amax, asum, xtx = _moments(xt, x, self.keep_hessian)
        if self._absmax is None:
            self._absmax, self._abssum = amax, asum.clone()
        else:
            self._absmax = torch.maximum(self._absmax, amax)
            self._abssum += asum
        if self.keep_hessian:
            self._xtx = xtx.clone() if self._xtx is None else self._xtx + xtx
        self.n_tokens += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        """``(1/N) XᵀX`` as float32 ``[in, in]``."""
        if self._xtx is None:
            raise ValueError("no Hessian was accumulated for this layer (keep_hessian=False or no data)")
        return (self._xtx / max(self.n_tokens, 1)).to(torch.float32)

    @property
    def absmax(self) -> torch.Tensor:
        if self._absmax is None:
            raise ValueError("no activations were seen for this layer")
        return self._absmax

    @property
    def absmean(self) -> torch.Tensor:
        if self._abssum is None:
            raise ValueError("no activations were seen for this layer")
        return (self._abssum / max(self.n_tokens, 1)).to(torch.float32)

    # ------------------------------------------------------------------ (de)serialization
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.absmax": self.absmax, f"{prefix}.abssum": self._abssum,
               f"{prefix}.n_tokens": torch.tensor([self.n_tokens], dtype=torch.int64)}
        if self._xtx is not None:
            out[f"{prefix}.xtx"] = self._xtx
        return out

    @classmethod
    def from_state(cls, prefix: str, tensors: dict[str, torch.Tensor]) -> "LayerStats":
        amax = tensors[f"{prefix}.absmax"]
        s = cls(in_features=amax.numel(), keep_hessian=f"{prefix}.xtx" in tensors)
        s._absmax, s._abssum = amax, tensors[f"{prefix}.abssum"]
        s._xtx = tensors.get(f"{prefix}.xtx")
        s.n_tokens = int(tensors[f"{prefix}.n_tokens"].item())
        return s


_CHUNK = 2048
_last: list = [None, None, None]  # (input tensor, its _version, moments): q/k/v and gate/up share an input


def _moments(xt: torch.Tensor, x: torch.Tensor, hessian: bool):
    """``(absmax, abssum, XᵀX | None)`` of ``x [N, in]`` (cpu; float32, float64, float64)."""
    if _last[0] is xt and _last[1] == xt._version and (_last[2][2] is not None or not hessian):
        return _last[2]
    xf = x.to(torch.float32)
    a = xf.abs()
    amax = a.amax(0).cpu()
    asum = a.sum(0, dtype=torch.float64).cpu()
    xtx = gram(xf) if hessian else None
    _last[:] = [xt, xt._version, (amax, asum, xtx)]
    return _last[2]


def gram(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_t w_t x_t x_tᵀ`` (``w = 1`` without ``weights [N]``) of ``x [N, in]``: products over chunks of at most
    :data:`_CHUNK` rows, summed in float64, on the CPU.

    The products are float32, except inside a bf16 autocast region (the walks under ``--walk-amp``, :mod:`mixq.amp`):
    there each chunk's rows and its partial sum are rounded to bf16: 2.5x faster on two AMX cores ([512, 1536]
    rows), each entry of a chunk's sum off by about 2^-8 of itself at most, independently from chunk to chunk --
    far below GPTQ's damping (1 % of the mean diagonal)."""
    xf = x.to(torch.float32)
    w = None if weights is None else weights.to(device=xf.device, dtype=torch.float32)
    out = torch.zeros(xf.shape[1], xf.shape[1], dtype=torch.float64)
    dev = xf.device.type
    bf16 = torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16
    with full_precision(xf.device):
        for s in range(0, xf.shape[0], _CHUNK):
            c = xf[s : s + _CHUNK]
            a = c if w is None else c * w[s : s + _CHUNK, None]
            if bf16:
                a, c = a.bfloat16(), c.bfloat16()
            out += (a.T @ c).to(torch.float64).cpu()
    return out


def _cross(xt_fp, xt, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a - b)ᵀ b`` float64 on the CPU, over chunks; kept for the next layer given the same pair of tensors
    (q/k/v read one input in both models)."""
    if _last_cross[0] is xt_fp and _last_cross[1] is xt and _last_cross[2] == (xt_fp._version, xt._version):
        return _last_cross[3]
    bf = b.to(torch.float32)
    d = torch.zeros(b.shape[1], b.shape[1], dtype=torch.float64)
    with full_precision(bf.device):
        for s in range(0, bf.shape[0], _CHUNK):
            c = bf[s : s + _CHUNK]
            d += ((a[s : s + _CHUNK].to(torch.float32) - c).T @ c).to(torch.float64).cpu()
    _last_cross[:] = [xt_fp, xt, (xt_fp._version, xt._version), d]
    return d


_last_cross: list = [None, None, None, None]  # (fp input, input, their _versions, (a - b)ᵀ b)


def release_shared_input() -> None:
    """Drop the references to the last inputs seen (called at the end of a calibration walk)."""
    _last[:] = [None, None, None]
    _last_cross[:] = [None, None, None, None]
