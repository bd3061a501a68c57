"""A lean forward for Llama-shaped decoders: the same block arithmetic as transformers' modeling code, without its
per-call machinery.

A decode step of a small model through transformers runs some 3,000 ATen calls -- the cache's concatenations, mask
and position bookkeeping, dtype round trips, module dispatch -- whose cost is the same whatever the linears are:
on SmolLM2-135M about a third of a quantized model's step on this 2-core CPU.  :class:`LeanDecoder` walks the same
modules' weights itself: RMSNorm as the family's norm computes it, RoPE from the model's own rotary embedding
(precomputed for the positions, per layer type where the family has several, so any static ``rope_type``), sliding
windows where a layer has one, a preallocated KV cache written in place, and each query group attending its
key/value head in one ``scaled_dot_product_attention`` call.  One-token steps run the block's glue through three
native calls (:mod:`~mixq.runtime.kernels.glue_cpu`) and each layer through its own native step where it has one
(``decode_step``, e.g. a trellis layer's); the linears are the model's modules otherwise, so what a plan chose runs
unchanged.

Which models it takes is one table, :data:`FAMILIES` (``config.model_type`` -> what differs: Llama, Mistral, Qwen2
and 3, Gemma 2 (soft-capping: eager attention) and 3, OLMo 2, Phi-3 and Phi-4-mini (RoPE on part of each head),
Granite, SmolLM3 (layers without RoPE), and the mixtures of experts Qwen3-MoE and Mixtral (their expert blocks run as
the modules)); anything else, any block or attention module that is not the family's own class, or any hook on the
modules it bypasses (activation quantization, a simulated KV cache), is refused with the reason --
:func:`greedy_generate` then runs transformers.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F


LLAMA_NORMS = ("input_layernorm", None, "post_attention_layernorm", None)


@dataclass(frozen=True)
class Family:
    prefix: str                # class names: <prefix>DecoderLayer, <prefix>Attention, <prefix>MLP, <prefix>RMSNorm
    qk_norm: str = ""          # an RMSNorm on the queries and keys before RoPE: over each "head" (Qwen3, Gemma 3) or
                               # over "all" the heads at once (OLMo 2)
    norm: str = "llama"        # how the RMSNorm rounds (NORM_MODES): w * round(x) (Llama), round(x * (1 + w))
                               # ("offset": Gemma), round(x * w) ("once": OLMo 2)
    norms: tuple = LLAMA_NORMS  # a block's norms by attribute name: before attention, on its output, before the MLP,
                                # on its output (None: no norm there); Gemma 3 has all four, OLMo 2 the outputs' only
    window_in_config: bool = False  # every layer's sliding window is config.sliding_window (Mistral, Phi-3); else
                                    # the attention module's own ``sliding_window`` (None: full attention)
    fused: bool = False        # one qkv_proj and one gate_up_proj (Phi-3) instead of q/k/v and gate/up projections
    scaled: bool = False       # Granite's multipliers: embedding_multiplier, residual_multiplier, logits_scaling
    moe: str = ""              # the class of a mixture-of-experts block in place of the MLP (run as the module)
    softcap: bool = False      # Gemma 2's soft-capping of attention scores and logits (config values; eager attention)

    def names(self) -> tuple[str, str, str, str]:
        p = self.prefix
        return f"{p}DecoderLayer", f"{p}Attention", f"{p}MLP", f"{p}RMSNorm"


GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
FAMILIES: dict[str, Family] = {
    "llama": Family("Llama"),
    "mistral": Family("Mistral", window_in_config=True),
    "qwen2": Family("Qwen2"),
    "qwen3": Family("Qwen3", qk_norm="head"),
    "gemma2": Family("Gemma2", norm="offset", norms=GEMMA_NORMS, softcap=True),
    "gemma3_text": Family("Gemma3", qk_norm="head", norm="offset", norms=GEMMA_NORMS),
    "olmo2": Family("Olmo2", qk_norm="all", norm="once",
                    norms=(None, "post_attention_layernorm", None, "post_feedforward_layernorm")),
    "phi3": Family("Phi3", window_in_config=True, fused=True),
    "granite": Family("Granite", scaled=True),
    "smollm3": Family("SmolLM3"),  # every fourth layer without RoPE (the attention module's use_rope)
    "qwen3_moe": Family("Qwen3Moe", qk_norm="head", moe="Qwen3MoeSparseMoeBlock"),
    "mixtral": Family("Mixtral", window_in_config=True, moe="MixtralSparseMoeBlock"),
}
NORM_MODES = {"llama": 0, "offset": 1, "once": 2}  # as glue_cpu numbers them
ACTS = {"silu": 0, "gelu_pytorch_tanh": 1}  # the MLP activations, as glue_cpu numbers them
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rope types whose cos/sin depend on the position only
GROW = 256  # cache positions added at a time
GLUE_DTYPES = (torch.float32, torch.bfloat16)  # what the native glue (kernels.glue_cpu) computes in


def _rope_types(cfg) -> list[str]:
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    subs = [v for v in rp.values() if isinstance(v, dict)] if isinstance(rp, dict) else []
    return [d.get("rope_type", "default") for d in subs] or [rp.get("rope_type", "default")]


def _act(cfg) -> str:
    return getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")


def unsupported(model) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model`` (``None`` when it can)."""
    cfg = getattr(model, "config", None)
    fam = FAMILIES.get(getattr(cfg, "model_type", None))
    if fam is None:
        return f"model type {getattr(cfg, 'model_type', None)!r} is not in lean_decode.FAMILIES"
    if _act(cfg) not in ACTS:
        return f"activation {_act(cfg)!r} (the lean decoder has {', '.join(ACTS)})"
    bad = [t for t in _rope_types(cfg) if t not in STATIC_ROPE]
    if bad:
        return f"rope_type {bad[0]!r} changes with the sequence length"
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, key, None) is not None and not fam.softcap:
            return f"{key} (not in the lean decoder)"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention"
    if any(t not in ("full_attention", "sliding_attention") for t in getattr(cfg, "layer_types", None) or ()):
        return f"layer types {sorted(set(cfg.layer_types))}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "no model.model.layers / lm_head"
    block, attention, mlp, norm = fam.names()
    mods = [model, inner, inner.embed_tokens, inner.norm]
    for i, blk in enumerate(inner.layers):
        att = getattr(blk, "self_attn", None)
        ffn = getattr(blk, "mlp", None)
        kinds = [(blk, block), (att, attention), (ffn, fam.moe if fam.moe and type(ffn).__name__ == fam.moe else mlp)]
        kinds += [(getattr(blk, a, None), norm) for a in fam.norms if a]
        kinds += [(getattr(att, "q_norm", None), norm), (getattr(att, "k_norm", None), norm)] if fam.qk_norm else []
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


