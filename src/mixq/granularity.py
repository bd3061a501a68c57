"""Granularity: which elements share one set of quantization parameters.

A granularity is a value, never a ``-1`` sentinel.  All granularities are expressed over the
*last* dimension of a 2-D view of the tensor:

=================  =======================================  ==============================
granularity        weight ``W[out, in]``                     activation ``X[tokens, feat]``
=================  =======================================  ==============================
``PerTensor()``    one group = the whole tensor             one group = the whole tensor
``PerChannel()``   one group per output row (len ``in``)    one group per feature column*
``PerGroup(g)``    ``in // g`` groups of ``g`` per row      ``feat // g`` groups per token
``PerToken()``     same as PerChannel (one group per row)   one group per token (row)
=================  =======================================  ==============================

(*) for activations ``PerChannel`` means per input feature, which is a column; callers that
need it transpose first.  ``rows_view`` below reshapes any 2-D tensor to ``[n_groups, group_len]``
so every quantizer in :mod:`mixq.formats` only ever works on rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PerTensor:
    kind: str = "tensor"

    def __str__(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel:
    kind: str = "channel"

    def __str__(self) -> str:
        return "channel"


@dataclass(frozen=True)
class PerToken:
    kind: str = "token"

    def __str__(self) -> str:
        return "token"


@dataclass(frozen=True)
class PerGroup:
    size: int = 128
    kind: str = "group"

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"group size must be a positive integer, got {self.size!r}")

    def __str__(self) -> str:
        return f"g{self.size}"


Granularity = PerTensor | PerChannel | PerToken | PerGroup


def parse_granularity(text: str | int | Granularity) -> Granularity:
    """``"tensor" | "channel" | "token" | "g128" | "128" | 128`` -> a granularity value."""
    if isinstance(text, (PerTensor, PerChannel, PerToken, PerGroup)):
        return text
    if isinstance(text, int):
        return PerGroup(text)
    t = str(text).strip().lower()
    if t in ("tensor", "per-tensor"):
        return PerTensor()
    if t in ("channel", "per-channel", "row"):
        return PerChannel()
    if t in ("token", "per-token"):
        return PerToken()
    digits = t[1:] if t.startswith("g") else t
    if digits.isdigit() and int(digits) > 0:
        return PerGroup(int(digits))
    raise ValueError(f"unknown granularity {text!r}: use tensor, channel, token or gN (e.g. g128)")


def group_len(g: Granularity, shape: tuple[int, int]) -> int:
    """Number of elements in one group of a 2-D tensor of ``shape = (rows, cols)``."""
    rows, cols = shape
    if isinstance(g, PerTensor):
        return rows * cols
    if isinstance(g, (PerChannel, PerToken)):
        return cols
    if cols % g.size != 0:
        raise ValueError(
            f"group size {g.size} does not divide the row length {cols}: "
            f"pick a group size that divides {cols} (e.g. {_divisor_hint(cols)}) or use 'channel'"
        )
    return g.size


def n_groups(g: Granularity, shape: tuple[int, int]) -> int:
    rows, cols = shape
    return rows * cols // group_len(g, shape)


def rows_view(x: torch.Tensor, g: Granularity) -> torch.Tensor:
    """Reshape a 2-D tensor to ``[n_groups, group_len]`` (a view when possible)."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(x.shape)}")
    return x.reshape(-1, group_len(g, tuple(x.shape)))


def _divisor_hint(n: int) -> str:
    divs = [d for d in (32, 64, 128, 16, 96, 192) if n % d == 0]
    return ", ".join(map(str, divs[:3])) if divs else "1"
