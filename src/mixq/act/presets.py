"""W/A preset names: ``W4A8``, ``W8A8``, ``W4A4-rot``, ``W8A8-fp8``, ``MXFP4``, ``NVFP4`` → weight spec, act spec, rotate.

The weight spec goes to the weight quantizer (RTN/GPTQ/AWQ, with the usual group fallback), the
activation spec to :func:`mixq.act.actquant.apply_act_quant`, and ``rotate`` to
:func:`mixq.act.outliers.prepare_for_act_quant` (before both).
"""
from __future__ import annotations

import re
from typing import NamedTuple

from ..config import QuantSpec, parse_spec
from .actquant import parse_act_spec


class WAPreset(NamedTuple):
    """``(weight spec | None, activation spec | None, rotate)`` of a ``W<b>A<b>`` preset name."""

    weight: QuantSpec | None
    act: QuantSpec | None
    rotate: bool


def parse_wa_preset(name: str, mode: str = "dynamic") -> WAPreset:
    """``W4A8``, ``W8A8``, ``W4A4-rot``, ``W4A16-g64``, ``W8A8-fp8``, ``MXFP4``, ``NVFP4-rot`` → :class:`WAPreset`.

    ``W<wb>A<ab>``: int weights (``-g<N>``, default ``channel`` for 8 bits, else ``g128``; ``W16`` keeps
    them), int activations ``A<ab>`` per token (``A16``: none); ``-fp8`` makes both FP8 (weights per
    channel, activations per token); ``MXFP4``/``MXFP8``/``NVFP4`` use the block format for both;
    ``-rot`` asks for a QuaRot rotation first (:func:`mixq.act.outliers.prepare_for_act_quant`).
    """
    toks = [t for t in str(name).strip().split("-") if t]
    if not toks:
        raise ValueError("empty W/A preset: use e.g. W4A8, W8A8, W4A4-rot, MXFP4, NVFP4")
    head, rest = toks[0].upper(), [t.lower() for t in toks[1:]]
    rotate = "rot" in rest
    rest = [t for t in rest if t != "rot"]
    if head in ("MXFP4", "MXFP8", "MXFP6", "NVFP4"):
        if rest:
            raise ValueError(f"{head} preset takes only -rot, got {rest}")
        return WAPreset(parse_spec(head), parse_act_spec(head, mode), rotate)
    m = re.fullmatch(r"W(\d+)A(\d+)", head)
    if not m:
        raise ValueError(f"unknown W/A preset {name!r}: use W<bits>A<bits>[-gN][-fp8][-rot], MXFP4 or NVFP4")
    wb, ab = int(m.group(1)), int(m.group(2))
    fp8 = "fp8" in rest
    rest = [t for t in rest if t != "fp8"]
    gran = None
    for t in rest:
        if re.fullmatch(r"g\d+|channel", t):
            gran = t
        else:
            raise ValueError(f"W/A preset {name!r}: unknown option {t!r}")
    if fp8:
        if (wb, ab) != (8, 8) or gran:
            raise ValueError(f"-fp8 applies to W8A8 only (FP8 weights per channel), got {name!r}")
        return WAPreset(parse_spec("FP8"), parse_act_spec("FP8", mode), rotate)
    weight = None if wb == 16 else parse_spec(f"W{wb}-{gran or ('channel' if wb >= 8 else 'g128')}")
    act = None if ab == 16 else parse_act_spec(f"A{ab}", mode)
    return WAPreset(weight, act, rotate)


__all__ = ["MODES", "ActQuantizer", "ActQuantHandle", "WAPreset", "apply_act_quant", "calibrate_act_absmax",
           "check_act_spec", "fake_quant_act", "parse_act_spec", "parse_wa_preset"]
