"""Runtime targets (``--target`` of ``plan``, ``quantize``, ``measure --candidates``): which specs a runtime holds
exactly for a layer's shape, and the candidates a target's measurement starts from.

A plan made under a target only chooses, per layer, specs the target's predicate accepts for that layer's
``[out, in]`` shape; its export (``mixq export --format <target>``) then writes every layer as it is,
with no re-quantization and no fallback.  A new target is one module with a predicate and a candidate list,
registered here.

============================  ======================================  ============================================
target                        predicate                               written by
============================  ======================================  ============================================
``gguf``                      :func:`mixq.export.ggml_exact.ggml_exact_type`   ``mixq export --format gguf``
``gptq``                      :func:`mixq.export.hf_exact.gptq_holds`         ``mixq export --format gptq``
``compressed-tensors``        :func:`mixq.export.hf_exact.ct_holds`           ``mixq export --format compressed-tensors``
============================  ======================================  ============================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import parse_spec
from . import ggml_exact, hf_exact


@dataclass(frozen=True)
class RuntimeTarget:
    name: str
    holds: Callable[[object, tuple[int, int]], bool]  # (spec, [out, in]) -> held exactly
    candidates: tuple[str, ...]                        # spec names a --target measurement uses by default
    summary: str                                       # one line for --help


_REGISTRY: dict[str, RuntimeTarget] = {}


def register(target: RuntimeTarget) -> RuntimeTarget:
    if target.name in _REGISTRY:
        raise ValueError(f"runtime target {target.name!r} is already registered")
    _REGISTRY[target.name] = target
    return target


register(RuntimeTarget(
    "gguf", lambda s, shape: ggml_exact.ggml_exact_type(s, shape) is not None, ggml_exact.GGUF_CANDIDATE_NAMES,
    "the ggml block types of the row length (Q8_0/Q5_x/Q4_x/IQ4_NL/MXFP4 on multiples of 32, the K-quants "
            "Q2_K..Q6_K on multiples of 256)"))
register(RuntimeTarget(
    "gptq", hf_exact.gptq_holds, hf_exact.GPTQ_CANDIDATE_NAMES,
    "symmetric int grids of 2/3/4/8 bits, fp16 scales, channel or groups dividing the row (GPTQModel, vLLM)"))
register(RuntimeTarget(
    "compressed-tensors", hf_exact.ct_holds, hf_exact.CT_CANDIDATE_NAMES,
    "symmetric int grids of 2-8 bits, fp16 scales, channel or groups dividing the row (transformers, vLLM)"))

TARGETS: tuple[str, ...] = tuple(_REGISTRY)


def get(target: str) -> RuntimeTarget:
    try:
        return _REGISTRY[target]
    except KeyError:
        raise ValueError(f"unknown runtime target {target!r}: choose one of {', '.join(_REGISTRY)}") from None


def holds_exactly(target: str, spec, shape: tuple[int, int]) -> bool:
    """Whether runtime ``target`` holds ``spec`` exactly for a weight of ``shape`` (``[out, in]``)."""
    return bool(get(target).holds(spec, tuple(int(x) for x in shape)))


def target_candidates(target: str) -> list:
    """The default candidate specs of a runtime target."""
    return [parse_spec(n) for n in get(target).candidates]


def help_text() -> str:
    return "; ".join(f"{t.name}: {t.summary}" for t in _REGISTRY.values())
