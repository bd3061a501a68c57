"""llama.cpp's activation rounding (mixq.export.ggml_actsim) against gguf-py's Q8_0 and the q8_K definition."""
import numpy as np
import pytest
import torch

from mixq.export.ggml_actsim import VEC_DOT, round_activations, simulate, types_of_directory

gguf = pytest.importorskip("gguf")


def test_q8_0_matches_gguf_py_reference():
    # gguf-py's Q8_0 is bit-exact with ggml's reference quantizer; llama.cpp's x86 path multiplies by 127 / amax
    # instead of 1 / d and rounds ties to even, which can differ from the reference by one step, rarely
    x = torch.randn(64, 576, generator=torch.Generator().manual_seed(0)) * torch.rand(64, 1) * 5
    x[3, :32] = 0.0  # an all-zero block
    ref = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0).reshape(x.shape)
    got = round_activations(x, "q8_0").numpy()
    step = np.abs(x.numpy()).reshape(64, -1, 32).max(-1, keepdims=True) / 127
    diff = np.abs(got - ref).reshape(64, -1, 32)
    assert (diff <= step * 1.001 + 1e-12).all()
    assert (diff == 0).mean() > 0.999
    assert (got[3, :32] == 0).all()
    assert np.abs(got - x.numpy()).max() > 0  # it does round


def test_q8_k_blocks_of_256():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 512, generator=g)
    x[0, 7] = -9.0  # the block's largest |x| is negative: it maps to +127 * (-1 / 127 * -9) exactly
    y = round_activations(x, "q8_K")
    assert y[0, 7].item() == pytest.approx(-9.0, rel=1e-6)
    for blk in range(2):
        xb, yb = x[:, blk * 256:(blk + 1) * 256], y[:, blk * 256:(blk + 1) * 256]
        i = xb.abs().argmax(1, keepdim=True)
        d = -xb.gather(1, i) / 127  # 1 / iscale
        q = yb / d
        assert torch.allclose(q, q.round(), atol=1e-3)  # on the grid of its own block's step
        assert (q.round() <= 127).all() and (q.round() >= -127).all()
        assert ((yb - xb).abs() <= d.abs() / 2 * 1.0001).all()
    with pytest.raises(ValueError, match="multiple of it"):
        round_activations(torch.randn(2, 576), "q8_K")


def test_simulate_hooks_only_named_linears_and_restores():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 32, bias=False))
    x = torch.randn(3, 64)
    plain = m(x)
    with simulate(m, {"0": "Q4_0"}) as n:
        assert n == 1
        sim = m(x)
        expect = m[1](m[0](round_activations(x, "q8_0")))
    assert torch.equal(sim, expect) and not torch.equal(sim, plain)
    assert torch.equal(m(x), plain)  # hooks removed
    with pytest.raises(ValueError, match="no llama.cpp activation type"):
        with simulate(m, {"0": "TQ9_9"}):
            pass


def test_vec_dot_table_and_a_full_precision_model():
    assert VEC_DOT["Q3_K"] == "q8_K" and VEC_DOT["IQ4_NL"] == "q8_0" and VEC_DOT["Q4_1"] == "q8_1"
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    assert types_of_directory(m, {}) == {"0": "F16", "2": "F16"}  # as in an F16 file


def test_eval_runtime_llamacpp(tiny_dir, tmp_path, capsys):
    import json

    import mixq
    from mixq.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat and the dog ran after it . " * 40)
    model, tok = mixq.load_model(str(tiny_dir))
    for spec, name in (("W4-g32", "q4"), ("W4-g64", "g64")):
        m, _ = mixq.load_model(str(tiny_dir))
        mixq.save_quantized(tmp_path / name, m, tok, mixq.quantize(m, spec, progress=False))
    loaded, _, info = mixq.load_quantized(tmp_path / "q4")
    types = types_of_directory(loaded, info)
    assert {t for n, t in types.items() if n != "lm_head"} == {"Q4_0"} and types["lm_head"] == "F16"
    assert len(types) == sum(isinstance(x, torch.nn.Linear) for x in loaded.modules())
    args = ["eval", str(tmp_path / "q4"), "--corpus", str(corpus), "--tokens", "96", "--seqlen", "32"]
    assert main(args + ["--out", str(tmp_path / "plain.json")]) == 0
    assert main(args + ["--runtime", "llamacpp", "--out", str(tmp_path / "sim.json")]) == 0
    plain, sim = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "sim.json"))
    assert sim["protocol"]["runtime"] == "llamacpp" and plain["protocol"]["runtime"] == "mixq"
    assert sim["perplexity"] != plain["perplexity"]
    assert abs(sim["perplexity"] / plain["perplexity"] - 1) < 0.05
    assert "runtime llamacpp" in capsys.readouterr().out
    rc = main(["eval", str(tmp_path / "g64"), "--corpus", str(corpus), "--tokens", "96", "--seqlen", "32",
               "--runtime", "llamacpp"])
    err = capsys.readouterr().err
    assert rc == 2 and "W4-g64" in err and "--target gguf" in err
