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

from ..granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken, parse_granularity
from .protocol import SCALE_BITS, BitCost, Export
from .registry import family_of, format_of, owner

SPEC_VERSION = 1


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
        fam = owner(self.dtype)  # raises on an unknown dtype
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise ValueError(f"bits must be an integer, got {self.bits!r}")
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerToken, PerGroup)):
            raise ValueError(f"granularity must be PerTensor/PerChannel/PerToken/PerGroup, got {self.granularity!r}")
        if self.scale_dtype not in SCALE_BITS:
            raise ValueError(f"unknown scale dtype {self.scale_dtype!r}: choose one of {', '.join(SCALE_BITS)}")
        if self.zero_dtype not in ("int", "fp16"):
            raise ValueError(f"zero_dtype must be 'int' or 'fp16', got {self.zero_dtype!r}")
        if self.clip not in ("minmax", "mse"):
            raise ValueError(f"clip must be 'minmax' or 'mse', got {self.clip!r}")
        if self.symmetric and self.zero_dtype != "int":
            raise ValueError(f"zero_dtype={self.zero_dtype!r} only applies to asymmetric int grids (symmetric=False)")
        fam.check(self)
        if self.tensor_scale and self.scale_dtype != "e4m3":
            raise ValueError("tensor_scale (a second-level fp32 scale) is only used with scale_dtype='e4m3' (NVFP4)")

    # ------------------------------------------------------------------ properties
    @property
    def is_float_keep(self) -> bool:
        return owner(self.dtype).keeps_float

    @property
    def n_levels(self) -> int:
        return 2 ** self.bits

    @property
    def name(self) -> str:
        """Canonical, parseable name (``parse_spec(spec.name) == spec``)."""
        return spec_name(self)

    # ------------------------------------------------------------------ accounting
    def cost(self, shape: tuple[int, int]) -> BitCost:
        """Exact bits to store a ``[rows, cols]`` tensor quantized with this spec: the sum over the tensors its
        family stores (:meth:`~mixq.config.protocol.ElementFormat.stored`), e.g. for the built-in grids

        codes     = rows*cols*bits
        scales    = n_groups * scale_bits
        zeros     = n_groups * (bits | 16) for asymmetric int
        codebook  = n_groups * 2**bits * 16 for kmeans (one fp16 codebook per group)
        extra     = 32 for a per-tensor fp32 scale (NVFP4)
        """
        return family_of(self).cost(self, shape)

    def export_to(self, target: str) -> Export:
        """How export ``target`` (``native``, ``gguf``, ``compressed-tensors``, ``gptq``) maps this spec: its family's
        :class:`~mixq.config.protocol.Export` (exact / approximate, with the approximation / refused, with why); a
        composite's is its composite family's (:func:`~mixq.config.registry.format_of`)."""
        return format_of(self).export(self, target)

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
def spec_name(s: QuantSpec) -> str:
    """The canonical name: the family's own (``MXFP4``, ``NVFP4``, ``FP16``), else its head and the options."""
    fam = family_of(s)
    whole = fam.name(s)
    if whole is not None:
        return whole
    parts = [fam.head(s), str(s.granularity)]
    if not s.symmetric:
        parts.append("asym" if s.zero_dtype == "int" else "asymf")
    if s.clip == "mse":
        parts.append("mse")
    if s.scale_dtype not in fam.quiet_scales(s):
        parts.append(f"s{s.scale_dtype}")
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
    "Q4_K": "llama.cpp Q4_K: 4-bit codes, 6-bit scales and mins per 32 times fp16 per 256 (rows of 256k)",
    "Q3_K": "llama.cpp Q3_K: 3-bit codes, 6-bit scales per 16 times fp16 per 256 (rows of 256k)",
    "IQ4_NL": "llama.cpp IQ4_NL: 4-bit codes into a fixed non-linear table, fp16 scale per 32",
    "FP16": "kept in fp16 (no quantization)",
}
