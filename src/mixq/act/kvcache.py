"""KIVI KV-cache quantization for Hugging Face models (Liu et al., 2024, arXiv:2402.02750).

Per layer and head, with ``K, V [B, H, T, D]`` (``H`` key/value heads):

keys, per channel
    tokens are quantized in groups of ``G = k_group`` consecutive tokens; within a group each
    channel ``d`` has its own grid (KIVI §3.2: key outliers are fixed channels)::

        rows of K[b, h, jG:(j+1)G, d]  (length G)  →  one (scale, zero) each

values, per token
    each token's ``D`` channels in groups of ``v_group`` (default ``D``)::

        rows of V[b, h, t, kG_v:(k+1)G_v]  →  one (scale, zero) each

residual window
    the ``R = residual`` most recent tokens stay in full precision.  After every update the
    oldest tokens beyond the window are quantized: values token by token (fp window exactly
    ``min(T, R)``), keys a whole group of ``G`` at a time (fp window in ``[R, R + G)``), so the
    quantized key tokens are ``Tq = G·⌊(T − R)/G⌋`` and the quantized value tokens ``Tv = T − R``
    (when positive) — whatever the chunking of the updates.

Every row uses :func:`mixq.formats.quantize` with :func:`kv_spec` (KIVI's asymmetric min/max int
grid, ``x̂ = scale·q + offset`` with fp16 ``scale`` and ``offset``; ``zero="int"`` stores a
``bits``-bit zero point instead).  ``bits = 16`` keeps that tensor in the model's dtype.

What attention sees on an update with new states ``K_new``: ``[dequant(quantized), fp window,
K_new]`` — the new tokens attend to themselves in full precision (so a prefill is exact, as in
KIVI), then the window is flushed.  Feeding one token at a time reproduces decoding; a chunk of
``c`` tokens sees the cache as it was before the chunk.

Not done: pre-RoPE key quantization (KVQuant).  HF attention hands the cache post-RoPE keys and no
positions, so it would need the rotary tables and positions passed in (un-rotate, quantize,
re-rotate) — invasive per family.  Sliding-window layers (Gemma 3, Mistral with a window) are
rejected.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache, get_layer_types_and_kwargs

from ..config import QuantSpec
from ..formats import dequantize, quantize
from ..granularity import PerToken

FP = 16
VALID_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FP)


def kv_spec(bits: int, zero: str = "fp16") -> QuantSpec | None:
    """Row spec of a KIVI grid: asymmetric int, fp16 scale, fp16 offset (``"fp16"``) or int zero; ``None`` at 16 bits."""
    if bits not in VALID_BITS:
        raise ValueError(f"KV bits must be 1..8 or 16, got {bits!r}")
    if zero not in ("fp16", "int"):
        raise ValueError(f"KV zero must be 'fp16' (KIVI) or 'int', got {zero!r}")
    if bits == FP:
        return None
    return QuantSpec(dtype="int", bits=bits, granularity=PerToken(), symmetric=False, zero_dtype=zero)


def resolve_kv_bits(bits, n_layers: int) -> list[tuple[int, int]]:
    """``(k_bits, v_bits)`` per layer from an int, a ``(k, v)`` pair, or a dict ``{layer: int | (k, v) |
    {"k": .., "v": ..}}`` (an optional ``"default"`` entry fills the other layers)."""
    def pair(b, where):
        if isinstance(b, dict):
            if set(b) != {"k", "v"}:
                raise ValueError(f"{where}: a K/V dict needs exactly the keys 'k' and 'v', got {sorted(b)}")
            b = (b["k"], b["v"])
        kv = (b, b) if isinstance(b, int) else tuple(b) if isinstance(b, (tuple, list)) else (b,)
        if len(kv) != 2 or any(isinstance(x, bool) or x not in VALID_BITS for x in kv):
            raise ValueError(f"{where}: KV bits must be 1..8 or 16 (or a (k, v) pair of them), got {b!r}")
        return kv
    if not isinstance(bits, dict):
        return [pair(bits, "kv bits")] * n_layers
    default = bits.get("default")
    extra = [k for k in bits if k != "default" and not (isinstance(k, int) and 0 <= k < n_layers)]
    if extra:
        raise ValueError(f"kv bits keys must be layer indices 0..{n_layers - 1} or 'default', got {extra}")
    missing = [i for i in range(n_layers) if i not in bits]
    if missing and default is None:
        raise ValueError(f"kv bits give no width for layers {missing}: add them or a 'default' entry")
    return [pair(bits.get(i, default), f"layer {i}") for i in range(n_layers)]


def kv_dims(config) -> tuple[int, int, int]:
    """``(n_layers, n_kv_heads, head_dim)`` of a (text) model config."""
    c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // heads
    return int(c.num_hidden_layers), int(kv), int(hd)


# ---------------------------------------------------------------------------- one layer
@dataclass
class _Part:
    """The quantized part of K or V: codes ``[B, H, t, D]`` (uint8), params, dequantized values."""

    codes: torch.Tensor | None = None
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    deq: torch.Tensor | None = None

    def append(self, codes, params, deq) -> None:
        if self.codes is None:
            self.codes, self.params, self.deq = codes, params, deq
            return
        self.codes = torch.cat([self.codes, codes], 2)
        self.params = {k: torch.cat([v, params[k]], 2) for k, v in self.params.items()}
        self.deq = torch.cat([self.deq, deq], 2)

    def map(self, fn) -> None:
        if self.codes is not None:
            self.codes, self.deq = fn(self.codes), fn(self.deq)
            self.params = {k: fn(v) for k, v in self.params.items()}

    def bits(self, spec: QuantSpec | None) -> int:
        if self.codes is None:
            return 0
        per = {"scale": 16, "offset": 16, "zero": spec.bits}
        return self.codes.numel() * spec.bits + sum(v.numel() * per[k] for k, v in self.params.items())


def _quantize_rows(rows: torch.Tensor, spec: QuantSpec):
    qt = quantize(rows, spec)
    params = {k: getattr(qt.params, k) for k in ("scale", "zero", "offset") if getattr(qt.params, k) is not None}
    return qt.codes, params, dequantize(qt)


def quantize_keys(k: torch.Tensor, spec: QuantSpec, group: int):
    """Keys ``[B, H, m, D]`` (``m`` a multiple of ``group``) per channel in token groups →
    ``(codes [B,H,m,D], params {name: [B,H,m/group,D]}, dequantized [B,H,m,D] float32)``."""
    B, H, m, D = k.shape
    j = m // group
    rows = k.float().reshape(B, H, j, group, D).transpose(-1, -2).reshape(-1, group)
    codes, params, deq = _quantize_rows(rows, spec)
    back = lambda t: t.reshape(B, H, j, D, group).transpose(-1, -2).reshape(B, H, m, D)  # noqa: E731
    return back(codes), {n: p.reshape(B, H, j, D) for n, p in params.items()}, back(deq)


def quantize_values(v: torch.Tensor, spec: QuantSpec, group: int):
    """Values ``[B, H, m, D]`` per token in channel groups → codes, params ``[B,H,m,D/group]``, dequantized."""
    B, H, m, D = v.shape
    codes, params, deq = _quantize_rows(v.float().reshape(-1, group), spec)
    return codes.reshape(B, H, m, D), {n: p.reshape(B, H, m, D // group) for n, p in params.items()}, \
        deq.reshape(B, H, m, D)


class KIVILayer(BaseQuantizedLayer):
    """One attention layer's KIVI cache (module doc).  ``keys``/``values`` hold the fp window."""

    is_croppable = False

    def __init__(self, k_bits: int = 4, v_bits: int = 4, *, k_group: int = 32, v_group: int | None = None,
                 residual: int = 32, zero: str = "fp16"):
        super().__init__()
        if k_group < 1 or residual < 0 or (v_group is not None and v_group < 1):
            raise ValueError(f"need k_group >= 1, v_group >= 1, residual >= 0; got {k_group}, {v_group}, {residual}")
        self.k_bits, self.v_bits = k_bits, v_bits
        self.k_spec, self.v_spec = kv_spec(k_bits, zero), kv_spec(v_bits, zero)
        self.k_group, self.v_group, self.residual = k_group, v_group, residual

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        D = value_states.shape[-1]
        self.v_group = self.v_group or D
        if D % self.v_group:
            raise ValueError(f"v_group {self.v_group} does not divide head_dim {D}")
        self._quantized_keys, self._quantized_values = _Part(), _Part()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        qk, qv = self._dequantize(self._quantized_keys), self._dequantize(self._quantized_values)
        keys = torch.cat([t for t in (qk, self.keys, key_states) if t is not None], -2)
        values = torch.cat([t for t in (qv, self.values, value_states) if t is not None], -2)
        self.keys = torch.cat([self.keys, key_states], -2)
        self.values = torch.cat([self.values, value_states], -2)
        self._flush()
        return keys, values

    def _quantize(self, tensor: torch.Tensor, kind: str):
        """``(codes, params, dequantized in the states' dtype)`` of fp keys (``kind="k"``) or values."""
        if kind == "k":
            c, p, d = quantize_keys(tensor, self.k_spec, self.k_group)
        else:
            c, p, d = quantize_values(tensor, self.v_spec, self.v_group)
        return c, p, d.to(self.dtype)

    def _dequantize(self, part: _Part) -> torch.Tensor | None:
        return part.deq  # decoded once, when the tokens entered the quantized part

    def _flush(self) -> None:
        if self.k_spec is not None:
            n = self.keys.shape[-2] - self.residual
            m = (n // self.k_group) * self.k_group if n > 0 else 0
            if m:
                self._quantized_keys.append(*self._quantize(self.keys[..., :m, :], "k"))
                self.keys = self.keys[..., m:, :]
        if self.v_spec is not None:
            n = self.values.shape[-2] - self.residual
            if n > 0:
                self._quantized_values.append(*self._quantize(self.values[..., :n, :], "v"))
                self.values = self.values[..., n:, :]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the next update will show attention for the past: ``(K, V) [B, H, T, D]``."""
        qk, qv = self._dequantize(self._quantized_keys), self._dequantize(self._quantized_values)
        return (torch.cat([t for t in (qk, self.keys) if t is not None], -2),
                torch.cat([t for t in (qv, self.values) if t is not None], -2))

    def stored_bits(self) -> int:
        """Bits held now: codes + scales + zeros/offsets + the fp window (at the states' dtype width)."""
        if not self.is_initialized:
            return 0
        fp = torch.finfo(self.dtype).bits
        return (self._quantized_keys.bits(self.k_spec) + self._quantized_values.bits(self.v_spec)
                + (self.keys.numel() + self.values.numel()) * fp)

    def _map(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self._quantized_keys.map(fn)
            self._quantized_values.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens; only tokens still in the fp window can go."""
        n = -tokens_to_remove
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if n == 0 or not self.is_initialized:
            return
        if n > min(self.keys.shape[-2], self.values.shape[-2]):
            raise NotImplementedError(f"cannot crop {n} tokens: quantized tokens cannot be restored")
        self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
        self.cumulative_length -= n


class KIVICache(Cache):
    """KIVI-quantized cache for ``model.generate(..., past_key_values=KIVICache(model.config, 2))``.

    ``bits``: int, ``(k, v)`` or a per-layer dict (:func:`resolve_kv_bits`); 16 = unquantized.
    ``k_group`` tokens per key group, ``v_group`` channels per value group (default head_dim),
    ``residual`` fp tokens, ``zero`` = ``"fp16"`` offset (KIVI) or ``"int"`` zero point.
    """

    def __init__(self, config, bits=4, *, k_group: int = 32, v_group: int | None = None, residual: int = 32,
                 zero: str = "fp16"):
        text = config.get_text_config(decoder=True)
        layer_types, _ = get_layer_types_and_kwargs(text)
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise NotImplementedError(f"KIVICache supports full-attention layers only, this model has {other}")
        self.per_layer = resolve_kv_bits(bits, len(layer_types))
        self.k_group, self.v_group, self.residual, self.zero = k_group, v_group, residual, zero
        layers = [KIVILayer(kb, vb, k_group=k_group, v_group=v_group, residual=residual, zero=zero)
                  for kb, vb in self.per_layer]
        super().__init__(layers=layers)

    def stored_bits(self) -> int:
        return sum(layer.stored_bits() for layer in self.layers)


# ---------------------------------------------------------------------------- accounting
def kv_cache_bits(config, bits_per_layer, context: int, batch: int = 1, *, k_group: int = 32,
                  v_group: int | None = None, residual: int = 32, zero: str = "fp16", fp_bits: int = 16) -> dict:
    """Exact bits of a :class:`KIVICache` holding ``context`` tokens for ``batch`` sequences.

    Per layer with ``n = B·H`` rows of heads: keys ``Tq = G·⌊max(T−R, 0)/G⌋`` quantized tokens →
    ``n·Tq·D`` codes and ``n·(Tq/G)·D`` groups; values ``Tv = max(T−R, 0)`` → ``n·Tv·D`` codes and
    ``n·Tv·D/G_v`` groups; each group stores an fp16 scale and an fp16 offset (or a ``bits``-bit zero),
    counted by :meth:`QuantSpec.cost`; the other tokens are ``fp_bits`` each (16-bit layers: all).
    Returns ``{"codes", "scales", "zeros", "fp", "total", "layers": [per-layer total]}``.
    """
    L, H, D = kv_dims(config)
    gv = v_group or D
    if D % gv:
        raise ValueError(f"v_group {gv} does not divide head_dim {D}")
    n, T = batch * H, context
    out = {"codes": 0, "scales": 0, "zeros": 0, "fp": 0, "layers": []}
    for kb, vb in resolve_kv_bits(bits_per_layer, L):
        before = sum(out[k] for k in ("codes", "scales", "zeros", "fp"))
        for bits, kind in ((kb, "k"), (vb, "v")):
            spec = kv_spec(bits, zero)
            if spec is None:
                out["fp"] += n * T * D * fp_bits
                continue
            over = max(T - residual, 0)
            tq = (over // k_group) * k_group if kind == "k" else over
            shape = (n * (tq // k_group) * D, k_group) if kind == "k" else (n * tq * D // gv, gv)
            c = spec.cost(shape)
            out["codes"] += c.codes
            out["scales"] += c.scales
            out["zeros"] += c.zeros
            out["fp"] += n * (T - tq) * D * fp_bits
        out["layers"].append(sum(out[k] for k in ("codes", "scales", "zeros", "fp")) - before)
    out["total"] = sum(out["layers"])
    return out


def kv_cache_bytes(config, bits_per_layer, context: int, batch: int = 1, **kw) -> float:
    """``kv_cache_bits(...)["total"] / 8`` (a float: 3-bit codes need not fill whole bytes)."""
    return kv_cache_bits(config, bits_per_layer, context, batch, **kw)["total"] / 8
