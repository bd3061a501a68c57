"""KV-cache sensitivity per layer and per K/V (:func:`measure_kv`).

For every attention layer ``i``, each of ``K`` and ``V``, and each width ``b`` in ``bits``
(default 2, 3, 4, 8), only that tensor of that layer goes through the KIVI cache at ``b`` bits
(every other layer and the other tensor stay at 16) and the calibration windows are scored::

    e_kl(i, K, b)   = mean_t KL(P_fp(· | x_<t) ‖ P_q(· | x_<t))              (default, nats/token)
    e_loss(i, K, b) = max(0, mean_t NLL_q(t) − mean_t NLL_fp(t))              (``metric="loss"``)

over every predicted position of every calibration window.  Both are per-token loss increases
in nats — the unit of mixq's ``kfac`` weight errors (``½ E_t[ΔyᵀG Δy]``, a second-order
per-token loss increase) — so weight and KV errors add in one knapsack
(:mod:`mixq.allocate.joint`).  16 bits costs nothing and has error 0 (no measurement).
The KV errors are measured at the calibration window length; costs are counted at whatever
context the plan states, so a plan for a much longer context extrapolates the per-token error.

Decoding ``chunk`` tokens per forward is simulated exactly (:mod:`mixq.runtime.kv_sim`, ``engine="simulate"``,
the default) or run through the real cache (``engine="cache"``, :func:`mixq.runtime.kv_feed.decode_logits`).  In
the measurement, the blocks before layer ``i`` are unaffected by quantizing layer ``i``'s cache, so with the
simulation their fp outputs are replayed from one fp pass instead of recomputed (about half of the block
compute saved).  The result is a :class:`~mixq.allocate.kv_table.KVSensitivityTable`; its costs are
:func:`~mixq.runtime.kv_settings.kv_part_bits`.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch import nn

from ..allocate.kv_table import KV_METRICS, KVEntry, KVSensitivityTable
from ..arch import get_blocks
from ..data import calibration_hash
from ..eval.perplexity import row_chunks
from ..models import model_fingerprint
from ..runtime.kv_cache import KIVICache
from ..runtime.kv_codec import FP, kv_spec
from ..runtime.kv_cost import kv_dims
from ..runtime.kv_feed import decode_logits
from ..runtime.kv_settings import KVSettings
from ..runtime.kv_sim import KV_ENGINES, check_full_attention, simulate_kivi
from .partial import load_partial, partial_file, save_partial

log = logging.getLogger(__name__)

KV_CANDIDATE_BITS = (2, 3, 4, 8)


# ---------------------------------------------------------------------------- measurement
def kv_measurement_key(model: nn.Module, calib_ids: torch.Tensor, bits, metric: str, settings: KVSettings,
                       engine: str, chunk: int, prefill: int | None) -> dict:
    """What a KV measurement (and its ``.partial`` file) belongs to: model, calibration ids, widths, settings."""
    return {"model": model_fingerprint(model),
            "calibration": calibration_hash(calib_ids),
            "calibration_shape": list(calib_ids.shape), "bits": [int(b) for b in bits], "metric": metric,
            "settings": settings.to_dict(), "engine": engine, "chunk": chunk, "prefill": prefill or chunk}


def _score(logits: torch.Tensor, ids: torch.Tensor, ref_logits: torch.Tensor):
    """``(Σ_t KL(P_ref ‖ P_q), Σ_t NLL_q)`` over the predicted positions of ``logits [B, T, V]``, against the
    fp ``ref_logits [B, T-1, V]`` — in float64 by row chunks, so identical logits give 0 and float32
    rounding leaves no noise floor in the small errors of 8-bit caches."""
    V = logits.shape[-1]
    z = logits[:, :-1].reshape(-1, V)
    r = ref_logits.reshape(-1, V)
    y = ids[:, 1:].reshape(-1).to(z.device)
    kl = nll = 0.0
    for sl in row_chunks(z.shape[0], V):
        q = torch.log_softmax(z[sl].double(), -1)
        p = torch.log_softmax(r[sl].to(q.device).double(), -1)
        kl += float((p.exp() * (p - q)).sum(-1).clamp_min(0).sum())
        nll += float(-q.gather(-1, y[sl, None]).sum())
    return kl, nll


@torch.no_grad()
def measure_kv(model: nn.Module, calib_ids: torch.Tensor, *, bits=KV_CANDIDATE_BITS, metric: str = "kl",
               settings: KVSettings = KVSettings(), engine: str = "simulate", chunk: int = 1,
               prefill: int | None = None, batch_size: int = 2, out=None, progress: bool = False) -> KVSensitivityTable:
    """Measure every layer's K and V error at each width in ``bits`` (module doc); 16 is added at 0.

    ``calib_ids [n, L]``: calibration windows (all positions are scored).  ``out``: the JSON path,
    also used to resume (``out + ".partial"`` is written after every layer).
    """
    if metric not in KV_METRICS:
        raise ValueError(f"unknown KV metric {metric!r}: choose one of {', '.join(KV_METRICS)}")
    if engine not in KV_ENGINES:
        raise ValueError(f"unknown KV engine {engine!r}: choose one of {', '.join(KV_ENGINES)}")
    bits = tuple(sorted({int(b) for b in bits} - {FP}))
    for b in bits:
        kv_spec(b)
    if not bits:
        raise ValueError("measure at least one KV width below 16 bits")
    if calib_ids.dim() != 2 or calib_ids.shape[1] < 2:
        raise ValueError(f"calibration ids must be [n, L >= 2], got {tuple(calib_ids.shape)}")
    check_full_attention(model.config)
    t0 = time.perf_counter()
    key = kv_measurement_key(model, calib_ids, bits, metric, settings, engine, chunk, prefill)
    dims = kv_dims(model.config)
    L = dims[0]
    partial = partial_file(out)
    doc = load_partial(partial, key, "KV measurement", "model/calibration/setting")
    done = {int(k): v for k, v in doc.get("layers", {}).items()} if doc else {}
    was = model.training
    model.eval()
    blocks = get_blocks(model)
    batches = [calib_ids[i: i + batch_size] for i in range(0, calib_ids.shape[0], batch_size)]
    n_tok = calib_ids.shape[0] * (calib_ids.shape[1] - 1)
    try:
        # fp pass: reference log-probs and (simulate engine) every block's output, for replay
        outs: list[list] = [[] for _ in blocks]
        hooks = [blk.register_forward_hook(lambda m, a, o, i=i: outs[i].append(o)) for i, blk in enumerate(blocks)] \
            if engine == "simulate" else []
        ref_lp, fp_nll = [], 0.0
        try:
            with simulate_kivi(model, FP, settings=settings):
                for ids in batches:
                    logits = model(ids, use_cache=False).logits
                    ref_lp.append(logits[:, :-1].float())
                    fp_nll += _score(logits, ids, ref_lp[-1])[1]
        finally:
            for h in hooks:
                h.remove()
        fp_nll /= n_tok
        results = dict(done)
        for i in range(L):
            if i in results:
                continue
            row = {}
            for kind in ("k", "v"):
                errs = []
                for b in bits:
                    pair = (b, FP) if kind == "k" else (FP, b)
                    kl_sum = nll_sum = 0.0
                    for bi, ids in enumerate(batches):
                        if engine == "simulate":
                            with _replay(blocks[:i], [o[bi] for o in outs[:i]]), \
                                    simulate_kivi(model, {i: pair, "default": FP}, settings=settings, chunk=chunk,
                                                  prefill=prefill):
                                logits = model(ids, use_cache=False).logits
                        else:
                            cache = KIVICache(model.config, {i: pair, "default": FP}, **settings.kw())
                            logits = torch.cat([lg for _, _, lg in decode_logits(model, ids, cache, chunk=chunk,
                                                                                 prefill=prefill)], 1)
                        k_, n_ = _score(logits, ids, ref_lp[bi])
                        kl_sum, nll_sum = kl_sum + k_, nll_sum + n_
                    errs.append(kl_sum / n_tok if metric == "kl" else max(0.0, nll_sum / n_tok - fp_nll))
                row[kind] = errs
            results[i] = row
            if progress:
                log.warning("KV layer %d/%d: K %s  V %s", i + 1, L, _fmt(row["k"]), _fmt(row["v"]))
            if partial is not None:
                save_partial(partial, key, layers={str(k): v for k, v in results.items()})
    finally:
        model.train(was)
    entries = []
    for i in range(L):
        for kind in ("k", "v"):
            entries.append(KVEntry(i, kind, (*bits, FP), (*results[i][kind], 0.0)))
    meta = {**key, "fp_nll": fp_nll, "seconds": time.perf_counter() - t0, "resumed_layers": len(done),
            "unit": "nats per token (mean over every predicted calibration position)"}
    table = KVSensitivityTable(tuple(entries), dims, metric, settings, key["model"], meta)
    if out:
        table.save(out, overwrite=True)
        partial.unlink(missing_ok=True)
    return table


def _fmt(xs) -> str:
    return " ".join(f"{x:.3g}" for x in xs)


@contextlib.contextmanager
def _replay(blocks, outputs):
    """Blocks ``blocks`` return their recorded fp ``outputs`` instead of computing (their inputs are
    unaffected by what is measured downstream)."""
    saved = []
    try:
        for blk, o in zip(blocks, outputs):
            saved.append((blk, blk.__dict__.get("forward")))
            blk.forward = (lambda *a, _o=o, **k: _o)
        yield
    finally:
        for blk, f in saved:
            if f is None:
                del blk.forward
            else:
                blk.forward = f
