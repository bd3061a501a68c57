"""A lean forward for Llama-shaped decoders: the same block arithmetic as transformers' ``modeling_llama``, without its
per-call machinery.

A decode step of a small model through transformers runs some 3,000 ATen calls -- the cache's concatenations, mask
and position bookkeeping, dtype round trips, module dispatch -- whose cost is the same whatever the linears are:
on SmolLM2-135M about a third of a quantized model's step on this 2-core CPU.  :class:`LeanDecoder` walks the same
modules' weights itself: RMSNorm as ``LlamaRMSNorm`` computes it, RoPE from the model's own rotary embedding
(precomputed for the positions, so any static ``rope_type``), a preallocated KV cache written in place, and each
query group attending its key/value head in one ``scaled_dot_product_attention`` call.  The linears are the model's
modules, called as they are (packed mixq layers, trellis steps, dense ``nn.Linear``), so what a plan chose runs
unchanged.

Which models it takes is one table, :data:`FAMILIES` (``config.model_type`` -> what differs); anything else, any
block or attention module that is not the family's own class, or any hook on the modules it bypasses (activation
quantization, a simulated KV cache), is refused with the reason -- :func:`greedy_generate` then runs transformers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Family:
    block: str            # the decoder layer's class name
    attention: str        # its attention class name
    mlp: str              # its MLP class name
    norm: str             # its RMSNorm class name
    qk_norm: bool = False  # an RMSNorm over each head of the queries and keys before RoPE (Qwen3)


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm"),
    "mistral": Family("MistralDecoderLayer", "MistralAttention", "MistralMLP", "MistralRMSNorm"),
    "qwen2": Family("Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm"),
    "qwen3": Family("Qwen3DecoderLayer", "Qwen3Attention", "Qwen3MLP", "Qwen3RMSNorm", qk_norm=True),
}
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rope types whose cos/sin depend on the position only
GROW = 256  # cache positions added at a time
GLUE_DTYPES = (torch.float32, torch.bfloat16)  # what the native glue (kernels.glue_cpu) computes in


def unsupported(model) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model`` (``None`` when it can)."""
    cfg = getattr(model, "config", None)
    fam = FAMILIES.get(getattr(cfg, "model_type", None))
    if fam is None:
        return f"model type {getattr(cfg, 'model_type', None)!r} is not in lean_decode.FAMILIES"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (the table's families use silu)"
    rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}).get("rope_type",
                                                                                                 "default")
    if rope not in STATIC_ROPE:
        return f"rope_type {rope!r} changes with the sequence length"
    if getattr(cfg, "layer_types", None) and any(t != "full_attention" for t in cfg.layer_types):
        return "sliding-window attention layers"
    if getattr(cfg, "use_sliding_window", False) or (cfg.model_type == "mistral" and getattr(cfg, "sliding_window",
                                                                                             None)):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "no model.model.layers / lm_head"
    mods = [model, inner, inner.embed_tokens, inner.norm]
    for i, blk in enumerate(inner.layers):
        kinds = ((blk, fam.block), (blk.self_attn, fam.attention), (blk.mlp, fam.mlp),
                 (blk.input_layernorm, fam.norm), (blk.post_attention_layernorm, fam.norm))
        if fam.qk_norm:
            kinds += ((blk.self_attn.q_norm, fam.norm), (blk.self_attn.k_norm, fam.norm))
        for m, name in kinds:
            if type(m).__name__ != name:
                return f"layer {i}: {type(m).__name__} where {name} was expected"
        mods += [m for m, _ in kinds]
    from torch.nn.modules import module as _module

    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return "a global module hook"
    for m in mods:
        if m._forward_hooks or m._forward_pre_hooks:
            return f"a hook on {type(m).__name__} (activation or KV-cache quantization runs through transformers)"
    return None


