"""mixq.bos: the BOS convention from the tokenizer (else the family, else a warning), applied to evaluation
windows and zero-shot contexts, and recorded in the eval JSON's protocol."""
import argparse
import json

import pytest
import torch
from tiny import make_tiny, make_tiny_tokenizer

from mixq.bos import BOS_CHOICES, BosDecision, resolve_bos
from mixq.cli import main
from mixq.cli.common import eval_windows_for
from mixq.eval import Protocol
from mixq.eval.zeroshot import MixqLM, Request

BOS = 2  # "<s>" in the tiny character tokenizer; also Gemma3TextConfig.bos_token_id
TEXT = "".join(f"the {w} sat on the mat number {i} and then it ran away .\n" for i, w in
               enumerate(["cat", "dog", "bird", "fox", "cow"] * 4))


def gemma_tokenizer():
    """The tiny character tokenizer with a Gemma-style post-processor: BOS before every encoded text."""
    from tokenizers import processors

    tok = make_tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                                  special_tokens=[("<s>", BOS)])
    return tok


class PlainEncoder:
    """Not an HF tokenizer: ``encode`` only, no special tokens, no ``bos_token_id``."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 128 for c in text]


@pytest.fixture(scope="module")
def gemma3():
    return make_tiny("gemma3"), gemma_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return make_tiny("llama"), make_tiny_tokenizer()


def test_auto_follows_the_tokenizer(gemma3, llama):
    model, tok = gemma3
    assert tok.encode("ab")[0] == BOS and tok.encode("ab", add_special_tokens=False)[0] != BOS
    assert resolve_bos(tok, model) == BosDecision("auto", BOS, "tokenizer")
    model, tok = llama  # same BOS token, but the tokenizer does not add it
    assert tok.bos_token_id == BOS
    assert resolve_bos(tok, model, "auto") == BosDecision("auto", None, "tokenizer")
    assert resolve_bos(tok, model, "always") == BosDecision("always", BOS, "user")


def test_never_overrides_and_always_needs_a_bos_token(gemma3):
    model, tok = gemma3
    assert resolve_bos(tok, model, "never") == BosDecision("never", None, "user")
    no_bos = argparse.Namespace(bos_token_id=None)
    assert resolve_bos(no_bos, model, "auto") == BosDecision("auto", None, "tokenizer")
    with pytest.raises(ValueError, match="--bos never"):
        resolve_bos(no_bos, model, "always")
    with pytest.raises(ValueError, match="--bos must be one of auto, always, never"):
        resolve_bos(tok, model, "sometimes")
    assert BOS_CHOICES == ("auto", "always", "never")


def test_family_table_then_warning():
    assert resolve_bos(PlainEncoder(), make_tiny("gemma3")) == BosDecision("auto", BOS, "family")
    assert resolve_bos(PlainEncoder(), make_tiny("gpt2")) == BosDecision("auto", None, "family")
    with pytest.warns(UserWarning, match=r"--bos always\|never"):
        d = resolve_bos(PlainEncoder(), make_tiny("llama"))  # llama checkpoints disagree (Llama-3 vs SmolLM2)
    assert d == BosDecision("auto", None, "undetermined")
    assert json.loads(json.dumps(d.to_dict())) == {"policy": "auto", "bos_id": None, "source": "undetermined"}


def _args(**kw):
    base = dict(corpus=None, split="test", tokens=128, seqlen=16, stride=None, bos="auto")
    return argparse.Namespace(**{**base, **kw})


def test_eval_windows_start_with_bos_when_the_model_expects_it(gemma3, llama, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    model, tok = gemma3
    [(_, win, proto)] = eval_windows_for(_args(corpus=str(corpus)), tok, model)
    assert win.input_ids.shape[1] == 17 and bool((win.input_ids[:, 0] == BOS).all())
    assert (proto.bos, proto.bos_policy, proto.bos_source) == ("prepend", "auto", "tokenizer")
    [(_, win, proto)] = eval_windows_for(_args(corpus=str(corpus), bos="never"), tok, model)
    assert win.input_ids.shape[1] == 16 and (proto.bos, proto.bos_policy, proto.bos_source) == ("none", "never", "user")
    model, tok = llama
    [(_, win, proto)] = eval_windows_for(_args(corpus=str(corpus)), tok, model)
    assert win.input_ids.shape[1] == 16 and proto.bos == "none"
    [(_, win, proto)] = eval_windows_for(_args(corpus=str(corpus), bos="always"), tok, model)
    assert bool((win.input_ids[:, 0] == BOS).all()) and (proto.bos, proto.bos_source) == ("prepend", "user")


def test_zeroshot_contexts_start_with_bos(gemma3):
    model, tok = gemma3
    bos = resolve_bos(tok, model).bos_id
    lm, plain = MixqLM(model, tok, bos_id=bos), MixqLM(model, tok)
    ctx, cont = lm.encode_pair(" the stock market", " fell")
    assert ctx[0] == BOS and plain.encode_pair(" the stock market", " fell") == (ctx[1:], cont)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), dim=-1)
    want = sum(float(logp[t - 1, (ctx + cont)[t]]) for t in range(len(ctx), len(ctx) + len(cont)))
    got = lm.loglikelihood([Request((" the stock market", " fell"))])[0][0]
    assert got == pytest.approx(want, abs=1e-4)
    assert got != pytest.approx(plain.loglikelihood([Request((" the stock market", " fell"))])[0][0], abs=1e-4)


def test_protocol_records_the_policy_and_reads_old_json(gemma3):
    proto = {"version": 1, "corpus": "ptb", "split": "test", "tokenizer": "t", "seqlen": 16, "stride": 16,
             "bos": "none", "max_tokens": 64, "n_windows": 4, "n_scored": 60, "dtype": "float32"}
    old = Protocol.from_dict(proto)  # written before the policy was recorded
    assert old.bos_policy is None and old.bos_source is None
    new = Protocol.from_dict({**proto, "bos": "prepend", "bos_policy": "auto", "bos_source": "tokenizer"})
    assert Protocol.from_dict(json.loads(json.dumps(new.to_dict()))) == new
    with pytest.raises(ValueError, match="contradicts"):
        Protocol.from_dict({**proto, "bos": "prepend", "bos_policy": "never", "bos_source": "user"})


def test_cli_eval_and_zeroshot_record_the_bos_policy(gemma3, tmp_path, capsys):
    model, tok = gemma3
    d = tmp_path / "gemma3"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "r.json"
    base = ["eval", str(d), "--corpus", str(corpus), "--tokens", "128", "--seqlen", "16", "--out", str(out)]
    assert main(base) == 0
    p = json.loads(out.read_text())["protocol"]
    assert (p["bos"], p["bos_policy"], p["bos_source"], p["seqlen"]) == ("prepend", "auto", "tokenizer", 16)
    assert "BOS prepend (auto: tokenizer)" in capsys.readouterr().out
    assert main([*base, "--force", "--bos", "never"]) == 0
    p = json.loads(out.read_text())["protocol"]
    assert (p["bos"], p["bos_policy"], p["bos_source"]) == ("none", "never", "user")
    z = tmp_path / "z.json"
    assert main(["zeroshot", str(d), "--task", "lastword", "--n", "4", "--no-greedy", "--out", str(z)]) == 0
    assert json.loads(z.read_text())["bos"] == {"policy": "auto", "bos_id": BOS, "source": "tokenizer"}


@pytest.mark.parametrize("family, want", [("gemma3", BOS), ("llama", None)])
def test_calibration_and_measurement_rows_follow_the_convention(family, want, gemma3, llama, tmp_path, monkeypatch):
    """quantize (GPTQ) and measure calibrate on rows that start with BOS exactly when the model expects it;
    the quantized directory and the measurement record it, and an eval of the directory names its calibration."""
    import mixq.measure as measure_mod

    monkeypatch.setenv("MIXQ_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = gemma3 if family == "gemma3" else llama
    d = tmp_path / family
    model.save_pretrained(d)
    tok.save_pretrained(d)
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    seen = []
    real = measure_mod.measure
    monkeypatch.setattr(measure_mod, "measure", lambda m, ids, *a, **k: seen.append(ids.clone()) or real(m, ids, *a, **k))
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(d), "--bpw", "4", "--method", "gptq", "--calib", f"self+{corpus}",
                 "--nsamples", "4", "--seqlen", "16", "--grad-samples", "2", "--out", str(q)]) == 0
    cal = json.loads((q / "mixq.json").read_text())["calibration"]
    assert cal["bos_id"] == want and cal["rows"] == {"self": 2, str(corpus): 2}
    assert len(seen) == 1 and bool((seen[0][:, 0] == BOS).all()) == (want is not None)
    assert json.loads((q / "measurement.json").read_text())["meta"]["calibration_record"]["sha256"] == cal["sha256"]
    r = tmp_path / "r.json"
    assert main(["eval", str(q), "--corpus", str(corpus), "--tokens", "64", "--seqlen", "16", "--out", str(r)]) == 0
    res = json.loads(r.read_text())
    assert res["calibration"]["corpus"] == f"self+{corpus}" and res["protocol"]["bos_policy"] == "auto"
    assert (res["protocol"]["bos"] == "prepend") == (want is not None)
