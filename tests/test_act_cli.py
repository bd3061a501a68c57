"""CLI: mixq eval --act/--kv, mixq measure-kv, mixq plan --memory on a tiny local model; bad input → one line, exit 2."""
import json

import pytest

from mixq.cli import main

TEXT = "".join(f"the {w} sat on the mat number {i} and then it ran away .\n" for i, w in
               enumerate(["cat", "dog", "bird", "fox", "cow"] * 12))


@pytest.fixture
def tiny_dir(tiny_dir, tmp_path):  # the shared tiny model directory, plus a local corpus beside it
    (tmp_path / "corpus.txt").write_text(TEXT)
    return tiny_dir


def _eval(d, tmp_path, *extra):
    c = str(tmp_path / "corpus.txt")
    return ["eval", str(d), "--corpus", c, "--tokens", "192", "--seqlen", "64", "--calib", c, "--nsamples", "2",
            "--calib-seqlen", "32", *extra]


def test_eval_act_and_kv(tiny_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(_eval(tiny_dir, tmp_path, "--act", "W8A8", "--kv", "KV4-kivi", "--out", str(out))) == 0
    r = json.loads(out.read_text())
    assert r["act"]["act_spec"] == "W8-token" and r["act"]["weights"] == ["W8-channel"]
    assert r["kv"]["bits"] == [[4, 4], [4, 4]] and r["kv"]["chunk"] == 16 and r["kv"]["residual"] == 32
    assert 0 <= r["kl"] < 0.05 and r["n_scored"] == 189 and r["protocol"]["seqlen"] == 64
    text = capsys.readouterr().out
    assert "KV cache: KIVI K/V 4/4" in text and "16 tokens per forward" in text
    for extra in (["--act", "A4", "--act-outliers", "int8:0.5"],
                  ["--act", "W4A4-g32-rot", "--act-outliers", "atom:8"],
                  ["--act", "W8A8", "--smooth", "0.5", "--act-mode", "static"],
                  ["--act", "A4", "--act-outliers", "resq:1/8"],
                  ["--kv", "kivi:2:residual=8:group=8", "--kv-engine", "simulate", "--kv-chunk", "1"]):
        assert main(_eval(tiny_dir, tmp_path, *extra, "--out", str(out), "--force")) == 0, extra
        r = json.loads(out.read_text())
        assert r["kl"] > 0 and r["perplexity"] > 1


def test_measure_kv_joint_plan_quantize_eval(tiny_dir, tmp_path, capsys):
    c = str(tmp_path / "corpus.txt")
    m, kv = tmp_path / "m.json", tmp_path / "kv.json"
    assert main(["measure", "--model", str(tiny_dir), "--calib", c, "--nsamples", "4", "--seqlen", "32",
                 "--grad-samples", "2", "--out", str(m)]) == 0
    assert main(["measure-kv", "--model", str(tiny_dir), "--calib", c, "--nsamples", "2", "--seqlen", "64",
                 "--residual", "8", "--k-group", "8", "--out", str(kv)]) == 0
    doc = json.loads(kv.read_text())
    assert doc["_type"] == "KVSensitivityTable" and len(doc["layers"]) == 2 and doc["layers"][0]["bits"] == [2, 3, 4, 8, 16]
    capsys.readouterr()
    assert main(["plan", str(m), "--memory", "48KB", "--context", "256", "--kv-measurement", str(kv), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "weights" in text and "KV cache" in text and "K bits" in text and "model.layers.1.mlp.down_proj" in text
    plans = tmp_path / "plans"
    assert main(["plan", str(m), "--memory", "48KB,64KB", "--context", "256", "--kv-measurement", str(kv),
                 "--out", str(plans)]) == 0
    assert not list(plans.glob("kv-plan-*"))  # one plan: the weights' specs and the KV widths together
    kvp = json.loads((plans / "plan-49152B-ctx256-b1.json").read_text())["kv"]
    assert kvp["joint"]["total_bytes"] <= 49152 and kvp["context"] == 256
    assert main(["plan", str(m), "--memory", "64KB", "--context", "256", "--kv-measurement", str(kv),
                 "--kv-uniform", "4", "--dry-run"]) == 0
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir), "--plan", str(plans / "plan-49152B-ctx256-b1.json"),
                 "--out", str(q)]) == 0
    assert json.loads((q / "mixq.json").read_text())["kv_plan"] == kvp  # quantize records the KV widths
    out = tmp_path / "r.json"
    capsys.readouterr()
    assert main(_eval(q, tmp_path, "--out", str(out))) == 0  # ... and eval applies them with no flag
    assert "as recorded in" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["kv"]["bits"] == [[x["k"], x["v"]] for x in kvp["layers"]] and r["kv"]["residual"] == 8
    assert main(_eval(q, tmp_path, "--kv-plan", str(plans / "plan-49152B-ctx256-b1.json"), "--out", str(out),
                      "--force")) == 0
    assert json.loads(out.read_text())["kv"]["bits"] == r["kv"]["bits"]
    assert main(_eval(q, tmp_path, "--kv", "4", "--out", str(out), "--force")) == 0  # --kv overrides the record
    assert json.loads(out.read_text())["kv"]["bits"] == [[4, 4]] * len(kvp["layers"])
    capsys.readouterr()
    assert main(["plan", str(m), "--memory", "20KB", "--context", "256", "--kv-measurement", str(kv), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixq: error:") and err.count("\n") == 1 and "at least" in err


@pytest.mark.parametrize("extra, needle", [
    (["--act", "W9A9"], "neither a W/A preset"),
    (["--act", "W16A16"], "keeps the activations"),
    (["--act", "MXFP4", "--act-mode", "static"], "dynamic"),
    (["--act", "A4", "--act-outliers", "atom"], "atom:K"),
    (["--act", "A4", "--act-outliers", "resq:2"], "(0, 1)"),
    (["--act", "A4", "--act-outliers", "zz:1"], "int8[:T]"),
    (["--act-outliers", "int8"], "need --act"),
    (["--act", "W8A8", "--smooth", "2"], "--smooth must be in (0, 1]"),
    (["--kv", "17"], "KV bits"),
    (["--kv", "kivi:4:foo=1"], "unknown option"),
    (["--kv", "KV4-zz"], "unknown option"),
    (["--kv", "4", "--kv-chunk", "0"], "--kv-chunk must be positive"),
    (["--kv-plan", "missing.json"], "missing.json"),
])
def test_eval_bad_input_one_line_exit_2(tiny_dir, tmp_path, capsys, monkeypatch, extra, needle):
    monkeypatch.chdir(tmp_path)
    rc = main(_eval(tiny_dir, tmp_path, *extra, "--out", "OUT.json"))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mixq: error:") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "OUT.json").exists()


def test_plan_memory_bad_input(tiny_dir, tmp_path, capsys):
    m = tmp_path / "m.json"
    m.write_text("{}")
    for argv, needle in [(["--memory", "1MB"], "--kv-measurement"),
                         (["--memory", "1MB", "--bpw", "3", "--kv-measurement", "kv.json"], "not both"),
                         (["--memory", "12XB", "--kv-measurement", "kv.json"], "bad --memory"),
                         (["--memory", "1MB", "--kv-measurement", "kv.json", "--solver", "uniform"], "--kv-uniform"),
                         (["--memory", "1MB", "--kv-measurement", str(m)], "not a SensitivityTable")]:
        assert main(["plan", str(m), *argv, "--dry-run"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("mixq: error:") and err.count("\n") == 1 and needle in err, err


def test_dir_targets_refuse_smoothing_and_unrotated_rot_presets(tiny_dir, tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir), "--spec", "W8A8", "--out", str(q)]) == 0  # the W-part
    info = json.loads((q / "mixq.json").read_text())
    assert info["spec"] == "W8-channel" and info["activations"] == "W8A8"  # the A-part, recorded
    capsys.readouterr()
    out = tmp_path / "recorded.json"
    assert main(_eval(q, tmp_path, "--out", str(out))) == 0  # no --act: the recorded activations are applied
    assert "activations: W8A8, as recorded" in capsys.readouterr().out
    applied = json.loads(out.read_text())["act"]
    assert main(_eval(q, tmp_path, "--act", "W8A8", "--out", str(out), "--force")) == 0
    assert json.loads(out.read_text())["act"] == applied and applied  # the same as asking for it
    capsys.readouterr()
    assert main(_eval(q, tmp_path, "--act", "W8A8", "--smooth", "0.5")) == 2
    assert "base model" in capsys.readouterr().err
    assert main(_eval(q, tmp_path, "--act", "W4A4-rot")) == 2
    assert "--rotate" in capsys.readouterr().err
    assert main(_eval(q, tmp_path, "--act", "A8", "--kv", "8")) == 0
