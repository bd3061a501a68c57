"""Block-wise fine-tuning with codes fixed (mixq.distill, `mixq finetune`)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from mixq import api
from mixq.cli import main
from mixq.config import parse_spec
from mixq.distill import FinetuneConfig, finetune_blockwise
from mixq.tunable import TunableLinear, tunable
from mixq.export.native import load_quantized, read_info
from mixq.formats import dequantize
from mixq.algorithms.composite.incoherence import IncoherentQTensor

IDS = torch.randint(4, 99, (16, 24), generator=torch.Generator().manual_seed(0))
SPECS = ["W3-g32", "W3-g32+ip", "W2-g32-asymf", "NF3-g32"]


def _kl(ref, q, ids=IDS):
    with torch.no_grad():
        a, b = torch.log_softmax(ref(ids).logits, -1), torch.log_softmax(q(ids).logits, -1)
    return float((a.exp() * (a - b)).sum(-1).mean())


def _quantized(tiny_model, perturb: float = 1.0):
    ref = tiny_model("llama")
    q = copy.deepcopy(ref)
    fq = list(api.resolve_specs(q, "W4-g32"))
    specs = {f: parse_spec(SPECS[i % len(SPECS)]) for i, f in enumerate(fq)}
    res = api.quantize_model(q, specs, method="rtn", progress=False)
    if perturb != 1.0:  # scales off by a factor: the codes are right, the continuous part is not
        mods = dict(q.named_modules())
        for f, qt in res.qtensors.items():
            inner = qt.inner if isinstance(qt, IncoherentQTensor) else qt
            inner.params.scale = (inner.params.scale * perturb).half().float()
            with torch.no_grad():
                mods[f].weight.copy_(qt.dequantize() if isinstance(qt, IncoherentQTensor) else dequantize(qt))
    return ref, q, res.qtensors


def test_tunable_layers_reproduce_the_stored_weight(tiny_model):
    _, _, qts = _quantized(tiny_model)
    assert all(tunable(qt) for qt in qts.values())
    assert not tunable(api.quantize_model(tiny_model("llama"), {"model.layers.0.mlp.up_proj": parse_spec(
        "W3-g32+o0.5")}, progress=False).qtensors["model.layers.0.mlp.up_proj"])
    for qt in qts.values():
        t = TunableLinear(qt, None)
        want = qt.dequantize() if isinstance(qt, IncoherentQTensor) else dequantize(qt)
        assert torch.allclose(t.weight_hat(), want, atol=1e-5)
        st = t.stored()
        assert type(st) is type(qt) and torch.allclose(
            st.dequantize() if isinstance(st, IncoherentQTensor) else dequantize(st), want, atol=1e-5)


def test_perturbed_scales_are_recovered_and_held_out_decides(tiny_model):
    ref, q, qts = _quantized(tiny_model, perturb=1.3)
    before = _kl(ref, q)
    new, rep = finetune_blockwise(q, ref, qts, IDS, FinetuneConfig(epochs=6, lr=2e-2, batch=4), progress=False)
    after = _kl(ref, q)
    assert after < 0.5 * before, (before, after)
    for b in rep["blocks"]:
        assert b["held_out_after"] == min(b["held_out"]) and b["held_out_after"] <= b["held_out_before"]
        assert b["held_out"][b["epoch_kept"]] == b["held_out_after"] and len(b["train"]) == 6
    assert rep["rows"] == {"train": 12, "held_out": 4}
    # the stored parts hold what the model computes with (scales rounded to fp16)
    mods = dict(q.named_modules())
    for f, qt in new.items():
        w = qt.dequantize() if isinstance(qt, IncoherentQTensor) else dequantize(qt)
        assert torch.allclose(mods[f].weight, w, atol=1e-6)
        assert qt.params.scale.half().float().equal(qt.params.scale) if not isinstance(qt, IncoherentQTensor) else True


def test_resume_gives_the_same_result(tiny_model, tmp_path, monkeypatch):
    import mixq.distill as d

    cfg = FinetuneConfig(epochs=2, lr=1e-2, batch=4)
    ref, q, qts = _quantized(tiny_model, perturb=1.2)
    q2 = copy.deepcopy(q)
    want, _ = finetune_blockwise(q, ref, qts, IDS, cfg, progress=False)
    calls = {"n": 0}
    real = d._train_block

    def once(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(d, "_train_block", once)
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        finetune_blockwise(copy.deepcopy(q2), ref, qts, IDS, cfg, checkpoint=ck, progress=False)
    assert (ck / "block-0.json").exists() and not (ck / "block-1.json").exists()
    monkeypatch.setattr(d, "_train_block", real)
    got, rep = finetune_blockwise(q2, ref, qts, IDS, cfg, checkpoint=ck, progress=False)
    assert not ck.exists()
    for f in want:
        a, b = want[f], got[f]
        a, b = (a.inner, b.inner) if isinstance(a, IncoherentQTensor) else (a, b)
        assert torch.equal(a.params.scale, b.params.scale), f


@pytest.mark.parametrize("spec", ["W3-g32+ip", "VQ3-channel+ip", "TCQ2.5-channel+ip"])
def test_cli_finetune(tiny_dir, tmp_path, capsys, spec):
    calib = tmp_path / "c.txt"
    calib.write_text("the market said shares rose in heavy trading as investors bought bank stocks .\n" * 60)
    src = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir), "--spec", spec, "--method", "rtn", "--out", str(src)]) == 0
    out = tmp_path / "ft"
    args = ["finetune", str(src), "--calib", str(calib), "--nsamples", "8", "--seqlen", "16", "--epochs", "2",
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "blocks changed" in printed and "end-to-end: held-out KL" in printed
    info = read_info(out)
    e2e = info["finetune"]["e2e"]
    assert e2e["held_out_after"] <= e2e["held_out_before"] and e2e["layers_tuned"] > 0
    assert info["finetune"]["rows"] == {"train": 6, "held_out": 2} and len(info["finetune"]["blocks"]) == 2
    assert info["recipe"]["name"] and (tmp_path / "ft" / "finetune.png").stat().st_size > 0
    model, tok, _ = load_quantized(out)
    assert tok is not None
    assert main(args) == 2  # an existing --out is refused
    assert main(["finetune", str(src), "--out", str(src), "--force"]) == 2
    assert json.loads((src / "mixq.json").read_text())["format"]  # the source is untouched


@pytest.mark.parametrize("flags", [[], ["--finetune", "block"]])
def test_quantize_with_finetune(tiny_dir, tmp_path, flags, monkeypatch):
    """`mixq quantize` fine-tunes by default (the recipe's end-to-end stage; `--finetune block` the block-wise one)
    from a scratch directory it removes, on the rows it quantized with (the corpus is tokenised once)."""
    from collections import Counter

    import mixq.data

    seen = Counter()
    tokenize = mixq.data.tokenize
    monkeypatch.setattr(mixq.data, "tokenize",
                        lambda text, *a, **k: (seen.update([hash(text)]), tokenize(text, *a, **k))[1])
    calib = tmp_path / "c.txt"
    calib.write_text("shares rose in heavy trading as investors bought bank stocks and bonds .\n" * 60)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir), "--bpw", "3.5", "--calib", str(calib), "--nsamples", "8",
                 "--seqlen", "16", "--grad-samples", "2", *flags,
                 *(["--finetune-samples", "8"] if flags else []),  # without it: the --nsamples rows themselves
                 "--out", str(out)]) == 0
    info = read_info(out)
    assert info["method"] == "gptq" and info["recipe"]["deviations"].get("finetune") == ("block" if flags else None)
    ft = info["finetune"]
    assert ("blocks" in ft) == bool(flags) and ("e2e" in ft) != bool(flags)
    assert (ft["rows"] if flags else ft["e2e"]["rows"])["train"] == 6 and (out / "plan.json").exists()
    assert (out / "finetune.png").exists() and info["finetune"]["plot"].endswith("finetune.png")
    assert not list(tmp_path.glob(".q.*"))  # no scratch left behind
    assert ft["calibration"] == info["calibration"] and list(seen.values()) == [1]


def test_end_to_end_stage_lowers_kl_and_keeps_the_best_epoch(tiny_model):
    from mixq.distill_e2e import E2EConfig, finetune_e2e

    ref, q, qts = _quantized(tiny_model, perturb=1.3)
    before = _kl(ref, q)
    new, rep = finetune_e2e(q, ref, qts, IDS, E2EConfig(epochs=4, lr=3e-3, batch=1), progress=False)
    after = _kl(ref, q)
    assert after < 0.5 * before, (before, after)
    assert rep["held_out_after"] == min(rep["held_out"]) and rep["held_out"][rep["epoch_kept"]] == rep["held_out_after"]
    assert len(rep["train"]) == 4 and rep["rows"] == {"train": 12, "held_out": 4}
    mods = dict(q.named_modules())
    for f, qt in new.items():  # the original linears are back, holding exactly the stored (rounded) weights
        assert type(mods[f]) is torch.nn.Linear
        w = qt.dequantize() if isinstance(qt, IncoherentQTensor) else dequantize(qt)
        assert torch.allclose(mods[f].weight, w, atol=1e-6)
    assert not any(p.requires_grad for p in q.parameters())


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_end_to_end_amp_autocasts_only_the_training_forward(tiny_model, monkeypatch, amp):
    """``amp="bf16"``: the quantized model's training forward runs under bf16 autocast and still recovers
    perturbed scales; the teacher and the held-out KL run in float32 either way; the report names what ran."""
    import mixq.distill_e2e as e
    from mixq.amp import resolve

    seen = []
    real = e._logits

    def spy(model, ids):
        seen.append((model is q, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return real(model, ids)

    monkeypatch.setattr(e, "_logits", spy)
    ref, q, qts = _quantized(tiny_model, perturb=1.3)
    before = _kl(ref, q)
    _, rep = e.finetune_e2e(q, ref, qts, IDS, e.E2EConfig(epochs=4, lr=3e-3, batch=1, amp=amp), progress=False)
    assert _kl(ref, q) < 0.5 * before
    assert rep["amp"] == amp and rep["config"]["amp"] == amp
    training = [a for student, grad, a in seen if student and grad]
    assert len(training) == 4 * 12 and all(a == (amp == "bf16") for a in training)
    assert not any(a for student, grad, a in seen if not (student and grad))  # teacher, held-out: float32
    assert resolve("auto", "cpu") in ("bf16", "off") and resolve("off", "cpu") == "off"
    with pytest.raises(ValueError, match="unknown amp mode"):
        e.E2EConfig(amp="fp8")


def test_end_to_end_keeps_epoch_zero_when_training_hurts(tiny_model):
    from mixq.distill_e2e import E2EConfig, finetune_e2e

    ref, q, qts = _quantized(tiny_model)
    w0 = {n: p.detach().clone() for n, p in q.named_parameters()}
    _, rep = finetune_e2e(q, ref, qts, IDS, E2EConfig(epochs=1, lr=5.0, norm_lr=5.0, batch=4), progress=False)
    assert rep["epoch_kept"] == 0 and rep["held_out"][1] > rep["held_out"][0]
    for n, p in q.named_parameters():  # nothing changed beyond the fp16 rounding of the unchanged scales
        assert torch.allclose(p, w0[n], atol=1e-6), n


def test_end_to_end_resumes_from_the_last_epoch(tiny_model, tmp_path, monkeypatch):
    import mixq.distill_e2e as e

    cfg = e.E2EConfig(epochs=2, lr=1e-2, batch=4)
    ref, q, qts = _quantized(tiny_model, perturb=1.2)
    q2 = copy.deepcopy(q)
    ck = tmp_path / "ck"
    real, calls = e._val, {"n": 0}

    def stop_after_first_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # before, after epoch 1, then epoch 2's: interrupted there
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(e, "_val", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        e.finetune_e2e(copy.deepcopy(q), ref, qts, IDS, cfg, checkpoint=ck, progress=False)
    assert (ck / "block-1.json").exists() and not (ck / "block-2.json").exists()
    monkeypatch.setattr(e, "_val", real)
    _, rep = e.finetune_e2e(q2, ref, qts, IDS, cfg, checkpoint=ck, progress=False)
    assert len(rep["train"]) == 2 and not ck.exists()


@pytest.mark.parametrize("spec", ["VQ3-channel+ip", "TCQ3-channel+ip", "TCQ3-channel+ip1"])
def test_codebook_layers_tune_their_scales(tiny_model, spec):
    """VQ+ip and TCQ+ip layers (codes / bits fixed, codebook / table fixed): the row scales are tunable, a
    perturbed scale is recovered, and the stored parts (scales rounded to fp16) decode to the weight the model
    computes with."""
    from dataclasses import replace

    ref = tiny_model("llama")
    q = copy.deepcopy(ref)
    specs = {f: parse_spec(spec) for f in api.resolve_specs(q, "W4-g32")}
    qts = api.quantize_model(q, specs, method="rtn", progress=False).qtensors
    mods = dict(q.named_modules())
    for f, qt in qts.items():
        assert tunable(qt)
        t = TunableLinear(qt, None)
        assert torch.allclose(t.weight_hat(), qt.dequantize(), atol=1e-5)
        qts[f] = replace(qt, inner=replace(qt.inner, scale=(qt.inner.scale * 1.3).half().float()))
        with torch.no_grad():
            mods[f].weight.copy_(qts[f].dequantize())
    before = _kl(ref, q)
    new, _ = finetune_blockwise(q, ref, qts, IDS, FinetuneConfig(epochs=6, lr=2e-2, batch=4), progress=False)
    after = _kl(ref, q)
    assert after < 0.5 * before, (before, after)
    for f, qt in new.items():
        codes = "codes" if hasattr(qt.inner, "codes") else "bits"
        assert getattr(qt.inner, codes).equal(getattr(qts[f].inner, codes))
        assert qt.inner.scale.half().float().equal(qt.inner.scale)
        assert torch.allclose(mods[f].weight, qt.dequantize(), atol=1e-6)


@pytest.mark.parametrize("spec", ["VQ3-channel+ip", "TCQ3-channel+ip", "TCQ3-g32+ip", "TCQ3-channel+ip1"])
def test_row_scaled_ip_layers_run_on_their_fixed_basis(tiny_model, spec):
    """With one scale per row, a tunable ``+ip`` codebook layer computes ``((x Vᵀ) · s) Q_out`` on the fixed
    ``V = U Q_in`` (fp16) instead of transforming its weight every step: the output and the scale gradient of the
    dense ``F.linear(x, Ŵ)`` to fp16's rounding; grouped scales keep the dense path."""
    ref = tiny_model("llama")
    f = "model.layers.0.mlp.up_proj"
    qt = api.quantize_model(ref, {f: parse_spec(spec)}, method="rtn", progress=False).qtensors[f]
    t = TunableLinear(qt, torch.randn(qt.shape[0]))
    assert t.basis == spec.endswith(("channel+ip", "channel+ip1"))
    with torch.no_grad():
        t.theta.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, qt.shape[1], generator=torch.Generator().manual_seed(2))
    y = t(x)
    y.square().sum().backward()
    g = t.theta.grad.clone()
    t.theta.grad = None
    dense = torch.nn.functional.linear(x, t.weight_hat(), t.bias)
    dense.square().sum().backward()
    tol = 2e-3 if t.basis else 1e-5  # the basis is kept in fp16
    assert torch.allclose(y, dense, atol=tol * float(dense.detach().abs().max()), rtol=tol)
    assert torch.allclose(g, t.theta.grad, atol=10 * tol * float(t.theta.grad.abs().max()), rtol=10 * tol)


def test_chunked_kl_loss_matches_the_direct_one():
    """The end-to-end loss, computed a few tokens at a time, equals KL(p_ref ‖ p_q) and its gradient in the
    quantized model's logits over more tokens than one chunk."""
    import torch.nn.functional as F

    from mixq.distill_e2e import KL_CHUNK, kl_loss

    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, KL_CHUNK + 7, 40, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, KL_CHUNK + 7, 40, generator=g, dtype=torch.float64)
    want = F.kl_div(F.log_softmax(a.reshape(-1, 40), -1), F.log_softmax(b.reshape(-1, 40), -1), log_target=True,
                    reduction="batchmean")
    got = kl_loss(a, b)
    (2 * got).backward()
    grad = a.grad.clone()
    a.grad = None
    (2 * want).backward()
    assert abs(float(got.detach()) - float(want.detach())) < 1e-6 and torch.allclose(grad, a.grad, atol=1e-9)
