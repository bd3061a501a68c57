"""The packed model's full-precision bf16 linears take torch.mv for one token: the same bits as F.linear."""
import torch
import torch.nn.functional as F
from torch import nn

from mixq.runtime.dense_gemv import GemvLinear, use_gemv


def test_one_bf16_row_takes_mv_with_the_same_bits_and_the_rest_keeps_linear(monkeypatch):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(96, 200, bias=False).to(torch.bfloat16)
    lin.weight.data = torch.randn(200, 96, generator=g).bfloat16()
    calls = []
    real_mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *a: calls.append(1) or real_mv(*a))
    assert use_gemv(lin) == 1 and type(lin) is GemvLinear
    for shape in ((96,), (1, 96), (1, 1, 96)):
        x = torch.randn(*shape, generator=g).bfloat16()
        y = lin(x)
        assert y.shape == (*shape[:-1], 200) and torch.equal(y, F.linear(x, lin.weight))
    assert len(calls) == 3
    # several rows, float32, or a bias: F.linear as before
    x = torch.randn(3, 96, generator=g).bfloat16()
    assert torch.equal(lin(x), F.linear(x, lin.weight))
    lin32 = nn.Linear(96, 8)
    use_gemv(lin32)
    x32 = torch.randn(1, 96, generator=g)
    assert torch.equal(lin32(x32), F.linear(x32, lin32.weight, lin32.bias))
    assert len(calls) == 3


def test_use_gemv_keeps_parameters_ties_and_outputs(tiny_model):
    model = tiny_model("llama").to(torch.bfloat16).eval()
    ids = torch.randint(0, 64, (1, 1))
    with torch.no_grad():
        ref = model(ids).logits
    keys = list(model.state_dict())
    n = use_gemv(model)
    assert n == sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    assert list(model.state_dict()) == keys
    assert all(type(m) is not nn.Linear for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
