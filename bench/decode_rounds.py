"""Decode speeds that a drifting machine cannot skew: every model once a round, rounds in turn.

On a shared host the speed of one core moves by 10-30 % within minutes, so speeds measured one model after the
other compare badly.  :func:`interleaved` loads every model, then runs ``rounds`` rounds in which each model makes
one greedy decode (the order rotated every round, so that no model always follows the same one), and reports for
each the median tokens/s and the median over rounds of its ratio to a reference model's speed in the same round.
"""
from __future__ import annotations

import gc
import statistics

from mixq.runtime import greedy_generate


def interleaved(loaders: dict, prompt, new_tokens: int, rounds: int, reference: str,
                engines: dict | None = None) -> dict:
    """``{name: {"tok_s": median, "runs": [...], "ratio": median of per-round ratios to reference}}`` for the
    models ``loaders[name]()`` makes (all held at once); ``reference`` is one of the names; ``engines[name]``:
    :func:`greedy_generate`'s engine for that model (default auto)."""
    models = {name: load() for name, load in loaders.items()}
    eng = {n: (engines or {}).get(n, "auto") for n in models}
    try:
        for n, m in models.items():  # warm-up: kernel layouts built, caches allocated
            greedy_generate(m, prompt, 8, stop_at_eos=False, engine=eng[n])
        names = list(models)
        runs: dict[str, list[float]] = {n: [] for n in names}
        for k in range(rounds):
            for n in names[k % len(names):] + names[: k % len(names)]:
                runs[n].append(greedy_generate(models[n], prompt, new_tokens, stop_at_eos=False,
                                               engine=eng[n]).decode_tokens_per_s)
        return {n: {"tok_s": statistics.median(v), "runs": v,
                    "ratio": statistics.median(a / b for a, b in zip(v, runs[reference]))} for n, v in runs.items()}
    finally:
        models.clear()
        gc.collect()
