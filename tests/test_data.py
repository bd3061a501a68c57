"""mixq.data: corpora, tokenization, calibration batches, evaluation windows."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from mixq.data import (CorpusUnavailableError, calibration_batch, eval_windows, load_corpus,
                       split_text, tokenize)


class CharTokenizer:
    """Stand-in for an HF tokenizer: one id per character (code point mod 128)."""

    bos_token_id = 1

    def __call__(self, texts, add_special_tokens=False, split_special_tokens=False):
        assert not add_special_tokens and split_special_tokens
        return {"input_ids": [[ord(c) % 128 for c in t] for t in texts]}


class EncodeOnlyTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 128 for c in text]


# -- corpora ------------------------------------------------------------------------------

def test_ptb_splits_and_alias():
    train, valid, test = (load_corpus("ptb", s) for s in ("train", "valid", "test"))
    assert len(train) > 10 * len(test) > 0 and len(valid) > 0
    assert load_corpus("ptb", "validation") == valid
    assert test.startswith(" no it was n't black monday \n")


def test_unknown_corpus_and_split():
    with pytest.raises(ValueError, match="ptb, fortunes, wikitext2, c4"):
        load_corpus("pennbank", "test")
    with pytest.raises(ValueError, match="unknown split"):
        load_corpus("ptb", "dev")
    with pytest.raises(ValueError, match="no test split"):
        load_corpus("c4", "test")


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_hf_corpus_without_datasets(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails immediately
    with pytest.raises(CorpusUnavailableError, match="--corpus ptb") as info:
        load_corpus(name, "validation")
    assert "not installed" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_hf_corpus_offline(name, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\n(more detail)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(CorpusUnavailableError, match="ConnectionError.*--corpus ptb") as info:
        load_corpus(name, "train")
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


def test_hf_corpus_joining(monkeypatch):
    class Rows(dict):
        def __len__(self):
            return len(self["text"])

        def select(self, idx):
            return Rows(text=[self["text"][i] for i in idx])

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return Rows(text=["a", "b", "c"])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_corpus("wikitext2", "test") == "a\n\nb\n\nc"
    assert calls[-1] == (("wikitext", "wikitext-2-raw-v1"), {"split": "test"})
    assert load_corpus("c4", "validation") == "a b c"
    assert calls[-1][1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}


def test_local_files(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("line one\nline two\n", encoding="utf-8")
    assert load_corpus(str(txt), "train") == load_corpus(txt, "test") == "line one\nline two\n"
    jl = tmp_path / "corpus.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["x", "y z"])) + "\n\n")
    assert load_corpus(str(jl), "test") == "x\n\ny z"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_corpus(str(bad), "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"), "test")


def test_split_text():
    text = "".join(f"line {i}\n" for i in range(100))
    train, test = split_text(text, 0.1)
    assert train + test == text and train.endswith("\n")
    assert 0.05 < len(test) / len(text) < 0.15
    assert split_text(text, 0.1) == (train, test)
    with pytest.raises(ValueError):
        split_text(text, 1.0)


# -- tokenization -------------------------------------------------------------------------

def test_tokenize_chunking_is_exact():
    text = load_corpus("ptb", "test")[:20000]
    whole = tokenize(text, CharTokenizer(), chunk_lines=None, progress=False)
    chunked = tokenize(text, CharTokenizer(), chunk_lines=7, progress=False)
    assert whole.dtype == torch.long and whole.shape == (len(text),)
    assert torch.equal(whole, chunked)
    assert torch.equal(tokenize(text, EncodeOnlyTokenizer(), progress=False), whole)
    assert torch.equal(tokenize("no newline", CharTokenizer(), progress=False),
                       torch.tensor([ord(c) for c in "no newline"]))


def test_special_token_strings_in_a_corpus_are_text():
    """PTB's ``<unk>`` is Gemma's unknown token: read from a corpus it is text, not the control id."""
    from tiny import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    special = tok.convert_tokens_to_ids("<s>")
    parsed = tok("a <s> b", add_special_tokens=False)["input_ids"]
    assert special in parsed  # what the plain call does
    ids = tokenize("a <s> b\n", tok, progress=False).tolist()
    assert special not in ids and len(ids) > len(parsed)


# -- calibration --------------------------------------------------------------------------

def test_calibration_batch():
    tokens = torch.arange(1000)
    a = calibration_batch(tokens, 8, 32, seed=0)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, calibration_batch(tokens, 8, 32, seed=0))
    assert not torch.equal(a, calibration_batch(tokens, 8, 32, seed=1))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 31, dtype=torch.long))  # contiguous windows
    b = calibration_batch(tokens, 4, 32, seed=0, bos_id=1)
    assert b.shape == (4, 32) and (b[:, 0] == 1).all()
    assert calibration_batch(tokens[:32], 2, 32, seed=0).shape == (2, 32)
    with pytest.raises(ValueError, match="fewer than seqlen"):
        calibration_batch(tokens[:31], 2, 32, seed=0)


# -- evaluation windows -------------------------------------------------------------------

def test_eval_windows_disjoint():
    n, L = 1000, 64
    w = eval_windows(torch.arange(n), L)
    assert w.input_ids.shape == (n // L, L) and w.n_windows == n // L
    assert w.n_scored == (n // L) * (L - 1) and w.stride == L and w.bos == "none"
    assert torch.equal(w.input_ids.flatten(), torch.arange((n // L) * L))
    assert not w.score_mask[:, 0].any()


def test_eval_windows_sliding():
    n, L, s = 1000, 64, 16
    w = eval_windows(torch.arange(n), L, stride=s)
    n_windows = (n - L) // s + 1
    assert w.n_windows == n_windows and w.n_scored == (L - 1) + (n_windows - 1) * s
    scored = (w.input_ids[w.score_mask]).sort().values  # every token once, none twice
    assert torch.equal(scored, torch.arange(1, int(w.starts[-1]) + L))
    assert torch.equal(w.score_mask[1], torch.arange(L) >= L - s)


def test_eval_windows_max_tokens_and_bos():
    w = eval_windows(torch.arange(1000), 64, max_tokens=300)
    assert w.n_windows == 4 and w.n_scored == 4 * 63 and w.max_tokens == 300
    b = eval_windows(torch.arange(1000), 64, max_tokens=300, bos_id=1)
    assert b.input_ids.shape == (4, 65) and (b.input_ids[:, 0] == 1).all() and b.bos == "prepend"
    assert torch.equal(b.input_ids[b.score_mask], w.input_ids[w.score_mask])  # scoring unchanged
    with pytest.raises(ValueError, match="fewer than seqlen"):
        eval_windows(torch.arange(50), 64)
    with pytest.raises(ValueError, match="stride"):
        eval_windows(torch.arange(500), 64, stride=65)
