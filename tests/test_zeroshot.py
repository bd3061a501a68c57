"""mixq.eval.zeroshot: the offline PTB suite, the lm-eval request methods, the harness adapter, the CLI."""
from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from tiny import make_tiny, make_tiny_tokenizer

from mixq.cli import main
from mixq.eval import zeroshot as zs
from mixq.eval.stats import wilson_interval
from mixq.eval.suite import build_suite, evaluate_zeroshot, fingerprint, score_items, suite_info
from mixq.eval.zeroshot import MixqLM, Request

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def suite():
    return build_suite(n=12, seed=0)


def direct_logprob(model, tok, context: str, continuation: str) -> float:
    """Σ log p(continuation | context) straight from the logits (character tokenizer: no merges)."""
    ctx = tok.encode(context, add_special_tokens=False)
    ids = torch.tensor([ctx + tok.encode(continuation, add_special_tokens=False)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(float(logp[t - 1, ids[0, t]]) for t in range(len(ctx), ids.shape[1]))


def test_items_are_identical_across_builds(suite):
    again = build_suite(n=12, seed=0)
    assert again == suite
    assert {t: fingerprint(v) for t, v in again.items()} == {t: fingerprint(v) for t, v in suite.items()}
    other = build_suite(n=12, seed=1)
    assert fingerprint(other["lastword"]) != fingerprint(suite["lastword"])
    assert build_suite("choice", n=5, seed=0)["choice"] == build_suite(["choice"], n=5, seed=0)["choice"]


def test_items_are_well_formed(suite):
    for x in suite["lastword"]:
        assert len(x.choices) == 5 and len(set(x.choices)) == 5
        assert x.choices[x.label] == " " + x.answer and not x.context.endswith(" ")
        assert x.answer.isalpha()
    for x in suite["choice"]:
        assert len(x.choices) == 4 and len(set(x.choices)) == 4
        assert x.choices[x.label] == " \n " + x.answer and all(c.startswith(" \n ") for c in x.choices)
    assert len({x.label for x in suite["lastword"]}) > 1  # the answer's position varies
    with pytest.raises(ValueError, match="eligible sentences"):
        build_suite("lastword", n=10**6)
    with pytest.raises(ValueError, match="unknown zero-shot task"):
        build_suite("hellaswag", n=5)


def test_loglikelihood_equals_direct_computation(model, tok):
    reqs = [Request((" the stock market", " fell")), Request((" a", " b c d")), Request(("x", "y"))]
    for bs in (1, 3):
        got = MixqLM(model, tok, batch_size=bs).loglikelihood(reqs)
        for (lp, _), r in zip(got, reqs):
            assert lp == pytest.approx(direct_logprob(model, tok, *r.args), abs=1e-4)
    lm = MixqLM(model, tok)
    # trailing whitespace of the context moves to the continuation (the harness' convention)
    assert lm.loglikelihood([Request((" a b ", "c"))])[0][0] == pytest.approx(
        direct_logprob(model, tok, " a b", " c"), abs=1e-4)
    # empty context: the continuation is scored after the prefix (BOS) token
    bos = tok.bos_token
    assert lm.loglikelihood([Request(("", "ab"))])[0][0] == pytest.approx(
        direct_logprob(model, tok, bos, "ab"), abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen2", "phi", "gemma3", "gpt_neox"])
def test_shared_context_scoring_equals_direct_computation(family, tok, monkeypatch):
    """Continuations of one context are scored with the context run once (KV cache): same numbers, and
    the one-window path is not used for them."""
    fam_model = make_tiny(family)
    ctx = " the stock market"
    conts = [" fell", " rose sharply today", "!", " was"]
    reqs = [Request((ctx, c)) for c in conts] + [Request((" a", " b"))]  # the last one has its own context
    windows = []
    real = MixqLM._score
    monkeypatch.setattr(MixqLM, "_score", lambda self, seqs, *a, **k: windows.append(len(seqs)) or real(self, seqs, *a, **k))
    for bs in (1, 3):
        got = MixqLM(fam_model, tok, batch_size=bs).loglikelihood(reqs)
        for (lp, _), r in zip(got, reqs):
            assert lp == pytest.approx(direct_logprob(fam_model, tok, *r.args), abs=1e-4)
    assert windows == [1, 1]  # only the lone request went through one-window scoring
    greedy = MixqLM(fam_model, tok).generate_until([Request((ctx, {"until": [], "max_gen_toks": 3}))])[0]
    if greedy.strip():  # (a random model may stop at EOS at once)
        other = greedy[:-1] + ("a" if greedy[-1] != "a" else "b")
        flags = MixqLM(fam_model, tok).loglikelihood([Request((ctx, greedy)), Request((ctx, other))])
        assert flags[0][1] and not flags[1][1]


def test_greedy_flag_and_generation_agree(model, tok):
    lm = MixqLM(model, tok)
    ctx = " the company said"
    gen = lm.generate_until([Request((ctx, {"until": [], "max_gen_toks": 6}))])[0]
    assert len(gen) == 6  # character tokenizer: one character per token
    other = gen[:-1] + ("a" if gen[-1] != "a" else "b")
    (lp, greedy), (lp_other, not_greedy) = lm.loglikelihood([Request((ctx, gen)), Request((ctx, other))])
    assert greedy and not not_greedy and lp > lp_other
    cut = lm.generate_until([Request((ctx, {"until": [gen[2]], "max_gen_toks": 6}))])[0]
    assert cut == gen.split(gen[2], 1)[0]
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([Request((ctx, {"do_sample": True}))])


def test_rolling_and_long_continuations(model, tok):
    lm = MixqLM(model, tok)
    text = " hello world"
    assert lm.loglikelihood_rolling([Request((text,))])[0] == pytest.approx(
        direct_logprob(model, tok, tok.bos_token, text), abs=1e-4)
    # longer than max_length: scored in chunks, each target still once, finite
    short = MixqLM(model, tok, max_length=16)
    long_text = " the quick brown fox jumps over the lazy dog" * 2
    lp = short.loglikelihood_rolling([Request((long_text,))])[0]
    chunks = short._chunks(len(long_text) + 1, 1, from_end=False)
    assert sum(b - a for _, a, b in chunks) == len(long_text) and all(b - 1 - s <= 16 for s, _, b in chunks)
    assert lp < 0 and torch.isfinite(torch.tensor(lp))
    lp_ll = short.loglikelihood([Request((" a", long_text))])[0][0]
    assert lp_ll < 0 and torch.isfinite(torch.tensor(lp_ll))
    # within max_length the chunking changes nothing
    assert MixqLM(model, tok, max_length=1024).loglikelihood([Request((" a", long_text))])[0][0] == pytest.approx(
        direct_logprob(model, tok, " a", long_text), abs=1e-3)


class SpyLM(MixqLM):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls: list[tuple[str, list]] = []

    def loglikelihood(self, requests, disable_tqdm=False):
        self.calls.append(("loglikelihood", list(requests)))
        return super().loglikelihood(requests)

    def generate_until(self, requests, disable_tqdm=False):
        self.calls.append(("generate_until", list(requests)))
        return super().generate_until(requests)


def test_suite_runs_through_the_adapter_methods(model, tok, suite):
    lm = SpyLM(model, tok, batch_size=8)
    res = score_items(lm, suite["lastword"])
    kinds = [k for k, _ in lm.calls]
    assert kinds == ["loglikelihood", "generate_until"]
    reqs = lm.calls[0][1]
    assert [r.args for r in reqs] == [(x.context, c) for x in suite["lastword"] for c in x.choices]
    # the accuracy follows from the adapter's own scores
    scores = [lp for lp, _ in MixqLM(model, tok).loglikelihood(reqs)]
    k = sum(max(range(5), key=lambda c: scores[5 * i + c]) == x.label for i, x in enumerate(suite["lastword"]))
    assert res["acc"]["correct"] == k and res["acc"]["value"] == k / 12
    assert res["acc"]["ci"] == list(wilson_interval(k, 12))
    assert res["greedy_acc"]["n"] == 12 and res["chance"] == pytest.approx(0.2)
    assert res["fingerprint"] == fingerprint(suite["lastword"])
    choice = score_items(SpyLM(model, tok), suite["choice"], greedy=True)
    assert choice["greedy_acc"] is None and 0 <= choice["acc_norm"]["value"] <= 1


def test_harness_adapter_needs_lm_eval(monkeypatch):
    monkeypatch.setattr(zs, "_HARNESS_CLASS", None)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails even if installed
    monkeypatch.setitem(sys.modules, "lm_eval.api", None)
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[lm-eval\]'"):
        zs.harness_class()
    with pytest.raises(ImportError, match="lm-eval"):
        zs.MixqHarnessLM  # noqa: B018


def _lm_eval_pin() -> str:
    """The lm-eval version pyproject.toml's ``lm-eval`` extra pins (what `make install` installs)."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["lm-eval"]
    return next(r.split("==")[1] for r in extra if r.startswith("lm-eval=="))


def test_harness_adapter_with_the_real_lm_eval(monkeypatch, model, tok, tmp_path):
    """The adapter against lm-eval itself, at the version pyproject.toml's ``lm-eval`` extra pins: a subclass of its
    ``LM`` (and of ``MixqLM``), registered once in its registry as ``mixq``, answering its own ``Instance``
    requests as the direct computation does, reporting them to the harness's cache hook (through a real
    ``CachingLM``), and built from an ``--model_args`` string the way ``lm_eval --model mixq`` builds it.

    ``make install`` installs lm-eval, so a missing one fails here instead of skipping.  To run the suite where it is
    deliberately absent, set ``MIXQ_NO_LM_EVAL=1``: then (and only then) this test skips."""
    if os.environ.get("MIXQ_NO_LM_EVAL") == "1":
        pytest.skip("MIXQ_NO_LM_EVAL=1: lm-eval deliberately absent")
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        pytest.fail(f"lm-eval is not installed ({e}): `make install` installs pyproject.toml's lm-eval extra; "
                    "set MIXQ_NO_LM_EVAL=1 to skip this test where it is absent on purpose")
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM, CachingLM, hash_args
    from lm_eval.api.registry import get_model

    assert importlib.metadata.version("lm-eval") == _lm_eval_pin()
    monkeypatch.setattr(zs, "_HARNESS_CLASS", None)
    lm = zs.harness_lm(model, tok, batch_size="auto")
    assert isinstance(lm, LM) and isinstance(lm, MixqLM) and get_model("mixq") is type(lm)
    assert zs.harness_class() is type(lm)  # built and registered once
    cache = CachingLM(lm, str(tmp_path / "cache.db"))  # sets lm's cache hook: the adapter reports every answer to it
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=args, idx=0)
            for args in ((" the stock market", " fell"), ("the", " market rose"))]
    got = lm.loglikelihood(reqs)
    for (logp, greedy), r in zip(got, reqs):
        assert logp == pytest.approx(direct_logprob(model, tok, *r.args), abs=1e-4) and isinstance(greedy, bool)
        assert tuple(cache.dbdict[hash_args("loglikelihood", r.args)]) == (logp, greedy)
    cache.dbdict.close()
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    loaded = get_model("mixq").create_from_arg_string(f"pretrained={d},max_length=32", {"batch_size": 2, "device": None})
    assert loaded.batch_size == 2 and loaded.max_length == 32
    assert loaded.loglikelihood(reqs[:1])[0][0] == pytest.approx(got[0][0], abs=1e-5)


@pytest.fixture
def tiny_dir(tmp_path, model, tok):
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_zeroshot(tiny_dir, tmp_path, capsys):
    out = tmp_path / "zs.json"
    assert main(["zeroshot", str(tiny_dir), "--n", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "lastword  acc" in text and "choice" in text and "acc_norm" in text
    doc = json.loads(out.read_text())
    assert set(doc["tasks"]) == {"lastword", "choice"} and doc["suite"]["n"] == 8
    first = doc["tasks"]["lastword"]["fingerprint"]
    assert main(["zeroshot", str(tiny_dir), "--n", "8", "--task", "lastword", "--no-greedy", "--out", str(out),
                 "--force"]) == 0
    doc2 = json.loads(out.read_text())
    assert doc2["tasks"]["lastword"]["fingerprint"] == first and doc2["tasks"]["lastword"]["greedy_acc"] is None
    assert doc2["tasks"]["lastword"]["acc"] == doc["tasks"]["lastword"]["acc"]
    capsys.readouterr()
    assert main(["zeroshot", str(tiny_dir), "--n", "8", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["zeroshot", str(tmp_path / "missing-model"), "--task", "piqa"]) == 2
    assert capsys.readouterr().err.startswith("mixq: error: unknown zero-shot task 'piqa'")
    assert main(["zeroshot", str(tmp_path / "missing-model"), "--n", "1000000"]) == 2
    assert "eligible sentences" in capsys.readouterr().err


def test_evaluate_zeroshot_api(model, tok):
    res = evaluate_zeroshot(model, tok, tasks="choice", n=4, seed=2, batch_size=2)
    assert res["suite"] == suite_info(4, 2) and list(res["tasks"]) == ["choice"]
    assert res["tasks"]["choice"]["fingerprint"] == fingerprint(build_suite("choice", n=4, seed=2)["choice"])
    json.dumps(res)  # JSON-ready
