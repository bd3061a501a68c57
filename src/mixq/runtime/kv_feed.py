"""Feeding a :class:`~mixq.runtime.kv_cache.KIVICache` what its options need from the model's forwards.

:func:`kv_cache_feed` hands each layer of the cache the rotary tables of every forward's tokens (pre-RoPE
keys: a forward pre-hook on every attention module reads its ``position_embeddings``) and the attention
probabilities (important tokens: eager attention for the duration and a forward hook; the flush happens
after attention).  :func:`attention_modules` and :func:`rope_of` are shared with the decode simulation
(:mod:`.kv_sim`).  :func:`decode_logits` runs a model through a cache that way, prefill then chunk by chunk
(the ``"cache"`` engine of the KV measurement and of ``kv_compare``).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..arch import get_blocks
from .kv_cache import KIVICache
from .kv_codec import check_rope_convention


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """``layer index → attention module`` (the module with ``layer_idx == i`` inside block ``i``)."""
    out = {}
    for i, block in enumerate(get_blocks(model)):
        for m in block.modules():
            if getattr(m, "layer_idx", None) == i and type(m).__name__.endswith("Attention"):
                out[i] = m
                break
        else:
            raise NotImplementedError(f"block {i} has no attention module with layer_idx={i}")
    return out


def rope_of(module, args, kwargs):
    """``(cos, sin)`` an attention module's forward receives (``position_embeddings``), checked."""
    pe = kwargs.get("position_embeddings")
    if pe is None and len(args) > 1 and isinstance(args[1], tuple):
        pe = args[1]
    if pe is None:
        raise NotImplementedError(f"pre-RoPE keys: {type(module).__name__} receives no rotary position_embeddings "
                                  "(the model has no RoPE, or passes it differently)")
    return pe


@contextlib.contextmanager
def kv_cache_feed(model: nn.Module, cache: KIVICache):
    """Within the block, forwards of ``model`` hand ``cache`` what its options need (module doc):
    the rotary tables of each forward's tokens (``pre_rope``; a forward pre-hook on every attention
    module) and the attention probabilities (``important``; eager attention for the duration and a
    forward hook).  A no-op for a cache that needs neither."""
    if not getattr(cache, "needs_feed", False):
        yield
        return
    mods = attention_modules(model)
    hooks = []
    mixed = False
    for i, layer in enumerate(cache.layers):
        mod = mods[i]
        if layer.needs_rope:
            check_rope_convention(mod)

            def pre(m, args, kwargs, _layer=layer):
                _layer.set_rope(*rope_of(m, args, kwargs))

            hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        if layer.mixed:
            mixed = True

            def post(m, args, kwargs, output, _layer=layer):
                probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if probs is None:
                    raise RuntimeError(f"{type(m).__name__} returned no attention probabilities: important tokens "
                                       "need eager attention")
                _layer.observe(probs)

            hooks.append(mod.register_forward_hook(post, with_kwargs=True))
    cfg = model.config
    old = cfg._attn_implementation
    if mixed:
        cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        if mixed:
            cfg._attn_implementation = old
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------------------- chunked decode (the cache engine)
@torch.no_grad()
def decode_logits(model: nn.Module, ids: torch.Tensor, cache, *, chunk: int, prefill: int | None = None):
    """Yield ``(s, e, logits [B, e − s, V])`` feeding ``ids [B, T]`` chunk by chunk through ``cache``
    (prefill ``P`` tokens first, then ``chunk`` at a time), as :func:`mixq.eval.kv.eval_with_kv_quant` does;
    under :func:`kv_cache_feed` when the cache needs it (important tokens, pre-RoPE keys)."""
    T = ids.shape[1]
    p = min(prefill or chunk, T)
    bounds = [0, *range(p, T, chunk), T]
    with kv_cache_feed(model, cache):
        for s, e in zip(bounds[:-1], bounds[1:]):
            yield s, e, model(ids[:, s:e], past_key_values=cache, use_cache=True).logits
