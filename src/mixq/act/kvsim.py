"""KIVI decode semantics without the cache: settings, costs, an exact decode simulation inside one
forward, chunked decoding through the real cache, and evaluation with KL (see :mod:`.kvsens` for the
equations; the measurement there uses this module).  :class:`KVSettings` also carries the options of
:mod:`.kvcodec` — important tokens at high precision (MiKV), pre-RoPE keys (KVQuant), Hadamard
rotation — which both the simulation and the real cache apply.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from .kvcache import (FP, VALID_BITS, KIVICache, attention_modules, kv_cache_bits, kv_cache_feed, kv_dims, kv_spec,
                      resolve_kv_bits, rope_of)
from .kvcodec import KVCodec, check_rope_convention, important_count, normalize_rotate, select_important


KV_ENGINES = ("simulate", "cache")
SIM_NAME = "mixq_kivi_sim"


# ---------------------------------------------------------------------------- settings and costs
_BASE_FIELDS = ("k_group", "v_group", "residual", "zero")
_OPTION_DEFAULTS = {"important": 0.0, "important_bits": 8, "pre_rope": False, "rotate": ""}


@dataclass(frozen=True)
class KVSettings:
    """KIVI layout: ``k_group`` tokens per key group, ``v_group`` channels per value group (None:
    head_dim), ``residual`` fp tokens, ``zero`` ``"fp16"`` offset (KIVI) or ``"int"`` zero point.

    Options (:mod:`.kvcodec`): ``important`` fraction of each key group's tokens — the most attended
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
        attention the earlier blocks paid (module doc of :mod:`.kvsens`)."""
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


def _check_full_attention(config) -> None:
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
    _check_full_attention(model.config)
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


# ---------------------------------------------------------------------------- chunked decode (cache engine)
@torch.no_grad()
def decode_logits(model: nn.Module, ids: torch.Tensor, cache, *, chunk: int, prefill: int | None = None):
    """Yield ``(s, e, logits [B, e − s, V])`` feeding ``ids [B, T]`` chunk by chunk through ``cache``
    (prefill ``P`` tokens first, then ``chunk`` at a time), as :func:`eval_with_kv_quant` does; under
    :func:`kv_cache_feed` when the cache needs it (important tokens, pre-RoPE keys)."""
    T = ids.shape[1]
    p = min(prefill or chunk, T)
    bounds = [0, *range(p, T, chunk), T]
    with kv_cache_feed(model, cache):
        for s, e in zip(bounds[:-1], bounds[1:]):
            yield s, e, model(ids[:, s:e], past_key_values=cache, use_cache=True).logits


# ---------------------------------------------------------------------------- evaluation with KL
def kv_compare(model: nn.Module, windows, kv_bits, reference=None, *, settings: KVSettings = KVSettings(),
               engine: str = "cache", chunk: int = 16, prefill: int | None = None, batch_size: int = 8,
               progress: bool = False) -> dict:
    """Perplexity (and KL / top-1 against ``reference``: a model or :class:`~mixq.eval.ReferenceCache`)
    of ``model`` with a KIVI cache of ``kv_bits`` on ``windows``.

    ``engine="cache"``: the real :class:`KIVICache`, prefill then ``chunk`` tokens per forward (the
    loop of :func:`~mixq.act.kveval.eval_with_kv_quant`; same NLL).  ``engine="simulate"``: one full
    forward per batch under :func:`simulate_kivi` (the same decode semantics, any ``chunk`` incl. 1).
    Returns :func:`mixq.eval.kl.compare`'s keys (KL ones ``None`` without a reference) plus ``"kv"``.
    """
    from ..eval.kl import ReferenceCache, compare  # noqa: PLC0415
    from ..eval.perplexity import batches, eval_mode, model_device, perplexity, summarize_nll, token_nll  # noqa: PLC0415
    from ..eval.kl import token_kl  # noqa: PLC0415

    if engine not in KV_ENGINES:
        raise ValueError(f"KV engine must be one of {KV_ENGINES}, got {engine!r}")
    if chunk < 1 or (prefill is not None and prefill < 1):
        raise ValueError(f"chunk and prefill must be >= 1, got chunk={chunk}, prefill={prefill}")
    L = kv_dims(model.config)[0]
    info = {"bits": [list(b) for b in resolve_kv_bits(kv_bits, L)], **settings.kw(), "engine": engine,
            "chunk": chunk, "prefill": prefill or chunk}
    ref = reference
    if ref is not None and not isinstance(ref, ReferenceCache):  # a model: run it per batch, store nothing
        ref = ReferenceCache(ref, windows, batch_size=batch_size, progress=progress, max_bytes=0)
    if engine == "simulate":
        with simulate_kivi(model, kv_bits, settings=settings, chunk=chunk, prefill=prefill):
            if ref is None:
                r = perplexity(model, windows, batch_size=batch_size, progress=progress)
                r.update(kl=None, kl_p99=None, top1_agreement=None, reference_perplexity=None, reference_nll=None)
            else:
                r = compare(model, ref, windows, batch_size=batch_size, progress=progress)
        return {**r, "kv": info}
    t0 = time.perf_counter()
    device = model_device(model)
    mask_all = windows.score_mask.clone()
    mask_all[:, 0] = False
    n = int(mask_all.sum())
    nll = torch.empty(n, dtype=torch.float32)
    kl = torch.empty(n, dtype=torch.float32) if ref is not None else None
    agree = torch.empty(n, dtype=torch.bool) if ref is not None else None
    ref_nll = torch.empty(n, dtype=torch.float32) if ref is not None else None
    offset = 0
    with eval_mode(model):
        if ref is not None:
            ref.build()
        for i, j in batches(windows, batch_size, progress=progress, desc="kv-compare"):
            ids = windows.input_ids[i:j].to(device)
            mask = mask_all[i:j]
            idx = torch.full(mask.shape, -1, dtype=torch.long)
            idx[mask] = torch.arange(int(mask.sum()))
            rows = r_nll = r_arg = None
            if ref is not None:
                rows, r_nll, r_arg = ref.batch(i, j)
            cache = KIVICache(model.config, kv_bits, **settings.kw())
            T = ids.shape[1]
            for s, e, logits in decode_logits(model, ids, cache, chunk=chunk, prefill=prefill):
                e2 = min(e, T - 1)
                if e2 <= s:
                    continue
                tgt = idx[:, s + 1: e2 + 1]
                sel = tgt >= 0
                if not bool(sel.any()):
                    continue
                z = logits[:, : e2 - s][sel.to(logits.device)]
                y = ids[:, s + 1: e2 + 1][sel.to(ids.device)]
                where = tgt[sel]
                nll[offset + where] = token_nll(z, y).cpu()
                if ref is not None:
                    rr = rows[where.to(rows.device)]
                    kl[offset + where] = token_kl(z, rr).cpu()
                    agree[offset + where] = z.argmax(-1).cpu() == r_arg[where].cpu()
                    ref_nll[offset + where] = r_nll[where].cpu()
            offset += int(mask.sum())
    mean, ppl = summarize_nll(nll)
    out = {"perplexity": ppl, "nll": mean, "n_scored": n, "seconds": time.perf_counter() - t0, "kv": info,
           "kl": None, "kl_p99": None, "top1_agreement": None, "reference_perplexity": None, "reference_nll": None}
    if ref is not None:
        k = kl.double()
        rm, rp = summarize_nll(ref_nll)
        out.update(kl=float(k.mean()), kl_p99=float(torch.quantile(k, 0.99)) if n else float("nan"),
                   top1_agreement=float(agree.double().mean()), reference_perplexity=rp, reference_nll=rm)
    return out
