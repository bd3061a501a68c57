"""The offline zero-shot suite: multiple-choice items built deterministically from PTB, scored through
:class:`mixq.eval.zeroshot.MixqLM` (the lm-evaluation-harness request methods).  Two tasks from the Penn Treebank test sentences
(embedded, no network):

    ``lastword``  context = a sentence without its last word; the choices are the true last word
                  and ``K`` (default 4) last words of other sentences.  ``acc``: the true word has
                  the highest log-likelihood.  ``greedy_acc``: the first word of the greedy
                  continuation is the true word (LAMBADA-style, much harder).
    ``choice``    context = a sentence; the choices are the sentence that follows it and 3
                  sentences of similar length from ≥ 50 lines away.  ``acc``: highest summed
                  log-likelihood; ``acc_norm``: highest log-likelihood per character of the
                  choice (the harness' ``acc_norm``).

    Items are a pure function of ``(task, n, seed, corpus text)`` (``random.Random`` seeded with a
    string, stable across Python versions): two builds are identical, and ``fingerprint`` in the
    results names the exact item list.  Accuracies come with a Wilson interval
    (:func:`mixq.eval.stats.wilson_interval`); with ``n = 200`` its half-width is about ±7 points,
    so only large differences between quantized models are resolved.
    Text format: PTB's own (``" w1 w2 … wn \\n"`` lines), i.e. exactly what ``mixq eval`` scores.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .stats import DEFAULT_CONFIDENCE, wilson_interval
from .zeroshot import MixqLM, Request

SUITE_VERSION = 1
TASKS = ("lastword", "choice")
MIN_WORDS, MAX_WORDS = 6, 40
CHOICE_MIN_DISTANCE = 50


@dataclass(frozen=True)
class Item:
    """One multiple-choice item.  ``choices[label]`` is correct; ``answer`` is the bare true word
    (lastword) or sentence (choice); ``source`` the PTB line it was made from."""

    task: str
    context: str
    choices: tuple[str, ...]
    label: int
    answer: str
    source: int


def corpus_sentences(corpus: str = "ptb", split: str = "test") -> list[list[str]]:
    """The corpus' lines as word lists (blank lines kept as ``[]``, so indices are line numbers)."""
    from mixq.data import load_corpus

    return [line.split() for line in load_corpus(corpus, split).split("\n")]


def _rng(task: str, seed: int) -> random.Random:
    return random.Random(f"mixq-zeroshot/v{SUITE_VERSION}/{task}/{seed}")


def _text(words: Sequence[str]) -> str:
    return " " + " ".join(words)


def _pick(eligible: list[int], n: int, rng: random.Random, task: str) -> list[int]:
    if n < 1:
        raise ValueError(f"the number of items must be >= 1, got {n}")
    if n > len(eligible):
        raise ValueError(f"task {task} has {len(eligible)} eligible sentences, fewer than n={n}: use --n {len(eligible)} or less")
    return sorted(rng.sample(eligible, n))


def build_lastword(sentences: list[list[str]], n: int = 200, seed: int = 0, distractors: int = 4) -> list[Item]:
    """``lastword`` items: sentences of 6-40 words whose last word is alphabetic and ≥ 3 letters."""
    def ok(ws):
        return MIN_WORDS <= len(ws) <= MAX_WORDS and ws[-1].isalpha() and len(ws[-1]) >= 3

    eligible = [i for i, ws in enumerate(sentences) if ok(ws)]
    pool = sorted({sentences[i][-1] for i in eligible})
    if len(pool) <= distractors:
        raise ValueError(f"only {len(pool)} distinct last words: cannot draw {distractors} distractors")
    rng = _rng("lastword", seed)
    items = []
    for i in _pick(eligible, n, rng, "lastword"):
        ws = sentences[i]
        wrong = [w for w in rng.sample(pool, distractors + 1) if w != ws[-1]][:distractors]
        choices = [ws[-1], *wrong]
        rng.shuffle(choices)
        items.append(Item("lastword", _text(ws[:-1]), tuple(" " + w for w in choices), choices.index(ws[-1]),
                          ws[-1], i))
    return items


def build_choice(sentences: list[list[str]], n: int = 200, seed: int = 0, distractors: int = 3) -> list[Item]:
    """``choice`` items: a sentence and its successor (both 6-40 words); distractors are sentences
    ≥ 50 lines away whose length is within a factor 4/3 of the true one."""
    def ok(ws):
        return MIN_WORDS <= len(ws) <= MAX_WORDS

    eligible = [i for i in range(len(sentences) - 1) if ok(sentences[i]) and ok(sentences[i + 1])]
    usable = [j for j, ws in enumerate(sentences) if ok(ws)]
    rng = _rng("choice", seed)
    items = []
    for i in _pick(eligible, n, rng, "choice"):
        nxt = sentences[i + 1]
        m = len(nxt)
        pool = [j for j in usable if abs(j - (i + 1)) >= CHOICE_MIN_DISTANCE
                and 3 * m <= 4 * len(sentences[j]) and 3 * len(sentences[j]) <= 4 * m and sentences[j] != nxt]
        if len(pool) < distractors:
            raise ValueError(f"line {i}: only {len(pool)} distractor sentences of a similar length")
        picks = [nxt] + [sentences[j] for j in rng.sample(pool, distractors)]
        order = list(range(len(picks)))
        rng.shuffle(order)
        choices = tuple(" \n" + _text(picks[k]) for k in order)
        items.append(Item("choice", _text(sentences[i]), choices, order.index(0), " ".join(nxt), i))
    return items


