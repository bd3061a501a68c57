"""bf16 autocast of the calibration walks and the gradient pass (``--walk-amp``): the model's products and the
walks' Gram products go bf16, GPTQ's own arithmetic stays float32, and the mode is part of what a measurement or a
walk checkpoint is of."""
import pytest
import torch

from mixq.amp import full_precision
from mixq.arch import arch_for, block_linears, get_blocks
from mixq.calib.capture import walk_blocks
from mixq.calib.checkpoint import walk_key
from mixq.calib.stats import LayerStats, gram
from mixq.cli import build_parser
from mixq.config import parse_spec
from mixq.measure import measurement_key
from mixq.measure.gradients import gradient_stats, sample_labels
from mixq.recipe import DEFAULT_RECIPE, recipe_record


def _ids(n=4, L=16, seed=0):
    return torch.randint(0, 100, (n, L), generator=torch.Generator().manual_seed(seed))


def test_gram_products_follow_the_walk():
    """float32 products outside autocast; bf16 ones inside a bf16 autocast region (a walk under ``--walk-amp``),
    still summed in float64; ``full_precision`` turns autocast off for code inside such a region."""
    x = torch.randn(300, 96, generator=torch.Generator().manual_seed(1))
    want = x.double().T @ x.double()
    rel = lambda a: float((a - want).abs().max() / want.abs().max())  # noqa: E731
    assert gram(x).dtype == torch.float64 and rel(gram(x)) < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gram(x)
        assert (x @ x.T).dtype == torch.bfloat16
        with full_precision("cpu"):
            assert (x @ x.T).dtype == torch.float32
    assert got.dtype == torch.float64 and 1e-5 < rel(got) < 1e-2
    torch.testing.assert_close(got, (x.bfloat16().T @ x.bfloat16()).double())


def _autocast_seen(model):
    """Forward hooks on every block linear recording whether autocast was on when it ran."""
    seen, hooks = [], []
    for block in get_blocks(model):
        for m in block_linears(block, arch_for(model)).values():
            hooks.append(m.register_forward_hook(lambda mod, a, o: seen.append(torch.is_autocast_enabled("cpu"))))
    return seen, hooks


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_walk_autocasts_the_block_forwards_not_the_callback(tiny_model, amp):
    model = tiny_model("llama")
    ids = _ids()
    seen, hooks = _autocast_seen(model)
    in_callback, got = [], {}

    def on_block(i, block, stats):
        in_callback.append(torch.is_autocast_enabled("cpu"))
        got.update({f"{i}.{n}": s for n, s in stats.items()})

    walk_blocks(model, ids, on_block, progress=False, amp=amp)
    for h in hooks:
        h.remove()
    assert seen and all(s == (amp == "bf16") for s in seen)
    assert in_callback and not any(in_callback)  # GPTQ's own arithmetic stays float32
    # the statistics are of what the linears saw (q_proj reads the norm's float32 output), bf16 products in bf16
    ref = LayerStats(got["0.self_attn.q_proj"].H.shape[0])
    block0, arch = get_blocks(model)[0], arch_for(model)
    h = block_linears(block0, arch)["self_attn.q_proj"].register_forward_hook(lambda m, a, o: ref.update(a[0]))
    with torch.no_grad():
        for s in range(ids.shape[0]):
            model(ids[s : s + 1], use_cache=False)
    h.remove()
    H, tol = got["0.self_attn.q_proj"].H, 1e-5 if amp == "off" else 1e-2  # bf16 products in a bf16 walk
    torch.testing.assert_close(H, ref.H, rtol=tol, atol=tol * float(ref.H.abs().max()))
    assert (amp == "off") == torch.allclose(H, ref.H, rtol=1e-5, atol=1e-6)


def test_gradient_pass_under_bf16_is_close_to_float32(tiny_model):
    model = tiny_model("llama")
    ids = _ids(4, 32)
    seen, hooks = _autocast_seen(model)
    bf = gradient_stats(model, ids, labels="model", progress=False, amp="bf16")
    n_bf16 = len(seen)
    fp = gradient_stats(model, ids, labels="model", progress=False, amp="off")
    for h in hooks:
        h.remove()
    assert all(seen[:n_bf16]) and not any(seen[n_bf16:])
    for f in fp:
        g0, g1 = fp[f]["G"], bf[f]["G"]
        assert g1.dtype == torch.float32 and torch.isfinite(g1).all()
        assert float((g1 - g0).norm() / g0.norm()) < 0.15, f


def test_sample_labels_follow_the_softmax_and_the_seed():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2)) * 2
    a = sample_labels(logits, torch.Generator().manual_seed(7))
    assert a.shape == (4,) and a.dtype == torch.int64
    assert torch.equal(a, sample_labels(logits, torch.Generator().manual_seed(7)))
    rows = logits[:1].expand(40000, -1)
    counts = torch.bincount(sample_labels(rows, torch.Generator().manual_seed(3)), minlength=50).double() / 40000
    p = torch.softmax(logits[0].double(), -1)
    assert float((counts - p).abs().max()) < 0.01
    assert int(sample_labels(torch.tensor([[0.0, -1e9, -1e9]]), torch.Generator().manual_seed(0))) == 0


def test_amp_is_part_of_the_measurement_and_walk_keys(tiny_model):
    model = tiny_model("llama")
    ids = _ids()
    off = measurement_key(model, ids, [], "kfac", "rtn", "off")
    bf = measurement_key(model, ids, [], "kfac", "rtn", "bf16")
    assert "amp" not in off and bf == {**off, "amp": "bf16"}
    assert walk_key(model, ids, {}, amp="bf16") == {**walk_key(model, ids, {}), "amp": "bf16"}


def test_a_finished_measurement_of_another_amp_is_measured_again(tiny_model, tmp_path):
    from mixq.allocate import LayerEntry, SensitivityTable
    from mixq.budget_stage import _finished

    model = tiny_model("llama")
    ids = _ids()
    path = tmp_path / "m.json"
    entry = LayerEntry("x", (4, 4), (parse_spec("W4-g4"),), (1.0,))
    SensitivityTable([entry], "kfac", measurement_key(model, ids, [], "kfac", "rtn", "bf16")).save(path)
    assert _finished(path, model, ids, [], "kfac", "rtn", "bf16") is not None
    assert _finished(path, model, ids, [], "kfac", "rtn", "off") is None


def test_amp_flags_come_from_the_recipe():
    for argv in (["quantize", "--bpw", "3", "--out", "x"], ["measure", "--out", "m.json"]):
        assert build_parser().parse_args(argv).walk_amp == DEFAULT_RECIPE["walk_amp"] == "auto"
    for argv in (["quantize", "--bpw", "3", "--out", "x"], ["finetune", "d", "--out", "o"]):
        assert build_parser().parse_args(argv).e2e_amp == DEFAULT_RECIPE["e2e_amp"] == "auto"
    args = build_parser().parse_args(["quantize", "--bpw", "3", "--walk-amp", "off", "--out", "x"])
    assert args.walk_amp == "off" and recipe_record(args)["deviations"] == {"walk_amp": "off"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "d", "--walk-amp", "bf16", "--out", "o"])


def test_an_unknown_amp_mode_is_refused_before_any_work(tiny_model):
    from mixq import api

    with pytest.raises(ValueError, match="unknown amp mode 'fp8'"):
        api.quantize_model(tiny_model("llama"), {}, method="gptq", calib_ids=_ids(), amp="fp8")
