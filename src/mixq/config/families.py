"""The built-in element-format families (:class:`~mixq.config.protocol.ElementFormat` objects), in lookup order:
the scale schemes (MX, NVFP4) first, since they claim specs whose element dtype another family owns."""
from __future__ import annotations

import re

from ..granularity import PerChannel, PerGroup, PerTensor, n_groups
from .ggml_types import GGML_FAMILIES
from .protocol import ElementFormat, Export, suggest

FLOAT_DTYPES = {"fp8_e4m3": 8, "fp8_e5m2": 8, "fp6_e3m2": 6, "fp6_e2m3": 6, "fp4_e2m1": 4}
KEEP_DTYPES = {"fp16": 16, "bf16": 16, "fp32": 32}
_INT_EXPORTS = {
    "native": Export("exact"),
    "gguf": Export("approximate", "the ggml block type of least error (exact when mixq's grid is a ggml grid)"),
    "compressed-tensors": Export("exact"),
    "gptq": Export("exact"),
}
_GGUF_APPROX = Export("approximate", "the ggml block type of least error for the dequantized weight")
GPTQ_BITS = (2, 3, 4, 8)  # what GPTQ loaders (AutoGPTQ, GPTQModel, vLLM) take


def _no_variant(head: str, variant: str | None) -> None:
    if variant:
        raise ValueError(f"{head} has no element variants such as {variant!r}")


class _Counted(ElementFormat):
    """Families whose head is a prefix and a bit count (W4, NF3, KM3)."""

    prefix = ""
    default: dict = {}

    def parse(self, head, variant):
        m = re.fullmatch(rf"{self.prefix}(\d+)", head)
        if not m:
            return None
        _no_variant(head, variant)
        return dict(dtype=self.dtypes[0], bits=int(m.group(1)), **self.default)

    def head(self, spec):
        return f"{self.prefix}{spec.bits}"


class IntFormat(_Counted):
    family, dtypes, heads, prefix = "int", ("int",), ("W<bits>",), "W"
    default = dict(granularity=PerGroup(128))
    kernels = ("reference", "cpu-int4", "triton")
    asymmetric = True
    exports = _INT_EXPORTS

    def export(self, spec, target):
        """The HF formats store integer zero points and one scale level; GPTQ loaders take 2, 3, 4 or 8 bits."""
        if target in ("compressed-tensors", "gptq"):
            if not spec.symmetric and spec.zero_dtype != "int":
                return Export("refused", f"an fp16 offset (-asymf) is not an integer zero point: use "
                                         f"{suggest(spec, zero_dtype='int')}")
            if spec.tensor_scale:
                return Export("refused", f"a second-level per-tensor scale (-ts) is not representable: use "
                                         f"{suggest(spec, scale_dtype='fp16', tensor_scale=False)}")
            if target == "gptq" and spec.bits not in GPTQ_BITS:
                up = suggest(spec, bits=min((b for b in GPTQ_BITS if b >= spec.bits), default=GPTQ_BITS[-1]))
                return Export("refused", f"GPTQ loaders (AutoGPTQ, GPTQModel, vLLM) support "
                                         f"{', '.join(map(str, GPTQ_BITS))} bits, not {spec.bits}: use {up} or export "
                                         "compressed-tensors")
        return super().export(spec, target)


class NFFormat(_Counted):
    family, dtypes, heads, prefix = "NormalFloat", ("nf",), ("NF<bits>",), "NF"
    default = dict(granularity=PerGroup(64))
    kernels = ("reference", "triton")
    exports = {"native": Export("exact"), "gguf": _GGUF_APPROX}

    def check_bits(self, spec):
        if spec.bits not in (2, 3, 4):
            raise ValueError(f"NormalFloat supports 2, 3 or 4 bits, got {spec.bits}")

    def export(self, spec, target):
        if target in ("compressed-tensors", "gptq"):
            return Export("refused", f"NormalFloat levels are not a uniform integer grid: use "
                                     f"{suggest(spec, dtype='int')}")
        return super().export(spec, target)


class KMeansFormat(_Counted):
    family, dtypes, heads, prefix = "k-means LUT", ("kmeans",), ("KM<bits>",), "KM"
    closed_form = False  # codebooks are fitted iteratively
    default = dict(granularity=PerChannel(), scale_dtype="none")
    kernels = ("reference", "triton")
    scales = ("none",)
    exports = {"native": Export("exact"), "gguf": _GGUF_APPROX}

    def scale_error(self, spec):
        return "kmeans codebooks carry their own magnitude: use scale_dtype='none'"

    def stored(self, spec, shape):
        out = super().stored(spec, shape)
        out["codebook"] = (16, (n_groups(spec.granularity, (int(shape[0]), int(shape[1]))), 2 ** spec.bits))
        return out

    def export(self, spec, target):
        if target in ("compressed-tensors", "gptq"):
            use = suggest(spec, dtype="int", scale_dtype="fp16", granularity=PerGroup(128))
            return Export("refused", f"a k-means codebook is not a uniform integer grid: use {use} or W{spec.bits}-channel")
        return super().export(spec, target)


