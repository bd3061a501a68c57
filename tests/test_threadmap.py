"""Per-layer work on several CPU threads (mixq.threadmap): order, thread count, and the same floats as one thread."""
import threading

import pytest
import torch

from mixq.config import parse_spec
from mixq.threadmap import thread_map


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_thread_map_keeps_order_uses_threads_and_restores_the_count(two_threads):
    seen = []

    def f(x):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return x * x

    assert thread_map(f, [3, 1, 2], size=lambda x: x) == [9, 1, 4]
    assert all(name.startswith("mixq-layer") and n == 1 for name, n in seen)
    assert torch.get_num_threads() == 2
    seen.clear()
    assert thread_map(f, [3, 1], parallel=False) == [9, 1]
    assert seen == [(threading.current_thread().name, 2)] * 2


def test_thread_map_passes_an_error_on_and_still_restores_the_count(two_threads):
    def f(x):
        if x == 2:
            raise ValueError("bad item 2")
        return x

    with pytest.raises(ValueError, match="bad item 2"):
        thread_map(f, [1, 2, 3])
    assert torch.get_num_threads() == 2


def test_measurement_and_gptq_walk_on_two_threads_equal_one_thread(tiny_model, two_threads):
    from mixq.api import quantize_model
    from mixq.measure import measure

    cands = [parse_spec(n) for n in ["W2-g32-asym", "W3-g32", "W4-g32", "W8-channel", "FP16"]]
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama")
    got = {}
    for n in (2, 1):
        torch.set_num_threads(n)
        got[n] = measure(model, ids, cands, metric="kfac", algorithm="gptq", grad_samples=4, progress=False)
    for a, b in zip(got[2].layers, got[1].layers):
        assert a.fqn == b.fqn
        assert torch.allclose(torch.tensor(a.errors), torch.tensor(b.errors), rtol=1e-4, atol=0)
    weights = {}
    for n in (2, 1):
        torch.set_num_threads(n)
        m = tiny_model("llama")
        specs = {f"model.layers.{i}.{name}": parse_spec("W4-g32") for i in range(2)
                 for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}
        quantize_model(m, specs, method="gptq", calib_ids=ids, progress=False)
        weights[n] = {f: m.get_submodule(f).weight.detach().clone() for f in specs}
    for f in weights[1]:  # the same grid points, bar a rounding tie flipped by a last-bit difference
        assert (weights[2][f] != weights[1][f]).float().mean() < 0.01, f
    assert torch.get_num_threads() == 1
