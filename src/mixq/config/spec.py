"""Quantization specs: frozen, validated on construction, JSON round-trip, exact bit cost.

A :class:`QuantSpec` says *what values are representable* for one tensor and how the shared
parameters are stored.  It never says how the codes are chosen (RTN, GPTQ, ...): algorithms
take a spec as an argument (ARCHITECTURE.md rule 5).

Element types (``dtype``)
    ``int``        uniform integer grid, ``bits`` in 1..8, symmetric or asymmetric
    ``nf``         NormalFloat lookup table (QLoRA), ``bits`` in {2, 3, 4}, absmax scale
    ``kmeans``     per-row codebook of ``2**bits`` fp16 centroids fitted by (weighted) k-means
    ``fp8_e4m3``   ``fp8_e5m2``  ``fp6_e3m2``  ``fp6_e2m3``  ``fp4_e2m1``: minifloats (OCP MX spec)
    ``fp16`` ``bf16`` ``fp32``: kept in floating point (no quantization), for "keep" choices

Scale storage (``scale_dtype``)
    ``fp16`` ``bf16`` ``fp32``   a float per group
    ``e8m0``                    a power of two per group (OCP MX shared exponent, 8 bits)
    ``e4m3``                    an FP8 E4M3 per group (NVFP4), usually with ``tensor_scale``
    ``none``                    no scale (``kmeans`` codebooks carry their own magnitude)

Bit accounting (:meth:`QuantSpec.cost`) counts every stored bit: codes, scales, zero points,
codebooks and the per-tensor scale.  Bits per weight = total bits / number of weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..granularity import (
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    n_groups,
    parse_granularity,
)

SPEC_VERSION = 1

FLOAT_DTYPES = {"fp8_e4m3": 8, "fp8_e5m2": 8, "fp6_e3m2": 6, "fp6_e2m3": 6, "fp4_e2m1": 4}
KEEP_DTYPES = {"fp16": 16, "bf16": 16, "fp32": 32}
SCALE_BITS = {"fp16": 16, "bf16": 16, "fp32": 32, "e8m0": 8, "e4m3": 8, "none": 0}
DTYPES = ("int", "nf", "kmeans", *FLOAT_DTYPES, *KEEP_DTYPES)


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
class QuantSpec:
    """How one tensor is quantized.  See the module docstring for the fields' vocabulary.

    ``symmetric``: int only.  Symmetric grids store no zero point (GPTQ convention:
    ``x ≈ scale * (q - 2**(bits-1))``, for ``bits == 1``: ``x ≈ scale * (2q - 1)``).
    Asymmetric grids store a zero point per group, as a ``bits``-bit integer
    (``zero_dtype="int"``, GPTQ/AWQ) or an fp16 offset (``zero_dtype="fp16"``, llama.cpp Q4_1 style).
    ``clip``: ``minmax`` uses the group's range; ``mse`` searches a shrink factor of the range
    that minimizes the group's squared error.
    """

    dtype: str = "int"
    bits: int = 4
    granularity: Granularity = field(default_factory=lambda: PerGroup(128))
    symmetric: bool = True
    scale_dtype: str = "fp16"
    zero_dtype: str = "int"
    tensor_scale: bool = False
    clip: str = "minmax"

    def __post_init__(self):
        d = self.dtype
        if d not in DTYPES:
            raise ValueError(f"unknown element dtype {d!r}: choose one of {', '.join(DTYPES)}")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise ValueError(f"bits must be an integer, got {self.bits!r}")
        if d == "int" or d == "kmeans":
            if not 1 <= self.bits <= 8:
                raise ValueError(f"{d} bits must be in 1..8, got {self.bits}: use e.g. bits=4")
        elif d == "nf":
            if self.bits not in (2, 3, 4):
                raise ValueError(f"NormalFloat supports 2, 3 or 4 bits, got {self.bits}")
        elif d in FLOAT_DTYPES and self.bits != FLOAT_DTYPES[d]:
            raise ValueError(f"{d} has {FLOAT_DTYPES[d]} bits, got bits={self.bits}")
        elif d in KEEP_DTYPES and self.bits != KEEP_DTYPES[d]:
            raise ValueError(f"{d} has {KEEP_DTYPES[d]} bits, got bits={self.bits}")
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerToken, PerGroup)):
            raise ValueError(f"granularity must be PerTensor/PerChannel/PerToken/PerGroup, got {self.granularity!r}")
        if self.scale_dtype not in SCALE_BITS:
            raise ValueError(f"unknown scale dtype {self.scale_dtype!r}: choose one of {', '.join(SCALE_BITS)}")
        if self.zero_dtype not in ("int", "fp16"):
            raise ValueError(f"zero_dtype must be 'int' or 'fp16', got {self.zero_dtype!r}")
        if self.clip not in ("minmax", "mse"):
            raise ValueError(f"clip must be 'minmax' or 'mse', got {self.clip!r}")
        if d != "int" and not self.symmetric:
            raise ValueError(f"asymmetric grids are only defined for dtype='int', not {d!r}")
        if self.symmetric and self.zero_dtype != "int":
            raise ValueError(f"zero_dtype={self.zero_dtype!r} only applies to asymmetric int grids (symmetric=False)")
        if d in KEEP_DTYPES and self.scale_dtype != "none":
            raise ValueError(f"{d} keeps the tensor in floating point: use scale_dtype='none'")
        if d not in KEEP_DTYPES and d != "kmeans" and self.scale_dtype == "none":
            raise ValueError(f"dtype {d!r} needs a scale: use scale_dtype fp16, bf16, fp32, e8m0 or e4m3")
        if d == "kmeans" and self.scale_dtype != "none":
            raise ValueError("kmeans codebooks carry their own magnitude: use scale_dtype='none'")
        if self.tensor_scale and self.scale_dtype != "e4m3":
            raise ValueError("tensor_scale (a second-level fp32 scale) is only used with scale_dtype='e4m3' (NVFP4)")

    # ------------------------------------------------------------------ properties
    @property
    def is_float_keep(self) -> bool:
        return self.dtype in KEEP_DTYPES

    @property
    def n_levels(self) -> int:
        return 2 ** self.bits

    @property
    def name(self) -> str:
        """Canonical, parseable name (``parse_spec(spec.name) == spec``)."""
        return spec_name(self)

    # ------------------------------------------------------------------ accounting
    def cost(self, shape: tuple[int, int]) -> BitCost:
        """Exact bits to store a ``[rows, cols]`` tensor quantized with this spec.

        codes     = rows*cols*bits
        scales    = n_groups * scale_bits
        zeros     = n_groups * (bits | 16) for asymmetric int
        codebook  = n_groups * 2**bits * 16 for kmeans (one fp16 codebook per group)
        extra     = 32 for a per-tensor fp32 scale (NVFP4)
        """
        rows, cols = int(shape[0]), int(shape[1])
        numel = rows * cols
        if self.is_float_keep:
            return BitCost(numel, numel * self.bits)
        ng = n_groups(self.granularity, (rows, cols))
        scales = ng * SCALE_BITS[self.scale_dtype]
        zeros = 0
        if self.dtype == "int" and not self.symmetric:
            zeros = ng * (self.bits if self.zero_dtype == "int" else 16)
        codebook = ng * self.n_levels * 16 if self.dtype == "kmeans" else 0
        extra = 32 if self.tensor_scale else 0
        return BitCost(numel, numel * self.bits, scales, zeros, codebook, extra)

    def bpw(self, shape: tuple[int, int]) -> float:
        return self.cost(shape).bpw

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        return {
            "_type": "QuantSpec",
            "_version": SPEC_VERSION,
            "dtype": self.dtype,
            "bits": self.bits,
            "granularity": str(self.granularity),
            "symmetric": self.symmetric,
            "scale_dtype": self.scale_dtype,
            "zero_dtype": self.zero_dtype,
            "tensor_scale": self.tensor_scale,
            "clip": self.clip,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        if not isinstance(d, dict) or d.get("_type") != "QuantSpec":
            raise ValueError(f"not a QuantSpec dict: {d!r}")
        if d.get("_version") != SPEC_VERSION:
            raise ValueError(f"QuantSpec version {d.get('_version')} is not supported (this mixq reads {SPEC_VERSION})")
        known = {"dtype", "bits", "granularity", "symmetric", "scale_dtype", "zero_dtype", "tensor_scale", "clip"}
        unknown = set(d) - known - {"_type", "_version"}
        if unknown:
            raise ValueError(f"unknown QuantSpec fields {sorted(unknown)}")
        kw = {k: d[k] for k in known if k in d}
        if "granularity" in kw:
            kw["granularity"] = parse_granularity(kw["granularity"])
        return cls(**kw)


# ---------------------------------------------------------------------- names and presets
_FP_NAME = {"fp8_e4m3": "FP8", "fp8_e5m2": "FP8-e5m2", "fp6_e3m2": "FP6-e3m2", "fp6_e2m3": "FP6-e2m3", "fp4_e2m1": "FP4"}


def spec_name(s: QuantSpec) -> str:
    g = str(s.granularity)
    if s.is_float_keep:
        parts = [s.dtype.upper()] + ([g] if s.granularity != PerTensor() else []) + (["mse"] if s.clip == "mse" else [])
        return "-".join(parts)
    if s.dtype in FLOAT_DTYPES and s.scale_dtype == "e8m0" and s.granularity == PerGroup(32):
        base = {"fp8_e4m3": "MXFP8", "fp8_e5m2": "MXFP8-e5m2", "fp6_e2m3": "MXFP6", "fp6_e3m2": "MXFP6-e3m2",
                "fp4_e2m1": "MXFP4"}[s.dtype]
        return base + ("-mse" if s.clip == "mse" else "")
    if s.dtype == "fp4_e2m1" and s.scale_dtype == "e4m3" and s.tensor_scale and s.granularity == PerGroup(16):
        return "NVFP4" + ("-mse" if s.clip == "mse" else "")
    if s.dtype == "int" and s.bits == 8 and s.symmetric and s.scale_dtype == "e8m0" and s.granularity == PerGroup(32):
        return "MXINT8" + ("-mse" if s.clip == "mse" else "")
    parts = []
    if s.dtype == "int":
        parts.append(f"W{s.bits}")
    elif s.dtype == "nf":
        parts.append(f"NF{s.bits}")
    elif s.dtype == "kmeans":
        parts.append(f"KM{s.bits}")
    else:
        parts.append(_FP_NAME[s.dtype])
    parts.append(g)
    if s.dtype == "int" and not s.symmetric:
        parts.append("asym" if s.zero_dtype == "int" else "asymf")
    if s.clip == "mse":
        parts.append("mse")
    if s.scale_dtype not in ("fp16", "none") or (s.scale_dtype == "fp16" and s.dtype.startswith("fp8")):
        parts.append(f"s{s.scale_dtype}")  # FP8's default scale is fp32, so an fp16 one is spelled out
    if s.tensor_scale:
        parts.append("ts")
    return "-".join(parts)


PRESETS: dict[str, str] = {
    "W8-channel": "int8 symmetric, one fp16 scale per output channel",
    "W4-g128": "int4 symmetric, groups of 128, fp16 scales",
    "W4-g32": "int4 symmetric, groups of 32",
    "W3-g128": "int3 symmetric, groups of 128",
    "W3-g64": "int3 symmetric, groups of 64",
    "W3-g64-asym": "int3 asymmetric (3-bit zero points), groups of 64",
    "W2-g64": "int2 symmetric, groups of 64",
    "NF4-g64": "NormalFloat4, absmax fp16 scale per 64",
    "NF3-g64": "NormalFloat3, absmax fp16 scale per 64",
    "KM3": "3-bit per-channel k-means codebook (fp16 centroids)",
    "FP8": "FP8 E4M3, fp32 scale per output channel",
    "FP8-e5m2": "FP8 E5M2, fp32 scale per output channel",
    "MXFP8": "OCP MXFP8: E4M3 elements, E8M0 scale per 32",
    "MXFP6": "OCP MXFP6: E2M3 elements, E8M0 scale per 32",
    "MXFP4": "OCP MXFP4: E2M1 elements, E8M0 scale per 32",
    "MXINT8": "OCP MXINT8: int8 elements, E8M0 scale per 32",
    "NVFP4": "NVIDIA NVFP4: E2M1 elements, E4M3 scale per 16, fp32 tensor scale",
    "FP16": "kept in fp16 (no quantization)",
}
