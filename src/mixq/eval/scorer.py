"""The evaluation stage: models scored on every evaluation domain (``mixq eval``, ``mixq.evaluate``, the demo and
the benchmarks).

:func:`evaluation_windows` makes each domain's windows and :class:`~mixq.eval.Protocol`;
:class:`DomainScorer` holds them with the reference's log-probs, computed once, and scores any number of models
against them; :func:`evaluate` scores one model (what ``mixq eval`` writes).
"""
from __future__ import annotations

from .. import data
from ..bos import resolve_bos
from .domains import combine, load_domains, parse_corpora
from .kl import ReferenceCache
from .protocol import Protocol
from .protocol import evaluate as evaluate_windows

METRICS = ("kl", "perplexity", "top1_agreement")


def _dtype_name(model) -> str:
    dtype = getattr(model, "dtype", None)
    if dtype is None and model is not None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def evaluation_windows(tokenizer, model=None, *, corpus: str | list[str] | None = None, split: str = "test",
                       tokens: int | None = 32768, seqlen: int = 512, stride: int | None = None, bos="auto",
                       tokenizer_name: str | None = None, texts: dict | None = None, progress: bool = False) -> list:
    """``[(corpus, EvalWindows, Protocol)]`` for each evaluation domain (what ``mixq eval`` scores).

    ``corpus``: one name or several (``"ptb,fortunes"`` or a list: the first is the primary one); default
    :data:`mixq.eval.domains.DEFAULT_DOMAINS` (``ptb`` and ``fortunes``, the latter skipped with a warning
    where it is not installed; a corpus named explicitly must be there).  The first ``tokens`` tokens of
    ``split`` in windows of ``seqlen`` (``stride``: sliding windows); ``bos``: a policy (``auto``, ``always``,
    ``never``) or a :class:`~mixq.bos.BosDecision`, resolved for ``tokenizer`` / ``model``.
    ``tokenizer_name``: what the protocols record (default the tokenizer's ``name_or_path``).  ``texts``: the
    domains' texts already loaded (``{corpus: text}``, :func:`mixq.eval.domains.load_domains`), instead of
    ``corpus``.
    """
    if texts is None:
        names, defaults = parse_corpora(",".join(corpus) if isinstance(corpus, (list, tuple)) else corpus)
        texts = load_domains(names, split, defaults)
    decision = resolve_bos(tokenizer, model, bos)
    name_of_tok = tokenizer_name or getattr(tokenizer, "name_or_path", "") or ""
    out = []
    for name, text in texts.items():
        ids = data.tokenize(text, tokenizer, progress=progress)
        win = data.eval_windows(ids, seqlen, stride=stride, max_tokens=tokens, bos_id=decision.bos_id)
        proto = Protocol.for_windows(win, corpus=name, split=split, tokenizer=name_of_tok, dtype=_dtype_name(model),
                                     bos_decision=decision)
        out.append((name, win, proto))
    return out


class DomainScorer:
    """Fixed windows of every evaluation domain and the reference's log-probs on them, made once; :meth:`score`
    then costs one forward pass of the scored model per window.

    ``reference``: the full-precision model; ``batch_size``: windows per reference forward pass; the other
    keywords are :func:`evaluation_windows`'s.
    """

    def __init__(self, reference, tokenizer, *, batch_size: int = 1, progress: bool = False, **windows):
        self.bos = resolve_bos(tokenizer, reference, windows.pop("bos", "auto"))
        self.windows = evaluation_windows(tokenizer, reference, bos=self.bos, **windows)
        self.caches = {name: ReferenceCache(reference, win, batch_size=batch_size, progress=progress)
                       for name, win, _ in self.windows}

    @property
    def protocols(self) -> dict:
        """``{corpus: Protocol}``, the primary domain first."""
        return {name: proto for name, _, proto in self.windows}

    def score(self, model, *, progress: bool = False, batch_size: int = 1) -> dict:
        """``{corpus: result}`` of :func:`mixq.eval.evaluate` (perplexity, KL and top-1 agreement among them)."""
        return {name: evaluate_windows(model, win, proto, reference=self.caches[name], batch_size=batch_size,
                                       progress=progress)
                for name, win, proto in self.windows}

    def metrics(self, model, *, progress: bool = False) -> dict:
        """``{corpus: {"kl", "perplexity", "top1_agreement"}}``: the figures a benchmark row keeps."""
        return {name: {k: r.get(k) for k in METRICS} for name, r in self.score(model, progress=progress).items()}


def evaluate(model, tokenizer, *, reference=None, corpus: str | list[str] | None = None, split: str = "test",
             tokens: int | None = 32768, seqlen: int = 512, stride: int | None = None, bos="auto",
             batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity, and KL / top-1 agreement against ``reference``, on one or several corpora (``mixq eval``).

    ``model`` (e.g. from :func:`~mixq.load_quantized`) and ``reference`` (the full-precision model, e.g.
    ``load_model(info["base_model"])[0]``; None: perplexity only) are scored on the same windows:
    the first ``tokens`` tokens of each corpus' ``split`` in windows of ``seqlen`` tokens
    (:func:`evaluation_windows`; ``corpus`` default ``ptb`` and ``fortunes``).  Returns the JSON-ready dict
    ``mixq eval`` writes: ``perplexity``, ``nll``, ``kl``, ``kl_p99``, ``top1_agreement``,
    ``reference_perplexity``, ``n_scored``, ``seconds`` and ``protocol`` of the first corpus; with several
    corpora also ``domains`` (corpus → its result) and ``kl_ratio`` (each other corpus' KL / the first's).
    To score several models against one reference, build a :class:`DomainScorer` once instead.
    """
    if tokenizer is None:
        raise ValueError("evaluate needs the model's tokenizer (load_quantized returns None for a directory "
                         "without tokenizer files: re-quantize it)")
    results = {name: evaluate_windows(model, win, proto, reference=reference, batch_size=batch_size,
                                      progress=progress)
               for name, win, proto in evaluation_windows(tokenizer, model, corpus=corpus, split=split,
                                                          tokens=tokens, seqlen=seqlen, stride=stride, bos=bos,
                                                          progress=False)}
    return combine(results)
