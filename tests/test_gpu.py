"""The measurement and the packed layers on a CUDA device agree with the CPU (skipped without one).

The GPU paths are the same code as the CPU ones with tensors elsewhere; what can differ is arithmetic order
(cuBLAS, Cholesky on the device), so the tables are compared with a tolerance, not bit for bit.
"""
import json

import pytest
import torch

from mixq.config import parse_spec
from mixq.measure import measure

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CANDS = [parse_spec(n) for n in ["W2-g32-asym", "W3-g64", "W4-g32", "NF4-g64", "VQ2.5-channel+ip", "FP16"]]


def _close(a, b, rtol: float) -> tuple[list, int]:
    """The numbers of two JSON-like tables that differ by more than ``rtol`` (relative), and how many were compared."""
    bad, n = [], [0]

    def walk(x, y, path):
        if isinstance(x, dict):
            assert set(x) == set(y), path
            for k in x:
                walk(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, list):
            assert len(x) == len(y), path
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        elif isinstance(x, float):
            n[0] += 1
            if abs(x - y) > rtol * max(abs(x), abs(y)) + 1e-12:
                bad.append((path, x, y))
        else:
            assert x == y, (path, x, y)

    walk(a, b, "")
    return bad, n[0]


def test_measure_on_cuda_matches_cpu(tiny_model):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model("llama", layers=2)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    a = measure(model, ids, CANDS, metric="kfac", algorithm="gptq", grad_samples=2, progress=False)
    b = measure(model.cuda(), ids.cuda(), CANDS, metric="kfac", algorithm="gptq", grad_samples=2, progress=False)
    la, lb = a.to_dict()["layers"], b.to_dict()["layers"]
    bad, n = _close(la, lb, rtol=0.05)
    assert n > 50 and len(bad) <= 0.02 * n, bad[:10]


def test_cli_measure_device_cuda(tiny_dir, tmp_path):
    from mixq.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i}: pack my box with five dozen liquor jugs {i * 3}." for i in range(200)))
    cands = tmp_path / "cands.txt"
    cands.write_text("W2-g32-asym\nW4-g32\nVQ3-channel+ip\nW8-channel\nFP16\n")
    common = ["measure", "--model", str(tiny_dir), "--calib", str(corpus), "--nsamples", "2", "--seqlen", "32",
              "--grad-samples", "1", "--algorithm", "gptq", "--candidates", str(cands)]
    assert main([*common, "--out", str(tmp_path / "cpu.json")]) == 0
    assert main([*common, "--device", "cuda", "--out", str(tmp_path / "gpu.json")]) == 0
    assert main([*common, "--device-map", "auto", "--out", str(tmp_path / "map.json")]) == 0
    cpu, gpu, dm = (json.loads((tmp_path / f).read_text()) for f in ("cpu.json", "gpu.json", "map.json"))
    assert cpu["meta"]["model"] == gpu["meta"]["model"] == dm["meta"]["model"]
    for other in (gpu, dm):
        bad, n = _close(cpu["layers"], other["layers"], rtol=0.05)
        assert n > 20 and len(bad) <= 0.02 * n, bad[:10]


@pytest.mark.parametrize("name", ["VQ2-channel", "VQ3-g64", "VQ4-channel"])
def test_vqlinear_auto_on_cuda_is_triton_and_matches_reference(name):
    pytest.importorskip("triton")
    from mixq.algorithms.composite.storage import PackedComposite
    from mixq.algorithms.composite.hooks import quantize_layer
    from mixq.runtime.vq_linear import VQLinear

    W = torch.randn(384, 576, generator=torch.Generator().manual_seed(3))
    qt, Wh, _ = quantize_layer(W, parse_spec(name), None, "rtn")
    lin = VQLinear(PackedComposite.from_qtensor(qt), None, kernel="auto").cuda()
    for M in (1, 16, 70):
        x = torch.randn(M, 576, device="cuda", dtype=torch.bfloat16)
        y = lin(x)
        assert lin.last_kernel == "triton"
        ref = x.float() @ Wh.cuda().T
        assert float((y.float() - ref).abs().max()) < 2e-2 * float(ref.abs().max())


def test_cli_quantize_device_cuda(tiny_dir, tmp_path):
    """``mixq quantize --bpw --device cuda`` (measurement and GPTQ walk on the GPU) writes a directory that loads
    on the CPU and scores close to the CPU run's."""
    from mixq.cli import main
    from mixq.export.native import load_quantized

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i}: pack my box with five dozen liquor jugs {i * 3}." for i in range(200)))
    cands = tmp_path / "cands.txt"
    cands.write_text("W2-g32-asym\nW4-g32\nTCQ3-channel+ip\nW8-channel\n")
    common = ["quantize", "--model", str(tiny_dir), "--calib", str(corpus), "--nsamples", "2", "--seqlen", "32",
              "--grad-samples", "1", "--candidates", str(cands), "--bpw", "4", "--finetune", "none"]
    assert main([*common, "--out", str(tmp_path / "cpu")]) == 0
    assert main([*common, "--device", "cuda", "--out", str(tmp_path / "gpu")]) == 0
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (load_quantized(tmp_path / d)[0](ids).logits for d in ("cpu", "gpu"))
    assert (a - b).abs().max() < 0.05 * a.abs().max()
