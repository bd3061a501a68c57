"""How fast a trellis (TCQ) plan can decode on this CPU: the table gather's floor against the 1.5x-fp32 target.

    OMP_NUM_THREADS=1 python bench/tcq_decode_floor.py --dir DIR [--new-tokens 48] [--repeats 3]

``DIR``: a native directory of a trellis plan (e.g. ``mixq quantize --bpw 3.0``).  Measured, one thread:

1. **The gather**: reading ``lut[state]`` for 16 independent states from a 4096-entry float table (the L = 12
   trellis tables), as AVX2 (8 lanes) and AVX-512 (16 lanes) gathers, ns per element, in a C loop that does
   nothing else (compiled at first use like mixq's own kernels, :mod:`mixq.runtime.kernels.cbuild`).  Every
   trellis weight the decode GEMV reads costs one such element, whatever the rest of the kernel does.
2. **The kernel** (:class:`mixq.runtime.kernels.tcq_cpu.GemvLayer`) on the model's four layer shapes at rates
   2 / 3 / 4, one token, its operands hot in cache: ns per weight.
3. **A decode of DIR** (packed, bf16, ``kernel="auto"``) and of the fp32 model, greedy, batch 1: tokens/s, and the
   time inside the trellis layers' native calls of each step (a wrapper around them).  The rest of a step (the bf16 head,
   transforms, attention, norms, Python) is step - kernel.
4. **The bound**: a kernel at the gather's floor would spend ``floor x trellis weights`` a step; with the rest as
   measured, tokens/s <= 1 / (rest + that).  Compared with 1.5x the fp32 model's tokens/s.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from pathlib import Path

import torch

from common import RESULTS, git_rev, header, machine

GATHER_C = r"""
#include <immintrin.h>
#include <stdint.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
/* seconds for reps passes over n indices (n % 32 == 0) into lut, with `width` lanes per gather (8 or 16);
   a negative result: that width is not compiled in */
