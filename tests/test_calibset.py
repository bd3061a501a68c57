"""mixq.calibset / mixq.selfgen: self-generated calibration (deterministic, cached, hashed into the measurement
key), mixtures of sources, BOS on every row, and the fortunes corpus."""
import json

import pytest
import torch
from tiny import make_tiny, make_tiny_tokenizer

from mixq import data, fortunes, selfgen
from mixq.allocate import default_candidates
from mixq.calibset import build_calibration, corpus_rows, parse_sources, split_rows
from mixq.measure import measurement_key

TEXT = "".join(f"the {w} sat on the mat number {i} and then it ran away .\n" for i, w in
               enumerate(["cat", "dog", "bird", "fox", "cow"] * 20))
BOS = 2


@pytest.fixture(scope="module")
def tiny():
    return make_tiny("llama"), make_tiny_tokenizer()


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text(TEXT)
    return str(p)


def test_self_generation_samples_the_whole_distribution(tiny):
    """Rows are drawn from every token the model gives weight to, not only its likeliest few (a flat
    distribution over 500 tokens: 256 draws hit far more than the 64 tokens top-k sampling would keep)."""
    from types import SimpleNamespace

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, past_key_values=None, use_cache=True):
            return SimpleNamespace(logits=torch.zeros(ids.shape[0], ids.shape[1], 500), past_key_values=None)

    rows = selfgen.generate_rows(Flat(), tiny[1], 4, 128, seed=0, progress=False)
    sampled = rows[:, 64:]  # every prompt is cut to seqlen / 2 tokens: the rest was sampled
    assert sampled.max() < 500 and len(sampled.unique()) > 150


def test_self_generated_rows_are_deterministic_for_a_seed(tiny, tmp_path):
    model, tok = tiny
    a = selfgen.generate_rows(model, tok, 3, 24, seed=1, progress=False)
    b = selfgen.generate_rows(model, tok, 3, 24, seed=1, progress=False)
    c = selfgen.generate_rows(model, tok, 3, 24, seed=2, progress=False)
    assert a.shape == (3, 24) and torch.equal(a, b) and not torch.equal(a, c)
    # each row starts with its opener (cut at half the row), then the model's samples
    first = tok(selfgen.prompt_texts(tok, 3, 1)[0], add_special_tokens=False)["input_ids"][:12]
    assert a[0, : len(first)].tolist() == first


def test_self_generated_rows_with_bos(tiny):
    model, tok = tiny
    rows = selfgen.generate_rows(model, tok, 2, 16, seed=0, bos_id=BOS, progress=False)
    assert bool((rows[:, 0] == BOS).all()) and not bool((rows[:, 1] == BOS).all())


def test_chat_models_get_chat_exchanges(tiny):
    _, tok = tiny
    assert not selfgen.has_chat_template(tok)
    plain = selfgen.prompt_texts(tok, 4, 0)
    assert all(p in selfgen.PROMPTS for p in plain)

    class Chat:
        chat_template = "x"

        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            return f"<user>{msgs[0]['content']}<assistant>"

    mixed = selfgen.prompt_texts(Chat(), 4, 0)
    assert sum(p.startswith("<user>") for p in mixed) == 2 and sum(p in selfgen.PROMPTS for p in mixed) == 2


def test_a_failing_chat_template_falls_back_to_plain_openers(caplog):
    class Strict:  # e.g. a template that insists on a system turn first
        chat_template = "x"

        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            raise ValueError("Conversation must start with a system message")

    with caplog.at_level("WARNING", logger="mixq.selfgen"):
        rows = selfgen.prompt_texts(Strict(), 4, 0)
    assert rows == selfgen.prompt_texts(make_tiny_tokenizer(), 4, 0)  # the openers a plain model gets
    assert "chat template failed" in caplog.text and "system message" in caplog.text


