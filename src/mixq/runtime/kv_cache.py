"""KIVI KV-cache quantization for Hugging Face models (Liu et al., 2024, arXiv:2402.02750), with
token-level mixed precision (MiKV), pre-RoPE keys (KVQuant) and a Hadamard rotation as options.

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

Options (the quantizers are in :mod:`.kv_codec`, shared with the decode simulation):

``important = f``, ``important_bits`` (MiKV / ZipCache token-level mixed precision)
    in each key group the ``c = ⌊f·G + ½⌋`` tokens that have received the most attention so far
    (summed over the query heads sharing the KV head and over all earlier queries) are stored at
    ``important_bits`` (per-token grids, keys too), the rest at the layer's bits (KIVI grids: keys
    per channel over the group's other tokens), plus a 1-bit-per-token importance map per
    quantized tensor.  A token's precision is decided once, when its group leaves the fp window
    (ZipCache's streaming scheme: it has been attended by at least ``R`` queries in fp by then);
    MiKV's H2O-style eviction, which can later demote an important token, is not modelled.  K and
    V of a token share the decision, so values leave the window with the keys, a group at a time
    (both ``Tq = G·⌊(T − R)/G⌋``).  The attention probabilities come from the model: run it under
    :func:`~mixq.runtime.kv_feed.kv_cache_feed` (eager attention for the duration, forward hooks hand each layer its
    probabilities; the flush happens after attention).  A cache used without it raises.
``pre_rope`` (KVQuant)
    keys are quantized before the rotary embedding: ``k̂ = RoPE(Q(RoPE⁻¹(k)))`` with the rotary
    tables the model used for those tokens, handed over by :func:`~mixq.runtime.kv_feed.kv_cache_feed` (a forward
    pre-hook reads the attention module's ``position_embeddings``; positions need not be the cache
    index, so left padding is fine).  Families whose ``rotate_half`` is not HF's Llama one are refused.
``rotate = "k" | "v" | "kv"`` (QuaRot-style)
    ``x̂ = Q(x·R)·Rᵀ`` with a fixed randomised Hadamard ``R [D, D]`` (needs no feed).

Not done: sliding-window layers (Gemma 3, Mistral with a window) are rejected.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache, get_layer_types_and_kwargs

from .kv_codec import KVCodec, important_count, kv_spec, normalize_rotate, select_important
from .kv_cost import resolve_kv_bits


# ---------------------------------------------------------------------------- one layer
@dataclass
class _Part:
    """The quantized part of K or V: what is stored (``{name: tensor}``, tokens or token groups along
    dim 2, ``widths[name]`` bits per element) and the dequantized tokens ``deq [B, H, t, D]``."""

    store: dict[str, torch.Tensor] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)
    deq: torch.Tensor | None = None

    @property
    def codes(self) -> torch.Tensor | None:
        return self.store.get("codes")

    def append(self, stored: dict, deq: torch.Tensor) -> None:
        if self.deq is None:
            self.store = {n: t for n, (t, _) in stored.items()}
            self.widths = {n: w for n, (_, w) in stored.items()}
            self.deq = deq
            return
        self.store = {n: torch.cat([t, stored[n][0]], 2) for n, t in self.store.items()}
        self.deq = torch.cat([self.deq, deq], 2)

    def map(self, fn) -> None:
        if self.deq is not None:
            self.deq = fn(self.deq)
            self.store = {n: fn(t) for n, t in self.store.items()}

    def bits(self) -> int:
        return sum(t.numel() * self.widths[n] for n, t in self.store.items())


class KIVILayer(BaseQuantizedLayer):
    """One attention layer's KIVI cache (module doc).  ``keys``/``values`` hold the fp window.

    ``important``: fraction of each key group kept at ``important_bits`` (0: off; needs
    :func:`~mixq.runtime.kv_feed.kv_cache_feed`); ``pre_rope``: quantize keys before the rotary embedding
    (needs :func:`~mixq.runtime.kv_feed.kv_cache_feed`); ``rotate``: ``"k"``, ``"v"``, ``"kv"`` (or ``True``)
    Hadamard-rotate before quantizing.
    """

    is_croppable = False

    def __init__(self, k_bits: int = 4, v_bits: int = 4, *, k_group: int = 32, v_group: int | None = None,
                 residual: int = 32, zero: str = "fp16", important: float = 0.0, important_bits: int = 8,
                 pre_rope: bool = False, rotate=False):
        super().__init__()
        if k_group < 1 or residual < 0 or (v_group is not None and v_group < 1):
            raise ValueError(f"need k_group >= 1, v_group >= 1, residual >= 0; got {k_group}, {v_group}, {residual}")
        self.k_bits, self.v_bits = k_bits, v_bits
        self.k_spec, self.v_spec = kv_spec(k_bits, zero), kv_spec(v_bits, zero)
        self.k_group, self.v_group, self.residual, self.zero = k_group, v_group, residual, zero
        self.n_important = important_count(important, k_group)
        self.important_bits = important_bits
        kv_spec(important_bits, zero)
        self.pre_rope, self.rotate = bool(pre_rope), normalize_rotate(rotate)
        self.codec: KVCodec | None = None
        self._next_rope = None

    # -- what the feed must provide
    @property
    def mixed(self) -> bool:
        """Token-level mixed precision active (needs the attention probabilities)."""
        return bool(self.n_important) and (self.k_spec is not None or self.v_spec is not None)

    @property
    def needs_rope(self) -> bool:
        """Pre-RoPE keys active (needs the rotary tables)."""
        return self.pre_rope and self.k_spec is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        D = value_states.shape[-1]
        self.v_group = self.v_group or D
        if D % self.v_group:
            raise ValueError(f"v_group {self.v_group} does not divide head_dim {D}")
        self.codec = KVCodec(self.k_bits, self.v_bits, self.k_group, self.v_group, self.zero, self.n_important,
                             self.important_bits, self.rotate, self.pre_rope)
        self._quantized_keys, self._quantized_values = _Part(), _Part()
        B, H = key_states.shape[:2]
        self._score = torch.zeros(B, H, 0, dtype=torch.float32, device=self.device)  # undecided tokens (MiKV)
        self._rope = None       # (cos, sin) [B, W, r] of the fp key window (pre-RoPE)
        self._decided = 0       # tokens whose precision is fixed (MiKV: the quantized prefix)
        self._awaiting = False  # an update whose attention was not observed yet (MiKV)
        self.is_initialized = True

    def set_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """The rotary tables ``[B | 1, c, r]`` of the next update's tokens
        (:func:`~mixq.runtime.kv_feed.kv_cache_feed`)."""
        self._next_rope = (cos, sin)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.mixed and self._awaiting:
            raise RuntimeError("a KV cache with important tokens (MiKV) needs the attention probabilities of every "
                               "forward: run the model under mixq.runtime.kv_feed.kv_cache_feed(model, cache)")
        if self.needs_rope:
            if self._next_rope is None:
                raise RuntimeError("a KV cache with pre-RoPE keys needs the rotary tables of every forward: run the "
                                   "model under mixq.runtime.kv_feed.kv_cache_feed(model, cache)")
            B, c = key_states.shape[0], key_states.shape[2]
            cos, sin = (t.expand(B, c, t.shape[-1]) for t in self._next_rope)
            self._rope = (cos, sin) if self._rope is None else \
                (torch.cat([self._rope[0], cos], 1), torch.cat([self._rope[1], sin], 1))
            self._next_rope = None
        self.cumulative_length += key_states.shape[-2]
        qk, qv = self._dequantize(self._quantized_keys), self._dequantize(self._quantized_values)
        keys = torch.cat([t for t in (qk, self.keys, key_states) if t is not None], -2)
        values = torch.cat([t for t in (qv, self.values, value_states) if t is not None], -2)
        self.keys = torch.cat([self.keys, key_states], -2)
        self.values = torch.cat([self.values, value_states], -2)
        if self.mixed:  # flush after attention, when observe() has the probabilities
            B, H, c = key_states.shape[0], key_states.shape[1], key_states.shape[2]
            self._score = torch.cat([self._score, self._score.new_zeros(B, H, c)], 2)
            self._awaiting = True
        else:
            self._flush()
        return keys, values

    def observe(self, probs: torch.Tensor) -> None:
        """Attention probabilities ``[B, Hq, c, T]`` of the last update's ``c`` queries over all ``T``
        tokens: add what the undecided tokens received, then flush (:func:`~mixq.runtime.kv_feed.kv_cache_feed`)."""
        if not self.mixed:
            return
        if not self._awaiting:
            raise RuntimeError("attention probabilities observed twice for one update")
        B, Hq, c, T = probs.shape
        H = self._score.shape[1]
        if T != self.cumulative_length or Hq % H:
            raise RuntimeError(f"attention probabilities of shape {tuple(probs.shape)} do not match a cache of "
                               f"{self.cumulative_length} tokens and {H} KV heads")
        self._score += probs[..., self._decided:].float().reshape(B, H, Hq // H, c, -1).sum((2, 3))
        self._awaiting = False
        self._flush()

    def _fp_bits(self) -> int:
        return torch.finfo(self.dtype).bits

    def _flush(self) -> None:
        G, R, fpb = self.k_group, self.residual, self._fp_bits()
        if self.mixed:
            n = self.cumulative_length - self._decided - R
            m = (n // G) * G if n > 0 else 0
            if not m:
                return
            mask = select_important(self._score[..., :m], G, self.n_important)
            if self.k_spec is not None:
                self._quantized_keys.append(*self._encode_keys(self.keys[..., :m, :], mask, fpb))
                self.keys = self.keys[..., m:, :]
                self._drop_rope(m)
            if self.v_spec is not None:
                st, d = self.codec.encode_values(self.values[..., :m, :], mask=mask, fp_bits=fpb)
                self._quantized_values.append(st, d.to(self.dtype))
                self.values = self.values[..., m:, :]
            self._score = self._score[..., m:]
            self._decided += m
            return
        if self.k_spec is not None:
            n = self.keys.shape[-2] - R
            m = (n // G) * G if n > 0 else 0
            if m:
                self._quantized_keys.append(*self._encode_keys(self.keys[..., :m, :], None, fpb))
                self.keys = self.keys[..., m:, :]
                self._drop_rope(m)
        if self.v_spec is not None:
            n = self.values.shape[-2] - R
            if n > 0:
                st, d = self.codec.encode_values(self.values[..., :n, :], fp_bits=fpb)
                self._quantized_values.append(st, d.to(self.dtype))
                self.values = self.values[..., n:, :]

    def _quantize(self, tensor: torch.Tensor, kind: str):
        """``(stored, dequantized in the states' dtype)`` of the fp window's first keys (``kind="k"``) or
        values, without important tokens (``BaseQuantizedLayer``'s hook; the flush calls the codec)."""
        if kind == "k":
            return self._encode_keys(tensor, None, self._fp_bits())
        st, d = self.codec.encode_values(tensor, fp_bits=self._fp_bits())
        return st, d.to(self.dtype)

    def _encode_keys(self, k, mask, fpb):
        rope = None if self._rope is None else (self._rope[0][:, : k.shape[2]], self._rope[1][:, : k.shape[2]])
        st, d = self.codec.encode_keys(k, rope=rope, mask=mask, fp_bits=fpb)
        return st, d.to(self.dtype)

    def _drop_rope(self, m: int) -> None:
        if self._rope is not None:
            self._rope = (self._rope[0][:, m:], self._rope[1][:, m:])

    def _dequantize(self, part: _Part) -> torch.Tensor | None:
        return part.deq  # decoded once, when the tokens entered the quantized part

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the next update will show attention for the past: ``(K, V) [B, H, T, D]``."""
        qk, qv = self._dequantize(self._quantized_keys), self._dequantize(self._quantized_values)
        return (torch.cat([t for t in (qk, self.keys) if t is not None], -2),
                torch.cat([t for t in (qv, self.values) if t is not None], -2))

    def stored_bits(self) -> int:
        """Bits held now: codes + scales + zeros/offsets (+ important tokens and their maps) + the fp
        window (at the states' dtype width).  Working state is not counted: the accumulated attention of
        the undecided window tokens (MiKV) and the window's rotary tables (pre-RoPE)."""
        if not self.is_initialized:
            return 0
        return (self._quantized_keys.bits() + self._quantized_values.bits()
                + (self.keys.numel() + self.values.numel()) * self._fp_bits())

    def _map(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self._quantized_keys.map(fn)
            self._quantized_values.map(fn)
            self._score = fn(self._score)
            if self._rope is not None:
                self._rope = (fn(self._rope[0]), fn(self._rope[1]))

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
        if self.mixed:
            self._score = self._score[..., :-n]
        if self._rope is not None:
            self._rope = (self._rope[0][:, :-n], self._rope[1][:, :-n])
        self.cumulative_length -= n


class KIVICache(Cache):
    """KIVI-quantized cache for ``model.generate(..., past_key_values=KIVICache(model.config, 2))``.

    ``bits``: int, ``(k, v)`` or a per-layer dict (:func:`resolve_kv_bits`); 16 = unquantized.
    ``k_group`` tokens per key group, ``v_group`` channels per value group (default head_dim),
    ``residual`` fp tokens, ``zero`` = ``"fp16"`` offset (KIVI) or ``"int"`` zero point; ``important``,
    ``important_bits``, ``pre_rope``, ``rotate``: module doc.  With ``important`` or ``pre_rope`` run
    the model under ``with kv_cache_feed(model, cache):`` (:attr:`needs_feed`).
    """

    def __init__(self, config, bits=4, *, k_group: int = 32, v_group: int | None = None, residual: int = 32,
                 zero: str = "fp16", important: float = 0.0, important_bits: int = 8, pre_rope: bool = False,
                 rotate=False):
        text = config.get_text_config(decoder=True)
        layer_types, _ = get_layer_types_and_kwargs(text)
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise NotImplementedError(f"KIVICache supports full-attention layers only, this model has {other}")
        self.per_layer = resolve_kv_bits(bits, len(layer_types))
        self.k_group, self.v_group, self.residual, self.zero = k_group, v_group, residual, zero
        opts = dict(important=important, important_bits=important_bits, pre_rope=pre_rope, rotate=rotate)
        layers = [KIVILayer(kb, vb, k_group=k_group, v_group=v_group, residual=residual, zero=zero, **opts)
                  for kb, vb in self.per_layer]
        super().__init__(layers=layers)

    @property
    def needs_feed(self) -> bool:
        """Whether forwards must run under :func:`~mixq.runtime.kv_feed.kv_cache_feed` (important tokens or
        pre-RoPE keys)."""
        return any(layer.mixed or layer.needs_rope for layer in self.layers)

    def stored_bits(self) -> int:
        return sum(layer.stored_bits() for layer in self.layers)
