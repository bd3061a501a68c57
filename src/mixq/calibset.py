"""The calibration set: which text GPTQ, AWQ and the sensitivity measurement are fitted on.

``--calib`` names one source or a mixture joined by ``+``:

``self``
    text the full-precision model writes itself from varied openers and, for a chat model, chat
    exchanges through its chat template (:mod:`mixq.selfgen`; data-free, seeded, cached).
``ptb``, ``fortunes``, ``wikitext2``, ``c4``, a ``.txt`` / ``.jsonl`` path
    random windows of that corpus' train split (:func:`mixq.data.calibration_batch`).

A mixture such as ``self+ptb`` deals the ``nsamples`` rows out evenly over its sources (the first
sources take the remainder) and interleaves them, so any leading subset of rows (the gradient
statistics use the first ``--grad-samples``) mixes every source.  Every row starts with BOS when the
model's convention says so (:mod:`mixq.bos`).  The result is a :class:`CalibrationSet`: the ids, their
sha256 and a JSON record for the output directory's metadata; the measurement's key hashes the ids,
so another source, seed or BOS choice never reuses a measurement made on other text.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import data

DEFAULT_CALIB = "self+ptb"
SELF = "self"


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    ids: torch.Tensor  # LongTensor [nsamples, seqlen]
    source: str
    seed: int
    bos_id: int | None
    rows_per_source: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return data.ids_sha256(self.ids)

    def record(self) -> dict:
        """What the quantized directory's metadata and benchmark files keep of it."""
        n, seqlen = self.ids.shape
        return {"corpus": self.source, "split": "train", "nsamples": int(n), "seqlen": int(seqlen),
                "seed": self.seed, "bos_id": self.bos_id, "rows": dict(self.rows_per_source), "sha256": self.sha256}


def parse_sources(spec: str) -> list[str]:
    """``"self+ptb"`` → ``["self", "ptb"]``; checks each corpus can be had (a path exists, a hub corpus
    downloads) before any heavy work, so a bad ``--calib`` costs nothing."""
    parts = [p.strip() for p in str(spec).split("+")]
    if not parts or any(not p for p in parts):
        raise ValueError(f"--calib {spec!r}: give one source or several joined by '+', e.g. self+ptb")
    if len(set(parts)) != len(parts):
        raise ValueError(f"--calib {spec!r} names a source twice")
    for p in parts:
        if p == SELF:
            continue
        if not p.lower().endswith((".txt", ".jsonl")) and p not in data.CORPORA:
            raise ValueError(f"--calib source {p!r} is unknown: use self, {', '.join(data.CORPORA)}, "
                             "a .txt/.jsonl path, or several joined by '+'")
        data.load_corpus(p, "train")  # raises an error naming the fix
    return parts


def split_rows(n: int, k: int) -> list[int]:
    """``n`` rows over ``k`` sources, as evenly as possible (the first sources take the remainder)."""
    return [n // k + (i < n % k) for i in range(k)]


def build_calibration(model, tokenizer, spec: str, nsamples: int, seqlen: int, seed: int, *,
                      bos_id: int | None = None, progress: bool = True, corpus_tokens: dict | None = None
                      ) -> CalibrationSet:
    """The calibration rows of ``spec`` (see the module docstring).  ``corpus_tokens``: already tokenized
    train streams by source name (a run that tokenized a corpus once passes it here)."""
    sources = parse_sources(spec)
    if nsamples < len(sources):
        raise ValueError(f"--nsamples {nsamples} is fewer than the {len(sources)} sources of --calib {spec}")
    counts = split_rows(nsamples, len(sources))
    blocks = []
    for src, k in zip(sources, counts):
        if src == SELF:
            from .selfgen import self_generated

            blocks.append(self_generated(model, tokenizer, k, seqlen, seed, bos_id=bos_id, progress=progress))
        else:
            stream = (corpus_tokens or {}).get(src)
            if stream is None:
                stream = data.tokenize(data.load_corpus(src, "train"), tokenizer, progress=progress)
            blocks.append(data.calibration_batch(stream, k, seqlen, seed, bos_id=bos_id))
    return CalibrationSet(_interleave(blocks), "+".join(sources), seed, bos_id, dict(zip(sources, counts)))


def calibration_for(model, tokenizer, args, bos) -> CalibrationSet:
    """The set a command's ``--calib``, ``--nsamples``, ``--seqlen`` and ``--seed`` name, under the
    :class:`mixq.bos.BosDecision` ``bos``."""
    return build_calibration(model, tokenizer, args.calib, args.nsamples, args.seqlen, args.seed, bos_id=bos.bos_id)


def corpus_rows(record: dict, tokenizer) -> torch.Tensor | None:
    """The corpus rows of a calibration ``record`` (:meth:`CalibrationSet.record`), rebuilt without the model:
    what the calibration/evaluation overlap check needs (self-generated rows quote no corpus).  None when the
    record has no corpus rows.  Records written before mixtures existed (no ``rows``) name one corpus."""
    rows = record.get("rows") or {record["corpus"]: record["nsamples"]}
    blocks = [data.calibration_batch(data.tokenize(data.load_corpus(src, record.get("split", "train")), tokenizer,
                                                   progress=False), k, record["seqlen"], record["seed"],
                                     bos_id=record.get("bos_id"))
              for src, k in rows.items() if src != SELF]
    return torch.cat(blocks) if blocks else None


def _interleave(blocks: list[torch.Tensor]) -> torch.Tensor:
    rows, i = [], 0
    while any(i < len(b) for b in blocks):
        rows.extend(b[i] for b in blocks if i < len(b))
        i += 1
    return torch.stack(rows)