class MinifloatFormat(ElementFormat):
    family, dtypes, heads = "minifloat", tuple(FLOAT_DTYPES), ("FP8[-e5m2]", "FP6[-e3m2|-e2m3]", "FP4")
    kernels = ("reference", "triton")
    exports = {"native": Export("exact"), "gguf": _GGUF_APPROX}
    _NAME = {"fp8_e4m3": "FP8", "fp8_e5m2": "FP8-e5m2", "fp6_e3m2": "FP6-e3m2", "fp6_e2m3": "FP6-e2m3", "fp4_e2m1": "FP4"}
    _DEFAULT = {"FP8": "e4m3", "FP6": "e2m3", "FP4": "e2m1"}

    def parse(self, head, variant):
        if head not in self._DEFAULT:
            return None
        dt = f"{head.lower()}_{variant or self._DEFAULT[head]}"
        if dt not in FLOAT_DTYPES:
            raise ValueError(f"{head} has no {variant} variant")
        return dict(dtype=dt, bits=FLOAT_DTYPES[dt], granularity=PerChannel(),
                    scale_dtype="fp32" if head == "FP8" else "fp16")

    def check_bits(self, spec):
        if spec.bits != FLOAT_DTYPES[spec.dtype]:
            raise ValueError(f"{spec.dtype} has {FLOAT_DTYPES[spec.dtype]} bits, got bits={spec.bits}")

    def head(self, spec):
        return self._NAME[spec.dtype]

    def quiet_scales(self, spec):
        return ("none",) if spec.bits == 8 else ("fp16", "none")  # FP8's default scale is fp32: fp16 is spelled

    def export(self, spec, target):
        if target in ("compressed-tensors", "gptq"):
            return Export("refused", f"floating-point elements ({spec.name}) are unsupported (this export writes "
                                     "integer grids only): keep the native directory, or use an integer spec such "
                                     "as W8-channel or W4-g128")
        return super().export(spec, target)


class MXFormat(MinifloatFormat):
    """OCP MX: minifloat (or int8) elements with an E8M0 scale per 32; a scale scheme over other families' dtypes."""

    family, dtypes, heads, fixed = "MX", (), ("MXFP8[-e5m2]", "MXFP6[-e3m2]", "MXFP4", "MXINT8"), True
    _HEAD = {"fp8_e4m3": "MXFP8", "fp8_e5m2": "MXFP8-e5m2", "fp6_e2m3": "MXFP6", "fp6_e3m2": "MXFP6-e3m2",
             "fp4_e2m1": "MXFP4", "int": "MXINT8"}

    def claims(self, spec):
        return (spec.scale_dtype == "e8m0" and spec.granularity == PerGroup(32) and spec.dtype in self._HEAD
                and (spec.dtype != "int" or (spec.bits == 8 and spec.symmetric)))

    def parse(self, head, variant):
        if head == "MXINT8":
            _no_variant(head, variant)
            return dict(dtype="int", bits=8, granularity=PerGroup(32), scale_dtype="e8m0")
        if head not in ("MXFP8", "MXFP6", "MXFP4"):
            return None
        dt = f"{head[2:].lower()}_{variant or self._DEFAULT[head[2:]]}"
        if dt not in FLOAT_DTYPES:
            raise ValueError(f"{head} has no {variant} variant")
        return dict(dtype=dt, bits=FLOAT_DTYPES[dt], granularity=PerGroup(32), scale_dtype="e8m0")

    def name(self, spec):
        return self._HEAD[spec.dtype] + ("-mse" if spec.clip == "mse" else "")

    def export(self, spec, target):
        if spec.dtype == "int":
            return _INT_EXPORTS[target] if target in _INT_EXPORTS else super().export(spec, target)
        if target == "gguf" and spec.dtype == "fp4_e2m1":
            return Export("exact", "ggml's MXFP4 block type")
        return super().export(spec, target)


class NVFP4Format(MinifloatFormat):
    family, dtypes, heads, fixed = "NVFP4", (), ("NVFP4",), True

    def claims(self, spec):
        return (spec.dtype == "fp4_e2m1" and spec.scale_dtype == "e4m3" and spec.tensor_scale
                and spec.granularity == PerGroup(16))

    def parse(self, head, variant):
        if head != "NVFP4":
            return None
        _no_variant(head, variant)
        return dict(dtype="fp4_e2m1", bits=4, granularity=PerGroup(16), scale_dtype="e4m3", tensor_scale=True)

    def name(self, spec):
        return "NVFP4" + ("-mse" if spec.clip == "mse" else "")


class KeepFormat(ElementFormat):
    """fp16 / bf16 / fp32: the tensor kept in floating point (a "keep" choice, not a quantizer)."""

    family, dtypes, heads = "float (kept)", tuple(KEEP_DTYPES), ("FP16", "BF16", "FP32")
    keeps_float = True
    scales = ("none",)

    def export(self, spec, target):
        return Export("exact")  # a float tensor: every export target (mixq.export.registry) stores it as it is

    def scale_error(self, spec):
        return f"{spec.dtype} keeps the tensor in floating point: use scale_dtype='none'"

    def parse(self, head, variant):
        if head.lower() not in KEEP_DTYPES:
            return None
        _no_variant(head, variant)
        return dict(dtype=head.lower(), bits=KEEP_DTYPES[head.lower()], granularity=PerTensor(), scale_dtype="none")

    def check_bits(self, spec):
        if spec.bits != KEEP_DTYPES[spec.dtype]:
            raise ValueError(f"{spec.dtype} has {KEEP_DTYPES[spec.dtype]} bits, got bits={spec.bits}")

    def name(self, spec):
        g = [] if spec.granularity == PerTensor() else [str(spec.granularity)]
        return "-".join([spec.dtype.upper(), *g] + (["mse"] if spec.clip == "mse" else []))

    def stored(self, spec, shape):
        return {"codes": (spec.bits, (int(shape[0]), int(shape[1])))}


BUILTIN: tuple[ElementFormat, ...] = (MXFormat(), NVFP4Format(), IntFormat(), NFFormat(), KMeansFormat(),
                                      MinifloatFormat(), KeepFormat(), *GGML_FAMILIES)
