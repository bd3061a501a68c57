"""``kfac-kv``: per-token quadratic form on key/value projections, labels sampled from the model (mixq.measure)."""
import pytest
import torch

from mixq.algorithms.rtn import rtn_quantize
from mixq.arch import arch_for, block_linears, get_blocks
from mixq.config import parse_spec
from mixq.measure import measure
from mixq.measure.gradients import gradient_stats
from mixq.measure.metrics import LayerSensitivity, layer_error, per_token_error
from tiny import token_grads


def test_per_token_form_where_kfac_factorisation_fails():
    """A token whose gradient lies along the direction its own input error takes (and others that do not): the
    exact ½ Σ_t (g_t·ΔW x_t)² / T is what kfac-kv returns, while kfac's E[g²]·E[xxᵀ] is off by a large factor."""
    g = torch.Generator().manual_seed(0)
    T, n_in, n_out = 64, 16, 8
    x = torch.randn(T, n_in, generator=g)
    x[0] = 40 * torch.randn(n_in, generator=g)   # a sink-like token with a huge input ...
    gr = torch.randn(T, n_out, generator=g)
    gr[0] = 0.0                                    # ... and no gradient of its own
    gr[1:] *= 0.2
    dW = 0.1 * torch.randn(n_out, n_in, generator=g)
    exact = 0.5 * float(((x @ dW.T) * gr).sum(1).square().sum() / T)
    s = LayerSensitivity(H=x.T @ x / T, G=(gr ** 2).mean(0), Xt=x, Gt=gr / T ** 0.5)
    assert layer_error(dW, s, "kfac-kv") == pytest.approx(exact, rel=1e-5)
    assert per_token_error(dW, x, gr / T ** 0.5, chunk=5) == pytest.approx(exact, rel=1e-5)  # chunking
    assert layer_error(dW, s, "kfac") > 20 * exact
    # without per-token statistics (not a key/value projection) it falls back to kfac-tok / kfac
    assert layer_error(dW, LayerSensitivity(H=s.H, G=s.G), "kfac-kv") == layer_error(dW, s, "kfac")


def test_model_labels_are_seeded_and_differ_from_the_text(tiny_model):
    model = tiny_model("llama")
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    a = gradient_stats(model, ids, labels="model", seed=3, progress=False)
    b = gradient_stats(model, ids, labels="model", seed=3, progress=False)
    c = gradient_stats(model, ids, labels="data", progress=False)
    f = next(iter(a))
    assert torch.equal(a[f]["G"], b[f]["G"])
    assert not torch.allclose(a[f]["G"], c[f]["G"])
    with pytest.raises(ValueError, match="labels must be"):
        gradient_stats(model, ids, labels="text", progress=False)


def test_measured_kfac_kv_is_the_per_token_form_on_keys_and_values(tiny_model):
    """Through the driver on a tiny Llama: k/v entries equal ½ Σ_t (g_t·ΔW x_t)² / N from hooks on the gradient
    rows with the same sampled labels; the other linears carry kfac-tok's errors on those labels."""
    model = tiny_model("llama")
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    spec = parse_spec("W2-g32-asym")
    table = {e.fqn: e.errors[0] for e in
             measure(model, ids, [spec], metric="kfac-kv", algorithm="rtn", grad_samples=2, progress=False).layers}
    arch = arch_for(model)
    assert arch.kv_linears == ("self_attn.k_proj", "self_attn.v_proj")
    grads = gradient_stats(model, ids[:2], labels="model", progress=False)
    n_tok = ids[:2].numel()
    off = []
    for b, block in enumerate(get_blocks(model)):
        for name, lin in block_linears(block, arch).items():
            if name not in arch.kv_linears:
                continue
            x, gr = token_grads(model, lin, ids[:2], labels="model")
            dW = lin.weight.detach() - rtn_quantize(lin.weight.detach(), spec)[1]
            want = 0.5 * float(((x @ dW.T) * gr).sum(1).square().sum() / n_tok)
            fqn = f"{arch.blocks}.{b}.{name}"
            assert table[fqn] == pytest.approx(want, rel=2e-2), fqn  # bf16 storage of x and g
            kfac = layer_error(dW, LayerSensitivity(H=x.T @ x / x.shape[0], G=grads[fqn]["G"]), "kfac")
            off.append(abs(table[fqn] / kfac - 1))
    assert max(off) > 0.1, off  # not what kfac gives on the same labels (on some layer by chance close)


def test_kfac_kv_resumes_to_the_same_table(tiny_model, tmp_path):
    """Sampled labels are seeded, so a measurement resumed after block 0 equals the uninterrupted one."""
    from mixq.allocate import SensitivityTable
    from mixq.measure.driver import _save_partial, measurement_key

    model = tiny_model("llama")
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    specs = [parse_spec("W2-g32-asym"), parse_spec("W4-g32")]
    out = tmp_path / "m.json"
    full = measure(model, ids, specs, metric="kfac-kv", grad_samples=2, out=out, progress=False)
    kept = {e.fqn: e for e in SensitivityTable.load(out).layers if ".0." in e.fqn}
    out.unlink()
    _save_partial(tmp_path / "m.json.partial", measurement_key(model, ids, specs, "kfac-kv", "rtn"), kept)
    resumed = measure(model, ids, specs, metric="kfac-kv", grad_samples=2, out=out, progress=False)
    assert resumed.meta["resumed_layers"] == len(kept) > 0
    assert resumed.to_dict()["layers"] == full.to_dict()["layers"]
