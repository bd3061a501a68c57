"""VQ bases (mixq.algorithms.composite.vq): codebooks, exact cost, round trips, GPTQ feedback, storage and kernels."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixq.config import CompositeSpec, parse_spec
from mixq.algorithms.composite.storage import PackedComposite
from mixq.algorithms.composite.hooks import quantize_layer
from mixq.algorithms.composite.incoherence import IncoherentQTensor
from mixq.algorithms.composite.vq import quantize_vq
from mixq.formats.composite.vq_storage import VQQTensor, decode
from mixq.algorithms.composite.vq_search import _lloyd_max_1d, generate, mse, nearest
from mixq.formats.composite.vq_codebook import available, codebook, to_hex
from mixq.runtime.kernels import vq_cpu
from mixq.runtime.vq_linear import VQLinear

# sha256 of the fp16 bytes of each committed codebook: a changed table would change every stored model's decoding
PINNED = {
    (2, 4): "a754fb64c2c29d486175d1c96ce3f8fab645b5364500fdbf710c70e6c46bd74b",
    (2, 5): "172bedf4816f7c21b72be344a3a963ac7e59bf7718560d2adbb92059cfa16d6b",
    (2, 6): "d807f0b1a36280174dcd9c5eb8722715c9574122540214ed62b550d9092c7e6c",
    (2, 7): "79d3e5fe781b1de74e3b2f244745a79e4e224d4b4af995263a93977247263ab4",
    (2, 8): "ebff149d1d3cb0384772a2f256a44469fc0d2069cad9f61f22de4739d0d8376a",
    (4, 8): "2afffe8d3c515ad416d0c7b6cec3d3973fcf71065efc542f12734cc1a8eec080",
}


def _hess(C: int, n: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, C, generator=g) @ (torch.randn(C, C, generator=g) / C ** 0.5 + torch.eye(C))
    X[:, :4] *= 6  # a few loud input channels, as real layers have
    return X.T @ X / n


def _proxy(W, Wh, H):
    d = (W - Wh).double()
    return float(((d @ H.double()) * d).sum())


def test_grammar_name_roundtrip_and_cost_formula():
    for name, d, k in (("VQ2.5-g64+ip", 2, 5), ("VQ3-g64", 2, 6), ("VQ2x4-g64+ip", 4, 8), ("VQ4-channel+ip", 2, 8)):
        s = parse_spec(name)
        assert isinstance(s, CompositeSpec) and (s.vq_dim, s.vq_bits) == (d, k)
        assert s.name == name and parse_spec(s.name) == s and CompositeSpec.from_dict(s.to_dict()) == s
    s = parse_spec("VQ2.5-g64+ip")
    c = s.cost((192, 576))
    # codes R * C * 2.5, fp16 scale per 64-group, 64 seed bits of +ip: hand-computed
    assert (c.codes, c.scales, c.total) == (192 * 576 * 5 // 2, 192 * 9 * 16, 192 * 576 * 5 // 2 + 192 * 9 * 16 + 64)
    assert parse_spec("VQ3-channel").cost((8, 64)).total == 8 * 32 * 6 + 8 * 16
    for bad in ("VQ2.25", "VQ3-g64+o0.5", "VQ3-g64-asym", "VQ3x2-g63"):
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_codebooks_pinned_deterministic_and_better_than_scalar():
    assert set(PINNED) <= set(available())
    for (d, k), digest in PINNED.items():
        C = codebook(d, k)
        assert C.shape == (2 ** k, d)
        assert torch.equal(C, C.half().float()) and len({tuple(r) for r in C.tolist()}) == 2 ** k
        assert hashlib.sha256(bytes.fromhex(to_hex(C))).hexdigest() == digest
    # 2-D at 2 bits / weight beats the scalar Lloyd-Max quantizer of 2 bits (0.1175 per dimension)
    x = torch.randn(1 << 15, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    q1 = _lloyd_max_1d(4)
    scalar = float(((x[:, 0] - q1[nearest(x, q1[:, None])]) ** 2).mean())
    assert mse(2, 4) < 0.95 * scalar
    assert mse(2, 4) > mse(2, 5) > mse(2, 6) > mse(2, 7) > mse(2, 8)


@pytest.mark.integration  # ~20 s of Lloyd iterations
def test_generate_reproduces_committed_table():
    # the committed table is what generate() computes (k = 4: the cheap one)
    assert torch.equal(generate(2, 4), codebook(2, 4))


def test_nearest_is_exact_argmin():
    g = torch.Generator().manual_seed(1)
    x, C = torch.randn(500, 2, generator=g), codebook(2, 5)
    brute = torch.cdist(x, C).argmin(1)
    assert torch.equal(nearest(x, C), brute)


@pytest.mark.parametrize("name", ["VQ2-g64", "VQ2.5-g32+ip", "VQ3-channel"])
def test_encode_decode_roundtrip_and_stored_bits(name):
    spec = parse_spec(name)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    qt, Wh, _ = quantize_layer(W, spec, None, "rtn")
    inner = qt.inner if isinstance(qt, IncoherentQTensor) else qt
    assert isinstance(inner, VQQTensor)
    assert torch.equal(qt.dequantize(), Wh)
    assert qt.stored_bits() == spec.cost((64, 128)).total
    packed = PackedComposite.from_qtensor(qt)
    assert sum(t.numel() * t.element_size() * 8 for t in packed.tensors().values()) - spec.cost((64, 128)).total < 8 * 3
    again = PackedComposite.from_tensors(packed.tensors(), spec, (64, 128))
    assert torch.equal(again.dequantize(), Wh)
    # re-encoding the decoded codes' own vectors gives the same codes (nearest of an entry is itself)
    s = inner.scale.repeat_interleave(inner.shape[1] // inner.scale.shape[1], 1)
    re = nearest((decode(inner.codes, inner.scale, codebook(2, spec.vq_bits), 128 // inner.scale.shape[1]) / s)
                 .reshape(-1, 2), codebook(2, spec.vq_bits))
    assert torch.equal(re.reshape(inner.codes.shape).to(torch.uint8), inner.codes)
    # relative error floor: VQ at 2 bpw on Gaussian weights
    assert float((W - Wh).pow(2).mean() / W.pow(2).mean()) < (0.14 if spec.vq_bits == 4 else 0.08)


@pytest.mark.parametrize("name", ["VQ2-g64", "VQ3-g64+ip"])
def test_gptq_feedback_beats_rtn(name):
    spec = parse_spec(name)
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(4))
    H = _hess(128)
    _, W_rtn, _ = quantize_layer(W, spec, H, "rtn")
    qt, W_gptq, _ = quantize_layer(W, spec, H, "gptq")
    assert _proxy(W, W_gptq, H) < 0.8 * _proxy(W, W_rtn, H)
    assert qt.proxy_loss == pytest.approx(_proxy(W, W_gptq, H), rel=1e-6)
    assert torch.equal(PackedComposite.from_qtensor(qt).dequantize(), W_gptq)


def test_gptq_with_identity_hessian_is_rtn():
    spec = parse_spec("VQ2.5-g64")
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    a, Wa = quantize_vq(W, spec, None, "rtn")
    b, Wb = quantize_vq(W, spec, torch.eye(64), "gptq", damp=0.0)
    assert torch.equal(a.codes, b.codes) and torch.allclose(Wa, Wb)


def test_vq_beats_scalar_int_at_equal_bits_under_ip():
    W = torch.randn(96, 256, generator=torch.Generator().manual_seed(6))
    W[:, 3] *= 8
    H = _hess(256, seed=7)
    assert parse_spec("VQ3-g64+ip").cost((96, 256)) == parse_spec("W3-g64+ip").cost((96, 256))
    _, Wv, _ = quantize_layer(W, parse_spec("VQ3-g64+ip"), H, "gptq")
    _, Ws, _ = quantize_layer(W, parse_spec("W3-g64+ip"), H, "gptq")
    assert _proxy(W, Wv, H) < 0.85 * _proxy(W, Ws, H)


@pytest.mark.parametrize("name", ["VQ2-g64", "VQ2.5-g32", "VQ3-channel"])
def test_kernels_agree_with_reference(name):
    spec = parse_spec(name)
    W = torch.randn(80, 192, generator=torch.Generator().manual_seed(8))
    qt, Wh, _ = quantize_layer(W, spec, None, "rtn")
    lin = VQLinear(PackedComposite.from_qtensor(qt), torch.randn(80))
    for M in (1, 3, 40):
        x = torch.randn(2, M, 192, generator=torch.Generator().manual_seed(M))
        ref = x @ Wh.T + lin.bias
        for k in ("vq-reference", "vq-lut", "vq-dense") + (("vq-cpu",) if vq_cpu.available() else ()):
            lin.kernel = k
            torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-4)
            assert lin.last_kernel == k
    lin.kernel = "auto"
    lin(torch.randn(1, 192))
    assert lin.last_kernel == ("vq-cpu" if vq_cpu.available() else "vq-lut")
    lin(torch.randn(64, 192))
    assert lin.last_kernel == "vq-dense"


@pytest.mark.parametrize("lut", [False, True])
def test_native_cpu_kernel_both_forms(lut):
    if not vq_cpu.available():
        pytest.skip("no C compiler: the vq-cpu kernel is not built")
    g = torch.Generator().manual_seed(11)
    for d, k, glen in ((2, 6, 64), (2, 8, 32), (4, 8, 64)):
        codes = torch.randint(0, 2 ** k, (40, 256 // d), generator=g, dtype=torch.uint8)
        B, s = torch.randn(2 ** k, d, generator=g), torch.rand(40, 256 // glen, generator=g)
        x = torch.randn(3, 256, generator=g)
        torch.testing.assert_close(vq_cpu.vq_gemv(x, codes, s, B, glen, lut=lut), x @ decode(codes, s, B, glen).T,
                                   rtol=1e-5, atol=1e-4)


def test_save_load_same_output(tiny_model, tiny_tokenizer, tmp_path):
    from mixq import api
    from mixq.export.native import load_quantized
    from mixq.export.native_write import save_quantized

    model = tiny_model("llama")
    fqns = list(api.resolve_specs(model, "W4-g32"))
    names = ["VQ2.5-g32+ip", "VQ3-g32", "W4-g32"]
    specs = {f: parse_spec(names[i % len(names)]) for i, f in enumerate(fqns)}
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(9))
    res = api.quantize_model(model, specs, method="rtn", progress=False)
    d = save_quantized(tmp_path / "vq", model, tiny_tokenizer, res.qtensors, {"base_model": "tiny", "method": "rtn"})
    fake, _, _ = load_quantized(d)
    packed, _, _ = load_quantized(d, packed=True)
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(fake(ids).logits, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(packed(ids).logits, ref, rtol=1e-3, atol=1e-3)
    kinds = [type(m).__name__ for m in packed.modules()]
    assert "IncoherentLinear" in kinds and "VQLinear" in kinds


TRITON_CHILD = r"""
import json, torch
from mixq.config import parse_spec
from mixq.algorithms.composite.hooks import quantize_layer
from mixq.algorithms.composite.storage import PackedComposite
from mixq.runtime.vq_linear import VQLinear
from mixq.formats.composite.scales import group_len
from mixq.formats.composite.vq_storage import spec_codebook
from mixq.runtime.kernels.vq_triton import vq_linear_triton
out = []
# g32: a group per 32-wide K tile; channel: one scale per tile row; g48: scales gathered per element;
# x4: d = 4
for name in ("VQ2.5-g32", "VQ3-channel", "VQ2-g48", "VQ2x4-g64"):
    W = torch.randn(80, 192, generator=torch.Generator().manual_seed(8))
    qt, Wh, _ = quantize_layer(W, parse_spec(name), None, "rtn")
    lin = VQLinear(PackedComposite.from_qtensor(qt), None, kernel="triton")
    for M in (1, 17):
        x = torch.randn(M, 192, generator=torch.Generator().manual_seed(M))
        out.append(float((lin(x) - x @ Wh.T).abs().max()))
    y = vq_linear_triton(x, lin.codes(), lin.scale, spec_codebook(lin.spec),
                         group_len(lin.spec, 192), split_k=3)  # partial sums over 3 K ranges
    out.append(float((y - x @ Wh.T).abs().max()))