def _eps(norm) -> float:
    """An RMSNorm's epsilon (``variance_epsilon`` in Llama's, Qwen's and Mistral's, ``eps`` in Gemma's)."""
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


class LeanDecoder:
    """Prefill and one-token decode steps of a Llama-shaped ``model`` (batch 1) on its own KV cache."""

    def __init__(self, model):
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"LeanDecoder cannot run this model: {why}")
        cfg = model.config
        self.fam = fam = FAMILIES[cfg.model_type]
        inner = model.model
        self.blocks = list(inner.layers)
        self.bnorms = [tuple(getattr(b, a) if a else None for a in fam.norms) for b in self.blocks]
        self.embed, self.norm, self.head = inner.embed_tokens, inner.norm, model.lm_head
        scaled = (lambda key: float(getattr(cfg, key))) if fam.scaled else (lambda key: 1.0)
        self.emb_mult, self.res_mult = scaled("embedding_multiplier"), scaled("residual_multiplier")
        self.logit_scale = scaled("logits_scaling")
        self.mode = NORM_MODES[fam.norm]
        self.attn_cap = getattr(cfg, "attn_logit_softcapping", None) if fam.softcap else None
        self.logit_cap = getattr(cfg, "final_logit_softcapping", None) if fam.softcap else None
        self.rotary = inner.rotary_emb
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.act = ACTS[_act(cfg)]
        self.windows = [(cfg.sliding_window if fam.window_in_config else getattr(b.self_attn, "sliding_window", None))
                        for b in self.blocks]
        typed = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.rope_of = [(cfg.layer_types[i] if typed else None) for i in range(len(self.blocks))]
        self.nope = [not getattr(b.self_attn, "use_rope", True) for b in self.blocks]  # SmolLM3's layers without RoPE
        self.moe = [bool(fam.moe) and type(b.mlp).__name__ == fam.moe for b in self.blocks]
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        self.pos = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.cos: dict = {}
        self.sin: dict = {}
        self._reserve(GROW)
        self.glue, self._fns = None, {}
        tables = {c.dtype for c in self.cos.values()} - {self.dtype, torch.float32}  # the glue reads these two
        if self.device.type == "cpu" and self.dtype in GLUE_DTYPES and self.head_dim <= 512 and not tables:
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
        for t in set(self.rope_of):
            args = () if t is None else (t,)
            cos, sin = self.rotary(probe, torch.arange(n, device=self.device)[None], *args)
            self.rot = cos.shape[-1]  # the rotated part of a head (all of it but where RoPE is partial)
            half = self.rot // 2
            # rotate_half(x) * sin == flip(x's halves) * [-sin_1, sin_2]: one product instead of neg + cat
            self.cos[t] = cos[0]
            self.sin[t] = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)

    def _rms(self, norm, x: torch.Tensor) -> torch.Tensor:
        """``norm(x)`` as the family's RMSNorm computes it (``x`` itself where the family has no norm)."""
        if norm is None:
            return x
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _eps(norm))
        if self.mode == 1:
            return (xf * (1.0 + norm.weight.float())).to(x.dtype)
        if self.mode == 2:
            return (norm.weight * xf).to(x.dtype)
        return norm.weight * xf.to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x [1, h, T, d]`` rotated as ``apply_rotary_pos_emb`` does (its first ``self.rot`` channels: partial
        RoPE leaves the rest as they are)."""
        r = self.rot
        xr = x[..., :r] if r < self.head_dim else x
        out = (xr * cos + xr.unflatten(-1, (2, r // 2)).flip(-2).flatten(-2) * sin).to(x.dtype)  # float32 tables
        return out if r == self.head_dim else torch.cat([out, x[..., r:]], -1)  # (OLMo 2's): rounded once

    def _qkv(self, att, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queries, keys and values ``[..., heads * head_dim]`` of ``x``, their norms applied where the family
        has them over all heads at once (OLMo 2's)."""
        if self.fam.fused:
            H, KV, d = self.heads, self.kv_heads, self.head_dim
            q, k, v = att.qkv_proj(x).split([H * d, KV * d, KV * d], -1)
        else:
            q, k, v = att.q_proj(x), att.k_proj(x), att.v_proj(x)
        if self.fam.qk_norm == "all":
            q, k = self._rms(att.q_norm, q), self._rms(att.k_norm, k)
        return q, k, v

    def _gate_up(self, mlp, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fam.fused:
            return mlp.gate_up_proj(x).chunk(2, -1)
        return mlp.gate_proj(x), mlp.up_proj(x)

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i``'s MLP of ``x``."""
        mlp = self.blocks[i].mlp
        if self.moe[i]:
            return mlp(x)  # the router and the chosen experts, as transformers runs them
        g, u = self._gate_up(mlp, x)
        g = F.silu(g) if self.act == 0 else F.gelu(g, approximate="tanh")
        return mlp.down_proj(g * u)

    def _residual(self, h: torch.Tensor, norm, o: torch.Tensor) -> torch.Tensor:
        """``h`` plus a branch's output ``o`` (normalised where the family has a norm there; Granite's multiplier)."""
        o = self._rms(norm, o)
        return h + (o if self.res_mult == 1.0 else o * self.res_mult)

    def _attend(self, q, K, V, scale, mask=None, causal: bool = False) -> torch.Tensor:
        """Attention of ``q [1, h, T, d]`` on ``K``, ``V [1, KV, S, d]`` (``h`` a multiple of ``KV``; ``mask [T, S]``
        True where allowed, or ``causal``, or neither: every key), with Gemma 2's score soft-capping as its eager
        attention computes it where the model has it, else one ``scaled_dot_product_attention`` call."""
        h, kv = q.shape[1], K.shape[1]
        if not self.attn_cap:
            return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, is_causal=causal, scale=scale,
                                                  enable_gqa=kv != h)
        if h != kv:
            K, V = K.repeat_interleave(h // kv, 1), V.repeat_interleave(h // kv, 1)
        w = torch.tanh(q @ K.transpose(2, 3) * scale / self.attn_cap) * self.attn_cap
        if causal:
            mask = torch.ones(w.shape[-2:], dtype=torch.bool, device=w.device).tril(w.shape[-1] - w.shape[-2])
        if mask is not None:
            w = w.masked_fill(~mask, float("-inf"))
        return torch.softmax(w, -1, dtype=torch.float32).to(q.dtype) @ V

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x)[0]
        if self.logit_cap:
            logits = torch.tanh(logits / self.logit_cap) * self.logit_cap
        return logits if self.logit_scale == 1.0 else logits / self.logit_scale

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return h if self.emb_mult == 1.0 else h * self.emb_mult

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, *, last: bool = False) -> torch.Tensor:
        """Logits ``[T, vocab]`` of the tokens ``ids [1, T]`` following the cached ones (``[1, vocab]``, the next
        token's, with ``last``)."""
        T = ids.shape[1]
        if T == 1 and self.glue is not None:
            return self._step(ids)
        p0 = self.pos
        self._reserve(p0 + T)
        h = self._embed(ids)  # [1, T, hidden]
        H, KV, d = self.heads, self.kv_heads, self.head_dim
        rows = torch.arange(p0, p0 + T, device=h.device)[:, None]
        cols = torch.arange(p0 + T, device=h.device)[None]
        for i, blk in enumerate(self.blocks):
            att, W = blk.self_attn, self.windows[i]
            n_att, n_att_out, n_mlp, n_mlp_out = self.bnorms[i]
            cos, sin = self.cos[self.rope_of[i]][p0:p0 + T], self.sin[self.rope_of[i]][p0:p0 + T]
            q, k, v = self._qkv(att, self._rms(n_att, h))
            q, k = q.view(1, T, H, d), k.view(1, T, KV, d)
            if self.fam.qk_norm == "head":
                q, k = self._rms(att.q_norm, q), self._rms(att.k_norm, k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = v.view(1, T, KV, d).transpose(1, 2)
            if not self.nope[i]:
                q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            K, V = self.k[i], self.v[i]
            K[:, :, p0:p0 + T] = k
            V[:, :, p0:p0 + T] = v
            K, V = K[:, :, :p0 + T], V[:, :, :p0 + T]
            mask = None
            if p0 > 0 or (W is not None and p0 + T > W):  # causal, and within the window (kv > q - W)
                mask = (cols <= rows) & (True if W is None else cols > rows - W)
            o = self._attend(q, K, V, att.scaling, mask, causal=mask is None)
            h = self._residual(h, n_att_out, att.o_proj(o.transpose(1, 2).reshape(1, T, H * d)))
            h = self._residual(h, n_mlp_out, self._mlp(i, self._rms(n_mlp, h)))
        self.pos = p0 + T
        if last:
            h = h[:, -1:]
        return self._logits(self._rms(self.norm, h))

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

    @staticmethod
    def _norm_args(norm) -> tuple[int | None, float]:
        return (None, 0.0) if norm is None else (norm.weight.data_ptr(), _eps(norm))

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        """One token's logits ``[1, vocab]`` with the block glue in native calls (:mod:`.kernels.glue_cpu`)."""
        p = self.pos
        self._reserve(p + 1)
        g, bf, mode, rm = self.glue, int(self.dtype == torch.bfloat16), self.mode, self.res_mult
        H, KV, d = self.heads, self.kv_heads, self.head_dim
        cap, dt, fn, args = self.k[0].shape[2], self.dtype, self._fn, self._norm_args
        h = self._embed(ids)  # [1, 1, hidden], this step's own residual stream (added to in place)
        n = h.shape[-1]
        x = torch.empty_like(h)
        g.glue_add_rms(h.data_ptr(), None, None, 0.0, *args(self.bnorms[0][0]), x.data_ptr(), n, bf, mode, 1.0)
        for i, blk in enumerate(self.blocks):
            att, mlp, W = blk.self_attn, blk.mlp, self.windows[i]
            _, n_att_out, n_mlp, n_mlp_out = self.bnorms[i]
            if self.fam.fused:
                qkv = fn(att.qkv_proj, x)(x, dt).contiguous()
                q, k, v = qkv.split([H * d, KV * d, KV * d], -1)  # one row each: contiguous views
            else:
                q, k, v = (fn(m, x)(x, dt).contiguous() for m in (att.q_proj, att.k_proj, att.v_proj))
            if self.fam.qk_norm:
                shape = ((H, d), (KV, d)) if self.fam.qk_norm == "head" else ((1, H * d), (1, KV * d))
                q = self._rms(att.q_norm, q.reshape(shape[0])).contiguous()
                k = self._rms(att.k_norm, k.reshape(shape[1])).contiguous()
            K, V = self.k[i], self.v[i]
            t = self.rope_of[i]
            g.glue_rope_cache(q.data_ptr(), k.data_ptr(), v.data_ptr(), self.cos[t][p].data_ptr(),
                              self.sin[t][p].data_ptr(), K.data_ptr(), V.data_ptr(), p, H, KV, d,
                              0 if self.nope[i] else self.rot, cap, bf, int(self.cos[t].dtype != dt))
            lo = 0 if W is None else max(0, p + 1 - W)
            o = self._attend(q.view(1, KV, H // KV, d), K[:, :, lo:p + 1], V[:, :, lo:p + 1],
                             att.scaling)  # each kv head's queries as the rows of one call
            o = o.reshape(1, 1, H * d)
            a = fn(att.o_proj, o)(o, dt).contiguous()
            x = torch.empty_like(h)  # a new x: a layer may hold its input
            g.glue_add_rms(h.data_ptr(), a.data_ptr(), *args(n_att_out), *args(n_mlp), x.data_ptr(), n, bf, mode, rm)
            if self.moe[i]:
                m = mlp(x).contiguous()
            else:
                if self.fam.fused:
                    gate, up = fn(mlp.gate_up_proj, x)(x, dt).contiguous().chunk(2, -1)
                else:
                    gate, up = fn(mlp.gate_proj, x)(x, dt).contiguous(), fn(mlp.up_proj, x)(x, dt).contiguous()
                gu = torch.empty_like(gate)
                g.glue_act_mul(gate.data_ptr(), up.data_ptr(), gu.data_ptr(), gu.numel(), bf, self.act)
                m = fn(mlp.down_proj, gu)(gu, dt).contiguous()
            nxt = self.bnorms[i + 1][0] if i + 1 < len(self.blocks) else self.norm
            x = torch.empty_like(h)
            g.glue_add_rms(h.data_ptr(), m.data_ptr(), *args(n_mlp_out), *args(nxt), x.data_ptr(), n, bf, mode, rm)
        self.pos = p + 1
        return self._logits(x)
