"""The one spec grammar: :func:`parse_spec` reads every spec name — plain grids and intra-tensor composites.

::

    SPEC  := PLAIN | BASE ( "+" EXT )*        composites (:mod:`mixq.config.composite` has their EXT grammar
                                              and exact cost); SLIM<b>-... and BIN[-GRAN] bases are composites
    PLAIN := HEAD[-GRAN][-asym|-asymf][-mse][-sDTYPE][-ts]

HEAD is a head a registered element-format family parses (:func:`mixq.config.registry.parse_head`; built in:
``W<bits>`` (int), ``NF<bits>``, ``KM<bits>``, ``FP8``, ``FP8-e5m2``, ``FP6-e3m2``, ``FP6-e2m3``, ``FP4``,
``MXFP8``, ``MXFP6``, ``MXFP4``, ``MXINT8``, ``NVFP4``, ``FP16``, ``BF16``, ``FP32``); GRAN one of ``gN``,
``channel``, ``tensor``; ``ts`` adds an fp32 per-tensor scale (with ``-se4m3``).  ``parse_spec(spec.name) == spec``
for every spec, plain or composite.
"""
from __future__ import annotations

import re
from fractions import Fraction

from ..granularity import parse_granularity
from .composite import CompositeSpec, extend
from .protocol import SCALE_BITS
from .registry import composite_by_type, heads, parse_composite, parse_head
from .spec import QuantSpec

_EXT = re.compile(r"^(?:o(?P<o>\d+(?:\.\d+)?|\.\d+)(?:w(?P<ow>\d+))?|c(?P<c>\d+)|r(?P<r>\d+)"
                  r"|sq(?P<sq>\d+)(?:g(?P<sqg>\d+))?|d(?P<d>\d+)|h(?P<h>\d+(?:\.\d+)?|\.\d+)(?:w(?P<hw>\d+))?|(?P<ip>ip1?))$")
_SLIM = re.compile(r"^SLIM(\d+)(.*)$", re.IGNORECASE)
_BIN = re.compile(r"^BIN(-.*)?$", re.IGNORECASE)
_VQ = re.compile(r"^VQ(\d+(?:\.\d+)?)(?:x(\d+))?(-.*)?$", re.IGNORECASE)
_TCQ = re.compile(r"^TCQ(\d+(?:\.\d+)?)(?:L(\d+))?(-.*)?$", re.IGNORECASE)