print(json.dumps(out))
"""


def test_triton_kernel_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", TRITON_CHILD], env=env, capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).parent)
    assert r.returncode == 0, r.stderr[-2000:]
    errs = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(errs) == 12 and max(errs) < 1e-4, errs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernel_on_cuda():
    pytest.importorskip("triton")
    W = torch.randn(256, 512, generator=torch.Generator().manual_seed(10))
    qt, Wh, _ = quantize_layer(W, parse_spec("VQ2.5-g64"), None, "rtn")
    lin = VQLinear(PackedComposite.from_qtensor(qt), None, kernel="triton").cuda()
    for dt, tol in ((torch.float32, 1e-4), (torch.float16, 3e-2), (torch.bfloat16, 1e-1)):
        x = torch.randn(7, 512, device="cuda").to(dt)
        ref = x.float() @ Wh.cuda().T
        assert float((lin(x).float() - ref).abs().max()) < tol * float(ref.abs().max())


def test_candidates_file_and_measurement_price_vq(tiny_model, tmp_path):
    from mixq.allocate import Budget, allocate
    from mixq.allocate.candidates import load_candidates
    from mixq.measure import measure

    f = tmp_path / "cands.txt"
    f.write_text("W3-g32\nVQ2.5-g32+ip\nVQ3-g32+ip\nW4-g32\nFP16\n")
    cands = load_candidates(f)
    assert parse_spec("VQ2.5-g32+ip") in cands
    model = tiny_model("llama")
    ids = torch.randint(4, 99, (4, 16), generator=torch.Generator().manual_seed(0))
    table = measure(model, ids, cands, metric="hessian", algorithm="gptq", progress=False)
    for e in table.layers:
        errs = dict(zip(e.candidates, e.errors))
        assert errs[parse_spec("VQ3-g32+ip")] <= errs[parse_spec("VQ2.5-g32+ip")]
        assert errs[parse_spec("FP16")] <= errs[parse_spec("VQ3-g32+ip")]
    plan = allocate(table, Budget(bpw=3.3))
    assert plan.achieved_bpw <= 3.3 + 1e-9


def test_fast_kernel_for_vq():
    from mixq.runtime.kernels import fast_kernel_for

    assert fast_kernel_for(parse_spec("VQ3-g64+ip"), (576, 576)) == "vq-cpu"
    assert fast_kernel_for(parse_spec("VQ2.5-channel"), (576, 576), "cuda") == "triton"
