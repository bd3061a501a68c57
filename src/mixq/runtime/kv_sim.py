"""KIVI decode semantics without the cache: an exact decode simulation inside one forward.

KIVI quantizes a token's key/value when it leaves the fp residual window, in token groups of
``k_group`` (keys, per channel) or per token (values); decoding ``chunk`` tokens per forward
(:func:`mixq.eval.kv.eval_with_kv_quant`) means a token at position ``t`` in a chunk that
starts at ``n`` sees the cache as it was after ``n`` tokens::

    n(t)  = 0                                  t < P          (prefill P, default chunk)
          = P + c·⌊(t − P)/c⌋                  otherwise
    keys   s < Tk(n) = G·⌊max(n − R, 0)/G⌋     dequantized, the rest (window, chunk) fp
    values s < Tv(n) = max(n − R, 0)           dequantized

:func:`simulate_kivi` (the ``"simulate"`` engine) applies exactly this inside one full forward:
an attention function registered with transformers computes, for each quantized layer,
``S = where(s < Tk(n(t)), q·k̂ₛ, q·kₛ)`` and ``out = Σ_s p_ts (v̂ₛ if s < Tv(n(t)) else vₛ)`` with
the same quantizers as :class:`~mixq.runtime.kv_cache.KIVILayer` (:class:`~mixq.runtime.kv_codec.KVCodec`:
KIVI grids, pre-RoPE keys, rotation).  Decoding token by token (``chunk=1``) then costs one
forward per window instead of one per token, and is checked against the real :class:`KIVICache`
in the tests (same logits up to float rounding).  The ``"cache"`` engine runs the real cache chunk by
chunk (:func:`mixq.runtime.kv_feed.decode_logits`).

Important tokens (``settings.important``, MiKV): K and V are both quantized up to
``Tq(n) = G·⌊max(n − R, 0)/G⌋`` and which tokens of group ``j`` are important depends on the
attention paid by the queries before the group was flushed, which in turn saw the earlier
groups' decisions.  So the queries are processed in blocks of equal ``J(t) = Tq(n(t))/G`` in
order: before a block, the groups it newly sees are decided from the importance accumulated so
far (``a_s = Σ_{u < block} Σ_{heads of the KV head} p_us``, the probabilities as computed with the
quantized cache) and quantized; the block's probabilities are then added.  A query's output
depends only on queries before it (causal), and the real cache does the same with the eager
attention probabilities (:func:`~mixq.runtime.kv_feed.kv_cache_feed`).  Pre-RoPE keys take the
rotary tables from the attention module's ``position_embeddings`` (a forward pre-hook).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .kv_codec import FP, KVCodec, check_rope_convention, kv_spec, select_important
from .kv_cost import kv_dims, resolve_kv_bits
from .kv_feed import attention_modules, rope_of
from .kv_settings import KVSettings

KV_ENGINES = ("simulate", "cache")
SIM_NAME = "mixq_kivi_sim"


# ---------------------------------------------------------------------------- decode simulation
def _chunk_start(T: int, chunk: int, prefill: int | None, device) -> torch.Tensor:
    """``n(t)`` for ``t < T``: tokens in the cache when the chunk holding ``t`` is fed (module doc)."""
    p = prefill or chunk
    t = torch.arange(T, device=device)
    return torch.where(t < p, torch.zeros_like(t), p + chunk * torch.div(t - p, chunk, rounding_mode="floor"))


def _masked(scores: torch.Tensor, attention_mask, rows: slice, T: int) -> torch.Tensor:
    """``scores [B, Hq, r, T]`` of query rows ``rows`` with the causal / given mask applied."""
    if attention_mask is None:
        pos = torch.arange(T, device=scores.device)
        return scores.masked_fill(pos[None, :] > pos[rows, None], float("-inf"))
    m = attention_mask[..., rows, :T] if attention_mask.shape[-2] > 1 else attention_mask[..., :T]
    if m.dtype == torch.bool:
        return scores.masked_fill(~m, float("-inf"))
    return scores + m


@dataclass
class _LayerSim:
    """One layer's simulated KIVI attention (module doc)."""

    k_bits: int
    v_bits: int
    settings: KVSettings
    chunk: int
    prefill: int | None

    def __post_init__(self):
        self.k_spec = kv_spec(self.k_bits, self.settings.zero)
        self.v_spec = kv_spec(self.v_bits, self.settings.zero)
        self.rope = None  # (cos, sin) of the current forward (pre-RoPE keys; set by a forward pre-hook)

    @property
    def needs_rope(self) -> bool:
        return self.settings.pre_rope and self.k_spec is not None

    def codec(self, D: int) -> KVCodec:
        s = self.settings
        vg = s.v_group or D
        if D % vg:
            raise ValueError(f"v_group {vg} does not divide head_dim {D}")
        return KVCodec(self.k_bits, self.v_bits, s.k_group, vg, s.zero, s.important_tokens, s.important_bits,
                       s.rotate, s.pre_rope)

    def _rope_of(self, T: int, a: int, b: int):
        if not self.needs_rope:
            return None
        if self.rope is None:
            raise RuntimeError("pre-RoPE keys: the rotary tables of this forward were not captured")
        cos, sin = self.rope
        if cos.shape[-2] != T:
            raise RuntimeError(f"pre-RoPE keys: rotary tables for {cos.shape[-2]} tokens, the forward has {T}")
        return cos[:, a:b], sin[:, a:b]

    def __call__(self, module, query, key, value, attention_mask, scaling, kwargs):
        B, Hq, T, D = query.shape
        if key.shape[2] != T:
            raise RuntimeError("the simulated KIVI cache needs full-window forwards (use_cache=False, no past)")
        if kwargs.get("softcap") is not None or getattr(module, "sliding_window", None) or kwargs.get("sliding_window"):
            raise NotImplementedError("the KIVI simulation supports plain full attention only (no softcap/sliding window)")
        codec = self.codec(D)
        n = _chunk_start(T, self.chunk, self.prefill, query.device)
        scale = scaling if scaling is not None else D ** -0.5
        if codec.mixed:
            out = self._mixed(codec, query, key, value, attention_mask, scale, n)
        else:
            out = self._kivi(codec, query, key, value, attention_mask, scale, n)
        return out.transpose(1, 2).contiguous(), None

    def _kivi(self, codec, query, key, value, attention_mask, scale, n):
        """Every query at once: ``where(s < Tk(n(t)), q·k̂ₛ, q·kₛ)``, values by ``s < Tv(n(t))``."""
        B, Hq, T, D = query.shape
        s = self.settings
        pos = torch.arange(T, device=query.device)
        g = Hq // key.shape[1]
        k = key.repeat_interleave(g, 1)
        v = value.repeat_interleave(g, 1)
        scores = torch.matmul(query, k.transpose(-1, -2)) * scale
        if self.k_spec is not None:
            m = s.k_group * (T // s.k_group)
            tk = s.k_group * torch.div((n - s.residual).clamp_min(0), s.k_group, rounding_mode="floor")
            if m and int(tk.max()) > 0:
                deq = codec.encode_keys(key[..., :m, :], rope=self._rope_of(T, 0, m))[1].to(key.dtype)
                k_hat = torch.cat([deq, key[..., m:, :]], 2).repeat_interleave(g, 1)
                sq = torch.matmul(query, k_hat.transpose(-1, -2)) * scale
                scores = torch.where(pos[None, :] < tk[:, None], sq, scores)
        scores = _masked(scores, attention_mask, slice(0, T), T)
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if self.v_spec is not None:
            tv = (n - s.residual).clamp_min(0)
            if int(tv.max()) > 0:
                v_hat = codec.encode_values(value)[1].to(value.dtype).repeat_interleave(g, 1)
                old = (pos[None, :] < tv[:, None]).to(p.dtype)
                return torch.matmul(p * old, v_hat) + torch.matmul(p * (1 - old), v)
        return torch.matmul(p, v)

    def _mixed(self, codec, query, key, value, attention_mask, scale, n):
        """Important tokens: the queries in blocks of equal ``J(t) = ⌊max(n(t) − R, 0)/G⌋`` (quantized
        groups, K and V alike), in order; before a block, the groups it newly sees are decided from the
        attention the earlier blocks paid (module doc)."""
        B, Hq, T, D = query.shape
        s = self.settings
        G, H = s.k_group, key.shape[1]
        g = Hq // H
        J = torch.div((n - s.residual).clamp_min(0), G, rounding_mode="floor").tolist()
        k_hat, v_hat = key.clone(), value.clone()
        score = torch.zeros(B, H, T, dtype=torch.float32, device=query.device)
        out = torch.empty(B, Hq, T, D, dtype=query.dtype, device=query.device)
        decided, a = 0, 0
        while a < T:
            b = a
            while b < T and J[b] == J[a]:
                b += 1
            if J[a] > decided:
                lo, hi = decided * G, J[a] * G
                mask = select_important(score[..., lo:hi], G, codec.important)
                if self.k_spec is not None:
                    k_hat[..., lo:hi, :] = codec.encode_keys(key[..., lo:hi, :], rope=self._rope_of(T, lo, hi),
                                                             mask=mask)[1].to(key.dtype)
                if self.v_spec is not None:
                    v_hat[..., lo:hi, :] = codec.encode_values(value[..., lo:hi, :], mask=mask)[1].to(value.dtype)
                decided = J[a]
            sc = torch.matmul(query[:, :, a:b], k_hat.repeat_interleave(g, 1).transpose(-1, -2)) * scale
            p = torch.softmax(_masked(sc, attention_mask, slice(a, b), T), dim=-1, dtype=torch.float32).to(query.dtype)
            out[:, :, a:b] = torch.matmul(p, v_hat.repeat_interleave(g, 1))
            score += p.float().reshape(B, H, g, b - a, T).sum((2, 3))
            a = b
        return out


_ACTIVE: dict[int, _LayerSim] = {}


def _sim_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    sim = _ACTIVE.get(id(module))
    if sim is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return sim(module, query, key, value, attention_mask, scaling, kwargs)


def _register() -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: PLC0415
    from transformers.modeling_utils import AttentionInterface  # noqa: PLC0415

    AttentionInterface.register(SIM_NAME, _sim_attention)
    AttentionMaskInterface.register(SIM_NAME, sdpa_mask)


def check_full_attention(config) -> None:
    """Refuse a model with other than full-attention layers (sliding windows, ...)."""
    from transformers.cache_utils import get_layer_types_and_kwargs  # noqa: PLC0415

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types, _ = get_layer_types_and_kwargs(text)
    other = sorted(set(types) - {"full_attention"})
    if other:
        raise NotImplementedError(f"KIVI supports full-attention layers only, this model has {other}")


@contextlib.contextmanager
def simulate_kivi(model: nn.Module, bits, *, settings: KVSettings = KVSettings(), chunk: int = 1,
                  prefill: int | None = None):
    """Within the block, every full forward of ``model`` attends as if decoded ``chunk`` tokens at a
    time through a :class:`KIVICache` of ``bits`` (int, ``(k, v)`` or per-layer dict) — module doc.

    Layers at 16/16 run the model's usual SDPA attention.  Forwards with a cache are refused.
    With ``settings.pre_rope``, a forward pre-hook on each simulated attention module captures the
    rotary tables (``position_embeddings``) of the forward.
    """
    if chunk < 1 or (prefill is not None and prefill < 1):
        raise ValueError(f"chunk and prefill must be >= 1, got chunk={chunk}, prefill={prefill}")
    check_full_attention(model.config)
    per_layer = resolve_kv_bits(bits, kv_dims(model.config)[0])
    mods = attention_modules(model)
    _register()
    cfg = model.config
    old = cfg._attn_implementation
    mine = {}
    hooks = []
    for i, (kb, vb) in enumerate(per_layer):
        if (kb, vb) != (FP, FP):
            sim = _LayerSim(kb, vb, settings, chunk, prefill)
            mine[id(mods[i])] = sim
            if sim.needs_rope:
                check_rope_convention(mods[i])

                def pre(m, args, kwargs, _sim=sim):
                    _sim.rope = rope_of(m, args, kwargs)

                hooks.append(mods[i].register_forward_pre_hook(pre, with_kwargs=True))
    clash = set(mine) & set(_ACTIVE)
    if clash:
        for h in hooks:
            h.remove()
        raise RuntimeError("simulate_kivi is already active on this model")
    _ACTIVE.update(mine)
    cfg._attn_implementation = SIM_NAME
    try:
        yield
    finally:
        cfg._attn_implementation = old
        for h in hooks:
            h.remove()
        for k in mine:
            _ACTIVE.pop(k, None)
