"""GPTQ toward the full-precision model's outputs (``gptq_target="fp"``): the cross statistics, the retargeted
weight and the walk that carries both streams."""
import copy

import pytest
import torch

from mixq import api
from mixq.algorithms.gptq import fp_target
from mixq.calib.capture import walk_blocks
from mixq.calib.stats import LayerStats
from tiny import make_tiny


def test_cross_statistics_are_the_drift_times_the_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 50, 8)
    x_fp = x + 0.1 * torch.randn(2, 50, 8)
    s = LayerStats(8)
    s.update(x[0])
    s.update_cross(x_fp[0], x[0])
    s.update(x[1])
    s.update_cross(x_fp[1], x[1])
    X, Xf = x.reshape(-1, 8), x_fp.reshape(-1, 8)
    assert torch.allclose(s.D, (Xf - X).T @ X / 100, atol=1e-6)
    assert torch.allclose(s.H, X.T @ X / 100, atol=1e-6)


def test_cross_statistics_refuse_unpaired_inputs():
    s = LayerStats(4)
    s.update(torch.randn(10, 4))
    s.update_cross(torch.randn(9, 4), torch.randn(10, 4))  # an expert routed differently in the two models
    assert s.D is None
    t = LayerStats(4)
    t.update(torch.randn(10, 4))
    t.update_cross(None, torch.randn(10, 4))
    assert t.D is None
    u = LayerStats(4)
    u.update(torch.randn(10, 4))  # tokens without a cross pair: D would not match H's tokens
    assert u.D is None


def test_fp_target_is_the_least_squares_weight():
    torch.manual_seed(1)
    N, din, dout = 4000, 16, 6
    X = torch.randn(N, din, dtype=torch.float64)
    Xq = X + 0.2 * torch.randn(N, din, dtype=torch.float64)   # the drifted inputs
    W = torch.randn(dout, din, dtype=torch.float64)
    H, D = Xq.T @ Xq / N, (X - Xq).T @ Xq / N
    got = fp_target(W.float(), H.float(), D.float(), damp=1e-9).double()
    want = torch.linalg.lstsq(Xq, X @ W.T).solution.T           # argmin ‖X Wᵀ - X̃ W*ᵀ‖
    assert torch.allclose(got, want, atol=1e-3)
    assert torch.equal(fp_target(W.float(), H.float(), torch.zeros_like(D).float()), W.float())  # no drift: W


def _cross_stats_seen(family: str, rows: int, length: int) -> dict[int, dict]:
    """Each block's ``D`` per linear in a walk with the fp stream that rounds every weight (so inputs drift)."""
    torch.manual_seed(0)
    model = make_tiny(family)
    ids = torch.randint(0, model.config.vocab_size, (rows, length))
    seen = {}

    def on_block(i, block, stats):
        seen[i] = {n: st.D for n, st in stats.items()}
        for m in block.modules():  # nn.Linear and GPT-2's Conv1D
            if getattr(m, "weight", None) is not None and m.weight.dim() == 2:
                m.weight.data = m.weight.data.round()

    walk_blocks(model, ids, on_block, fp_stream=True, progress=False)
    return seen


def test_walk_carries_the_fp_stream():
    seen = _cross_stats_seen("llama", 4, 32)
    first = seen[0]["self_attn.q_proj"]
    assert first is not None and float(first.abs().max()) == 0.0  # block 0's inputs are the fp model's
    later = seen[1]["self_attn.q_proj"]
    assert later is not None and float(later.abs().max()) > 0.0
    # only the layers that read the block's own input: the others' inputs depend on this block's own layers
    assert all(seen[1][n] is not None for n in ("self_attn.k_proj", "self_attn.v_proj"))
    assert all(seen[1][n] is None for n in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


def test_quantize_model_fp_target_fits_the_calibration_outputs_better():
    torch.manual_seed(0)
    base = make_tiny("llama")
    ids = torch.randint(0, base.config.vocab_size, (8, 64))
    with torch.no_grad():
        ref = base(ids).logits.log_softmax(-1)
    kl = {}
    for target in ("quantized", "fp"):
        m = copy.deepcopy(base)
        api.quantize_model(m, api.resolve_specs(m, "W2-g32"), method="gptq", calib_ids=ids, progress=False,
                           gptq_target=target)
        with torch.no_grad():
            lq = m(ids).logits.log_softmax(-1)
        kl[target] = float((ref.exp() * (ref - lq)).sum(-1).mean())
    assert kl["fp"] < kl["quantized"]
    with pytest.raises(ValueError, match="gptq_target"):
        api.quantize_model(copy.deepcopy(base), {}, method="gptq", calib_ids=ids, gptq_target="teacher")


def test_fused_qkv_reads_the_block_input():
    seen = _cross_stats_seen("gpt2", 2, 16)
    assert seen[1]["attn.c_attn"] is not None
    assert all(seen[1][n] is None for n in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
