"""TCQ bases (mixq.algorithms.composite.tcq): the trellis and its tables, the Viterbi search, exact cost, GPTQ, storage,
kernels."""
from __future__ import annotations

import copy
import gc
import hashlib
import itertools
import re

import pytest
import torch

from mixq.config import CompositeSpec, parse_spec
from mixq.algorithms.composite.storage import PackedComposite
from mixq.algorithms.composite.families import pack_composite
from mixq.algorithms.composite.hooks import quantize_layer
from mixq.runtime.composite_linear import IncoherentLinear
from mixq.algorithms.composite.tcq import quantize_tcq
from mixq.formats.composite.tcq_storage import TCQQTensor, pack_tcq, unpack_tcq
from mixq.algorithms.composite import tcq_search as ts
from mixq.formats.composite import tcq_codebook as tc
from mixq.runtime.kernels import tcq_cpu, tcq_step
from mixq.runtime.layers import make_layer
from mixq.runtime.tcq_linear import TCQLinear
from mixq.algorithms.composite.vq_search import mse as vq_mse
from mixq.algorithms.composite.vq import quantize_vq

# sha256 of the fp16 bytes of each committed table: a changed table would change every stored model's decoding
PINNED = {
    "2": "58c378d6a3f078ef4c504d5196c4db75cce67620b2222e639eca1d81d5145d31",
    "5/2": "221dce69c9961b9be83a0cbf48e9d569536a5a114b13bc3851a6449b5f5aa424",
    "3": "d018c1340d460a0bbbdeecc164812c87953990947b47851d360c044088ef30e9",
    "7/2": "9543e1de2afac16d2922a468463c76b1e52118b2a7417da51e67c03f33139216",
    "4": "291066d656a0763459bf833b2c9329d3c2f07002094f3bd72b1779954fa12940",
    "5": "3f9c38619d0d18c25457b58e5653f62a03b94d709cdb200d2dacca2db9128ff2",
    "6": "6740444ccba8611f8db5afe46a55106ce1e9d76c43e502af259b78e7603a3fda",
}
PINNED_L10 = {  # the 2^10-entry tables of TCQ<rate>L10
    "2": "3c1fbfb3cf92c86ce98594a76f8650e2d752e7fbb644147a07305032cf18679c",
    "5/2": "ed5225d2dd8ac2fe80bfb6d29503511324310dfa05beb84d516dacf44c7d6703",
    "3": "70d379918aad716648d83384e1cde8469e0b4f1e0e2196db56e877986558aedd",
    "7/2": "8e95f24cfca1ee164466308150e98443c5ed67f18c701b14dbfeb24330aee02f",
    "4": "2cf23d8cbb2fe62d95d776b302d3edeefb75863b557da2337c64f0cd228695dd",
    "5": "69eb9afb613fd7a68097f256eb1d7f0f2dbe3c21c932523b413b711096ce364c",
    "6": "9dff4e282dc6111537e1db265e856f62d952d1ef70c05841faae9f5d2da91511",
}
PINNED_L12 = {  # the 2^12-entry tables of TCQ<rate>L12
    "2": "4681a68757ff101a4befebd15d2c48ceeefabb64944ace5f1ee656862f45f78d",
    "5/2": "53d629f169c28fdc275ed1c6b4b1e017260398398f1db2b81eda44f5448fd576",
    "3": "200f3be4b9520f19542cd47fdfcf21ac9e3636dd6fcfed6f75cba44e1fbcf3af",
    "7/2": "40e569679046f777fa39cf77b0dd0129b556d60b4180e10489aec9cfd7963fd4",
    "4": "d0010cce27c55cdbb5e0c9bcd79f0ade0ff328447563f564645805c162e5565c",
    "5": "7f0bf4654c0f10abb3cc4db5db24fae6e6ed15129a60224148488e18729a7371",
    "6": "d07593a98b21e97b04f2389af655338ce08172fc2f5b88a84843231610535539",
}
needs_native = pytest.mark.skipif(not tcq_cpu.available(), reason="no C compiler for the tcq-cpu kernels")


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


# the decode kernels' two code layouts: the interleaved one (where the CPU has AVX2 or AVX-512) and the byte stream
LAYOUTS = [pytest.param("words", marks=pytest.mark.skipif(not tcq_cpu.available() or not tcq_cpu.words_isa(),
                                                            reason="needs the AVX2 or AVX-512 trellis kernels")),
           pytest.param("stream", marks=needs_native)]


def _use_layout(layout, monkeypatch):
    """Layers made from here on hold ``layout`` (the byte stream: as on a CPU without AVX2)."""
    if layout == "stream":
        monkeypatch.setattr(tcq_cpu, "words_isa", lambda: 0)


