"""KV-cache settings and exact per-layer costs.

:class:`KVSettings` is the KIVI layout (key / value groups, fp residual window, zero points) plus the options
of :mod:`.kv_codec` — important tokens at high precision (MiKV), pre-RoPE keys (KVQuant), Hadamard rotation —
which the simulation (:mod:`.kv_sim`), the real cache (:mod:`.kv_cache`) and the measurement (:mod:`mixq.act.kvsens`)
all apply.

:func:`kv_part_bits` is the exact bit count of one layer's K (or V) at ``context`` tokens for ``batch``
sequences, derived from :func:`mixq.runtime.kv_cost.kv_cache_bits` (so a per-layer plan's K + V parts add up to
``kv_cache_bits`` of that plan exactly).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from .kv_codec import FP, VALID_BITS, important_count, kv_spec, normalize_rotate
from .kv_cost import kv_cache_bits

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
