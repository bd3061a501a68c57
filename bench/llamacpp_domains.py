"""llama.cpp's own quantizations scored by mixq in two domains: how far its files fit their calibration text.

    OMP_NUM_THREADS=1 python bench/llamacpp_domains.py --work /tmp/lcd [--types IQ3_S,Q4_K_M] \\
        [--calib-chunks 64] [--mixq LABEL=EVAL.json ...]

The generalization issue asks that mixq's KL on text no calibration saw stay within 1.3x of its KL on the
calibration domain.  This script measures the same ratio for llama.cpp's quantizer, on mixq's evaluation
protocol, so the two can be read side by side at equal in-domain KL:

1. The embedded model as an F16 GGUF, PTB train/test as text (``bench/gguf_vs_llamacpp.py``'s helpers).
2. ``llama-imatrix`` on ``--calib-chunks`` x 512 tokens of PTB train: the importance matrix a user would make
   from the same calibration domain mixq's PTB rows come from.
3. Each stock type: ``llama-quantize --imatrix`` (token embedding and output F16), then the file scored by ``mixq
   eval FILE.gguf --corpus ptb,fortunes --tokens 4096`` against the fp32 model (mixq reads a GGUF file through
   transformers' loader, gguf-py's dequantization: the file's exact weights in fp32) -- the protocol of every
   two-domain figure in ``bench/results`` (KL on the first 4,096 tokens of each test split, 512-token windows).  The F16 file
   itself is scored too (the floor of reading a file back).
4. ``--mixq LABEL=EVAL.json``: rows of ``mixq eval`` JSONs of mixq's own plans, put in the same table.

Writes bench/results/<--results>.{md,json}; every step is cached in ``--work`` (a rerun redoes what is missing).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import llamacpp
from common import RESULTS, header
from gguf_vs_llamacpp import block_linear_bpw, f16_gguf, importance_matrix, stock, texts

TYPES = ("IQ2_M", "IQ3_S", "IQ4_XS", "Q3_K_M", "Q4_K_M", "Q5_K_M")


def score(gguf_path: Path, model_name: str, out: Path, args) -> None:
    """``mixq eval`` of the file itself (mixq reads a .gguf as its dequantized weights, cached; the cached copy,
    half a GB in fp32, is deleted once scored)."""
    from mixq.models import local_gguf_cache

    cmd = [sys.executable, "-m", "mixq", "eval", str(gguf_path), "--reference", model_name, "--corpus", args.corpus,
           "--tokens", str(args.tokens), "--out", str(out)]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    shutil.rmtree(local_gguf_cache(gguf_path)[0], ignore_errors=True)


def row(name: str, who: str, doc: dict, bpw: float | None, corpora: list[str]) -> dict:
    kl = {c: doc["domains"][c]["kl"] for c in corpora}
    return {"name": name, "who": who, "bpw": bpw, "kl": kl,
            "ratio": {c: kl[c] / kl[corpora[0]] for c in corpora[1:]},
            "top1": {c: doc["domains"][c]["top1_agreement"] for c in corpora}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamacpp_domains"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--calib-chunks", type=int, default=64, help="imatrix chunks of 512 PTB-train tokens")
    ap.add_argument("--corpus", default="ptb,fortunes")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mixq", nargs="*", default=[], metavar="LABEL=EVAL.json",
                    help="`mixq eval` JSONs of mixq plans to put in the same table")
    ap.add_argument("--results", default="llamacpp_domains")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    corpora = args.corpus.split(",")
    t0 = time.perf_counter()
    tools = llamacpp.tools()
    train, _ = texts(args.work)
    f16 = f16_gguf(args.work, args.model)
    imatrix = importance_matrix(tools, f16, train, args.work, 512, args.calib_chunks, args.threads)
    rows = []
    for name in ["F16", *[t for t in args.types.split(",") if t]]:
        g = f16 if name == "F16" else stock(tools, f16, imatrix, name, args)
        out = args.work / f"eval-{name}.json"
        if not out.exists():
            score(g, args.model, out, args)
        rows.append(row(name, "llama.cpp" if name != "F16" else "file floor", json.loads(out.read_text()),
                        block_linear_bpw(g)["block_linear_bpw"], corpora))
        print(f"{name}: {rows[-1]['kl']}", flush=True)
    for item in args.mixq:
        label, _, path = item.partition("=")
        doc = json.loads(Path(path).read_text())
        rows.append(row(label, "mixq", doc, doc.get("size", {}).get("bpw_linears"), corpora))
    doc = {"rows": rows, "model": args.model, "corpora": corpora, "tokens": args.tokens,
           "calib_chunks": args.calib_chunks, "seconds": time.perf_counter() - t0,
           "llama_cpp": llamacpp.VERSION}
    (RESULTS / f"{args.results}.json").write_text(json.dumps(doc, indent=1))
    write_md(doc, RESULTS / f"{args.results}.md")
    plot(doc, RESULTS / f"{args.results}.png")


def plot(doc: dict, path: Path) -> None:
    """KL against bpw, one line per (tool, corpus): in domain solid, out of domain dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for who, marker in (("llama.cpp", "o"), ("mixq", "s")):
        rows = sorted((r for r in doc["rows"] if r["who"] == who), key=lambda r: r["bpw"])
        for c, ls in zip(doc["corpora"], ("-", "--", ":", "-.")):
            ax.plot([r["bpw"] for r in rows], [r["kl"][c] for r in rows], marker + ls, label=f"{who}, {c}")
        for r in rows:
            ax.annotate(r["name"].split(" ")[0 if who == "llama.cpp" else -1], (r["bpw"], r["kl"][doc["corpora"][0]]),
                        fontsize=7, xytext=(4, -9), textcoords="offset points")
    ax.set_xlabel("bits per weight of the block linears")
    ax.set_ylabel("KL to the fp32 model (mixq eval)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{doc['model']}: in domain ({doc['corpora'][0]}, the calibration's) and out of domain\n"
                 "llama.cpp (imatrix on PTB train) and mixq plans, scored alike")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_md(doc: dict, path: Path) -> None:
    c = doc["corpora"]
    lines = header("llama.cpp's quantizations and mixq's plans, each scored by mixq in two domains",
                   "python " + shlex.join(sys.argv))
    lines += [f"{doc['model']}; llama.cpp {doc['llama_cpp']}: `llama-quantize --imatrix` (imatrix on "
              f"{doc['calib_chunks']} x 512 tokens of PTB train; token embedding and output F16), each file read "
              "back in fp32 by transformers' GGUF loader and scored by `mixq eval` like every mixq plan: KL to the "
              f"fp32 model on the first {doc['tokens']} tokens of each test split ({', '.join(c)}), 512-token "
              f"windows.  ratio: KL on a corpus / KL on {c[0]}.  bpw: block linears, every stored bit counted."
              + ("  The embedded SmolLM2's weights sit on a 4-bit / g32 asymmetric grid (its GGUF is Q4_1): the "
                 "types from ~5 bpw up find much of that grid again (Q5_K_M scores below Q6_K), so their KL "
                 "flatters them." if doc["model"] == "smollm2-135m" else ""), "",
              "| file / plan | by | bpw | " + " | ".join(f"KL {x}" for x in c) + " | "
              + " | ".join(f"ratio {x}" for x in c[1:]) + " | " + " | ".join(f"top-1 {x}" for x in c) + " |",
              "|---|---|---:|" + "---:|" * (3 * len(c) - 1)]
    for r in sorted(doc["rows"], key=lambda r: (r["who"] != "file floor", -r["kl"][c[0]])):
        lines.append(f"| {r['name']} | {r['who']} | {r['bpw']:.3f} | "
                     + " | ".join(f"{r['kl'][x]:.4f}" for x in c) + " | "
                     + " | ".join(f"{r['ratio'][x]:.2f}" for x in c[1:]) + " | "
                     + " | ".join(f"{100 * r['top1'][x]:.1f}" for x in c) + " |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