def _hess(C: int, n: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, C, generator=g) @ (torch.randn(C, C, generator=g) / C ** 0.5 + torch.eye(C))
    X[:, :4] *= 6
    return X.T @ X / n


def _proxy(W, Wh, H):
    d = (W - Wh).double()
    return float(((d @ H.double()) * d).sum())


def test_grammar_cost_and_errors():
    for name, t, L in (("TCQ3-channel+ip", 6, 8), ("TCQ2.5-g64+ip", 5, 8), ("TCQ2-channel", 4, 8),
                       ("TCQ4-g128+ip", 8, 8), ("TCQ3L10-channel+ip", 6, 10), ("TCQ2.5L10-g64", 5, 10),
                       ("TCQ5-channel+ip", 10, 8), ("TCQ6L10-g64", 12, 10), ("TCQ2.5L12-channel+ip", 5, 12)):
        s = parse_spec(name)
        assert isinstance(s, CompositeSpec) and s.trellis == t and s.bits == -(-t // 2) and s.state_bits == L
        assert s.name == name and parse_spec(s.name) == s and CompositeSpec.from_dict(s.to_dict()) == s
    # more state bits change the table, not the stored bits: the cost is the L = 8 spec's
    assert parse_spec("TCQ3L10-channel+ip").cost((192, 576)) == parse_spec("TCQ3-channel+ip").cost((192, 576))
    assert "state_bits" not in parse_spec("TCQ3-channel+ip").to_dict()  # files written before L10 read the same
    assert parse_spec("TCQ3+ip").name == "TCQ3-channel+ip"  # channel scales by default
    c = parse_spec("TCQ2.5-g64+ip").cost((192, 576))
    # R * C * 2.5 code bits, an fp16 scale per row and 64-column group, 64 seed bits: hand-computed
    assert (c.codes, c.scales, c.total) == (192 * 576 * 5 // 2, 192 * 9 * 16, 192 * 576 * 5 // 2 + 192 * 9 * 16 + 64)
    with pytest.raises(ValueError, match="rows in pairs"):
        parse_spec("TCQ2.5-channel").cost((7, 64))
    # above 4 bits only whole rates: a half rate's two-step symbol would not fit a byte
    for bad in ("TCQ2.25", "TCQ4.5", "TCQ5.5", "TCQ7", "TCQ0.5", "TCQ3-g64+o0.5", "TCQ3-asym", "TCQ3L14-channel", "TCQ3L9"):
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_tables_pinned_reproducible_and_better_than_vq():
    for key, digest in PINNED.items():
        assert hashlib.sha256(bytes.fromhex(tc.to_hex(tc.lut(key)))).hexdigest() == digest
    for key, digest in PINNED_L10.items():
        assert hashlib.sha256(bytes.fromhex(tc.to_hex(tc.lut(key, 10)))).hexdigest() == digest
    for key, digest in PINNED_L12.items():
        assert hashlib.sha256(bytes.fromhex(tc.to_hex(tc.lut(key, 12)))).hexdigest() == digest
    with pytest.raises(ValueError, match="state bits"):
        tc.lut(3, 14)
    # the committed tables are what their definition computes, up to the search's float rounding (they were made
    # by an earlier build of the native search): the same MSE to 0.5 %, every entry within 0.05
    fresh = ts.generate(3)
    assert abs(ts.mse(3, table=fresh) / ts.mse(3) - 1) < 5e-3 and float((fresh - tc.lut(3)).abs().max()) < 0.05
    for r in (2, 2.5, 3, 3.5, 4):  # the trellis beats the 2-D codebook of the same rate by >= 10 % in MSE
        assert ts.mse(r) < 0.9 * vq_mse(2, int(2 * r)), r
        assert ts.mse(r) > 2 ** (-2 * r)  # and cannot beat the Gaussian distortion-rate bound
        # 2^10 states: >= 5 % less squared error at the same rate, still above the bound
        assert 2 ** (-2 * r) < ts.mse(r, table=tc.lut(r, 10)) < 0.95 * ts.mse(r), r
        # 2^12 states: >= 4 % less than 2^10
        assert 2 ** (-2 * r) < ts.mse(r, table=tc.lut(r, 12)) < 0.96 * ts.mse(r, table=tc.lut(r, 10)), r
    # 5 and 6 bits: at 2^10 states below the Gaussian Lloyd-Max scalar quantizer of the same bits (MSE 0.002502 and
    # 0.000652, bench/results/tcq.md) and above the bound; 2^8 states leave the trellis only 3 or 2 bits of memory
    for r, lloyd_max in ((5, 0.002502), (6, 0.000652)):
        assert 2 ** (-2 * r) < ts.mse(r, table=tc.lut(r, 10)) < 0.95 * lloyd_max, r
        assert ts.mse(r, table=tc.lut(r, 10)) < 0.85 * ts.mse(r), r


def test_schedule_and_states():
    assert tc.schedule(2.5, 5).tolist() == [2, 3, 2, 3, 2] and tc.schedule(3, 3).tolist() == [3, 3, 3]
    bits = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    ks = tc.schedule(2, 4)
    s = [(0b01), (0b0110), (0b011011), (0b01101100)]
    assert tc.states(bits, ks)[0].tolist() == s


def _brute(x, w, rate, lut):
    ks = tc.schedule(rate, x.numel()).tolist()
    best = None
    for bits in itertools.product(*[range(1 << k) for k in ks]):
        st = tc.states(torch.tensor([bits], dtype=torch.uint8), torch.tensor(ks))[0]
        c = float((w * (x - lut[st]) ** 2).sum())
        best = c if best is None or c < best else best
    return best


@pytest.mark.parametrize("rate", [2, 2.5])
def test_viterbi_is_optimal_and_native_matches_torch(rate):
    g = torch.Generator().manual_seed(1)
    lut = tc.lut(rate)
    x, w = torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g) + 0.1
    bits, vals, cost = ts.viterbi_torch(x, w, tc.schedule(rate, 4), lut)
    for n in range(3):  # exhaustive search over every bit string of 4 steps
        assert cost[n].item() == pytest.approx(_brute(x[n], w[n], rate, lut), rel=1e-5)
        assert torch.equal(vals[n], lut[tc.states(bits[n:n + 1], tc.schedule(rate, 4))[0]])
    if tcq_cpu.available():
        X, Wt = torch.randn(16, 200, generator=g), torch.rand(16, 200, generator=g) + 0.1
        b1, v1, c1 = ts.viterbi(X, Wt, rate, lut)
        b2, v2, c2 = ts.viterbi_torch(X, Wt, tc.schedule(rate, 200), lut)
        torch.testing.assert_close(c1, c2, rtol=1e-4, atol=1e-4)
        assert (b1 == b2).float().mean() > 0.99  # the same path up to float ties
        assert torch.equal(v1, lut[tc.states(b1, tc.schedule(rate, 200))])


@needs_native
@pytest.mark.parametrize("L", [8, 10, 12])
def test_native_search_matches_torch_at_every_step_width(L):
    """Every step width 1-6 bits (the AVX2 cost update has a path for k < 3 and one for k >= 3) at both state bits:
    the native search's costs are the torch search's, and its values decode from its bits."""
    g = torch.Generator().manual_seed(L)
    for rate in (1, 1.5, 3, 3.5, 4, 5, 6):  # 5 and 6 bits: the argmin's wider predecessor field
        lut = tc.lut(rate, L)
        X, Wt = torch.randn(8, 96, generator=g), torch.rand(8, 96, generator=g) + 0.1
        b1, v1, c1 = ts.viterbi(X, Wt, rate, lut)  # L from the table's size
        b2, v2, c2 = ts.viterbi_torch(X, Wt, tc.schedule(rate, 96), lut, L)
        torch.testing.assert_close(c1, c2, rtol=1e-4, atol=1e-4)
        assert torch.equal(v1, lut[tc.states(b1, tc.schedule(rate, 96), L)]), rate


@pytest.mark.parametrize("name", ["TCQ3-channel", "TCQ2.5-g64", "TCQ3L10-channel", "TCQ2.5L10-g64", "TCQ5L10-channel",
                                  "TCQ3L12-channel"])
def test_rtn_gptq_storage_round_trip(name):
    spec = parse_spec(name)
    g = torch.Generator().manual_seed(0)
    W, H = torch.randn(64, 128, generator=g), _hess(128)
    qt, Wr = quantize_tcq(W, spec)
    qg, Wg = quantize_tcq(W, spec, H, "gptq")
    assert isinstance(qg, TCQQTensor) and torch.equal(qg.dequantize(), Wg) and torch.equal(qt.dequantize(), Wr)
    assert _proxy(W, Wg, H) < 0.8 * _proxy(W, Wr, H)  # error feedback pays on a correlated H
    if spec.trellis <= 8:  # and beats the VQ of the same rate (VQ stops at 4 bits)
        vq = parse_spec(re.sub(r"L1[02]", "", name.replace("TCQ", "VQ")))
        assert _proxy(W, Wg, H) < _proxy(W, quantize_vq(W, vq, H, "gptq")[1], H)
    t = pack_tcq(qg)
    c = spec.cost((64, 128))
    assert qg.stored_bits() == c.codes + c.scales and t["tcq.codes"].numel() == -(-c.codes // 8)
    back = unpack_tcq(t, spec, (64, 128))
    assert torch.equal(back.bits, qg.bits) and torch.equal(back.dequantize(), Wg)
    if spec.state_bits > 8:  # the same bits decode through 2^10 (2^12) states: less GPTQ proxy than at L = 8
        l8 = parse_spec(name.replace(f"L{spec.state_bits}", ""))
        assert _proxy(W, Wg, H) < 0.97 * _proxy(W, quantize_tcq(W, l8, H, "gptq")[1], H)


@needs_native
@pytest.mark.parametrize("name,shape", [("TCQ3-channel+ip", (64, 128)), ("TCQ2.5-g64+ip", (128, 128)),
                                        ("TCQ3.5-channel+ip", (32, 256)), ("TCQ3L10-channel+ip", (64, 128)),
                                        ("TCQ5L10-channel+ip", (64, 128)), ("TCQ6-channel+ip", (32, 128)),
                                        ("TCQ2.5L12-channel+ip", (64, 128)), ("TCQ3-channel+ip1", (42, 128))])
def test_kernels_match_the_reference(name, shape):
    spec = parse_spec(name)
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    qt, W_hat, _ = quantize_layer(W, spec)
    pc = PackedComposite(pack_composite(qt), spec, shape)
    for kernel in ("tcq-reference", "tcq-cpu", "tcq-dense"):
        lin = make_layer(pc, None, kernel)
        assert isinstance(lin, IncoherentLinear) and isinstance(lin.inner, TCQLinear)
        for M in (1, 5, 19):
            x = torch.randn(M, shape[1])
            torch.testing.assert_close(lin(x), x @ W_hat.T, rtol=1e-4, atol=1e-4)
            assert lin.inner.last_kernel == kernel


@needs_native
@pytest.mark.parametrize("name", ["TCQ3-channel+ip1", "TCQ3-channel"])
def test_decode_steps_call_the_native_kernel_directly(name, monkeypatch):
    """A CPU decode step (kernel auto, <= CPU_MAX_TOKENS rows) goes straight to the native GEMV: no ``choose``, no
    module call of the inner layer; bf16 in, bf16 out, the bias added once; longer inputs still choose."""
    spec = parse_spec(name)
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(5))
    qt, W_hat, _ = quantize_layer(W, spec)
    pc = PackedComposite(pack_composite(qt), spec, (48, 128))
    bias = torch.randn(48)
    lin = make_layer(pc, bias, "auto")
    tcq = lin.inner if isinstance(lin, IncoherentLinear) else lin
    assert isinstance(tcq, TCQLinear)
    chose, inner_calls = [], []
    real = TCQLinear.choose
    monkeypatch.setattr(TCQLinear, "choose", lambda self, x: chose.append(x.shape) or real(self, x))
    if tcq is not lin:
        tcq.register_forward_pre_hook(lambda mod, args: inner_calls.append(1))
    with torch.no_grad():
        for M, direct in ((1, True), (16, True), (17, False)):
            x = torch.randn(1, M, 128).bfloat16()
            y = lin(x)
            assert y.dtype == torch.bfloat16 and y.shape == (1, M, 48)
            torch.testing.assert_close(y.float(), x.float() @ W_hat.T + bias, rtol=2e-2, atol=5e-2)
            assert (not chose) == direct and tcq.last_kernel == ("tcq-cpu" if direct else "tcq-dense")
            assert (not inner_calls) == (direct or tcq is lin)
            chose.clear()
            inner_calls.clear()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["TCQ3-channel+ip1", "TCQ2.5-g32+ip1", "TCQ3-channel"])
