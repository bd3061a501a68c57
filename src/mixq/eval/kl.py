"""Distribution-level comparison of a (quantized) model with its reference.

Per scored token t, with ``r = log_softmax(ref logits)`` and ``q = log_softmax(model logits)``:

    KL_t = Σ_v exp(r_v) (r_v − q_v)        (KL(P_ref ‖ P_q), nats)
    agree_t = [argmax ref logits == argmax model logits]

``compare`` reports mean KL, its 99th percentile (the tail that a mean hides), top-1 agreement
and both perplexities.  The reference is either a model, run side by side per batch, or a
:class:`ReferenceCache` holding the reference log-probs of every scored token.

Cache precision: log-probs are stored in float16 (relative rounding ≤ 2^-11) and renormalized
with a float32 log-softmax when read, so P_ref still sums to one and KL ≥ 0 (Gibbs).  The
reference NLL and argmax are stored exactly (float32 / int64), so ``reference_perplexity`` and
``top1_agreement`` are unchanged.  The rounding δ enters the KL at second order (≈ ½ Σ p δ²) plus
a first-order term with random sign: on the tiny test model the KL moves by ~1e-6 nats with
float16 (self-KL 6e-7) and ~4e-5 with bfloat16 (7-bit mantissa), against KLs of 1e-3..1e-1 for
real quantized models.  Memory: ``n_scored × V × 2 B``, e.g. 64 windows × 511 × 49152 × 2 B = 3.2 GB.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from mixq.data import EvalWindows
from mixq.eval.perplexity import batches, eval_mode, row_chunks, scored_logits, summarize_nll, token_nll

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 4 * 2**30


class ReferenceCache:
    """Reference log-probs of every scored token of ``windows``, computed once.

    Construction is cheap (it only does the memory math); the reference model runs on the
    first :meth:`build` (called by :func:`compare`).  If ``n_scored × V × itemsize(dtype)``
    exceeds ``max_bytes`` nothing is stored and the reference is recomputed per batch instead.
    Stored: ``logprobs [n_scored, V]`` (``dtype``), ``nll [n_scored]`` float32,
    ``argmax [n_scored]`` int64, all on CPU, in window order.
    """

    def __init__(self, reference_model: torch.nn.Module, windows: EvalWindows, *,
                 max_bytes: int = DEFAULT_MAX_BYTES, dtype: torch.dtype = torch.float16,
                 batch_size: int = 1, progress: bool = True):
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"cache dtype must be float16, bfloat16 or float32, got {dtype}")
        self.model, self.windows, self.dtype = reference_model, windows, dtype
        self.batch_size, self.progress, self.max_bytes = batch_size, progress, max_bytes
        self.vocab_size = _vocab_size(reference_model)
        per_window = windows.score_mask.sum(dim=1)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), per_window.cumsum(0)]).tolist()
        self.nbytes = windows.n_scored * (self.vocab_size * dtype.itemsize + 4 + 8)
        self.stored = self.nbytes <= max_bytes
        log.info("reference cache: %d scored tokens x %d vocab x %d B = %.2f GB (limit %.2f GB): %s",
                 windows.n_scored, self.vocab_size, dtype.itemsize, self.nbytes / 1e9, max_bytes / 1e9,
                 "stored" if self.stored else "too large, the reference is recomputed per batch")
        self.logprobs: torch.Tensor | None = None
        self.nll: torch.Tensor | None = None
        self.argmax: torch.Tensor | None = None

    def build(self) -> ReferenceCache:
        """Run the reference over all windows and store its outputs (no-op if built or not stored)."""
        if not self.stored or self.logprobs is not None:
            return self
        n, w = self.windows.n_scored, self.windows
        logprobs = torch.empty((n, self.vocab_size), dtype=self.dtype)
        nll, argmax = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.long)
        with eval_mode(self.model):
            for i, j in batches(w, self.batch_size, progress=self.progress, desc="reference"):
                logits, targets = scored_logits(self.model, w.input_ids[i:j], w.score_mask[i:j])
                a, b = self.offsets[i], self.offsets[j]
                if logits.shape[-1] != self.vocab_size:
                    raise ValueError(f"reference logits have {logits.shape[-1]} columns but config vocab_size is {self.vocab_size}")
                for sl in row_chunks(b - a, self.vocab_size):
                    rows = slice(a + sl.start, a + sl.stop)
                    logprobs[rows] = torch.log_softmax(logits[sl].float(), dim=-1).to(self.dtype).cpu()
                nll[a:b] = token_nll(logits, targets).cpu()
                argmax[a:b] = logits.argmax(dim=-1).cpu()
        self.logprobs, self.nll, self.argmax = logprobs, nll, argmax
        return self

    def batch(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reference ``(logits or log-probs [S, V], nll [S], argmax [S])`` for windows ``i:j``."""
        if self.logprobs is None:
            if self.stored:
                self.build()
            else:
                return _reference_batch(self.model, self.windows, i, j)
        a, b = self.offsets[i], self.offsets[j]
        return self.logprobs[a:b], self.nll[a:b], self.argmax[a:b]


