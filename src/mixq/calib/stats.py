"""Per-layer calibration statistics accumulated from a linear layer's inputs.

For a layer ``y = x Wᵀ`` with inputs ``X ∈ R^{N×in}`` (N tokens) we keep

* ``H = (1/N) XᵀX``           the (scaled) Hessian of the layer-wise loss ``‖XΔWᵀ‖²/N``  (GPTQ/OBS)
* ``absmax[j] = max_t |X_tj|``  per input channel (SmoothQuant, outlier detection)
* ``absmean[j] = mean_t |X_tj|`` per input channel (AWQ's activation magnitude)

``H`` is accumulated in float64 (sums of many small outer products lose precision in float32)
and returned in float32.  Statistics can be saved with safetensors and loaded back, so one
calibration pass serves many measurements.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerStats:
    """Running statistics of one layer's input.  ``update`` takes ``x[..., in]``."""

    in_features: int
    keep_hessian: bool = True
    n_tokens: int = 0
    _xtx: torch.Tensor | None = field(default=None, repr=False)
    _absmax: torch.Tensor | None = field(default=None, repr=False)
    _abssum: torch.Tensor | None = field(default=None, repr=False)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        xf = x.to(torch.float32)
        a = xf.abs()
        amax = a.amax(0).cpu()
        asum = a.sum(0, dtype=torch.float64).cpu()
        if self._absmax is None:
            self._absmax, self._abssum = amax, asum
        else:
            self._absmax = torch.maximum(self._absmax, amax)
            self._abssum += asum
        if self.keep_hessian:
            xtx = (xf.T.to(torch.float64) @ xf.to(torch.float64)).cpu()
            self._xtx = xtx if self._xtx is None else self._xtx + xtx
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
