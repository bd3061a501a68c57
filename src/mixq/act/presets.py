"""Preset names.

W/A presets: ``W4A8``, ``W8A8``, ``W4A4-rot``, ``W8A8-fp8``, ``MXFP4``, ``NVFP4`` → weight spec, act spec,
rotate.  The weight spec goes to the weight quantizer (RTN/GPTQ/AWQ, with the usual group fallback),
the activation spec to :func:`mixq.act.actquant.apply_act_quant`, and ``rotate`` to
:func:`mixq.act.outliers.prepare_for_act_quant` (before both).

KV presets (:func:`parse_kv_preset`, ``mixq eval --kv``): ``KV4``, ``KV2-kivi``, ``K4V2``, ``KV2-r0``,
``KV2-mikv`` (20 % of each key group's tokens — the most attended — at 8 bits), ``KV4-prerope``
(keys quantized before RoPE), ``KV2-rot`` (Hadamard-rotated K and V), or the long ``kivi:...`` form
→ ``(bits, KVSettings)``.
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


# ---------------------------------------------------------------------------- KV cache
KV_MIKV_FRACTION, KV_MIKV_BITS = 0.2, 8
_KV_LONG = {"residual": "residual", "r": "residual", "group": "k_group", "k_group": "k_group", "g": "k_group",
            "vgroup": "v_group", "v_group": "v_group", "zero": "zero", "important": "important", "keep": "important",
            "mikv": "important", "important_bits": "important_bits", "hi": "important_bits",
            "pre_rope": "pre_rope", "prerope": "pre_rope", "rotate": "rotate", "rot": "rotate"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "none", "")


def parse_kv_preset(text: str):
    """``(bits, KVSettings)`` of a ``--kv`` value; raises ``ValueError`` with a one-line reason.

    Short form ``[KV]<b>`` / ``<k>/<v>`` / ``K<k>V<v>`` followed by options: ``-kivi`` (the default
    layout), ``-r<N>`` fp window, ``-g<N>`` key group, ``-nowin`` (``-r0``), ``-mikv[<PCT>]`` important
    tokens (default 20 % of each key group at 8 bits; ``-mikv10`` = 10 %), ``-hi<B>`` their bits
    (``-hi16`` keeps them fp), ``-prerope`` keys quantized before RoPE, ``-rot`` / ``-rotk`` /
    ``-rotv`` Hadamard rotation of K and V / K / V.  E.g. ``KV2-mikv``, ``KV3-prerope``, ``KV2-rot``.
    Long form ``kivi:BITS[:residual=R][:group=G][:vgroup=N][:zero=int][:important=F][:hi=B]
    [:pre_rope=1][:rotate=k|v|kv]``.
    """
    from ..runtime.kv_codec import FP  # noqa: PLC0415
    from ..runtime.kv_cost import resolve_kv_bits  # noqa: PLC0415
    from ..runtime.kv_settings import KVSettings  # noqa: PLC0415

    t = str(text).strip()
    opts: dict = {}
    if t.lower().startswith("kivi:"):
        parts = t.split(":")[1:]
        if not parts or not parts[0]:
            raise ValueError("use kivi:BITS[:residual=R][:group=G][:vgroup=N][:zero=int][:important=F][:hi=B]"
                             "[:pre_rope=1][:rotate=kv]")
        bits = _kv_bits(parts[0])
        for p in parts[1:]:
            name = p.split("=", 1)[0].strip().lower()
            if "=" not in p or name not in _KV_LONG:
                raise ValueError(f"unknown option {p!r} (residual=, group=, vgroup=, zero=, important=, hi=, "
                                 "pre_rope=, rotate=)")
            key, v = _KV_LONG[name], p.split("=", 1)[1].strip()
            if key == "zero":
                opts[key] = v
            elif key == "important":
                opts[key] = _number(v, name, float)
            elif key == "pre_rope":
                if v.lower() not in _TRUE + _FALSE:
                    raise ValueError(f"{name}={v!r}: use 1 or 0")
                opts[key] = v.lower() in _TRUE
            elif key == "rotate":
                low = v.lower()
                opts[key] = "kv" if low in _TRUE else "" if low in _FALSE else low
            else:
                opts[key] = _number(v, name, int)
    else:
        m = re.fullmatch(r"(?i)(?:kv)?(\d+(?:/\d+)?|k\d+v\d+)((?:-[a-z0-9]+)*)", t)
        if not m:
            raise ValueError("use 4, 4/2, KV4, KV2-kivi, KV4-r0, K4V2, KV2-mikv, KV4-prerope, KV2-rot or "
                             "kivi:BITS[:residual=R][:group=G]")
        bits = _kv_bits(m.group(1))
        for tok in [x for x in m.group(2).lower().split("-") if x]:
            if tok == "kivi":
                continue
            if re.fullmatch(r"r\d+", tok):
                opts["residual"] = int(tok[1:])
            elif re.fullmatch(r"g\d+", tok):
                opts["k_group"] = int(tok[1:])
            elif tok == "nowin":
                opts["residual"] = 0
            elif re.fullmatch(r"mikv\d*", tok):
                pct = int(tok[4:]) if tok[4:] else round(100 * KV_MIKV_FRACTION)
                if not 0 < pct < 100:
                    raise ValueError(f"-{tok}: the percentage of important tokens must be 1..99")
                opts["important"] = pct / 100
            elif re.fullmatch(r"hi\d+", tok):
                opts["important_bits"] = int(tok[2:])
            elif tok in ("prerope", "pre_rope"):
                opts["pre_rope"] = True
            elif tok in ("rot", "rotkv", "rotk", "rotv"):
                opts["rotate"] = tok[3:] or "kv"
            else:
                raise ValueError(f"unknown option -{tok} (use -kivi, -r<N>, -g<N>, -nowin, -mikv[<PCT>], -hi<B>, "
                                 "-prerope, -rot, -rotk, -rotv)")
    if "important_bits" in opts and not opts.get("important"):
        raise ValueError("the important tokens' bits (hi) need important tokens: add -mikv (or important=F)")
    if opts.get("important"):
        opts.setdefault("important_bits", KV_MIKV_BITS)
    pairs = resolve_kv_bits(bits, 1)
    settings = KVSettings(**opts)
    widths = {b for pair in pairs for b in pair}
    quantized = widths - {FP}
    if settings.important:
        if not quantized:
            raise ValueError("important tokens need a KV width below 16 bits")
        if settings.important_bits <= max(quantized):
            raise ValueError(f"important tokens at {settings.important_bits} bits must be wider than the KV bits "
                             f"({max(quantized)})")
    if settings.pre_rope and pairs[0][0] == FP:
        raise ValueError("pre-RoPE applies to the keys, which stay at 16 bits here")
    if settings.rotate and all(pairs[0][i] == FP for i, kind in enumerate("kv") if kind in settings.rotate):
        raise ValueError(f"rotation of {'/'.join(settings.rotate.upper())}: nothing rotated is quantized here")
    return bits, settings


def _kv_bits(s: str):
    s = s.strip().lower()
    try:
        m = re.fullmatch(r"k(\d+)v(\d+)", s)
        if m:
            return int(m.group(1)), int(m.group(2))
        if "/" in s:
            a, b = s.split("/", 1)
            return int(a), int(b)
        return int(s)
    except ValueError:
        raise ValueError(f"KV bits must be 1..8 or 16 (or K/V like 4/2), got {s!r}") from None


def _number(v: str, name: str, kind):
    try:
        return kind(v)
    except ValueError:
        raise ValueError(f"{name}={v!r}: expected {'an integer' if kind is int else 'a number'}") from None