BUILDERS = {"lastword": build_lastword, "choice": build_choice}


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [t for t in names if t]
    bad = [t for t in names if t not in BUILDERS]
    if bad or not names:
        raise ValueError(f"unknown zero-shot task {bad[0] if bad else ''!r}: choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def build_suite(tasks: str | Sequence[str] = TASKS, n: int = 200, seed: int = 0, *, corpus: str = "ptb",
                split: str = "test") -> dict[str, list[Item]]:
    """``{task: [Item]}``, ``n`` items per task, a pure function of the arguments and the corpus."""
    names = parse_tasks(tasks)
    sentences = corpus_sentences(corpus, split)
    return {t: BUILDERS[t](sentences, n, seed) for t in names}


def fingerprint(items: Sequence[Item]) -> str:
    """SHA-256 (16 hex digits) of the items' canonical JSON: names one exact item list."""
    blob = json.dumps([asdict(x) for x in items], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _accuracy(correct: list[bool], confidence: float) -> dict:
    k, n = sum(correct), len(correct)
    lo, hi = wilson_interval(k, n, confidence)
    return {"value": k / n, "correct": k, "n": n, "ci": [lo, hi]}


def score_items(lm: MixqLM, items: Sequence[Item], *, greedy: bool = True,
                confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """Accuracy of ``lm`` on ``items`` (one task) through ``lm.loglikelihood`` (and, for
    ``lastword`` with ``greedy``, ``lm.generate_until``).

    Returns ``{"task", "n", "chance", "fingerprint", "acc": {"value", "correct", "n", "ci"},
    "acc_norm": {...}, "greedy_acc": {...} | None, "predictions": [chosen index per item],
    "seconds"}``.
    """
    if not items:
        raise ValueError("no items to score")
    t0 = time.perf_counter()
    task = items[0].task
    reqs = [Request((x.context, c)) for x in items for c in x.choices]
    scores = [lp for lp, _ in lm.loglikelihood(reqs)]
    preds, preds_norm, at = [], [], 0
    for x in items:
        s = scores[at:at + len(x.choices)]
        at += len(x.choices)
        preds.append(max(range(len(s)), key=lambda c: s[c]))
        preds_norm.append(max(range(len(s)), key=lambda c: s[c] / len(x.choices[c])))
    res = {"task": task, "n": len(items), "chance": sum(1 / len(x.choices) for x in items) / len(items),
           "fingerprint": fingerprint(items),
           "acc": _accuracy([p == x.label for p, x in zip(preds, items)], confidence),
           "acc_norm": _accuracy([p == x.label for p, x in zip(preds_norm, items)], confidence),
           "greedy_acc": None, "predictions": preds}
    if greedy and task == "lastword":
        gens = lm.generate_until([Request((x.context, {"until": ["\n"], "max_gen_toks": _gen_budget(lm, x)}))
                                  for x in items])
        first = [g.split()[0] if g.split() else "" for g in gens]
        res["greedy_acc"] = _accuracy([f == x.answer for f, x in zip(first, items)], confidence)
        res["generations"] = gens
    res["seconds"] = time.perf_counter() - t0
    return res


def _gen_budget(lm: MixqLM, item: Item) -> int:
    """Enough tokens for the true word and the space or newline after it."""
    return len(lm.tok_encode(" " + item.answer)) + 2


def run_suite(lm: MixqLM, suite: dict[str, list[Item]], *, greedy: bool = True,
              confidence: float = DEFAULT_CONFIDENCE) -> dict[str, dict]:
    """:func:`score_items` for every task of ``suite``."""
    return {task: score_items(lm, items, greedy=greedy, confidence=confidence) for task, items in suite.items()}


def evaluate_zeroshot(model: torch.nn.Module, tokenizer, *, tasks: str | Sequence[str] = TASKS, n: int = 200,
                      seed: int = 0, batch_size: int = 8, greedy: bool = True, max_length: int | None = None,
                      confidence: float = DEFAULT_CONFIDENCE, bos: str = "auto") -> dict:
    """Build the offline suite and score ``model`` on it: JSON-ready
    ``{"suite": {corpus, split, seed, n, version}, "bos": {policy, bos_id, source}, "tasks": {task: result}}``;
    every context starts with BOS when ``bos`` (auto, always, never: :func:`mixq.bos.resolve_bos`) says so."""
    from mixq.bos import resolve_bos

    suite = build_suite(tasks, n, seed)
    decision = resolve_bos(tokenizer, model, bos)
    lm = MixqLM(model, tokenizer, batch_size=batch_size, max_length=max_length, bos_id=decision.bos_id)
    return {"suite": suite_info(n, seed, confidence), "bos": decision.to_dict(),
            "tasks": run_suite(lm, suite, greedy=greedy, confidence=confidence)}


def suite_info(n: int, seed: int, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """What identifies the offline suite's items (with each task's ``fingerprint``)."""
    return {"corpus": "ptb", "split": "test", "seed": seed, "n": n, "version": SUITE_VERSION, "confidence": confidence}