class LeanDecoder:
    """Prefill and one-token decode steps of a Llama-shaped ``model`` (batch 1) on its own KV cache."""

    def __init__(self, model):
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"LeanDecoder cannot run this model: {why}")
        cfg = model.config
        self.model, inner = model, model.model
        self.qk_norm = FAMILIES[cfg.model_type].qk_norm
        self.blocks = list(inner.layers)
        self.embed, self.norm, self.head = inner.embed_tokens, inner.norm, model.lm_head
        self.rotary = inner.rotary_emb
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = self.blocks[0].self_attn.scaling
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        self.pos = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.cos = self.sin = None
        self._reserve(GROW)
        self.glue, self._fns = None, {}
        if self.device.type == "cpu" and self.dtype in GLUE_DTYPES and self.head_dim <= 512:
            from .kernels.glue_cpu import lib
            self.glue = lib()

    def _reserve(self, n: int) -> None:
        """Room for ``n`` positions in the cache and the rotary tables (grown by :data:`GROW` steps)."""
        have = self.k[0].shape[2] if self.k else 0
        if n <= have:
            return
        n = -(-n // GROW) * GROW
        shape = (1, self.kv_heads, n, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.blocks]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.blocks]
        for old, new in zip(self.k + self.v, new_k + new_v):
            new[:, :, :have] = old
        self.k, self.v = new_k, new_v
        probe = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, torch.arange(n, device=self.device)[None])
        half = self.head_dim // 2
        # rotate_half(x) * sin == flip(x's halves) * [-sin_1, sin_2]: one product instead of neg + cat
        self.cos = cos[0]
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)

    @staticmethod
    def _rms(norm, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * xf.to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x [1, h, T, d]`` rotated as ``apply_rotary_pos_emb`` does."""
        d = self.head_dim
        rot = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
        return x * cos + rot * sin

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, *, last: bool = False) -> torch.Tensor:
        """Logits ``[T, vocab]`` of the tokens ``ids [1, T]`` following the cached ones (``[1, vocab]``, the next
        token's, with ``last``)."""
        T = ids.shape[1]
        if T == 1 and self.glue is not None:
            return self._step(ids)
        p0 = self.pos
        self._reserve(p0 + T)
        cos, sin = self.cos[p0:p0 + T], self.sin[p0:p0 + T]
        h = self.embed(ids)  # [1, T, hidden]
        H, KV, d = self.heads, self.kv_heads, self.head_dim
        for i, blk in enumerate(self.blocks):
            att = blk.self_attn
            x = self._rms(blk.input_layernorm, h)
            q, k = att.q_proj(x).view(1, T, H, d), att.k_proj(x).view(1, T, KV, d)
            if self.qk_norm:
                q, k = self._rms(att.q_norm, q), self._rms(att.k_norm, k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = att.v_proj(x).view(1, T, KV, d).transpose(1, 2)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            K, V = self.k[i], self.v[i]
            K[:, :, p0:p0 + T] = k
            V[:, :, p0:p0 + T] = v
            K, V = K[:, :, :p0 + T], V[:, :, :p0 + T]
            if T == 1:  # each kv head's queries as the rows of one attention call: no mask, no repeat
                o = F.scaled_dot_product_attention(q.reshape(1, KV, H // KV, d), K, V, scale=self.scale)
            else:
                mask = None if p0 == 0 else torch.ones(T, p0 + T, dtype=torch.bool, device=h.device).tril(p0)
                o = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, is_causal=p0 == 0, scale=self.scale,
                                                   enable_gqa=KV != H)
            h = h + att.o_proj(o.reshape(1, H, T, d).transpose(1, 2).reshape(1, T, H * d))
            x = self._rms(blk.post_attention_layernorm, h)
            mlp = blk.mlp
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        self.pos = p0 + T
        if last:
            h = h[:, -1:]
        return self.head(self._rms(self.norm, h))[0]

    def _fn(self, mod, x: torch.Tensor):
        """What computes ``mod(x)`` for this decode step's inputs: the module's own ``decode_step(x)`` (a native
        call without the module machinery, e.g. a trellis layer's :class:`~.kernels.tcq_step.Step`) where it has one
        for such inputs, else the module; found once per module."""
        f = self._fns.get(id(mod))
        if f is None:
            find = getattr(mod, "decode_step", None)
            hooked = mod._forward_hooks or mod._forward_pre_hooks  # they run only through the module call
            step = find(x) if find is not None and not hooked else None
            f = self._fns[id(mod)] = (lambda x, dtype: mod(x)) if step is None else step
        return f

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        """One token's logits ``[1, vocab]`` with the block glue in native calls (:mod:`.kernels.glue_cpu`)."""
        p = self.pos
        self._reserve(p + 1)
        g, bf = self.glue, int(self.dtype == torch.bfloat16)
        H, KV, d = self.heads, self.kv_heads, self.head_dim
        cap = self.k[0].shape[2]
        cos, sin = self.cos[p].data_ptr(), self.sin[p].data_ptr()
        h = self.embed(ids)  # [1, 1, hidden], this step's own residual stream (added to in place)
        n = h.shape[-1]
        x = torch.empty_like(h)
        norm = self.blocks[0].input_layernorm
        g.glue_add_rms(h.data_ptr(), None, norm.weight.data_ptr(), norm.variance_epsilon, x.data_ptr(), n, bf)
        for i, blk in enumerate(self.blocks):
            att, mlp = blk.self_attn, blk.mlp
            dt, fn = self.dtype, self._fn
            q = fn(att.q_proj, x)(x, dt).contiguous()
            k = fn(att.k_proj, x)(x, dt).contiguous()
            v = fn(att.v_proj, x)(x, dt).contiguous()
            if self.qk_norm:
                q = self._rms(att.q_norm, q.view(H, d)).contiguous()
                k = self._rms(att.k_norm, k.view(KV, d)).contiguous()
            K, V = self.k[i], self.v[i]
            g.glue_rope_cache(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos, sin, K.data_ptr(), V.data_ptr(),
                              p, H, KV, d, cap, bf)
            o = F.scaled_dot_product_attention(q.view(1, KV, H // KV, d), K[:, :, :p + 1], V[:, :, :p + 1],
                                               scale=self.scale)
            o = o.reshape(1, 1, H * d)
            a = fn(att.o_proj, o)(o, dt).contiguous()
            norm, x = blk.post_attention_layernorm, torch.empty_like(h)  # a new x: a layer may hold its input
            g.glue_add_rms(h.data_ptr(), a.data_ptr(), norm.weight.data_ptr(), norm.variance_epsilon, x.data_ptr(),
                           n, bf)
            gate, up = fn(mlp.gate_proj, x)(x, dt).contiguous(), fn(mlp.up_proj, x)(x, dt).contiguous()
            gu = torch.empty_like(gate)
            g.glue_silu_mul(gate.data_ptr(), up.data_ptr(), gu.data_ptr(), gu.numel(), bf)
            m = fn(mlp.down_proj, gu)(gu, dt).contiguous()
            norm = self.blocks[i + 1].input_layernorm if i + 1 < len(self.blocks) else self.norm
            x = torch.empty_like(h)
            g.glue_add_rms(h.data_ptr(), m.data_ptr(), norm.weight.data_ptr(), norm.variance_epsilon, x.data_ptr(),
                           n, bf)
        self.pos = p + 1
        return self.head(x)[0]
