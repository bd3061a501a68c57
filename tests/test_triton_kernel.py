"""The ``triton`` GPU kernel: layout, interpreter-mode equality with the reference, compile check, why_not, CUDA.

Without a GPU the kernel runs in triton's CPU interpreter, which must be switched on (``TRITON_INTERPRET=1``)
before triton is imported: those cases run in one subprocess (:func:`_interpreter_worker`) whose results the
parametrized tests check.  The interpreter's ``tl.dot`` mishandles bfloat16 (it multiplies the raw bits), so
bf16 is checked on CUDA only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixq.config import parse_spec
from mixq.formats import quantize
from mixq.runtime import AUTO_ORDER, KERNELS, KernelUnsupported, PackedWeight, QuantLinear, fast_kernel_for
from mixq.runtime.kernels import triton_gpu as tg
from mixq.runtime.kernels.triton_jit import interpreting, jitted

HAS_CUDA = torch.cuda.is_available()
SYM = [f"W{b}-g64" for b in range(1, 9)]
OTHER = ["W3-g64-asym", "W4-g64-asym", "W5-g64-asym", "W4-g64-asymf", "W3-g32-asymf", "W8-g64-asymf",
         "W8-channel", "W4-tensor", "W3-g96", "W4-g96-asym", "W4-g24", "W4-g32-se8m0", "W4-g64-sbf16",
         "W4-g32-sfp32", "W2-channel-asym", "NF4-g64", "NF3-g64", "KM3", "KM4-g64", "KM2-tensor", "MXFP4",
         "NVFP4", "FP8", "MXINT8"]
SHAPES = {"W4-g24": (48, 192), "KM3": (40, 100), "W4-g40": (48, 200), "W4-channel-asymf": (33, 200),
          "W1-channel": (33, 200)}
# (spec, M, bias, dtype, forced K splits): every spec at M = 1, 5, 17; the full M x bias x dtype grid for W4-g64
CASES = [(s, m, bias, dt, split) for i, s in enumerate(SYM + OTHER + ["W4-g40", "W4-channel-asymf", "W1-channel"])
         for m, bias, dt, split in [(1, i % 2 == 0, "float16", None), (5, i % 2 == 1, "float32", 2),
                                    (17, True, ("float16", "float32")[i % 2], 3 if i % 3 == 0 else None)]]
CASES += [("W4-g64", m, bias, dt, None) for m in (1, 5, 17) for bias in (False, True) for dt in ("float16", "float32")]
CASES = list(dict.fromkeys(CASES))
EXACT_SPECS = list(dict.fromkeys(SYM + OTHER + ["W4-g40", "W4-channel-asymf", "W1-channel"]))


def _case_id(c) -> str:
    s, m, bias, dt, split = c
    return f"{s}-M{m}-{'bias' if bias else 'nobias'}-{dt}-split{split or 'auto'}"


def _packed(name: str, seed: int = 0) -> PackedWeight:
    shape = SHAPES.get(name, (80, 192))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[:, :8] += 0.2  # asymmetric rows, so offsets and zero points are not all the midpoint
    return PackedWeight.from_qtensor(quantize(w, parse_spec(name)))


def _tolerance(x: torch.Tensor, pw: PackedWeight, b: torch.Tensor | None) -> torch.Tensor:
    """One rounding of the output in ``x.dtype`` plus fp32 accumulation over ``in`` terms, of ``|x| |Ŵ|ᵀ + |b|``."""
    w = pw.dequantize().to(x.dtype).double()
    mag = x.double().abs() @ w.abs().t() + (0 if b is None else b.to(x.dtype).double().abs())
    unit = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}[x.dtype]
    return (unit + x.shape[1] * 2.0**-24) * mag + 1e-30


def _interpreter_worker() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1: every case on CPU tensors, JSON results on stdout."""
    assert interpreting(), "set TRITON_INTERPRET=1 before triton is imported"
    out = {}
    for c in CASES:
        name, m, bias, dt, split = c
        pw = _packed(name, seed=m)
        state = tg.prepare(pw)
        g = torch.Generator().manual_seed(100 + m)
        x = torch.randn(m, pw.shape[1], generator=g).to(getattr(torch, dt))
        b = torch.randn(pw.shape[0], generator=g) if bias else None
        y = tg.linear(x, None, state, b, split_k=split)
        ref = KERNELS["reference"].linear(x, pw, None, b)
        err = (y.double() - ref.double()).abs()
        tol = 2 * _tolerance(x, pw, b)
        out[_case_id(c)] = {"dtype": str(y.dtype), "shape": list(y.shape), "ok": bool((err <= tol).all()),
                            "err": float(err.max()), "split": tg.launch_args(x, state, b, split)[0][2]}
    for name in EXACT_SPECS:  # x = I: the kernel's Ŵ itself, bit for bit
        pw = _packed(name)
        y = tg.linear(torch.eye(pw.shape[1]), None, tg.prepare(pw), None, tiles=(64, 128, 128))
        out["exact-" + name] = {"ok": bool(torch.equal(y.t(), pw.dequantize()))}
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import test_triton_kernel as t; t._interpreter_worker()")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_interpreted_kernel_equals_reference(interpreted, case):
    res = interpreted[_case_id(case)]
    name, m, bias, dt, split = case
    assert res["dtype"] == f"torch.{dt}" and res["shape"] == [m, _packed(name).shape[0]]
    assert res["ok"], f"max |triton - reference| = {res['err']}"
    if split:
        assert res["split"] == split