def test_cache_is_reused_and_a_damaged_entry_regenerated(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    ids = selfgen.self_generated(model, tok, 2, 16, 0, cache=tmp_path, progress=False)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(selfgen, "generate_rows", lambda *a, **k: calls.append(1) or ids)
    assert torch.equal(selfgen.self_generated(model, tok, 2, 16, 0, cache=tmp_path, progress=False), ids)
    assert calls == []  # from the cache
    meta = files[0].with_suffix(".json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "sha256": "0" * 64}))
    selfgen.self_generated(model, tok, 2, 16, 0, cache=tmp_path, progress=False)
    assert calls == [1]  # damaged: generated again


def test_calibration_hash_changes_the_measurement_key(tiny, corpus):
    model, tok = tiny
    cands = default_candidates()[:2]
    a = build_calibration(model, tok, "self", 4, 16, seed=0, progress=False)
    b = build_calibration(model, tok, "self", 4, 16, seed=1, progress=False)
    p = build_calibration(model, tok, corpus, 4, 16, seed=0, progress=False)
    assert a.sha256 != b.sha256 != p.sha256
    keys = [measurement_key(model, c.ids, cands, "kfac", "rtn")["calibration"] for c in (a, b, p)]
    assert len(set(keys)) == 3
    assert measurement_key(model, build_calibration(model, tok, "self", 4, 16, seed=0, progress=False).ids,
                           cands, "kfac", "rtn")["calibration"] == keys[0]


def test_mixture_interleaves_sources_and_records_them(tiny, corpus):
    model, tok = tiny
    s = build_calibration(model, tok, f"self+{corpus}", 5, 16, seed=0, bos_id=BOS, progress=False)
    assert s.ids.shape == (5, 16) and bool((s.ids[:, 0] == BOS).all())
    assert split_rows(5, 2) == [3, 2] and s.rows_per_source == {"self": 3, corpus: 2}
    own = build_calibration(model, tok, "self", 3, 16, seed=0, bos_id=BOS, progress=False).ids
    rows = corpus_rows(s.record(), tok)  # the corpus part, rebuilt from the record alone
    assert torch.equal(s.ids[[0, 2, 4]], own) and torch.equal(s.ids[[1, 3]], rows)
    rec = s.record()
    assert rec["corpus"] == f"self+{corpus}" and rec["bos_id"] == BOS and rec["sha256"] == s.sha256
    assert json.loads(json.dumps(rec)) == rec


@pytest.mark.parametrize("spec, needle", [("", "several joined by"), ("self+self", "twice"),
                                          ("nope", "unknown"), ("missing.txt", "missing.txt")])
def test_bad_calib_names_the_fix(spec, needle):
    with pytest.raises((ValueError, FileNotFoundError), match=needle):
        parse_sources(spec)


def test_fortunes_splits(tmp_path, monkeypatch):
    for name, quotes in (("wisdom", ["A penny saved.", "Know thyself.\n\t\t-- Socrates"]),
                         ("people", [f"Quote number {i}, said someone." for i in range(30)])):
        (tmp_path / name).write_text("\n%\n".join(quotes) + "\n%\n")
        (tmp_path / f"{name}.dat").write_bytes(b"")
    (tmp_path / "ascii-art").write_text("(o_o)\n%\n")
    (tmp_path / "ascii-art.dat").write_bytes(b"")
    monkeypatch.setenv("MIXQ_FORTUNES_DIR", str(tmp_path))
    parts = {s: data.load_corpus("fortunes", s) for s in ("train", "valid", "test")}
    entries = [e for t in parts.values() for e in t.strip("\n").split("\n\n")]
    assert sorted(entries) == sorted(fortunes.entries())  # every entry once, no ascii-art
    assert len(entries) == 32 and "(o_o)" not in "".join(entries)
    assert len(parts["test"].strip().split("\n\n")) == 4 and parts["test"] == data.load_corpus("fortunes", "test")
    monkeypatch.setenv("MIXQ_FORTUNES_DIR", str(tmp_path / "none"))
    with pytest.raises(data.CorpusUnavailableError, match="apt-get install fortunes"):
        data.load_corpus("fortunes", "test")


def test_the_suite_writes_self_generated_rows_to_a_private_cache(tiny, private_cache):
    """conftest's session cache: rows a test generates land there, and the user's costly entries are shared."""
    from mixq.models import cache_dir

    assert cache_dir() == private_cache and not selfgen.cache_root().is_symlink()
    assert all((private_cache / name).is_symlink() for name in ("models", "gguf", "kernels"))
    model, tok = tiny
    build_calibration(model, tok, "self", 2, 16, seed=5, progress=False)
    assert list(selfgen.cache_root().glob("*.safetensors"))
