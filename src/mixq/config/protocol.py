"""The element-format protocol: what one family of element formats (int, NF, k-means, minifloat, MX, NVFP4, ...)
knows about itself, so the rest of mixq asks the family instead of branching on ``spec.dtype``.

A family is an :class:`ElementFormat` (subclass it and override what differs) registered with
:func:`mixq.config.registry.register`.  It answers:

``parse(head, variant)``   the QuantSpec fields of a name head it owns (``W4`` -> int, 4 bits), else None
``check(spec)``            its own validation (bits, scales, zero points), raising ValueError
``head(spec)`` / ``name``  its canonical name (``name`` returns a whole name for fixed formats: ``MXFP4``)
``stored(spec, shape)``    the tensors a ``[R, C]`` weight stores: name -> (bits per entry, shape); the exact
                           bit cost (:meth:`cost`) is their sum, and ``formats.bitpack`` stores the same params
``kernels``                which matmul kernels run it (``reference`` always: it dequantizes with ``fit/encode/decode``)
``export(spec, target)``   how an export target (a name in :data:`mixq.export.registry.EXPORTERS`) maps it:
                           :class:`Export` exact / approximate (with the approximation stated) / refused (with
                           the reason); by default ``exports[target]``, and refused for a target not named there
``fit/encode/decode``      the math (optional: the built-in families' math lives in :mod:`mixq.formats`)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..granularity import n_groups

SCALE_BITS = {"fp16": 16, "bf16": 16, "fp32": 32, "e8m0": 8, "e4m3": 8, "none": 0}
FLOAT_SCALES = ("fp16", "bf16", "fp32", "e8m0", "e4m3")
PARAMS = ("scale", "zero", "offset", "codebook", "tensor_scale")  # stored parameters, in storage order
_COST_FIELD = {"codes": "codes", "scale": "scales", "zero": "zeros", "offset": "zeros", "codebook": "codebook",
               "tensor_scale": "extra"}


@dataclass(frozen=True)
class BitCost:
    """Exact storage of one quantized tensor, in bits."""

    numel: int
    codes: int
    scales: int = 0
    zeros: int = 0
    codebook: int = 0
    extra: int = 0  # per-tensor scale, sparse outliers, permutations, ...

    @property
    def total(self) -> int:
        return self.codes + self.scales + self.zeros + self.codebook + self.extra

    @property
    def bpw(self) -> float:
        return self.total / self.numel

    @property
    def nbytes(self) -> float:
        return self.total / 8

    def __add__(self, other: "BitCost") -> "BitCost":
        return BitCost(
            self.numel + other.numel,
            self.codes + other.codes,
            self.scales + other.scales,
            self.zeros + other.zeros,
            self.codebook + other.codebook,
            self.extra + other.extra,
        )

    def to_dict(self) -> dict:
        return {"numel": self.numel, "codes": self.codes, "scales": self.scales, "zeros": self.zeros,
                "codebook": self.codebook, "extra": self.extra, "total": self.total, "bpw": self.bpw}


@dataclass(frozen=True)
class Export:
    """How an export target maps a spec: ``exact``, ``approximate`` (``note`` states the approximation) or
    ``refused`` (``note`` says why, and what to use instead)."""

    kind: str
    note: str = ""

    def __post_init__(self):
        if self.kind not in ("exact", "approximate", "refused"):
            raise ValueError(f"Export kind is exact, approximate or refused, not {self.kind!r}")


def suggest(spec, **fields) -> str:
    """The name of ``spec`` with ``fields`` changed, or ``W4-g128`` when that is not a valid spec."""
    try:
        return replace(spec, **fields).name
    except ValueError:
        return "W4-g128"


class ElementFormat:
    """One family of element formats.  Defaults describe a scaled grid of ``bits``-bit codes."""

    family = ""                       # the family's name, as messages and docs spell it
    dtypes: tuple[str, ...] = ()      # QuantSpec.dtype values it owns (validation, math); () for scale schemes
    heads: tuple[str, ...] = ()       # the name heads it parses, as written in docs (W<bits>, MXFP4, ...)
    kernels: tuple[str, ...] = ("reference",)  # read from the family that owns the dtype (registry.owner)
    closed_form = True                # its params come from the values in closed form (may quantize activations)
    keeps_float = False               # a "keep" choice (fp16/bf16/fp32): not a quantizer
    importance_fit = False            # its fit takes importance weights (GPTQ passes diag(H), as an imatrix)
    fixed = False                     # a fixed block format: the head says everything; only -mse may follow
    asymmetric = False                # may store a zero point (symmetric=False)
    scales: tuple[str, ...] = FLOAT_SCALES  # the scale dtypes it accepts
    exports: dict[str, Export] = {"native": Export("exact")}

    def claims(self, spec) -> bool:
        """Whether this family names, stores and exports ``spec`` (scale schemes such as MX claim specs whose
        element dtype another family owns)."""
        return spec.dtype in self.dtypes

    def parse(self, head: str, variant: str | None) -> dict | None:
        return None

    def check(self, spec) -> None:
        """Its own validation (QuantSpec checks the fields' vocabulary first), raising ValueError."""
        self.check_bits(spec)
        if spec.scale_dtype not in self.scales:
            raise ValueError(self.scale_error(spec))
        if not spec.symmetric and not self.asymmetric:
            raise ValueError(f"asymmetric grids are only defined for dtype='int', not {spec.dtype!r}")

    def check_bits(self, spec) -> None:
        if not 1 <= spec.bits <= 8:
            raise ValueError(f"{spec.dtype} bits must be in 1..8, got {spec.bits}: use e.g. bits=4")

    def scale_error(self, spec) -> str:
        return f"dtype {spec.dtype!r} needs a scale: use scale_dtype fp16, bf16, fp32, e8m0 or e4m3"

    def head(self, spec) -> str:
        raise NotImplementedError(f"{type(self).__name__} must name its specs (head or name)")

    def name(self, spec) -> str | None:
        """A whole canonical name, or None for ``head`` + the generic options (gran, asym, mse, scale, ts)."""
        return None

    def quiet_scales(self, spec) -> tuple[str, ...]:
        """Scale dtypes the generic name leaves unspelled."""
        return ("fp16", "none")

    def stored(self, spec, shape: tuple[int, int]) -> dict[str, tuple[int, tuple[int, ...]]]:
        rows, cols = int(shape[0]), int(shape[1])
        ng = n_groups(spec.granularity, (rows, cols))
        out = {"codes": (spec.bits, (rows, cols))}
        if spec.scale_dtype != "none":
            out["scale"] = (SCALE_BITS[spec.scale_dtype], (ng,))
        if not spec.symmetric:
            out["zero" if spec.zero_dtype == "int" else "offset"] = (spec.bits if spec.zero_dtype == "int" else 16, (ng,))
        if spec.tensor_scale:
            out["tensor_scale"] = (32, (1,))
        return out

    def params(self, spec) -> tuple[str, ...]:
        """The QParams fields a quantized tensor stores, in :data:`PARAMS` order."""
        names = self.stored(spec, (1, 1) if not hasattr(spec.granularity, "size") else (1, spec.granularity.size))
        return tuple(p for p in PARAMS if p in names)

    def cost(self, spec, shape: tuple[int, int]) -> BitCost:
        parts = {"codes": 0, "scales": 0, "zeros": 0, "codebook": 0, "extra": 0}
        for what, (bits, dims) in self.stored(spec, shape).items():
            parts[_COST_FIELD[what]] += bits * math.prod(dims)
        return BitCost(int(shape[0]) * int(shape[1]), **parts)

    def export(self, spec, target: str) -> Export:
        if target in self.exports:
            return self.exports[target]
        return Export("refused", f"{target} has no {self.family} element type")
