"""Evaluation on more than one kind of text: the calibration domain and text calibration never saw.

A plan fitted to its calibration text can look good there and lose several times more elsewhere, so
mixq scores every model on :data:`DEFAULT_DOMAINS` unless told otherwise: PTB test (the embedded
corpus, lower-cased newswire; the domain of the ``ptb`` calibration rows) and the fortunes test split
(ordinary punctuated English quotations, which no default calibration draws from).  ``--corpus A,B``
names others; the first is the primary one, whose figures also stand at the top level of the result.
"""
from __future__ import annotations

import logging

from .. import data
from ..data import CorpusUnavailableError

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("ptb", "fortunes")


def parse_corpora(value: str | None) -> tuple[list[str], bool]:
    """``--corpus`` → (corpus names, whether they are the defaults)."""
    if value is None:
        return list(DEFAULT_DOMAINS), True
    names = [c.strip() for c in str(value).split(",") if c.strip()]
    if not names:
        raise ValueError(f"--corpus {value!r}: name one corpus or several joined by ',', e.g. ptb,fortunes")
    return names, False


def load_domains(names: list[str], split: str, defaults: bool) -> dict[str, str]:
    """The text of each domain.  With the defaults, a domain that cannot be had here is skipped with a
    warning that says how to get it (the first one is required); a named one is an error."""
    out = {}
    for i, name in enumerate(names):
        try:
            out[name] = data.load_corpus(name, split)
        except CorpusUnavailableError as exc:
            if not defaults or i == 0:
                raise
            log.warning("evaluating without the out-of-domain text: %s", exc)
    return out


def combine(results: dict[str, dict]) -> dict:
    """One result for several domains: ``domains`` maps corpus → its result; the primary (first) domain's
    fields stay at the top level; ``kl_ratio`` maps each other domain → its KL / the primary KL."""
    names = list(results)
    first = dict(results[names[0]])
    if len(names) == 1:
        return first
    first["domains"] = results
    k0 = results[names[0]].get("kl")
    first["kl_ratio"] = {n: (results[n]["kl"] / k0 if k0 and results[n].get("kl") is not None else None)
                         for n in names[1:]}
    return first