def test_a_decode_step_is_one_native_call_with_the_same_values(name, layout, monkeypatch):
    """``tcq_step.Step``: the input transform of a one-sided ``+ip`` layer and the GEMV in one native call from
    float32 or bfloat16 inputs, from either code layout (the byte stream also on the scalar path) -- the same bits as
    the transform and the layer's kernel called one after the other; the layer's decode step takes it (and only it),
    longer inputs do not."""
    from mixq.algorithms.composite.incoherence import kron_plan, rotate

    _use_layout(layout, monkeypatch)
    spec = parse_spec(name)
    R, C = 40, 192  # 40 rows: two vectors of row sums and eight rows one at a time
    qt, W_hat, _ = quantize_layer(torch.randn(R, C, generator=torch.Generator().manual_seed(7)), spec)
    bias = torch.randn(R)
    lin = make_layer(PackedComposite(pack_composite(qt), spec, (R, C)), bias, "auto")
    tcq = lin.inner if isinstance(lin, IncoherentLinear) else lin
    g = tcq._part("gemv")
    assert g.interleaved == (layout == "words")
    rot = kron_plan(C, lin._seeds[0], False) if tcq is not lin else None
    kernels = [g]
    if layout == "stream":  # the same stream through the scalar path
        kernels.append(tcq_cpu.GemvLayer(g.stream, g.scale, g.lut, *g.layout, isa="scalar"))
    for k in kernels:
        step = tcq_step.Step(k, rot)
        for M in (1, 4, 16):
            for xdt in (torch.float32, torch.bfloat16):
                x = torch.randn(M, C, generator=torch.Generator().manual_seed(M)).to(xdt)
                xr = x.float() if rot is None else rotate(x.float(), lin._seeds[0])
                for dt in (torch.float32, torch.bfloat16, torch.float16):
                    assert torch.equal(step(x, dt), k(xr, dt))
    with pytest.raises(ValueError, match="at most 16 rows"):
        step(torch.randn(17, C), torch.float32)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        step(torch.randn(1, C).half(), torch.float32)
    calls = []
    real = tcq_step.Step.__call__
    monkeypatch.setattr(tcq_step.Step, "__call__", lambda self, x, dt: calls.append(x.shape) or real(self, x, dt))
    with torch.no_grad():
        for M, direct in ((1, True), (16, True), (17, False)):
            x = torch.randn(1, M, C).bfloat16()
            y = lin(x)
            assert y.dtype == torch.bfloat16 and y.shape == (1, M, R) and bool(calls) == direct
            if direct:
                xr = x.float().reshape(M, C) if rot is None else rotate(x.float().reshape(M, C), lin._seeds[0])
                assert torch.equal(y, (g(xr, torch.bfloat16) + bias.bfloat16()).reshape(1, M, R))
            torch.testing.assert_close(y.float(), x.float() @ W_hat.T + bias, rtol=2e-2, atol=5e-2)
            calls.clear()
        # a deep copy after decoding leaves the kernels' state (addresses of the original's tensors) behind
        x = torch.randn(1, 1, C).bfloat16()
        want = lin(x)
        lin2 = copy.deepcopy(lin)
        del lin, tcq, g, step, k, kernels
        gc.collect()
        assert torch.equal(lin2(x), want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layers_reading_one_input_are_learnt_and_run_as_one_call(layout, monkeypatch):
    """q/k/v-like layers called one after the other on one tensor: from the second call on, the first computes the
    others' outputs in its native call and each takes its own -- the same bits as alone; a changed input (in place,
    or another tensor) is computed again, never served stale."""
    _use_layout(layout, monkeypatch)
    C = 192
    layers = []
    for i, (name, R) in enumerate((("TCQ3-channel+ip1", 64), ("TCQ2.5-channel+ip1", 32), ("TCQ4-channel+ip1", 32))):
        spec = parse_spec(name)
        qt, _, _ = quantize_layer(torch.randn(R, C, generator=torch.Generator().manual_seed(i)), spec)
        layers.append(make_layer(PackedComposite(pack_composite(qt), spec, (R, C)), torch.randn(R), "auto"))
    other = layers[0]  # a layer on another input between rounds (as o_proj is)

    def alone(lin, x):  # the transform and this layer's kernel by themselves
        from mixq.algorithms.composite.incoherence import rotate
        y = lin.inner._part("gemv")(rotate(x.float().reshape(-1, C), lin._seeds[0]), torch.bfloat16)
        return (y + lin.bias.bfloat16()).reshape(*x.shape[:-1], -1)

    with torch.no_grad():
        for rnd in range(4):
            x = torch.randn(1, 1, C, generator=torch.Generator().manual_seed(10 + rnd)).bfloat16()
            for lin in layers:
                assert torch.equal(lin(x), alone(lin, x))
            other(torch.randn(1, 1, C).bfloat16())
        probe = torch.zeros(1, 1, C).bfloat16()
        lead = layers[0]._cpu_step(probe)
        assert [f is layers[k]._cpu_step(probe) for k, f in enumerate(lead.followers, 1)] == [True, True]
        # the leader ran for all three; the input changes in place before the others are called: computed again
        x = torch.randn(1, 1, C).bfloat16()
        layers[0](x)
        assert all(f._stash is not None for f in lead.followers)
        x.mul_(-0.5)
        assert torch.equal(layers[1](x), alone(layers[1], x))
        # another tensor with the same values is not the input the leader computed from: computed again too
        layers[0](x)
        assert torch.equal(layers[2](x.clone()), alone(layers[2], x))


@needs_native
@pytest.mark.parametrize("name,shape", [("TCQ2-channel", (48, 96)), ("TCQ2.5-channel", (40, 64)),
                                        ("TCQ3-g16", (24, 80)), ("TCQ3.5-channel", (32, 72)),
                                        ("TCQ4-g32", (16, 64)), ("TCQ3-channel", (8, 20)),
                                        ("TCQ2.5-channel", (16, 136)), ("TCQ3L10-channel", (48, 96)),
                                        ("TCQ2.5L10-g32", (40, 64)), ("TCQ2L10-channel", (16, 136)),
                                        ("TCQ5L10-channel", (24, 96)), ("TCQ6-g32", (16, 64)),
                                        ("TCQ3L12-channel", (24, 96)), ("TCQ3.5-channel", (32, 160)),
                                        ("TCQ2L12-g32", (24, 128))])
def test_native_gemv_vector_and_scalar_paths_agree(name, shape):
    """The AVX-512 path (up to 16 tokens from its lane-interleaved copy of the stream, where the CPU has it and the
    scale groups are a multiple of 16 columns), the AVX2 one (eight columns per step) and the scalar one give the
    reference product for every rate, grouped scales, several tokens and uneven thread splits; a stream with too
    little padding for the vector loads (2 bytes), or groups not a multiple of 8 columns, run the scalar path."""
    from mixq.formats.composite.scales import group_len
    from mixq.formats.composite.tcq_storage import stream_layout
    from mixq.formats.composite.tcq_codebook import lut

    spec = parse_spec(name)
    R, C = shape
    qt, W_hat, _ = quantize_layer(torch.randn(R, C, generator=torch.Generator().manual_seed(5)), spec)
    packed = pack_tcq(qt)["tcq.codes"]
    P, width, k1 = stream_layout(spec)
    args = (qt.scale.float().contiguous(), lut(spec.tcq_rate, spec.state_bits), R, P, width, k1, spec.state_bits,
            group_len(spec, C))
    for pad in (2, 4):
        stream = torch.cat([packed, torch.zeros(pad, dtype=torch.uint8)])
        for M in (1, 3, 7, 11, 19):  # 19: above DENSE_FROM, the dense product on the AVX-512 path
            x = torch.randn(M, C, generator=torch.Generator().manual_seed(M))
            for isa in ("scalar", "avx2", "auto"):
                torch.testing.assert_close(tcq_cpu.gemv(x, stream, *args, isa=isa), x @ W_hat.T,
                                           rtol=1e-4, atol=1e-4)
            # the layer's bound kernel (TCQLinear's decode path) is the same call, checked once
            layer = tcq_cpu.GemvLayer(stream, args[0], args[1], R, C, *args[3:])
            assert torch.equal(layer(x), tcq_cpu.gemv(x, stream, *args))
            one = pad == 4 and args[-1] % 16 == 0 and tcq_cpu.words_isa() > 0
            assert (layer.words is not None) == one and (layer.stream is None) == one  # the layout replaces the stream
            for dt in (torch.bfloat16, torch.float16):  # written as bf16 by the kernel itself: rounded as torch does
                assert torch.equal(layer(x, dt), layer(x).to(dt))
        # the dense decode (prefill), from the interleaved layout where the layer has it: the byte stream's bits
        assert torch.equal(tcq_cpu.GemvLayer(stream, args[0], args[1], R, C, *args[3:]).dense(),
                           tcq_cpu.decode(stream, args[0], args[1], R, C, *args[3:]))
        assert torch.equal(layer.dense(), W_hat)
    with pytest.raises(ValueError, match="do not fit"):
        tcq_cpu.GemvLayer(packed[:-8], args[0], args[1], R, C, *args[3:])
    with pytest.raises(ValueError, match="isa must be one of"):
        tcq_cpu.GemvLayer(stream, args[0], args[1], R, C, *args[3:], isa="avx512")


def test_measurement_treats_tcq_as_its_own_family():
    from mixq.measure.layer import _family, _scaled_as

    c = parse_spec("TCQ2.5-channel+ip")
    assert _scaled_as(c) == (c.inner, 2) and _family(c.inner) == ("tcq", 2) and _family(parse_spec("VQ2.5-channel+ip").inner) == ("vq2", 2)
    assert _scaled_as(parse_spec("TCQ2.5-channel+ip1")) == (c.inner, 1)  # its own basis and GPTQ/RTN ratio


TRITON_CHILD = r"""
import json, torch
from mixq.config import parse_spec
from mixq.algorithms.composite.hooks import quantize_layer
from mixq.algorithms.composite.storage import PackedComposite
from mixq.runtime.tcq_linear import TCQLinear
out = []
for name, shape in (("TCQ3-channel", (64, 96)), ("TCQ2.5-g32", (48, 64)), ("TCQ2-channel", (32, 64)),
                    ("TCQ3.5-g32", (64, 64)), ("TCQ3L10-channel", (64, 96)), ("TCQ5L10-channel", (32, 64)),
                    ("TCQ6-g32", (32, 64))):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    qt, Wh, _ = quantize_layer(W, parse_spec(name))
    lin = TCQLinear(PackedComposite.from_qtensor(qt), None, "triton")
    for M in (1, 5):
        x = torch.randn(M, shape[1], generator=torch.Generator().manual_seed(M))
        out.append(float((lin(x) - x @ Wh.T).abs().max()))
print(json.dumps(out))
"""


def test_triton_kernel_in_interpreter():
    """The fused decode + GEMM in triton's CPU interpreter, every rate layout (whole and half rates, channel and
    group scales), against the reference decode."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", TRITON_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    errs = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(errs) == 14 and max(errs) < 1e-4, errs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernel_on_cuda():
    pytest.importorskip("triton")
    W = torch.randn(256, 512, generator=torch.Generator().manual_seed(10))
    qt, Wh, _ = quantize_layer(W, parse_spec("TCQ2.5-g64"), None, "rtn")
    lin = TCQLinear(PackedComposite.from_qtensor(qt), None).cuda()
    for dt, tol in ((torch.float32, 1e-4), (torch.float16, 3e-2), (torch.bfloat16, 1e-1)):
        x = torch.randn(7, 512, device="cuda").to(dt)
        ref = x.float() @ Wh.cuda().T
        assert float((lin(x).float() - ref).abs().max()) < tol * float(ref.abs().max())
        assert lin.last_kernel == "triton"


@needs_native
def test_extra_compiler_flags_build_and_key_their_own_library(monkeypatch, tmp_path):
    """``MIXQ_KERNEL_CFLAGS`` reaches the compiler (a macro it defines is seen by the source) and keys the cached
    library apart from the one built without it."""
    import ctypes

    from mixq.runtime.kernels import cbuild

    src = "int f(void) {\n#ifdef MIXQ_PROBE\n  return 2;\n#else\n  return 1;\n#endif\n}"
    monkeypatch.setenv("MIXQ_CACHE_DIR", str(tmp_path / "cache"))
    sig = {"f": (ctypes.c_int, [])}
    assert cbuild.load("probe", src, "none", sig).f() == 1
    monkeypatch.setenv("MIXQ_KERNEL_CFLAGS", "-DMIXQ_PROBE -O2")
    assert cbuild.load("probe", src, "none", sig).f() == 2
    assert len(list((tmp_path / "cache" / "kernels").glob("probe_*.so"))) == 2


_DECODE_TESTS = ("test_kernels_match_the_reference or test_decode_steps_call_the_native_kernel_directly or "
                 "test_a_decode_step_is_one_native_call or test_layers_reading_one_input or "
                 "test_native_gemv_vector_and_scalar_paths_agree")


@pytest.mark.skipif(not tcq_cpu.available() or tcq_cpu.words_isa() != 512 or "avx2" not in _cpu_flags(),
                    reason="needs a CPU with AVX-512 (the AVX2 build is what its own run tests elsewhere)")
def test_the_decode_tests_pass_with_the_avx2_kernels_too(tmp_path):
    """On an AVX-512 CPU the AVX2 kernels of the interleaved layout never run in this process: the decode tests again
    in a process whose kernels are built with ``-mno-avx512f`` (``MIXQ_KERNEL_CFLAGS``), where they must run the
    AVX2 ones."""
    import os
    import subprocess
    import sys

    from subrun import pytest_in_subprocess

    env = {**os.environ, "MIXQ_KERNEL_CFLAGS": "-mno-avx512f", "MIXQ_CACHE_DIR": str(tmp_path / "cache")}
    probe = subprocess.run([sys.executable, "-c", "from mixq.runtime.kernels import tcq_cpu; print(tcq_cpu.words_isa())"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert probe.stdout.strip() == "256", probe.stderr[-2000:]
    run = pytest_in_subprocess(__file__, "-k", _DECODE_TESTS, env=env)
    assert run.returncode == 0, run.stdout[-4000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def test_without_a_compiler_everything_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    """No working C compiler: the build warns and returns None, the search and the decode run in torch with the same
    result, and the layer's auto kernel is tcq-dense."""
    from mixq.runtime.kernels import cbuild

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MIXQ_CACHE_DIR", str(tmp_path / "cache"))
    assert cbuild.load("probe", "int f(void) { return 1; }", "the torch path", {}) is None
    assert "the torch path" in caplog.text
    spec = parse_spec("TCQ2.5-channel+ip")
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    native = quantize_layer(W, spec)
    monkeypatch.setattr(tcq_cpu, "_lib", lambda: None)
    qt, W_hat, _ = quantize_layer(W, spec)
    assert torch.allclose(W_hat, native[1], atol=1e-5) or \
        float(((W - W_hat) ** 2).sum()) <= 1.001 * float(((W - native[1]) ** 2).sum())
    lin = make_layer(PackedComposite(pack_composite(qt), spec, (32, 64)))
    x = torch.randn(2, 64)
    torch.testing.assert_close(lin(x), x @ W_hat.T, rtol=1e-4, atol=1e-4)
    assert lin.inner.last_kernel == "tcq-dense"


def test_a_dtype_cast_of_the_model_keeps_the_stored_parts_exact():
    spec = parse_spec("TCQ3-g32")
    qt, W_hat, _ = quantize_layer(torch.randn(16, 64, generator=torch.Generator().manual_seed(2)), spec)
    lin = TCQLinear(PackedComposite.from_qtensor(qt), None, "tcq-reference")
    before = {k: v.clone() for k, v in lin.packed.tensors().items()}
    lin = lin.to(torch.bfloat16)
    assert all(torch.equal(before[k], v) for k, v in lin.packed.tensors().items())
    assert torch.equal(lin.dequantize(), W_hat)


def test_reports_name_the_tcq_kernels():
    from mixq.runtime.kernels import fast_kernel_for

    s = parse_spec("TCQ3-channel+ip")
    assert fast_kernel_for(s, (64, 128), "cpu") == "tcq-cpu" and fast_kernel_for(s, (64, 128), "cuda") == "triton"


def test_l12_scales_are_fitted_through_the_10_bit_trellis():
    """A TCQ<r>L12 layer's scales come from the 10-bit trellis's fit (a quarter of the search), its codes from
    the 12-bit search at those scales: RTN scales equal the L10 spec's, the error is lower, and under GPTQ too."""
    g = torch.Generator().manual_seed(4)
    W, H = torch.randn(256, 64, generator=g), _hess(64, seed=4)  # long columns: the trellis runs down the rows
    for method in ("rtn", "gptq"):
        q10, W10 = quantize_tcq(W, parse_spec("TCQ3L10-channel"), H, method)
        q12, W12 = quantize_tcq(W, parse_spec("TCQ3L12-channel"), H, method)
        if method == "rtn":  # RTN minimizes the plain squared error, GPTQ the proxy
            assert torch.equal(q12.scale, q10.scale)
            assert float((W - W12).pow(2).sum()) < float((W - W10).pow(2).sum())
        else:
            assert q12.proxy_loss < q10.proxy_loss
        assert torch.equal(q12.dequantize(), W12)


@needs_native
@pytest.mark.parametrize("name,shape", [("TCQ2-channel", (96, 320)), ("TCQ2.5-g64", (64, 256)),
                                        ("TCQ3.5L10-channel", (48, 192)), ("TCQ6L12-g128", (40, 384)),
                                        ("TCQ3-g64", (256, 192))])
def test_native_gptq_sweep_gives_the_torch_sweeps_bits(name, shape, monkeypatch):
    """GPTQ through the trellis with the block's column steps done natively (tcq_cpu.SweepSearch, sweep_runs) gives
    the same bits, scales and weights as the torch column loop (sweep + viterbi), to the bit: group starts inside a
    block and past its end, rows weighted or not, 8-12 state bits."""
    spec = parse_spec(name)
    R, C = shape
    g = torch.Generator().manual_seed(11)
    W, H = torch.randn(R, C, generator=g), _hess(C)
    for rw in (None, torch.rand(R, generator=g) + 0.2):
        native = quantize_tcq(W, spec, H, "gptq", row_weight=rw, block_size=96)
        with monkeypatch.context() as m:
            m.setattr(tcq_cpu.SweepSearch, "make", classmethod(lambda cls, *a: None))
            ref = quantize_tcq(W, spec, H, "gptq", row_weight=rw, block_size=96)
        assert torch.equal(native[0].bits, ref[0].bits) and torch.equal(native[0].scale, ref[0].scale)
        assert torch.equal(native[1], ref[1])


@needs_native
def test_native_gptq_sweep_rejects_what_it_cannot_search():
    s = tcq_cpu.SweepSearch.make(tc.schedule(3, 8), tc.lut(3), 8)
    s.scales(torch.ones(8), torch.ones(8))
    Wt, U = torch.zeros(4, 8), torch.eye(4)
    with pytest.raises(ValueError, match="unit column stride"):
        s.run(Wt, torch.zeros(4, 8), U[:, :2], 0, 4, torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 8))
    bad = tcq_cpu.SweepSearch.make(torch.full((8,), 7, dtype=torch.uint8), tc.lut(3), 8)
    bad.scales(torch.ones(8), torch.ones(8))
    with pytest.raises(ValueError, match="unsupported trellis"):
        bad.run(Wt, torch.zeros(4, 8), U, 0, 4, torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 8))
