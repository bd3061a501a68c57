"""mixq's K-quant / IQ4_NL fit (RTN, ``mixq.formats.kquant`` / ``iq4nl``) against llama.cpp's own quantizer.

    OMP_NUM_THREADS=1 python bench/kquant_fit.py [--work /tmp/kqf] [--mats 3]

Both quantize the same tensors to the same ggml type; both files are decoded by ``gguf.quants.dequantize`` and the
relative squared error is compared: plain (no importance) and weighted by an importance vector over the input
columns (mixq: ``quantize(w, spec, weight=h)``, the ``diag(H)`` GPTQ passes; llama.cpp: the same ``h`` as its
imatrix).  llama.cpp's side is ``ggml_quantize_chunk`` from the cached build of ``bench/llamacpp.py``
(``libggml-base.a``), called by a 20-line C helper compiled here.

Tensors: heavy-tailed random weights (Student-t, 5 degrees of freedom, 512 x 1536) with a log-normal importance
(``exp(1.5 N(0,1))``), and the ``down_proj`` weights (rows of 1536) of the embedded SmolLM2-135M, which is itself a
dequantized Q4_1 GGUF (its weights sit on a 32-block grid: not a fair fp model, shown apart).

Then GPTQ with the type's grid: the layer proxy of RTN and GPTQ, with and without diag(H) as the importance of
the super-block scale fit.

Writes bench/results/kquant_fit.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from common import RESULTS, header

sys.path.insert(0, str(Path(__file__).parent))
import llamacpp  # noqa: E402

from mixq.algorithms.gptq import gptq_quantize  # noqa: E402  (one tensor's GPTQ proxy: no stage works per tensor)
from mixq.config import family_of, parse_spec  # noqa: E402
from mixq.formats import dequantize, quantize  # noqa: E402

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")
HELPER = r"""
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"
int main(int argc, char **argv) {  /* TYPE NROWS NCOLS in.f32 out.bin [imatrix.f32] */
    int type = atoi(argv[1]); long nr = atol(argv[2]), nc = atol(argv[3]);
    float *src = malloc(sizeof(float) * nr * nc), *im = NULL;
    FILE *f = fopen(argv[4], "rb"); if (fread(src, sizeof(float), nr * nc, f) != (size_t)(nr * nc)) return 1; fclose(f);
    if (argc > 6) { im = malloc(sizeof(float) * nc); f = fopen(argv[6], "rb");
                    if (fread(im, sizeof(float), nc, f) != (size_t)nc) return 1; fclose(f); }
    void *dst = malloc(ggml_row_size(type, nc) * nr);
    ggml_quantize_init(type);
    size_t n = ggml_quantize_chunk(type, src, dst, 0, nr, nc, im);
    f = fopen(argv[5], "wb"); fwrite(dst, 1, n, f); fclose(f);
    return 0;
}
"""


def helper(work: Path) -> Path:
    exe = work / "ggml_quantize"
    if exe.exists():
        return exe
    base = llamacpp.build().parent.parent  # .../llama.cpp-<version>
    (work / "q.c").write_text(HELPER)
    subprocess.run(["gcc", "-O2", "-fopenmp", f"-I{base / 'src/ggml/include'}", str(work / "q.c"), "-o", str(exe),
                    str(base / "build/ggml/src/libggml-base.a"), "-lm", "-lpthread", "-lstdc++"], check=True)
    return exe


def llama_cpp(exe: Path, work: Path, t: str, w: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    w.numpy().astype(np.float32).tofile(work / "w.f32")
    extra = []
    if h is not None:
        h.numpy().astype(np.float32).tofile(work / "h.f32")
        extra = [work / "h.f32"]
    qt = gguf.GGMLQuantizationType[t]
    subprocess.run([exe, str(int(qt)), str(w.shape[0]), str(w.shape[1]), work / "w.f32", work / "o.bin", *extra],
                   check=True)
    data = np.fromfile(work / "o.bin", np.uint8).reshape(w.shape[0], -1)
    return torch.from_numpy(gguf.quants.dequantize(data, qt).reshape(w.shape).astype(np.float32))


def compare(exe: Path, work: Path, mats: list[torch.Tensor], imps: list[torch.Tensor]) -> dict:
    out = {}
    for t in TYPES:
        spec, row = parse_spec(t), {}
        for use_imp in (False, True):
            mine, theirs = [], []
            for w, h in zip(mats, imps):
                hh = h if use_imp else torch.ones_like(h)
                ref = float((w * w * hh).sum())
                e_m = dequantize(quantize(w, spec, weight=hh[None] if use_imp else None)) - w
                e_l = llama_cpp(exe, work, t, w, h if use_imp else None) - w
                mine.append(float((e_m * e_m * hh).sum()) / ref)
                theirs.append(float((e_l * e_l * hh).sum()) / ref)
            key = "importance" if use_imp else "plain"
            row[key] = {"mixq": float(np.mean(mine)), "llama.cpp": float(np.mean(theirs)),
                        "ratio": float(np.mean([a / b for a, b in zip(mine, theirs)]))}
        out[t] = row
        print(t, json.dumps(row), flush=True)
    return out


def gptq_section() -> dict:
    """The layer proxy ``tr(dW H dW^T)`` of RTN and GPTQ, each without and with diag(H) as the scale fit's importance
    (GPTQ's default for these types), on a Student-t weight and correlated inputs with log-normal column scales."""
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(2)
    w = (torch.distributions.StudentT(5.0).sample((256, 1536)) * 0.02).float()
    mix = torch.eye(1536) + 0.3 * torch.randn(1536, 1536, generator=g) / 1536**0.5
    x = torch.randn(4096, 1536, generator=g) @ mix
    x = x * torch.exp(torch.randn(1536, generator=g))
    h = x.T @ x / x.shape[0]

    def proxy(wq):
        d = (w - wq).double()
        return float(((d @ h.double()) * d).sum())

    out = {}
    for t in TYPES:
        spec, fam = parse_spec(t), family_of(parse_spec(t))
        row = {"rtn": proxy(dequantize(quantize(w, spec))),
               "rtn_diagH": proxy(dequantize(quantize(w, spec, weight=torch.diagonal(h)[None]))),
               "gptq_diagH": gptq_quantize(w, h, spec).proxy_loss}
        type(fam).importance_fit = False
        try:
            row["gptq"] = gptq_quantize(w, h, spec).proxy_loss
        finally:
            type(fam).importance_fit = True
        out[t] = row
        print(t, json.dumps(row), flush=True)
    return out


def table(res: dict) -> list[str]:
    lines = ["| type | plain: mixq | plain: llama.cpp | ratio | importance: mixq | importance: llama.cpp | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for t, r in res.items():
        p, i = r["plain"], r["importance"]
        lines.append(f"| {t} | {p['mixq']:.5f} | {p['llama.cpp']:.5f} | {p['ratio']:.3f} | {i['mixq']:.5f} | "
                     f"{i['llama.cpp']:.5f} | {i['ratio']:.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/kqf")
    ap.add_argument("--mats", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    exe = helper(work)
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(0)
    mats = [(torch.distributions.StudentT(5.0).sample((512, 1536)) * 0.02).float() for _ in range(args.mats)]
    imps = [torch.exp(1.5 * torch.randn(1536, generator=g)) for _ in mats]
    synth = compare(exe, work, mats, imps)
    from mixq import load_model

    model, _ = load_model("smollm2-135m")
    downs = [m.weight.detach().float() for n, m in model.named_modules() if n.endswith("down_proj")][::10][:args.mats]
    smol = compare(exe, work, downs, [torch.exp(1.5 * torch.randn(d.shape[1], generator=g)) for d in downs])
    gp = gptq_section()
    cmd = "OMP_NUM_THREADS=1 python bench/kquant_fit.py " + " ".join(sys.argv[1:])
    lines = header("mixq's K-quant / IQ4_NL fit against llama.cpp's quantizer (RTN, same tensors)", cmd)
    lines += ["Relative squared error `sum(h (w - w_hat)^2) / sum(h w^2)` (h = 1 for plain), mean over the tensors; "
              "ratio = mean of mixq / llama.cpp per tensor (< 1: mixq's fit is closer).  llama.cpp: "
              "`ggml_quantize_chunk` of the cached llama-cpp-python 0.3.36 build, imatrix = h.", "",
              f"## Student-t (5 dof) random weights, {args.mats} x 512 x 1536, log-normal importance", "",
              *table(synth),
              "", f"## SmolLM2-135M down_proj ({len(downs)} layers, 576 x 1536; a dequantized Q4_1 model)", "",
              *table(smol), "",
              "## GPTQ with the type's grid (256 x 1536 Student-t weight, correlated inputs, log-normal column scales)",
              "", "Layer proxy `tr(dW H dW^T)` (lower is better); `diagH`: the scale fit weighted by diag(H).", "",
              "| type | RTN | RTN, diagH | GPTQ, scales without importance | GPTQ, diagH (default) |",
              "|---|---:|---:|---:|---:|",
              *[f"| {t} | {r['rtn']:.4g} | {r['rtn_diagH']:.4g} | {r['gptq']:.4g} | {r['gptq_diagH']:.4g} |"
                for t, r in gp.items()], ""]
    (RESULTS / "kquant_fit.md").write_text("\n".join(lines))
    doc = {"command": cmd, "synthetic": synth, "smollm2_down": smol, "gptq": gp}
    (RESULTS / "kquant_fit.json").write_text(json.dumps(doc, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
