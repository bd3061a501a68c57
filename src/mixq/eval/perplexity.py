"""Perplexity of a causal LM over :class:`mixq.data.EvalWindows`.

    nll = -(1/S) Σ_t log p(x_t | x_<t)   over the S scored tokens (nats),   ppl = exp(nll)

The model's logits for one batch of windows are ``[B, T, V]``; only the rows of scored targets
are kept (``[S_b, V]``) and the log-softmax is taken in float32, ``CHUNK_ELEMENTS`` at a time,
so the extra memory is bounded (for V = 49152 a chunk is 85 rows, 16 MiB) whatever the vocab.
Per-token values are summed in float64 in window order: same inputs → identical numbers.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from mixq.data import EvalWindows

CHUNK_ELEMENTS = 1 << 22  # float32 logits per log-softmax chunk (16 MiB)


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """``torch.no_grad()`` and ``.eval()`` for the block; each model's training flag is restored."""
    flags = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in zip(models, flags):
            m.train(flag)


def batches(windows: EvalWindows, batch_size: int, *, progress: bool, desc: str) -> Iterator[tuple[int, int]]:
    """``(first, stop)`` window ranges of ``batch_size``, with a tqdm bar (off when not a tty)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, windows.n_windows, batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", disable=None if progress else True):
        yield i, min(i + batch_size, windows.n_windows)


def scored_logits(model: torch.nn.Module, input_ids: torch.Tensor, score_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` on ``input_ids [B, T]``; return ``(logits [S, V], targets [S])`` for the S
    scored positions of ``score_mask [B, T]`` (logits at t-1 predict the token at t).
    Logits keep the model's dtype and device."""
    device = model_device(model)
    ids = input_ids.to(device)
    logits = model(ids, use_cache=False).logits
    mask = score_mask[:, 1:].to(device)
    return logits[:, :-1][mask], ids[:, 1:][mask]


def row_chunks(n_rows: int, vocab: int) -> Iterator[slice]:
    """Row slices such that ``rows × vocab ≤ CHUNK_ELEMENTS`` (at least one row)."""
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for i in range(0, n_rows, step):
        yield slice(i, min(i + step, n_rows))


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in nats, float32 ``[S]``, from ``logits [S, V]``.

    ``-log_softmax(z)[y] = logsumexp(z) - z[y]``, evaluated in float32 by row chunks."""
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=logits.device)
    for sl in row_chunks(logits.shape[0], logits.shape[-1]):
        z = logits[sl].float()
        out[sl] = torch.logsumexp(z, dim=-1) - z.gather(-1, targets[sl, None]).squeeze(-1)
    return out


def summarize_nll(nll: torch.Tensor) -> tuple[float, float]:
    """``(mean nll, exp(mean nll))`` of per-token NLLs, summed in float64."""
    mean = float(nll.double().mean()) if nll.numel() else float("nan")
    return mean, math.exp(mean)


def perplexity(model: torch.nn.Module, windows: EvalWindows, *, batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``windows``.

    Returns ``{"perplexity", "nll" (mean nats per scored token), "n_scored", "seconds"}``.
    ``model(input_ids, use_cache=False).logits`` must be ``[B, T, V]`` (any HF causal LM).
    """
    t0 = time.perf_counter()
    parts = []
    with eval_mode(model):
        for i, j in batches(windows, batch_size, progress=progress, desc="perplexity"):
            logits, targets = scored_logits(model, windows.input_ids[i:j], windows.score_mask[i:j])
            parts.append(token_nll(logits, targets).cpu())
    nll = torch.cat(parts)
    mean, ppl = summarize_nll(nll)
    return {"perplexity": ppl, "nll": mean, "n_scored": int(nll.numel()), "seconds": time.perf_counter() - t0}
