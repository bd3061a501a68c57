"""KV-cache settings: the KIVI layout and its options, their ``--kv`` names, and exact per-layer costs.

:class:`KVSettings` is the KIVI layout (key / value groups, fp residual window, zero points) plus the options
of :mod:`.kv_codec` — important tokens at high precision (MiKV), pre-RoPE keys (KVQuant), Hadamard rotation —
which the simulation (:mod:`.kv_sim`), the real cache (:mod:`.kv_cache`) and the measurement
(:mod:`mixq.measure.kv`) all apply.

:func:`parse_kv_preset` reads the names of ``mixq eval --kv`` / ``mixq plan --kv-uniform``: ``KV4``, ``KV2-kivi``,
``K4V2``, ``KV2-r0``, ``KV2-mikv`` (20 % of each key group's tokens — the most attended — at 8 bits),
``KV4-prerope`` (keys quantized before RoPE), ``KV2-rot`` (Hadamard-rotated K and V), or the long ``kivi:...``
form → ``(bits, KVSettings)``.

:func:`kv_part_bits` is the exact bit count of one layer's K (or V) at ``context`` tokens for ``batch``
sequences, derived from :func:`mixq.runtime.kv_cost.kv_cache_bits` (so a per-layer plan's K + V parts add up to
``kv_cache_bits`` of that plan exactly).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace

from .kv_codec import FP, VALID_BITS, important_count, kv_spec, normalize_rotate
from .kv_cost import kv_cache_bits, resolve_kv_bits

_BASE_FIELDS = ("k_group", "v_group", "residual", "zero")
_OPTION_DEFAULTS = {"important": 0.0, "important_bits": 8, "pre_rope": False, "rotate": ""}


@dataclass(frozen=True)
class KVSettings:
    """KIVI layout: ``k_group`` tokens per key group, ``v_group`` channels per value group (None:
    head_dim), ``residual`` fp tokens, ``zero`` ``"fp16"`` offset (KIVI) or ``"int"`` zero point.

    Options (:mod:`.kv_codec`): ``important`` fraction of each key group's tokens — the most attended
    so far — kept at ``important_bits`` (MiKV/ZipCache; 0 = off); ``pre_rope`` quantizes keys before
    the rotary embedding (KVQuant); ``rotate`` ``"k"``, ``"v"`` or ``"kv"`` (``True`` = ``"kv"``)
    quantizes in a Hadamard-rotated basis (QuaRot)."""

    k_group: int = 32
    v_group: int | None = None
    residual: int = 32
    zero: str = "fp16"
    important: float = 0.0
    important_bits: int = 8
    pre_rope: bool = False
    rotate: str = ""

    def __post_init__(self):
        for name in ("k_group", "residual"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "k_group" else 0):
                raise ValueError(f"KV {name} must be an integer >= {1 if name == 'k_group' else 0}, got {v!r}")
        if self.v_group is not None and (isinstance(self.v_group, bool) or not isinstance(self.v_group, int)
                                         or self.v_group < 1):
            raise ValueError(f"KV v_group must be a positive integer or None, got {self.v_group!r}")
        kv_spec(4, self.zero)  # validates zero
        important_count(self.important, self.k_group)  # validates the fraction against the key group
        if isinstance(self.important_bits, bool) or self.important_bits not in VALID_BITS:
            raise ValueError(f"KV important_bits must be 1..8 or 16, got {self.important_bits!r}")
        if not isinstance(self.pre_rope, bool):
            raise ValueError(f"KV pre_rope must be True or False, got {self.pre_rope!r}")
        object.__setattr__(self, "important", float(self.important))
        object.__setattr__(self, "rotate", normalize_rotate(self.rotate))

    @property
    def important_tokens(self) -> int:
        """Important tokens per key group (0: off)."""
        return important_count(self.important, self.k_group)

    def kw(self) -> dict:
        """Keyword arguments of :class:`KIVICache` / :func:`kv_cache_bits` / ``eval_with_kv_quant``."""
        return {"k_group": self.k_group, "v_group": self.v_group, "residual": self.residual, "zero": self.zero,
                "important": self.important, "important_bits": self.important_bits, "pre_rope": self.pre_rope,
                "rotate": self.rotate}

    def to_dict(self) -> dict:
        """The KIVI layout, plus the options that differ from their defaults (so documents written
        before the options existed are unchanged)."""
        d = {k: getattr(self, k) for k in _BASE_FIELDS}
        d.update({k: getattr(self, k) for k, v in _OPTION_DEFAULTS.items() if getattr(self, k) != v})
        return d

    def describe(self) -> str:
        """A short text of the options (``""`` when none): ``important 20% @ 8 bits, pre-RoPE keys, rotated K/V``."""
        out = []
        if self.important:
            out.append(f"important {self.important:.0%} of tokens ({self.important_tokens}/{self.k_group}) at "
                       f"{self.important_bits} bits")
        if self.pre_rope:
            out.append("pre-RoPE keys")
        if self.rotate:
            out.append(f"Hadamard-rotated {'/'.join(self.rotate.upper())}")
        return ", ".join(out)

    @classmethod
    def from_dict(cls, d: dict) -> "KVSettings":
        unknown = set(d) - set(_BASE_FIELDS) - set(_OPTION_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown KV settings {sorted(unknown)}")
        return cls(**d)


def _one_layer_config(dims: tuple[int, int, int]):
    _, h, d = dims
    return SimpleNamespace(num_hidden_layers=1, num_attention_heads=h, num_key_value_heads=h, head_dim=d,
                           hidden_size=h * d)


def kv_part_bits(dims: tuple[int, int, int], kind: str, bits: int, context: int, batch: int = 1,
                 settings: KVSettings = KVSettings(), fp_bits: int = 16) -> int:
    """Exact bits of one layer's keys (``kind="k"``) or values at ``bits`` holding ``context`` tokens
    for ``batch`` sequences; ``dims = (n_layers, n_kv_heads, head_dim)``.

    ``kv_cache_bits`` of that layer with the other tensor at 16 bits, minus the other tensor's
    ``B·H·T·D·fp_bits``: the parts of a plan add up to its ``kv_cache_bits`` exactly.
    """
    if kind not in ("k", "v"):
        raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be >= 1, got {context}, {batch}")
    _, h, d = dims
    pair = (bits, FP) if kind == "k" else (FP, bits)
    total = kv_cache_bits(_one_layer_config(dims), pair, context, batch, fp_bits=fp_bits, **settings.kw())["total"]
    return int(total - batch * h * context * d * fp_bits)


# ---------------------------------------------------------------------------- names (``--kv``)
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
