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
    imported.  Needs mixq's ``lm-eval`` extra (``pip install -e '.[lm-eval]'``; pyproject.toml pins it), which is
    not a dependency of mixq itself.
the offline suite
    built from PTB and scored through these methods: :mod:`mixq.eval.suite` (which imports this module).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mixq.eval.perplexity import eval_mode, model_device, token_nll

LM_EVAL_HINT = ("lm-evaluation-harness is not installed: install mixq's lm-eval extra (`pip install -e '.[lm-eval]'` "
                "in the mixq checkout: the version mixq is tested with) to run its tasks on mixq models (the offline "
                "suite, `mixq zeroshot`, needs nothing extra)")
DEFAULT_MAX_LENGTH = 2048


# ---------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Request:
    """The part of an lm-eval ``Instance`` that the model sees: ``args``."""

    args: tuple


# ---------------------------------------------------------------------------- the adapter
class MixqLM:
    """lm-evaluation-harness request methods over a causal LM (see the module docstring).

    ``batch_size``: windows per forward pass (right-padded; causal attention keeps the padding
    from touching the scored positions).  ``max_length``: tokens per forward pass (default: the
    model's ``max_position_embeddings`` / ``n_positions``, else 2048).  A continuation longer than
    that is scored in chunks, each with as much left context as fits.  ``bos_id``: every context
    starts with this token (the model's BOS convention, :func:`mixq.bos.resolve_bos`; the
    harness' ``add_bos_token``), and it is the prefix token of an empty context.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 8, max_length: int | None = None,
                 prefix_token_id: int | None = None, progress: bool = False, bos_id: int | None = None):
        if tokenizer is None:
            raise ValueError("MixqLM needs the model's tokenizer (a mixq directory without tokenizer files has none)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, int(batch_size), progress
        self.max_length = int(max_length) if max_length else _model_max_length(model)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.bos_start = [] if bos_id is None else [int(bos_id)]
        if prefix_token_id is None:
            bos = bos_id if bos_id is not None else getattr(tokenizer, "bos_token_id", None)
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
        return self.bos_start + ctx, whole[len(ctx):]

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
                ids = self.bos_start + self.tok_encode(context) if context else self._prefix()
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
        """lm-eval model ``mixq``: ``--model_args pretrained=DIR_OR_MODEL[,batch_size=8,max_length=N,bos=auto]``."""

        def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, batch_size=8,
                     max_length=None, device=None, bos="auto", **kwargs):
            LM.__init__(self)
            if model is None:
                if pretrained is None:
                    raise ValueError("the mixq lm-eval model needs pretrained=DIR_OR_MODEL (or model= and tokenizer=)")
                from mixq.targets import load_target

                model, tokenizer, _ = load_target(str(pretrained))
            if device:
                model.to(device)
            if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
                batch_size = 8
            from mixq.bos import resolve_bos

            MixqLM.__init__(self, model, tokenizer, batch_size=int(batch_size),
                            max_length=int(max_length) if max_length else None,
                            bos_id=resolve_bos(tokenizer, model, bos).bos_id)

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
