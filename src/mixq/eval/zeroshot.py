"""Zero-shot accuracy: an offline suite built from PTB, and an lm-evaluation-harness adapter.

Perplexity and KL say how far a quantized model moved; the survey's other axis is whether it
still *does* things.  This module gives both routes one code path:

:class:`MixqLM`
    the three request types of lm-evaluation-harness (v0.4) over any mixq / HF causal LM::

        loglikelihood([req.args = (context, continuation)])   -> [(sum log p(continuation), is_greedy)]
        loglikelihood_rolling([req.args = (text,)])           -> [sum log p(text)]
        generate_until([req.args = (context, {"until": [...], "max_gen_toks": N})]) -> [text]

    with the harness' conventions: trailing whitespace of a context moves to the continuation,
    the continuation's tokens are those of ``encode(context + continuation)`` after
    ``len(encode(context))``, an empty context is the prefix token (BOS, else EOS), inputs are
    cut from the left to ``max_length``, generation is greedy and cut at the first stop string.
    Log-probabilities are natural logs, computed in float32.
:func:`harness_lm` / :func:`harness_class`
    the same class as a subclass of ``lm_eval.api.model.LM``, registered as ``"mixq"``, so
    ``lm_eval.simple_evaluate(model=harness_lm(model, tok), tasks=[...])`` scores any harness task,
    and ``lm_eval --model mixq --model_args pretrained=DIR`` works once ``mixq.eval.zeroshot`` is
    imported.  Needs ``pip install lm-eval==0.4.13`` (not a dependency of mixq).
the offline suite (:func:`build_suite`, :func:`run_suite`)
    two tasks built deterministically from the Penn Treebank test sentences (embedded, no
    network), scored through :class:`MixqLM`'s methods:

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
from tqdm.auto import tqdm

from mixq.eval.perplexity import eval_mode, model_device, token_nll
from mixq.eval.stats import DEFAULT_CONFIDENCE, wilson_interval

SUITE_VERSION = 1
TASKS = ("lastword", "choice")
LM_EVAL_VERSION = "0.4.13"
LM_EVAL_HINT = (f"lm-evaluation-harness is not installed: `pip install lm-eval=={LM_EVAL_VERSION}` to run its tasks "
                "on mixq models (the offline suite, `mixq zeroshot`, needs nothing extra)")
DEFAULT_MAX_LENGTH = 2048
MIN_WORDS, MAX_WORDS = 6, 40
CHOICE_MIN_DISTANCE = 50


# ---------------------------------------------------------------------------- requests and items
@dataclass(frozen=True)
class Request:
    """The part of an lm-eval ``Instance`` that the model sees: ``args``."""

    args: tuple


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


# ---------------------------------------------------------------------------- the adapter
class MixqLM:
    """lm-evaluation-harness request methods over a causal LM (see the module docstring).

    ``batch_size``: windows per forward pass (right-padded; causal attention keeps the padding
    from touching the scored positions).  ``max_length``: tokens per forward pass (default: the
    model's ``max_position_embeddings`` / ``n_positions``, else 2048).  A continuation longer than
    that is scored in chunks, each with as much left context as fits.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 8, max_length: int | None = None,
                 prefix_token_id: int | None = None, progress: bool = False):
        if tokenizer is None:
            raise ValueError("MixqLM needs the model's tokenizer (a mixq directory without tokenizer files has none)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, int(batch_size), progress
        self.max_length = int(max_length) if max_length else _model_max_length(model)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if prefix_token_id is None:
            bos = getattr(tokenizer, "bos_token_id", None)
            prefix_token_id = bos if bos is not None else self.eos_token_id
        self.prefix_token_id = prefix_token_id
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or 0)

    # ------------------------------------------------------------------ tokens
    def tok_encode(self, text: str) -> list[int]:
        if hasattr(self.tokenizer, "encode"):
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer([text], add_special_tokens=False)["input_ids"][0])

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens, split the harness' way (see the module docstring)."""
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        if not context:
            return self._prefix(), self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    def _prefix(self) -> list[int]:
        if self.prefix_token_id is None:
            raise ValueError("empty context and the tokenizer has neither a BOS nor an EOS token to start from")
        return [int(self.prefix_token_id)]

    # ------------------------------------------------------------------ scoring core
    def _chunks(self, n: int, first: int, from_end: bool) -> list[tuple[int, int, int]]:
        """``(s, a, b)``: targets ``seq[a:b]`` predicted from input ``seq[s:b-1]`` (≤ max_length tokens)."""
        L, out = self.max_length, []
        if from_end:
            b = n
            while b > first:
                a = max(first, b - L)
                out.append((max(0, b - 1 - L), a, b))
                b = a
        else:
            a = first
            while a < n:
                b = min(n, a + L)
                out.append((max(0, b - 1 - L), a, b))
                a = b
        return out

    def _score(self, seqs: list[list[int]], firsts: list[int], *, from_end: bool) -> list[tuple[float, bool]]:
        """Sum of log p(seq[t] | seq[:t]) over ``t >= first`` and whether every target is the argmax."""
        windows = []  # (job, s, a, b)
        for k, (seq, first) in enumerate(zip(seqs, firsts)):
            if not 1 <= first <= len(seq):
                raise ValueError("a scored sequence needs at least one token of context")
            windows += [(k, s, a, b) for s, a, b in self._chunks(len(seq), first, from_end)]
        order = sorted(range(len(windows)), key=lambda i: -(windows[i][3] - 1 - windows[i][1]))
        logp = [0.0] * len(seqs)
        greedy = [True] * len(seqs)
        device = model_device(self.model)
        starts = range(0, len(order), self.batch_size)
        with eval_mode(self.model):
            for i in tqdm(starts, desc="loglikelihood", unit="batch", disable=None if self.progress else True):
                group = [windows[w] for w in order[i:i + self.batch_size]]
                width = max(b - 1 - s for _, s, _, b in group)
                ids = torch.full((len(group), width), self.pad_token_id, dtype=torch.long)
                for r, (k, s, _, b) in enumerate(group):
                    row = seqs[k][s:b - 1]
                    ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
                logits = self.model(ids.to(device), use_cache=False).logits
                rows, targets, sizes = [], [], []
                for r, (k, s, a, b) in enumerate(group):
                    rows.append(logits[r, a - 1 - s:b - 1 - s])
                    targets.append(torch.tensor(seqs[k][a:b], dtype=torch.long, device=logits.device))
                    sizes.append(b - a)
                rows_t, targets_t = torch.cat(rows), torch.cat(targets)
                nll = token_nll(rows_t, targets_t).double().cpu().split(sizes)
                hit = (rows_t.argmax(dim=-1) == targets_t).cpu().split(sizes)
                for (k, *_), x, h in zip(group, nll, hit):
                    logp[k] -= float(x.sum())
                    greedy[k] = greedy[k] and bool(h.all())
        return list(zip(logp, greedy))

    # ------------------------------------------------------------------ the three request types
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``[(log p(continuation | context), continuation is the greedy output)]`` per request."""
        seqs, firsts = [], []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx, cont = self.encode_pair(context, continuation)
            if not cont:
                raise ValueError(f"continuation {continuation!r} encodes to no tokens")
            seqs.append(ctx + cont)
            firsts.append(len(ctx))
        out: list = [None] * len(seqs)
        for k, r in self._shared_contexts(seqs, firsts).items():
            out[k] = r
        rest = [k for k in range(len(seqs)) if out[k] is None]
        for k, r in zip(rest, self._score([seqs[k] for k in rest], [firsts[k] for k in rest], from_end=True)):
            out[k] = r
        self._cache("loglikelihood", requests, out)
        return out

    def _shared_contexts(self, seqs: list[list[int]], firsts: list[int]) -> dict[int, tuple[float, bool]]:
        """Requests whose context is shared by others and that fit one window, scored with the context run
        once (:mod:`mixq.eval.prefix_cache`); the others are left out of the result."""
        from .prefix_cache import score_shared_context

        groups: dict[tuple, list[int]] = {}
        for k, (seq, f) in enumerate(zip(seqs, firsts)):
            if len(seq) - 1 <= self.max_length:
                groups.setdefault(tuple(seq[:f]), []).append(k)
        done: dict[int, tuple[float, bool]] = {}
        device = model_device(self.model)
        with eval_mode(self.model):
            for ctx, ks in groups.items():
                if len(ks) < 2:
                    continue
                res = score_shared_context(self.model, list(ctx), [seqs[k][len(ctx):] for k in ks],
                                           batch_size=self.batch_size, pad_id=self.pad_token_id, device=device)
                if res is None:  # no KV cache from this model: every request goes the one-window way
                    return {}
                done.update(zip(ks, res))
        return done

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text from the prefix token on, in disjoint windows of
        ``max_length`` predictions (the harness' rolling windows with one token of context)."""
        seqs = [self._prefix() + self.tok_encode(req.args[0]) for req in requests]
        out = [lp for lp, _ in self._score(seqs, [1] * len(seqs), from_end=False)]
        self._cache("loglikelihood_rolling", requests, out)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at the first stop string (``until``) and at
        ``max_gen_toks`` tokens (default 256) or the EOS token."""
        out = []
        device = model_device(self.model)
        with eval_mode(self.model):
            for req in requests:
                context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.pop("max_gen_toks", 256))
                if kwargs.pop("do_sample", False) or kwargs.pop("temperature", 0.0):
                    raise ValueError("MixqLM generates greedily only (do_sample=False, temperature=0)")
                ids = self.tok_encode(context) if context else self._prefix()
                ids = ids[-max(1, self.max_length - max_new):]
                gen: list[int] = []
                text = ""
                past = None  # KV cache while the whole sequence fits one window; else each step re-runs the window
                fits = len(ids) + max_new <= self.max_length
                for _ in range(max_new):
                    if fits:
                        x = torch.tensor([gen[-1:] if past is not None else ids], dtype=torch.long, device=device)
                        step = self.model(x, past_key_values=past, use_cache=True)
                        past = step.past_key_values
                        nxt = int(step.logits[0, -1].argmax())
                    else:
                        x = torch.tensor([(ids + gen)[-self.max_length:]], dtype=torch.long, device=device)
                        nxt = int(self.model(x, use_cache=False).logits[0, -1].argmax())
                    if nxt == self.eos_token_id:
                        break
                    gen.append(nxt)
                    text = self.tok_decode(gen)
                    if any(u and u in text for u in until):
                        break
                for u in until:
                    if u:
                        text = text.split(u, 1)[0]
                out.append(text)
        self._cache("generate_until", requests, out)
        return out

    def _cache(self, kind: str, requests, results) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None and hasattr(hook, "add_partial"):
            for req, res in zip(requests, results):
                hook.add_partial(kind, req.args, res)


def _model_max_length(model) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 1:
            return v
    return DEFAULT_MAX_LENGTH


# ---------------------------------------------------------------------------- lm-evaluation-harness
_HARNESS_CLASS = None


def harness_class():
    """``MixqLM`` as a subclass of ``lm_eval.api.model.LM``, registered with the harness as ``"mixq"``.

    Raises ``ImportError`` with the install command when ``lm_eval`` is missing."""
    global _HARNESS_CLASS
    if _HARNESS_CLASS is not None:
        return _HARNESS_CLASS
    try:
        from lm_eval.api.model import LM
    except ImportError as e:
        raise ImportError(LM_EVAL_HINT) from e

    class MixqHarnessLM(MixqLM, LM):
        """lm-eval model ``mixq``: ``--model_args pretrained=DIR_OR_MODEL[,batch_size=8,max_length=N]``."""

        def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, batch_size=8,
                     max_length=None, device=None, **kwargs):
            LM.__init__(self)
            if model is None:
                if pretrained is None:
                    raise ValueError("the mixq lm-eval model needs pretrained=DIR_OR_MODEL (or model= and tokenizer=)")
                from mixq.commands import load_target

                model, tokenizer, _ = load_target(str(pretrained))
            if device:
                model.to(device)
            if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
                batch_size = 8
            MixqLM.__init__(self, model, tokenizer, batch_size=int(batch_size),
                            max_length=int(max_length) if max_length else None)

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv.strip())
            extra = {k: v for k, v in (additional_config or {}).items()
                     if v is not None and k in ("batch_size", "device", "max_length")}
            return cls(**{**args, **extra})

    try:
        from lm_eval.api.registry import register_model

        register_model("mixq")(MixqHarnessLM)
    except (ImportError, ValueError, AssertionError):  # an older registry, or "mixq" already taken
        pass
    _HARNESS_CLASS = MixqHarnessLM
    return MixqHarnessLM


def harness_lm(model=None, tokenizer=None, *, pretrained: str | None = None, **kwargs):
    """An lm-eval model object for ``model``/``tokenizer`` (or ``pretrained``: a mixq directory or
    model name), for ``lm_eval.simple_evaluate(model=...)``."""
    return harness_class()(pretrained, model=model, tokenizer=tokenizer, **kwargs)


def __getattr__(name: str):
    if name == "MixqHarnessLM":
        return harness_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------- the offline suite
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
                      confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """Build the offline suite and score ``model`` on it: JSON-ready
    ``{"suite": {corpus, split, seed, n, version}, "tasks": {task: result}}``."""
    suite = build_suite(tasks, n, seed)
    lm = MixqLM(model, tokenizer, batch_size=batch_size, max_length=max_length)
    return {"suite": suite_info(n, seed, confidence), "tasks": run_suite(lm, suite, greedy=greedy, confidence=confidence)}


def suite_info(n: int, seed: int, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """What identifies the offline suite's items (with each task's ``fingerprint``)."""
    return {"corpus": "ptb", "split": "test", "seed": seed, "n": n, "version": SUITE_VERSION, "confidence": confidence}