def _vocab_size(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None:
        raise ValueError("cannot tell the reference model's vocabulary size: it has no output embeddings or config.vocab_size")
    return int(size)


def _reference_batch(model: torch.nn.Module, windows: EvalWindows, i: int, j: int):
    logits, targets = scored_logits(model, windows.input_ids[i:j], windows.score_mask[i:j])
    return logits, token_nll(logits, targets), logits.argmax(dim=-1)


def token_kl(model_logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``KL(P_ref ‖ P_q)`` per row, float32 ``[S]``, nats, clamped at 0.  ``model_logits [S, V]`` are raw
    logits; ``reference [S, V]`` raw logits or log-probs (log_softmax is applied to both)."""
    out = torch.empty(model_logits.shape[0], dtype=torch.float32, device=model_logits.device)
    for sl in row_chunks(model_logits.shape[0], model_logits.shape[-1]):
        q = torch.log_softmax(model_logits[sl].float(), dim=-1)
        r = torch.log_softmax(reference[sl].to(q.device, torch.float32), dim=-1)
        out[sl] = (r.exp() * (r - q)).sum(dim=-1)
    return out.clamp_min_(0.0)  # KL ≥ 0; float32 rounding can leave -1e-9 for equal rows


def compare(model: torch.nn.Module, reference: torch.nn.Module | ReferenceCache, windows: EvalWindows, *,
            batch_size: int = 1, progress: bool = True) -> dict:
    """Compare ``model`` with ``reference`` (a model or a :class:`ReferenceCache`) on ``windows``.

    Returns ``{"perplexity", "nll", "reference_perplexity", "reference_nll", "kl" (mean nats),
    "kl_p99", "top1_agreement" (fraction), "n_scored", "seconds"}``.
    A model compared with itself gives ``kl == 0.0`` and ``top1_agreement == 1.0`` exactly.
    """
    if isinstance(reference, ReferenceCache):
        if reference.windows is not windows and not (
            torch.equal(reference.windows.input_ids, windows.input_ids)
            and torch.equal(reference.windows.score_mask, windows.score_mask)
        ):
            raise ValueError("the ReferenceCache was built on other windows; build it with the same EvalWindows")
        ref_models = () if reference.model is model else (reference.model,)
    else:
        ref_models = () if reference is model else (reference,)
    t0 = time.perf_counter()
    nll, ref_nll, kl, agree = [], [], [], []
    with eval_mode(model, *ref_models):
        if isinstance(reference, ReferenceCache):
            reference.build()
        for i, j in batches(windows, batch_size, progress=progress, desc="compare"):
            logits, targets = scored_logits(model, windows.input_ids[i:j], windows.score_mask[i:j])
            if isinstance(reference, ReferenceCache):
                r_rows, r_nll, r_arg = reference.batch(i, j)
            elif reference is model:  # same forward, reused: exact zero, half the work
                r_rows, r_nll, r_arg = logits, token_nll(logits, targets), logits.argmax(dim=-1)
            else:
                r_rows, r_nll, r_arg = _reference_batch(reference, windows, i, j)
            nll.append(token_nll(logits, targets).cpu())
            kl.append(token_kl(logits, r_rows).cpu())
            agree.append((logits.argmax(dim=-1).cpu() == r_arg.cpu()))
            ref_nll.append(r_nll.cpu())
    kl_t = torch.cat(kl).double()
    mean, ppl = summarize_nll(torch.cat(nll))
    ref_mean, ref_ppl = summarize_nll(torch.cat(ref_nll))
    return {
        "perplexity": ppl,
        "nll": mean,
        "reference_perplexity": ref_ppl,
        "reference_nll": ref_mean,
        "kl": float(kl_t.mean()),
        "kl_p99": float(np.quantile(kl_t.numpy(), 0.99)),
        "top1_agreement": float(torch.cat(agree).double().mean()),
        "n_scored": int(kl_t.numel()),
        "seconds": time.perf_counter() - t0,
    }