double gather_seconds(const float* lut, const int32_t* idx, int n, int reps, int width, float* sink) {
  double t = now();
  if (width == 8) {
#ifdef __AVX2__
    __m256 a = _mm256_setzero_ps(), b = a;
    for (int r = 0; r < reps; r++)
      for (int i = 0; i < n; i += 16) {
        a = _mm256_add_ps(a, _mm256_i32gather_ps(lut, _mm256_loadu_si256((const __m256i*)(idx + i)), 4));
        b = _mm256_add_ps(b, _mm256_i32gather_ps(lut, _mm256_loadu_si256((const __m256i*)(idx + i + 8)), 4));
      }
    float o[8]; _mm256_storeu_ps(o, _mm256_add_ps(a, b)); *sink = o[0];
#else
    return -1.0;
#endif
  } else {
#ifdef __AVX512F__
    __m512 a = _mm512_setzero_ps(), b = a;
    for (int r = 0; r < reps; r++)
      for (int i = 0; i < n; i += 32) {
        a = _mm512_add_ps(a, _mm512_i32gather_ps(_mm512_loadu_si512(idx + i), lut, 4));
        b = _mm512_add_ps(b, _mm512_i32gather_ps(_mm512_loadu_si512(idx + i + 16), lut, 4));
      }
    *sink = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
#else
    return -1.0;
#endif
  }
  return now() - t;
}
"""

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down of SmolLM2 ([out, in])
RATES = [(2, 1, 2, 0), (3, 1, 3, 0), (4, 1, 4, 0)]          # rate, rows a symbol, symbol bits, second step bits


def gather_ns() -> dict[int, float]:
    from mixq.runtime.kernels.cbuild import INT, VOID_P, load

    lib = load("gather_floor", GATHER_C, "no gather timing", {
        "gather_seconds": (ctypes.c_double, [VOID_P, VOID_P, INT, INT, INT, VOID_P])})
    if lib is None:
        raise SystemExit("the gather timing needs a working C compiler (cc)")
    lut = torch.randn(4096)
    idx = torch.randint(0, 4096, (1 << 16,), dtype=torch.int32)
    sink = torch.zeros(1)
    out = {}
    for width in (8, 16):
        best = None
        for _ in range(5):
            s = lib.gather_seconds(lut.data_ptr(), idx.data_ptr(), idx.numel(), 200, width, sink.data_ptr())
            if s < 0:
                break
            best = s if best is None else min(best, s)
        if best is not None:
            out[width] = best / (idx.numel() * 200) * 1e9
    return out


def kernel_ns() -> list[dict]:
    from mixq.formats.composite.tcq_codebook import lut as tcq_lut
    from mixq.runtime.kernels import tcq_cpu

    rows = []
    for R, C in SHAPES:
        for rate, P, wbits, k1 in RATES:
            stream = torch.randint(0, 256, ((R // P) * C * wbits // 8 + 8,), dtype=torch.uint8)
            layer = tcq_cpu.GemvLayer(stream, torch.rand(R, 1) + 0.5, tcq_lut(rate, 12), R, C, P, wbits, k1, 12, C)
            x = torch.randn(1, C)
            for _ in range(10):
                layer(x)
            best = min(_time(lambda: layer(x), 50) for _ in range(5))
            rows.append({"shape": [R, C], "rate": rate, "ns_per_weight": best / (R * C) * 1e9})
    return rows


def _time(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def decode(model, prompt, new_tokens: int, repeats: int) -> dict:
    """Median tokens/s over ``repeats`` greedy decodes, and the seconds a step spends in trellis kernel calls (the
    layers' native calls, :class:`~mixq.runtime.kernels.tcq_step.Step`, and the kernel's own where a layer has no
    step: no AVX-512)."""
    from mixq.runtime import greedy_generate
    from mixq.runtime.kernels import tcq_cpu, tcq_step

    spent = [0.0, 0]
    calls = {cls: cls.__call__ for cls in (tcq_cpu.GemvLayer, tcq_step.Step)}

    def timer(call):
        def timed(self, x, *dtype):
            t = time.perf_counter()
            y = call(self, x, *dtype)
            spent[0] += time.perf_counter() - t
            spent[1] += 1
            return y
        return timed

    greedy_generate(model, prompt, 8, stop_at_eos=False)
    speeds, kernel = [], []
    for cls, call in calls.items():
        cls.__call__ = timer(call)
    try:
        for _ in range(repeats):
            spent[:] = [0.0, 0]
            r = greedy_generate(model, prompt, new_tokens, stop_at_eos=False)
            steps = new_tokens - 1
            speeds.append(steps / r.decode_s)
            kernel.append(spent[0] / (steps + 1))  # the prefill's calls are few tokens too: spread over all
    finally:
        for cls, call in calls.items():
            cls.__call__ = call
    i = speeds.index(statistics.median(speeds))
    return {"tok_s": speeds[i], "step_s": 1 / speeds[i], "kernel_s": kernel[i], "kernel_calls": spent[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", required=True, help="a native directory of a trellis plan")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import mixq
    from mixq import data
    from mixq.export.native import load_quantized

    g = gather_ns()
    k = kernel_ns()
    q, tok, info = load_quantized(args.dir, dtype=torch.bfloat16, packed=True)
    ids = data.tokenize(data.load_corpus("ptb", "test"), tok)[: args.prompt_tokens]
    prompt = torch.as_tensor(ids).reshape(1, -1)
    n_tcq = sum(m.in_features * m.out_features for m in q.modules() if type(m).__name__ == "TCQLinear")
    dq = decode(q, prompt, args.new_tokens, args.repeats)
    del q
    ref, _ = mixq.load_model(info["base_model"])
    d32 = decode(ref, prompt, args.new_tokens, args.repeats)
    floor = min(g.values())
    rest = dq["step_s"] - dq["kernel_s"]
    bound = 1 / (rest + floor * 1e-9 * n_tcq)
    cmd = f"OMP_NUM_THREADS=1 python bench/tcq_decode_floor.py --dir {args.dir}"
    doc = {"command": cmd, "commit": git_rev(), "machine": machine(), "args": vars(args), "gather_ns": g,
           "kernel": k, "trellis_weights": n_tcq, "decode_plan": dq, "decode_fp32": d32, "rest_s": rest,
           "bound_tok_s": bound, "plan": info.get("recipe") or info.get("meta", {}).get("recipe")}
    (RESULTS / "tcq_decode_floor.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = header("The trellis decode's floor on this CPU (one thread)", cmd)
    lines += ["| gather from a 4096-entry float table | ns per element |", "|---|---:|"]
    lines += [f"| {w} lanes ({'AVX2' if w == 8 else 'AVX-512'}) | {v:.3f} |" for w, v in g.items()]
    lines += ["", "Trellis GEMV kernel, one token, operands hot (ns per weight):", "",
              "| shape [out, in] | " + " | ".join(f"rate {r[0]}" for r in RATES) + " |",
              "|---|" + "---:|" * len(RATES)]
    for R, C in SHAPES:
        vals = [r["ns_per_weight"] for r in k if r["shape"] == [R, C]]
        lines.append(f"| {R} x {C} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    lines += ["", f"Decode of `{args.dir}` (packed bf16, {n_tcq / 1e6:.1f} M trellis weights) against the fp32 model, "
              f"greedy, {args.new_tokens} tokens after {args.prompt_tokens} PTB tokens, median of {args.repeats}:", "",
              "| model | tok/s | ms a step | of which trellis kernel calls |", "|---|---:|---:|---:|",
              f"| fp32 | {d32['tok_s']:.1f} | {d32['step_s'] * 1e3:.1f} | — |",
              f"| trellis plan | {dq['tok_s']:.1f} | {dq['step_s'] * 1e3:.1f} | {dq['kernel_s'] * 1e3:.1f} |", "",
              f"- the kernel in the model: {dq['kernel_s'] / n_tcq * 1e9:.3f} ns per trellis weight; the gather alone: "
              f"{floor:.3f}",
              f"- the rest of a step: {rest * 1e3:.1f} ms; a kernel at the gather's floor: "
              f"{floor * n_tcq * 1e-6:.1f} ms; bound {bound:.1f} tok/s = {bound / d32['tok_s']:.2f}x fp32 "
              f"(target 1.5x = {1.5 * d32['tok_s']:.1f} tok/s)"]
    (RESULTS / "tcq_decode_floor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
