"""Log-likelihoods of several continuations of one context, the context run once.

Multiple-choice requests (the offline ``lastword`` / ``choice`` tasks, most harness tasks) score
``K`` continuations of the same context; scoring each ``context + continuation`` as its own window
runs the context ``K`` times.  Here the context runs once with the model's KV cache; its last logits
predict every continuation's first token, and the continuations (all but their last token,
right-padded, ``batch_size`` at a time) run on a copy of that cache repeated per row.  Right padding
after the real tokens cannot change them under causal attention, so no mask is needed.

The result equals the one-window computation up to float rounding (other matmul shapes);
``tests/test_zeroshot.py`` checks it against direct log-probabilities on several families.  Models
that return no cache are left to the caller (``None``).
"""
from __future__ import annotations

import copy

import torch

from .perplexity import token_nll


@torch.no_grad()
def score_shared_context(model, ctx: list[int], conts: list[list[int]], *, batch_size: int, pad_id: int,
                         device) -> list[tuple[float, bool]] | None:
    """``[(Σ log p(cont | ctx), cont is greedy)]`` for every continuation of ``ctx``; ``None`` if the model
    returns no KV cache.  ``ctx`` and each continuation must be non-empty."""
    out = model(torch.tensor([ctx], dtype=torch.long, device=device), use_cache=True)
    cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    first = out.logits[0, -1:].float()  # predicts every continuation's first token
    del out
    results: list[tuple[float, bool]] = []
    for a in range(0, len(conts), batch_size):
        group = conts[a:a + batch_size]
        width = max(len(c) for c in group) - 1
        logits = None
        if width > 0:
            ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            for r, c in enumerate(group):
                ids[r, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            c_b = copy.deepcopy(cache)
            c_b.batch_repeat_interleave(len(group))
            logits = model(ids.to(device), past_key_values=c_b, use_cache=True).logits.float()
            del c_b
        for r, c in enumerate(group):
            rows = first if len(c) == 1 else torch.cat([first, logits[r, :len(c) - 1]])
            target = torch.tensor(c, dtype=torch.long, device=rows.device)
            nll = token_nll(rows, target).double()
            results.append((-float(nll.sum()), bool((rows.argmax(-1) == target).all())))
    return results