def parse_spec(x) -> QuantSpec:
    """A spec from a name (``W4-g128``, ``NVFP4``, ``W3-g64+o0.5``, ``SLIM3-g64``, ``BIN-g128+r8``, ``VQ2.5-g64+ip``,
    ``TCQ3-channel+ip``, ``TCQ3L10-channel+ip``), a
    ``to_dict()`` dict or a spec: a :class:`QuantSpec` for plain names, a :class:`CompositeSpec` for composites, a
    registered composite family's spec for its names (:meth:`~mixq.config.composite_protocol.CompositeFormat.parse`)."""
    if isinstance(x, QuantSpec):
        return x
    if isinstance(x, dict):
        fam = composite_by_type(x.get("_type"))  # a composite family's dict (CompositeSpec for the built-in ones)
        return fam.from_dict(x) if fam is not None else QuantSpec.from_dict(x)
    if not isinstance(x, str):
        raise ValueError(f"a spec is a name or a to_dict() dict, got {type(x).__name__}")
    raw = x.strip()
    own = parse_composite(raw)  # a registered composite family's own names
    if own is not None:
        return own
    head, *exts = [t.strip() for t in raw.split("+")]
    m = _SLIM.match(head)
    mb = _BIN.match(head)
    mv = _VQ.match(head)
    mt = _TCQ.match(head)
    if not exts and not m and not mb and not mv and not mt:
        return _parse_plain(head)
    kw: dict = {}
    if m:
        head = f"W{m.group(1)}{m.group(2)}"
        kw["slim"] = True
    elif mb:
        head = "W1" + (mb.group(1) or "-g128")
        kw["binary"] = True
    elif mv:
        d = int(mv.group(2) or 2)
        k = Fraction(mv.group(1)) * d
        if k.denominator != 1 or d < 1:
            raise ValueError(f"bad VQ spec {raw!r}: the rate times d ({d}) must be a whole number of code bits")
        head = f"W{-(-int(k) // d)}" + (mv.group(3) or "-g64")
        kw.update(vq_dim=d, vq_bits=int(k))
    elif mt:
        k2 = Fraction(mt.group(1)) * 2
        if k2.denominator != 1:
            raise ValueError(f"bad TCQ spec {raw!r}: the rate must be a multiple of 0.5 bits")
        head = f"W{-(-int(k2) // 2)}" + (mt.group(3) or "-channel")
        kw["trellis"] = int(k2)
        if mt.group(2):
            kw["state_bits"] = int(mt.group(2))
    for t in exts:
        e = _EXT.match(t.lower())
        if not e:
            raise ValueError(f"bad extension {t!r} in {raw!r}: use +o<percent> (sparse fp16 outliers), "
                             "+c<k> (fp16 input columns), +sq<bits>[g<rows>] (quantized group scales) "
                             "+h<percent>[w<bits>] (high-precision output rows), +d<D> (block dialects), "
                             "+ip (incoherence processing; +ip1: the input side only) "
                             "or, on BIN, +r<k> (residual-binarized columns) and +o<percent>w<bits>")
        if e.group("ip") is not None:
            key, val = "incoherent", True
            if e.group("ip") == "ip1":
                kw["ip_one_sided"] = True
        elif e.group("o") is not None:
            key, val = "outliers", float(e.group("o"))
            if e.group("ow") is not None:
                kw["outlier_bits"] = int(e.group("ow"))
        elif e.group("r") is not None:
            key, val = "residual", int(e.group("r"))
        elif e.group("c") is not None:
            key, val = "columns", int(e.group("c"))
        elif e.group("d") is not None:
            key, val = "dialects", int(e.group("d"))
        elif e.group("h") is not None:
            key, val = "hi_rows", float(e.group("h"))
            if e.group("hw") is not None:
                kw["hi_bits"] = int(e.group("hw"))
        else:
            key, val = "sq_bits", int(e.group("sq"))
            if e.group("sqg") is not None:
                kw["sq_group"] = int(e.group("sqg"))
        if key in kw:
            raise ValueError(f"extension {t!r} is given twice in {raw!r}")
        kw[key] = val
    try:
        return extend(_parse_plain(head), **kw)
    except ValueError as err:
        raise ValueError(f"bad composite spec {raw!r}: {err}") from None


def compose(base: QuantSpec | str, **ext) -> CompositeSpec:
    """``compose("W3-g64", outliers=0.5)``: a composite from a plain base spec (or its name) and extension fields."""
    return extend(parse_spec(base), **ext)


def _parse_plain(raw: str) -> QuantSpec:
    if not raw:
        raise ValueError("empty spec name: use a preset such as W4-g128 (see `mixq specs`)")
    toks = [t for t in raw.split("-") if t]
    head = toks[0].upper()
    rest = [t.lower() for t in toks[1:]]
    try:
        return _parse(head, rest, raw)
    except ValueError as e:
        if str(e).startswith("unknown spec"):
            raise
        raise ValueError(f"bad spec {raw!r}: {e}") from None


def _parse(head: str, rest: list[str], raw: str) -> QuantSpec:
    # minifloat element variants written as a second token (FP8-e5m2, MXFP6-e3m2)
    variant = rest.pop(0) if rest and re.fullmatch(r"e\dm\d", rest[0]) else None
    found = parse_head(head, variant)
    if found is None:
        if variant:
            raise ValueError(f"{head} has no element variants such as {variant!r}")
        raise ValueError(f"unknown spec {raw!r}: use {', '.join(heads())} with -g<N>, -asym, ... "
                         "(e.g. W4-g128, NF4-g64, MXFP4; `mixq specs` lists presets)")
    fam, kw = found
    for t in rest:
        if fam.fixed and t != "mse":
            raise ValueError(f"{head} is a fixed block format; option {t!r} is not allowed (only -mse)")
        if t in ("asym", "asymf"):
            kw["symmetric"] = False
            kw["zero_dtype"] = "int" if t == "asym" else "fp16"
        elif t == "sym":
            kw["symmetric"] = True
            kw["zero_dtype"] = "int"
        elif t == "mse":
            kw["clip"] = "mse"
        elif t.startswith("s") and t[1:] in SCALE_BITS:
            kw["scale_dtype"] = t[1:]
        elif t == "ts":
            kw["tensor_scale"] = True
        else:
            kw["granularity"] = parse_granularity(t)
    return QuantSpec(**kw)