@pytest.mark.parametrize("name", EXACT_SPECS)
def test_interpreted_kernel_dequantizes_exactly(interpreted, name):
    assert interpreted["exact-" + name]["ok"]


# ---------------------------------------------------------------------- layout (no triton needed)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [1, 31, 64, 100])
def test_words_round_trip(bits, cols):
    g = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(0, 2**bits, (7, cols), generator=g, dtype=torch.uint8)
    words = tg.pack_words(codes, bits)
    c = tg.CODES_PER_WORD[bits]
    assert words.dtype == torch.int32 and tuple(words.shape) == (-(-cols // c), 7)
    assert (words[0, 0].item() & (2**bits - 1)) == codes[0, 0].item()  # code 0 in the low bits
    assert torch.equal(tg.unpack_words(words, bits, cols), codes)


def _emulate(state) -> torch.Tensor:
    """The kernel's dequantization written with torch ops (same operations, same order): float32 [out, in]."""
    n, k = state["shape"]
    q = tg.codes_from_state(state).float()
    gidx = torch.arange(k) // state["group"]
    per = lambda t: t.float()[gidx].t()  # noqa: E731  [groups, out] -> [out, in]
    if state["lut_mode"] == tg.LUT_GLOBAL:
        v = state["lut"].float()[q.long()]
    elif state["lut_mode"] == tg.LUT_PER_GROUP:
        lut = state["lut"].float().reshape(-1, n, state["lut"].shape[-1])  # [groups, out, L]
        v = lut[gidx[None, :], torch.arange(n)[:, None], q.long()]
    else:
        v = q
    z = state["zmode"]
    v = v - state["zconst"] if z == tg.Z_SUB_CONST else v - per(state["zero"]) if z == tg.Z_SUB else \
        v * 2.0 - 1.0 if z == tg.Z_BINARY else v
    if state["scale"] is not None:
        v = v * per(state["scale"])
    return v + per(state["zero"]) if z == tg.Z_ADD else v


@pytest.mark.parametrize("name", EXACT_SPECS)
def test_state_holds_the_exact_weight(name):
    pw = _packed(name)
    state = tg.prepare(pw)
    assert torch.equal(tg.codes_from_state(state), pw.codes_unpacked())
    assert torch.equal(_emulate(state), pw.dequantize())
    assert state["nbytes"] == tg.state_nbytes(state) > 0 and state["holds_codes"]
    groups = pw.shape[1] // state["group"]
    for key in ("scale", "zero"):
        if state[key] is not None:
            assert tuple(state[key].shape) == ((1 if "tensor" in name else groups), pw.shape[0])


def test_params_take_the_narrowest_exact_dtype():
    assert tg.prepare(_packed("W4-g64"))["scale"].dtype == torch.float16
    assert tg.prepare(_packed("W4-g64-sbf16"))["scale"].dtype == torch.float16  # these bf16 values fit fp16
    tiny = PackedWeight.from_qtensor(quantize(torch.randn(16, 64) * 1e-6, parse_spec("W4-g64-sbf16")))
    assert tg.prepare(tiny)["scale"].dtype == torch.bfloat16  # below fp16's subnormals
    assert tg.prepare(_packed("W4-g32-sfp32"))["scale"].dtype == torch.float32
    assert tg.prepare(_packed("W4-g64-asym"))["zero"].dtype == torch.float16  # integer zero points
    st = tg.prepare(_packed("W4-g64"))
    assert st["nbytes"] == 80 * (192 // 8) * 4 + 80 * 3 * 2  # 4 bits per weight + fp16 scales


# ---------------------------------------------------------------------- registry, why_not, import
def test_registered_first_in_auto_order():
    k = KERNELS["triton"]
    assert AUTO_ORDER[0] == "triton" and AUTO_ORDER[-1] == "reference"
    assert not k.needs_packed and k.codes_from_state is tg.codes_from_state and k.max_tokens is None
    layer = QuantLinear(_packed("W4-g64"))
    assert layer.kernel_for(torch.zeros(1, 192)).name == "reference"  # CPU behaviour unchanged
    want = "triton" if tg.triton is not None else "reference"
    assert fast_kernel_for(parse_spec("NF4-g64"), (64, 128), device="cuda") == want
    assert fast_kernel_for(parse_spec("FP16"), (64, 128), device="cuda") == "reference"


def test_why_not_reasons(monkeypatch):
    pytest.importorskip("triton")
    pw = _packed("W4-g64")
    assert tg.why_not(pw, torch.zeros(1, 192, dtype=torch.float16)) == "it runs on CUDA tensors only"
    with pytest.raises(KernelUnsupported, match="CUDA tensors only"):
        QuantLinear(pw, kernel="triton")(torch.zeros(1, 192, dtype=torch.float16))
    keep = PackedWeight.from_qtensor(quantize(torch.randn(16, 32), parse_spec("FP16")))
    assert "floating point" in tg.why_not(keep, torch.zeros(1, 32))
    assert "floating point" in tg.spec_why_not(keep.spec, keep.shape)
    monkeypatch.setattr(tg, "triton", None)
    assert tg.why_not(pw, torch.zeros(1, 192)) == "triton is not installed: pip install 'mixq[gpu]'"


def test_module_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import torch\n"
            "from mixq.runtime import KERNELS, QuantLinear, PackedWeight\n"
            "from mixq.runtime.kernels import triton_gpu as t\n"
            "from mixq.config import parse_spec; from mixq.formats import quantize\n"
            "pw = PackedWeight.from_qtensor(quantize(torch.randn(16, 64), parse_spec('W4-g32')))\n"
            "print(t.triton is None, KERNELS['triton'].why_not(pw, torch.zeros(1, 64)))\n"
            "print(QuantLinear(pw)(torch.zeros(1, 64)).shape, t.prepare(pw)['holds_codes'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["True triton is not installed: pip install 'mixq[gpu]'",
                                     "torch.Size([1, 16]) True"]


# ---------------------------------------------------------------------- compiled for a real GPU (no GPU needed)
@pytest.mark.parametrize("name,dtype,m,arch", [("W4-g64", torch.float16, 1, 90), ("W3-g40", torch.bfloat16, 5, 80),
                                               ("W4-g64-asymf", torch.float32, 40, 90), ("KM3", torch.float16, 16, 90),
                                               ("W1-channel", torch.float16, 3, 90)])
def test_kernel_compiles_to_cubin(name, dtype, m, arch):
    """triton.compile to a cubin for sm_80 / sm_90 with the launch's real arguments: catches what the interpreter
    does not check (constexpr branches, tl.dot shapes and dtypes, layouts, ptxas)."""
    triton = pytest.importorskip("triton")
    if interpreting():
        pytest.skip("TRITON_INTERPRET=1: no compilation")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    shape = {"W3-g40": (48, 200), "KM3": (40, 100), "W1-channel": (33, 200)}.get(name, (80, 192))
    pw = PackedWeight.from_qtensor(quantize(torch.randn(shape), parse_spec(name)))
    x = torch.randn(m, shape[1]).to(dtype)
    split = 2 if m < 16 else 1
    grid, args, constexprs, options = tg.launch_args(x, tg.prepare(pw), torch.randn(shape[0]), split_k=split)
    fn = jitted(tg._qmm_kernel, "int / lookup-table")
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32"}
    sig = {a: ("*" + names[v.dtype]) if isinstance(v, torch.Tensor) else "i32" for a, v in zip(fn.arg_names, args)}
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    assert kernel.asm["cubin"] and kernel.metadata.num_warps == options["num_warps"]


# ---------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["W4-g128", "W3-g128", "W8-g128", "W4-g64-asymf", "W3-g96-asym", "W2-channel",
                                  "NF4-g64", "KM3", "MXFP4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_auto_runs_triton_on_cuda(name, dtype):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    w = torch.randn(320, 384) * 0.05
    q = quantize(w, parse_spec(name))
    b = torch.randn(320)
    layer = QuantLinear.from_qtensor(q, b).cuda()
    wq = PackedWeight.from_qtensor(q).dequantize().cuda()
    for m in (1, 16, 40, 300):
        x = torch.randn(m, 384, device="cuda").to(dtype)
        y = layer(x)
        assert layer.last_kernel == "triton" and y.dtype == dtype and y.shape == (m, 320)
        exact = F.linear(x.double(), wq.to(dtype).double(), b.to(dtype).double().cuda())
        mag = x.double().abs() @ wq.to(dtype).double().abs().t() + b.to(dtype).double().abs().cuda()
        unit = 2.0**-11 if dtype == torch.float16 else 2.0**-8
        assert torch.all((y.double() - exact).abs() <= (unit + 384 * 2.0**-24) * mag + 1e-6)
    assert layer.codes_released  # the state holds every code
    assert torch.equal(layer.packed.codes.cpu(), PackedWeight.from_qtensor(q).codes)
    eye = torch.eye(384, device="cuda")  # fp32, ieee dot: Ŵ itself, bit for bit
    assert torch.equal(tg.linear(eye, None, layer._state["triton"], None).t(), wq)
