"""Perplexity with the quantized KV cache actually used: prefill, then decode chunk by chunk.

A plain forward over a window (:func:`mixq.eval.perplexity.perplexity`) never reads a cache.  Here
each window ``[B, T]`` runs as::

    cache = KIVICache(config, kv_bits, ...)
    logits[:, 0:P]     = model(ids[:, 0:P],     past_key_values=cache)     # prefill: exact
    logits[:, s:s+c]   = model(ids[:, s:s+c],   past_key_values=cache)     # s = P, P+c, ...

so token ``t`` attends to the ``R`` most recent earlier tokens in fp and to older ones through the
quantized cache (``c = 1`` is exactly autoregressive decoding; a larger ``c`` is faster and lets
the tokens of one chunk see each other in fp).  The NLL of each scored target is computed per chunk
in float32 and the mean taken in float64 in the same (window, position) order as
:func:`~mixq.eval.perplexity.perplexity`.  With 16-bit K/V the result equals the plain perplexity
up to the rounding differences of chunked attention.
"""
from __future__ import annotations

import time

import torch

from ..data import EvalWindows
from ..eval.perplexity import batches, eval_mode, model_device, summarize_nll, token_nll
from .kvcache import KIVICache, kv_cache_feed, kv_dims, resolve_kv_bits


def eval_with_kv_quant(model: torch.nn.Module, windows: EvalWindows, kv_bits, *, chunk: int = 1,
                       prefill: int | None = None, batch_size: int = 1, k_group: int = 32,
                       v_group: int | None = None, residual: int = 32, zero: str = "fp16",
                       important: float = 0.0, important_bits: int = 8, pre_rope: bool = False, rotate=False,
                       progress: bool = False) -> dict:
    """Mean NLL per scored token with a :class:`KIVICache` of ``kv_bits`` (int, ``(k, v)`` or per-layer dict).

    ``prefill``: tokens of the first forward (default ``chunk``); ``chunk``: tokens per later forward.
    ``important``/``important_bits``/``pre_rope``/``rotate``: the cache's options (:mod:`.kvcache`);
    the forwards run under :func:`~mixq.act.kvcache.kv_cache_feed` when they need it.
    Returns ``{"nll", "perplexity", "n_scored", "seconds", "kv": {...settings}}``.
    """
    if chunk < 1 or (prefill is not None and prefill < 1):
        raise ValueError(f"chunk and prefill must be >= 1, got chunk={chunk}, prefill={prefill}")
    opts = dict(k_group=k_group, v_group=v_group, residual=residual, zero=zero, important=important,
                important_bits=important_bits, pre_rope=pre_rope, rotate=rotate)
    t0 = time.perf_counter()
    device = model_device(model)
    parts = []
    with eval_mode(model):
        for i, j in batches(windows, batch_size, progress=progress, desc="kv-perplexity"):
            ids = windows.input_ids[i:j].to(device)
            mask = windows.score_mask[i:j].to(device)
            B, T = ids.shape
            nll = torch.zeros(B, T, dtype=torch.float32, device=device)
            cache = KIVICache(model.config, kv_bits, **opts)
            p = min(prefill or chunk, T)
            bounds = [0, *range(p, T, chunk), T]
            with kv_cache_feed(model, cache):
                for s, e in zip(bounds[:-1], bounds[1:]):
                    logits = model(ids[:, s:e], past_key_values=cache, use_cache=True).logits
                    e2 = min(e, T - 1)  # logits at t predict token t + 1
                    if e2 > s:
                        z = logits[:, : e2 - s].reshape(-1, logits.shape[-1])
                        nll[:, s + 1 : e2 + 1] = token_nll(z, ids[:, s + 1 : e2 + 1].reshape(-1)).reshape(B, e2 - s)
            parts.append(nll[mask].cpu())
    nll = torch.cat(parts)
    mean, ppl = summarize_nll(nll)
    return {"nll": mean, "perplexity": ppl, "n_scored": int(nll.numel()), "seconds": time.perf_counter() - t0,
            "kv": {"bits": [list(b) for b in resolve_kv_bits(kv_bits, kv_dims(model.config)[0])], **opts,
                   "chunk": chunk, "prefill": prefill or chunk}}
