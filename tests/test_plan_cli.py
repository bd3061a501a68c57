"""measure → plan → quantize --plan, and quantize --bpw in one go, on a tiny local model."""
import json

import pytest

from mixq.cli import main


def test_measure_plan_quantize(tiny_dir, tmp_path, capsys):
    m = tmp_path / "m.json"
    calib = ["--nsamples", "4", "--seqlen", "32", "--grad-samples", "2"]
    assert main(["measure", "--model", str(tiny_dir), *calib, "--out", str(m)]) == 0
    assert main(["plan", str(m), "--bpw", "3,4.5", "--out", str(tmp_path / "plans")]) == 0
    p3 = json.loads((tmp_path / "plans" / "plan-3bpw.json").read_text())
    p45 = json.loads((tmp_path / "plans" / "plan-4.5bpw.json").read_text())
    assert p3["achieved_bpw"] <= 3.0 < p45["achieved_bpw"] <= 4.5
    capsys.readouterr()
    assert main(["plan", str(m), "--bpw", "3", "--dry-run"]) == 0
    assert "model.layers.0.self_attn.q_proj" in capsys.readouterr().out
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir), "--plan", str(tmp_path / "plans" / "plan-3bpw.json"),
                 "--out", str(out)]) == 0
    info = json.loads((out / "mixq.json").read_text())
    assert info["size"]["bpw_quantized"] == pytest.approx(p3["achieved_bpw"])
    assert (out / "plan.json").exists()


def test_quantize_bpw_in_one_go(tiny_dir, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir), "--bpw", "3.5", "--nsamples", "4", "--seqlen", "32",
                 "--grad-samples", "2", "--method", "gptq", "--out", str(out)]) == 0
    info = json.loads((out / "mixq.json").read_text())
    assert info["size"]["bpw_quantized"] <= 3.5
    from mixq.models import file_sha256

    for name in ("measurement.json", "plan.json"):  # written inside the atomic write, so checksummed with the rest
        assert info["files"][name] == {"size": (out / name).stat().st_size, "sha256": file_sha256(out / name)}


def test_infeasible_budget_names_the_minimum(tiny_dir, tmp_path, capsys):
    m = tmp_path / "m.json"
    assert main(["measure", "--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "32", "--grad-samples", "1",
                 "--out", str(m)]) == 0
    capsys.readouterr()
    assert main(["plan", str(m), "--bpw", "1.0", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "at least bpw=2.2283" in err  # TCQ2-channel+ip1 on every layer (one 32-bit seed each)


def test_plan_for_another_model_is_rejected(tiny_dir, tiny_model, tiny_tokenizer, tmp_path, capsys):
    m = tmp_path / "m.json"
    assert main(["measure", "--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "32", "--grad-samples", "1",
                 "--out", str(m)]) == 0
    assert main(["plan", str(m), "--bpw", "4", "--out", str(tmp_path / "p")]) == 0
    other = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    capsys.readouterr()
    assert main(["quantize", "--model", str(other), "--plan", str(tmp_path / "p" / "plan-4bpw.json"),
                 "--out", str(tmp_path / "q")]) == 2
    assert "not in the model" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_quantize_bpw_resumes_from_a_finished_measurement(tiny_dir, tmp_path, monkeypatch):
    """An interrupt after the measurement (here: in quantize_model) keeps it; the rerun reuses it."""
    import mixq.api
    import mixq.measure

    out = tmp_path / "q"
    args = ["quantize", "--model", str(tiny_dir), "--bpw", "3.5", "--nsamples", "4", "--seqlen", "32",
            "--grad-samples", "2", "--out", str(out)]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(mixq.api, "quantize_model", interrupted)
        assert main(args) != 0  # the CLI reports the interrupt and exits non-zero
    scratch = tmp_path / ".q.measurement.json"
    assert scratch.exists() and not out.exists()
    monkeypatch.setattr(mixq.measure, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert main(args) == 0
    assert (out / "measurement.json").exists() and not scratch.exists()


def test_quantize_interrupted_in_the_finetuning_resumes_without_measuring_or_walking_again(tiny_dir, tmp_path,
                                                                                          monkeypatch, capsys):
    """The measurement and the GPTQ walk's blocks stay beside --out until the fine-tuned output is whole."""
    import mixq.cli.quantize as cq
    import mixq.measure

    out = tmp_path / "q"
    args = ["quantize", "--model", str(tiny_dir), "--bpw", "3.5", "--nsamples", "4", "--seqlen", "32",
            "--grad-samples", "2", "--out", str(out)]
    real = cq._finetune

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(cq, "_finetune", interrupted)
        assert main(args) != 0
    assert (tmp_path / ".q.measurement.json").exists() and (tmp_path / ".q.partial-walk").exists()
    assert not out.exists()
    capsys.readouterr()
    monkeypatch.setattr(mixq.measure, "measure", lambda *a, **k: pytest.fail("measured again"))
    calls = []
    monkeypatch.setattr(cq, "_finetune", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(args) == 0 and calls == [1]
    assert "all 2 blocks of the walk restored" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".q")) == []
    assert (out / "measurement.json").exists()


def test_quantize_bpw_with_rotation_measures_the_rotated_model(tiny_dir, tmp_path):
    """--rotate with --bpw rotates first, so the measurement belongs to the weights that are quantized."""
    out = tmp_path / "qr"
    assert main(["quantize", "--model", str(tiny_dir), "--bpw", "3.5", "--nsamples", "4", "--seqlen", "32",
                 "--grad-samples", "2", "--rotate", "--out", str(out)]) == 0
    info = json.loads((out / "mixq.json").read_text())
    meas = json.loads((out / "measurement.json").read_text())
    from mixq.models import load_model, model_fingerprint

    plain, _ = load_model(str(tiny_dir))
    assert info["rotate"] and info["size"]["bpw_quantized"] <= 3.5
    assert meas["meta"]["model"] != model_fingerprint(plain)  # the rotated weights were measured
