"""``kfac-tok``: kfac with each token's input weighted by its own output-gradient energy (mixq.measure.metrics)."""
import pytest
import torch

from mixq.algorithms.rtn import rtn_quantize
from mixq.arch import arch_for, block_linears, get_blocks
from mixq.config import parse_spec
from mixq.measure import measure
from mixq.measure.metrics import LayerSensitivity, layer_error
from tiny import token_grads


def test_token_without_gradient_does_not_count():
    """A token with huge activations and no gradient (an attention sink after a norm) dominates H, so kfac's
    E[g²]·E[xxᵀ] predicts a large error the loss never sees; kfac-tok is unchanged by that token and equals the
    per-token error ½ E_t Σ_o g_to² (ΔW x_t)_o² when g² is rank one over tokens and outputs."""
    g = torch.Generator().manual_seed(0)
    T, n_in, n_out = 64, 16, 8
    x = torch.randn(T, n_in, generator=g)
    x[0] = 50 * torch.randn(n_in, generator=g)           # the sink: huge input ...
    a = torch.rand(T, generator=g) + 0.5
    a[0] = 0.0                                              # ... and no gradient
    b = torch.rand(n_out, generator=g) + 0.5
    g2 = a[:, None] * b[None, :]                            # g_to² = a_t b_o
    dW = 0.1 * torch.randn(n_out, n_in, generator=g)
    exact = 0.5 * float((g2 * (x @ dW.T) ** 2).sum() / T)
    G = g2.mean(0)
    H = x.T @ x / T
    w = g2.sum(1)
    Hg = (x * w[:, None]).T @ x / w.sum()
    tok = layer_error(dW, LayerSensitivity(H=H, G=G, Hg=Hg), "kfac-tok")
    assert abs(tok - exact) < 1e-4 * exact
    assert layer_error(dW, LayerSensitivity(H=H, G=G), "kfac") > 20 * exact  # what kfac makes of the sink
    assert layer_error(dW, LayerSensitivity(H=H, G=G), "kfac-tok") == layer_error(dW, LayerSensitivity(H=H, G=G), "kfac")


def test_measured_kfac_tok_equals_per_token_weights(tiny_model):
    """Through the driver: the walk's rows line up with the gradient rows (H_g from the first grad_samples rows,
    each token weighted by Σ_o g_to² of that layer), on a tiny Llama."""
    model = tiny_model("llama")
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    spec = parse_spec("W2-g32-asym")
    table = measure(model, ids, [spec], metric="kfac-tok", algorithm="rtn", grad_samples=2, progress=False)
    arch = arch_for(model)
    fqn, lin = next((f"{arch.blocks}.1.{n}", m) for n, m in block_linears(get_blocks(model)[1], arch).items()
                    if n.endswith("down_proj"))
    x, g = token_grads(model, lin, ids[:2])
    g2 = g ** 2
    w = g2.sum(1)
    Hg = (x * w[:, None]).T @ x / w.sum()
    dW = lin.weight.detach() - rtn_quantize(lin.weight.detach(), spec)[1]
    want = layer_error(dW, LayerSensitivity(G=g2.mean(0), Hg=Hg, H=Hg), "kfac-tok")
    got = next(e for e in table.layers if e.fqn == fqn).errors[0]
    assert abs(got - want) < 1e-4 * want


def test_kfac_pos_is_kfac_on_keys_and_values_and_kfac_tok_elsewhere(tiny_model):
    """``kfac-pos`` from one measurement: the arch's key/value projections carry kfac's errors, every other block
    linear kfac-tok's (same rows, same candidates)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    specs = [parse_spec("W2-g32-asym"), parse_spec("W4-g32")]
    got = {m: {e.fqn: e.errors for e in measure(model, ids, specs, metric=m, algorithm="rtn", grad_samples=2,
                                                  progress=False).layers}
           for m in ("kfac", "kfac-tok", "kfac-pos")}
    kv = arch_for(model).kv_linears
    assert kv == ("self_attn.k_proj", "self_attn.v_proj")
    n_kv = 0
    for fqn, errs in got["kfac-pos"].items():
        is_kv = any(fqn.endswith("." + n) for n in kv)
        n_kv += is_kv
        want = got["kfac" if is_kv else "kfac-tok"][fqn]
        assert errs == pytest.approx(want, rel=1e-6), fqn
        if is_kv:  # the two metrics do differ there, so the test sees which one was used
            assert got["kfac-tok"][fqn] != pytest.approx(want, rel=1e-3), fqn
    assert n_kv == 2 * len(get_blocks(model))
