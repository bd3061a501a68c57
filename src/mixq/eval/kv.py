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

The same loop as a generator is :func:`mixq.runtime.kv_feed.decode_logits` (the ``"cache"`` engine, shared with
the KV measurement, :mod:`mixq.measure.kv`); :func:`kv_compare` adds KL / top-1 against a reference model with either engine (the real cache, or one
forward per batch under :func:`~mixq.runtime.kv_sim.simulate_kivi`).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..data import EvalWindows
from ..runtime.kv_cache import KIVICache
from ..runtime.kv_cost import kv_dims, resolve_kv_bits
from ..runtime.kv_feed import decode_logits, kv_cache_feed
from ..runtime.kv_settings import KVSettings
from ..runtime.kv_sim import KV_ENGINES, simulate_kivi
from .kl import ReferenceCache, compare, token_kl
from .perplexity import batches, eval_mode, model_device, perplexity, summarize_nll, token_nll


def eval_with_kv_quant(model: torch.nn.Module, windows: EvalWindows, kv_bits, *, chunk: int = 1,
                       prefill: int | None = None, batch_size: int = 1, k_group: int = 32,
                       v_group: int | None = None, residual: int = 32, zero: str = "fp16",
                       important: float = 0.0, important_bits: int = 8, pre_rope: bool = False, rotate=False,
                       progress: bool = False) -> dict:
    """Mean NLL per scored token with a :class:`KIVICache` of ``kv_bits`` (int, ``(k, v)`` or per-layer dict).

    ``prefill``: tokens of the first forward (default ``chunk``); ``chunk``: tokens per later forward.
    ``important``/``important_bits``/``pre_rope``/``rotate``: the cache's options (:mod:`mixq.runtime.kv_cache`);
    the forwards run under :func:`~mixq.runtime.kv_feed.kv_cache_feed` when they need it.
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


# ---------------------------------------------------------------------------- evaluation with KL
def kv_compare(model: nn.Module, windows, kv_bits, reference=None, *, settings: KVSettings = KVSettings(),
               engine: str = "cache", chunk: int = 16, prefill: int | None = None, batch_size: int = 8,
               progress: bool = False) -> dict:
    """Perplexity (and KL / top-1 against ``reference``: a model or :class:`~mixq.eval.ReferenceCache`)
    of ``model`` with a KIVI cache of ``kv_bits`` on ``windows``.

    ``engine="cache"``: the real :class:`KIVICache`, prefill then ``chunk`` tokens per forward (the
    loop of :func:`~mixq.eval.kv.eval_with_kv_quant`; same NLL).  ``engine="simulate"``: one full
    forward per batch under :func:`simulate_kivi` (the same decode semantics, any ``chunk`` incl. 1).
    Returns :func:`mixq.eval.kl.compare`'s keys (KL ones ``None`` without a reference) plus ``"kv"``.
    """
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
