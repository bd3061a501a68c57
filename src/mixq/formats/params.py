"""Per-row quantization parameters, shared by every format module (:mod:`.integer`, :mod:`.lut`,
:mod:`.floatgrid`) and the dispatch in :mod:`.base`; it imports none of them."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class QParams:
    """Per-row quantization parameters (float32; ``None`` where the format stores none).

    scale        ``[R, 1]`` exactly representable in ``spec.scale_dtype`` (for e4m3: ``e4m3 * tensor_scale``)
    zero         ``[R, 1]`` asym int, integer-valued in ``[0, 2^bits - 1]``: ``x̂ = scale * (q - zero)``
    offset       ``[R, 1]`` asym with fp16 zero: ``x̂ = scale * q + offset``
    codebook     ``[R, 2^bits]`` kmeans: ascending fp16-representable centroids
    tensor_scale ``[]`` NVFP4 second-level fp32 scale shared by all rows
    """

    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    codebook: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None

    _ROW_FIELDS = ("scale", "zero", "offset", "codebook")

    def select(self, idx) -> "QParams":
        """Params of a subset of rows (int, slice, bool mask or index tensor); an int keeps the row dim."""
        def pick(t):
            if t is None:
                return None
            return t[idx].unsqueeze(0) if isinstance(idx, int) else t[idx]
        return QParams(*(pick(getattr(self, f)) for f in self._ROW_FIELDS), tensor_scale=self.tensor_scale)

    def to(self, device) -> "QParams":
        return QParams(*(None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                         for f in fields(self)))

    @property
    def n_rows(self) -> int:
        for f in self._ROW_FIELDS:
            t = getattr(self, f)
            if t is not None:
                return t.shape[0]
        return 0
