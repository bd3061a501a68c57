"""mixq ``--target gguf`` plans against llama.cpp's own quantizer, measured by llama.cpp itself (issue 15 item 2).

    OMP_NUM_THREADS=1 python bench/gguf_vs_llamacpp.py --work /tmp/gb [--chunks 16] [--types Q4_0,Q8_0] \\
        [--bpw 4.25,4.5,5,6] [--measurement m.json] [--model smollm2-135m|gemma3-270m]

Steps (each artifact cached in ``--work``; a rerun redoes only what is missing):

1. llama.cpp's tools (``bench/llamacpp.py``: the llama-cpp-python sdist's vendored tree, built once).
2. The model (``--model``, an embedded one: SmolLM2-135M by default, or gemma3-270m) as an F16 GGUF written by
   mixq (``write_gguf`` with no quantized layer); PTB train and test as text files.
3. ``llama-imatrix`` on PTB train (``--calib-chunks`` x ``--ctx`` tokens).
4. Stock types: ``llama-quantize --imatrix`` from the F16 file, token embedding and output kept F16
   (``--token-embedding-type f16 --output-tensor-type f16``: mixq keeps them F16 too, so the files differ
   only in the block linears).
5. mixq: one measurement (``mixq measure --candidates gguf``, GPTQ errors, PTB train rows), a
   ``--target gguf`` plan per budget, ``mixq quantize --plan`` (GPTQ, the same PTB rows), ``mixq export
   --format gguf`` (exact: mixq's codes and scales, bit for bit).
6. ``llama-perplexity --kl-divergence`` of every file against the F16 file's logits on the first
   ``--chunks`` x ``--ctx`` tokens of PTB test (llama.cpp scores the second half of each chunk).
7. For one mixq plan (``--check-bpw``): the same PPL computed by mixq in torch on the same tokens with the same
   protocol (second half of each ``--ctx`` chunk), its fake-quant model vs the F16 GGUF's tokens; ``mixq eval``'s
   own figures; and ``llama-cli`` generating from the file.  Also ``llama-tokenize`` of the test text against the
   HF tokenizer (mixq's side of every comparison uses the HF ids; for a model whose tokenizer adds BOS, as
   Gemma's does, llama.cpp tokenizes the text with BOS first and puts BOS at each chunk's start, and so does
   :func:`chunk_ids`).

Writes bench/results/gguf_vs_llamacpp.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, header

sys.path.insert(0, str(Path(__file__).parent))
import llamacpp  # noqa: E402

STOCK = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "IQ2_M", "IQ3_S", "IQ4_XS", "IQ4_NL")
PROMPT = "The capital of France is"
# weight repacking off (``--no-repack``) for every tool that runs a quantized file: with it, this llama.cpp built
# GGML_NATIVE on a Sapphire Rapids CPU (AMX_INT8, REPACK) dies with signal 11 in llama-perplexity on every
# Q4_0 / Q8_0 / K-quant / IQ4_XS file (the types with a repacked or AMX layout; IQ2_M / IQ3_S / IQ4_NL ran).
# The plain CPU kernels compute the same dot products (8-bit activations), so the KLD measures the files alike.
NO_REPACK = ["-nr"]


def run(cmd: list, log: Path, env: dict | None = None, timeout: float | None = None) -> str:
    """Run ``cmd``, its stdout+stderr to ``log``; raises with the log's tail on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    text = log.read_text(errors="replace")
    if p.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ... failed ({p.returncode}):\n{text[-3000:]}")
    print(f"  {Path(str(cmd[0])).name} {time.perf_counter() - t0:.0f} s -> {log.name}", flush=True)
    return text


def mixq_cmd(*args) -> list:
    return [sys.executable, "-m", "mixq.cli", *args]


def texts(work: Path) -> tuple[Path, Path]:
    from mixq import data

    train, test = work / "ptb_train.txt", work / "ptb_test.txt"
    if not train.exists():
        train.write_text(data.load_corpus("ptb", "train"))
    if not test.exists():
        test.write_text(data.load_corpus("ptb", "test"))
    return train, test


def f16_gguf(work: Path, model_name: str) -> Path:
    out = work / f"{model_name}-f16.gguf"
    if not out.exists():
        from mixq.export.gguf import write_gguf
        from mixq.export.gguf_vocab import _embedded_pre
        from mixq import load_model

        model, tok = load_model(model_name)
        write_gguf(model, tok, {}, out, float_type="f16", name=model_name, tokenizer_pre=_embedded_pre(model_name))
    return out


_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"


def parse_kld(text: str) -> dict:
    """The figures ``llama-perplexity --kl-divergence`` prints (PPL of both, KLD mean/p99/max, same top p)."""
    pats = {
        "ppl": rf"Mean PPL\(Q\)\s*:\s*{_NUM}\s*±\s*{_NUM}",
        "ppl_base": rf"Mean PPL\(base\)\s*:\s*{_NUM}\s*±\s*{_NUM}",
        "kld": rf"Mean\s+KLD:\s*{_NUM}\s*±\s*{_NUM}",
        "kld_p99": rf"99\.0%\s+KLD:\s*{_NUM}",
        "kld_max": rf"Maximum KLD:\s*{_NUM}",
        "same_top_p": rf"Same top p:\s*{_NUM}\s*±\s*{_NUM}",
    }
    out = {}
    for k, pat in pats.items():
        m = re.search(pat, text)
        if m:
            out[k] = float(m.group(1))
            if m.lastindex and m.lastindex > 1:
                out[k + "_err"] = float(m.group(2))
    return out


def block_linear_bpw(path: Path) -> dict:
    """Bits per weight of the ``blk.*`` 2-D tensors of a GGUF file (from its tensor types), and its type counts."""
    import gguf

    r = gguf.GGUFReader(path)
    bits = numel = 0
    types: dict[str, int] = {}
    for t in r.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            n = int(t.n_elements)
            numel += n
            bits += int(t.n_bytes) * 8
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"block_linear_bpw": bits / numel, "block_linear_types": types}


def kld_eval(tools: dict, model: Path, base: Path, test: Path, args, tag: str) -> dict:
    """llama-perplexity's KLD of ``model`` against ``base``; a finished log of an earlier run is reused only when
    it was made of these same two files (size and modification time of each, in ``ppl-<tag>.key``)."""
    log, key_file = args.work / f"ppl-{tag}.log", args.work / f"ppl-{tag}.key"
    key = " ".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in (model, base, test))
    fresh = (log.exists() and "Mean    KLD" in log.read_text(errors="replace") and key_file.exists()
             and key_file.read_text() == key)
    if not fresh:
        key_file.unlink(missing_ok=True)
        run([tools["llama-perplexity"], "-m", model, "-f", test, "-c", args.ctx, "--chunks", args.chunks, "-t",
             args.threads, "-b", args.ctx, "--kl-divergence-base", base, "--kl-divergence", *NO_REPACK], log)
        key_file.write_text(key)
    res = parse_kld(log.read_text(errors="replace"))
    res.update(file_bytes=model.stat().st_size, **block_linear_bpw(model))
    return res


def importance_matrix(tools: dict, f16: Path, train: Path, work: Path, ctx: int, chunks: int, threads: int) -> Path:
    """``work/imatrix.dat``: ``llama-imatrix`` on the first ``chunks`` x ``ctx`` tokens of ``train`` (made once)."""
    out = work / "imatrix.dat"
    if not out.exists():
        run([tools["llama-imatrix"], "-m", f16, "-f", train, "-o", out, "-c", ctx, "--chunks", chunks, "-t", threads,
             "-b", ctx], work / "imatrix.log")
    return out


def stock(tools, f16, imatrix, qtype: str, args) -> Path:
    out = args.work / f"stock-{qtype}.gguf"
    if not out.exists():
        run([tools["llama-quantize"], "--imatrix", imatrix, "--token-embedding-type", "f16", "--output-tensor-type",
             "f16", f16, out, qtype, args.threads], args.work / f"quantize-{qtype}.log")
    return out


def mixq_plan_gguf(bpw: float, args, env) -> tuple[Path, Path]:
    """(native directory, exact GGUF) of the ``--target gguf`` plan at ``bpw``."""
    w = args.work
    plan = w / "plans" / f"plan-{bpw:g}bpw.json"
    if not plan.exists():
        run(mixq_cmd("plan", args.measurement, "--bpw", f"{bpw:g}", "--target", "gguf", "--out", w / "plans",
                     "--force"), w / f"plan-{bpw:g}.log", env)
    d = w / f"mixq-{bpw:g}"
    while (w / f".{d.name}.running").exists():  # another process of this bench is making it
        time.sleep(30)
    if not (d / "mixq.json").exists():
        run(mixq_cmd("quantize", "--model", args.model, "--plan", plan, "--target", "gguf", "--calib", "ptb",
                     "--nsamples", args.nsamples, "--seqlen", args.ctx, "--out", d, "--force"),
            w / f"quantize-mixq-{bpw:g}.log", env)
    g = w / f"mixq-{bpw:g}.gguf"
    if not g.exists():
        run(mixq_cmd("export", d, "--format", "gguf", "--out", g, "--force"), w / f"export-mixq-{bpw:g}.log", env)
    return d, g


def chunk_ids(test: Path, args):
    """The token ids llama-perplexity scores: the test text tokenized whole as llama.cpp reads it (:func:`_hf_ids`),
    cut in ``--chunks`` chunks of ``--ctx``, each starting with BOS where the tokenizer adds one."""
    import torch
    from transformers import AutoTokenizer  # noqa: F401  (the embedded tokenizer is an HF one)

    from mixq import load_model

    _, tok = load_model(args.model)
    ids = _hf_ids(tok, test)
    bos = _bos(tok)
    n = args.ctx * args.chunks
    chunks = torch.tensor(ids[:n]).view(args.chunks, args.ctx)
    if bos is not None:
        chunks[:, 0] = bos  # llama-perplexity replaces each chunk's first token by BOS
    return chunks, len(ids)


def _hf_ids(tok, test: Path) -> list[int]:
    """The HF ids of the text as llama-perplexity tokenizes it: BOS first where the tokenizer adds one; special-token
    strings in the text (PTB's ``<unk>``, which Gemma's tokenizer has as its unknown token) are plain text to
    llama.cpp, so they are split here too."""
    ids = tok(test.read_text(), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    bos = _bos(tok)
    return ids if bos is None else [bos] + ids


def _bos(tok) -> int | None:
    """The BOS id where the tokenizer puts one before a text (llama.cpp's ``add_bos_token``), else None."""
    with_sp, plain = tok("a")["input_ids"], tok("a", add_special_tokens=False)["input_ids"]
    return with_sp[0] if len(with_sp) > len(plain) and with_sp[0] == tok.bos_token_id else None


def tokens_check(tools: dict, gguf_path: Path, test: Path, args) -> dict:
    """``llama-tokenize``'s ids of the test text against the HF ids :func:`chunk_ids` scores (BOS as llama.cpp;
    special-token strings in the text as plain text, as llama-perplexity reads it)."""
    from mixq import load_model

    _, tok = load_model(args.model)
    hf = _hf_ids(tok, test)
    text = run([tools["llama-tokenize"], "-m", gguf_path, "-f", test, "--ids", "--no-parse-special",
                "--log-disable"], args.work / "tokenize.log")
    cpp = [int(t) for t in re.findall(r"-?\d+", text[text.rfind("["):])]
    first = next((i for i, (a, b) in enumerate(zip(hf, cpp)) if a != b), None)
    n = args.ctx * args.chunks
    return {"hf": len(hf), "llama_cpp": len(cpp), "first_difference": first, "same_scored_ids": hf[:n] == cpp[:n]}


def torch_ppl(model, chunks) -> float:
    """llama-perplexity's protocol in torch: each chunk run whole, the second half's tokens scored."""
    import torch

    nll, n = 0.0, 0
    half = chunks.shape[1] // 2
    with torch.no_grad():
        for row in chunks:
            logits = model(row[None]).logits[0].float()
            lp = torch.log_softmax(logits[half - 1:-1], dim=-1)
            tgt = row[half:]
            nll -= lp.gather(1, tgt[:, None]).sum().item()
            n += tgt.numel()
    return math.exp(nll / n)


def torch_ppl_as_llamacpp(mixq_dir: Path | None, gguf_path: Path, test: Path, args) -> dict:
    """mixq's own PPL of a file's model on llama.cpp's tokens and protocol (:func:`torch_ppl`), fp32 and with each
    linear layer's input rounded as llama.cpp's CPU dot product for its ggml type rounds it
    (:mod:`mixq.export.ggml_actsim`); ``mixq_dir`` None: the fp32 model against the F16 file (every linear F16)."""
    from mixq import load_model, load_quantized
    from mixq.export.ggml_actsim import simulate, types_of_directory

    done = args.work / f"sim-{gguf_path.stem}.json"
    if done.exists():
        return json.loads(done.read_text())
    chunks, _ = chunk_ids(test, args)
    if mixq_dir is None:
        model, info = load_model(args.model)[0], {}
    else:
        model, _, info = load_quantized(mixq_dir)
    model = model.float().eval()
    types = types_of_directory(model, info)
    out = {"torch_ppl": torch_ppl(model, chunks)}
    with simulate(model, types) as n:
        out.update(torch_ppl_actsim=torch_ppl(model, chunks), actsim_layers=n)
    done.write_text(json.dumps(out, indent=1))
    return out


def agreement(tools, mixq_dir: Path, gguf_path: Path, test: Path, args, env) -> dict:
    """llama.cpp's PPL of mixq's GGUF next to mixq's own: the same tokens and protocol in torch, and mixq eval."""
    from mixq import load_model, load_quantized

    done = args.work / f"check-{mixq_dir.name}.json"
    if done.exists():
        return json.loads(done.read_text())
    chunks, n_tok = chunk_ids(test, args)
    ref, _ = load_model(args.model)
    q, _, _ = load_quantized(mixq_dir)
    out = {"tokens_hf": n_tok, "tokens": tokens_check(tools, gguf_path, test, args),
           "torch_ppl_fp32": torch_ppl(ref.eval(), chunks),
           "torch_ppl_mixq": torch_ppl(q.float().eval(), chunks)}
    ev = args.work / f"eval-{mixq_dir.name}.json"
    if not ev.exists():
        run(mixq_cmd("eval", mixq_dir, "--corpus", "ptb", "--tokens", args.ctx * args.chunks, "--seqlen", args.ctx,
                     "--out", ev), args.work / f"eval-{mixq_dir.name}.log", env)
    e = json.loads(ev.read_text())
    out["mixq_eval"] = {k: e.get(k) for k in ("perplexity", "kl", "top1_agreement")}
    log = args.work / f"generate-{mixq_dir.name}.log"
    cmd = [tools["llama-completion"], "-m", gguf_path, "-p", PROMPT, "-n", 24, "--temp", 0, "-t", args.threads,
           "-no-cnv", *NO_REPACK]
    text = run(cmd, log, timeout=300)
    out["llama_cli"] = {"command": "llama-completion " + " ".join(map(str, cmd[1:])), "output": _generated(text)}
    done.write_text(json.dumps(out, indent=1))
    return out


def _generated(text: str) -> str:
    i = text.find(PROMPT)
    return text[i:i + 400].split("\n\n")[0].strip() if i >= 0 else text[-400:]


def plot(rows: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for who, style in (("llama.cpp", "o"), ("mixq", "s-")):  # stock types: points (several share a size)
        first: dict = {}  # one point per distinct file (a budget above the plan's reach repeats a smaller one)
        for r in rows:
            if r["who"] == who and "kld" in r:
                first.setdefault((r["file_bytes"] / 2**20, r["kld"]), r["name"])
        pts = sorted((x, y, n) for (x, y), n in first.items())
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=who)
        for x, y, n in pts:
            ax.annotate(n.replace("mixq ", ""), (x, y), fontsize=7, xytext=(4, 2 if who == "mixq" else -9),
                        textcoords="offset points")
    ax.set_xlabel("GGUF file size (MiB; token embedding F16 in every file)")
    ax.set_ylabel("mean KLD vs F16 (llama-perplexity)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{model}, PTB test: llama.cpp stock types (imatrix)\nand mixq --target gguf (labels: budget bpw)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf_vs_llamacpp"))
    ap.add_argument("--model", default="smollm2-135m", help="an embedded model (smollm2-135m, gemma3-270m)")
    ap.add_argument("--types", default=",".join(STOCK))
    ap.add_argument("--bpw", default="4.25,4.5,5,5.5,6")
    ap.add_argument("--measurement", type=Path, default=None, help="a `mixq measure --candidates gguf` table")
    ap.add_argument("--check-bpw", type=float, default=4.5, help="the plan checked against mixq's own PPL")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--calib-chunks", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-mixq", action="store_true")
    ap.add_argument("--skip-stock", action="store_true")
    ap.add_argument("--note", default="", help="a line for the results file (e.g. what a reduced run left out)")
    ap.add_argument("--without", default="", help="comma-separated candidate specs the mixq plans may not use "
                    "(e.g. W4-g32-asymf: Q4_1, lossless on the embedded model's Q4_1 weights); the plans are made "
                    "from a copy of the measurement without them")
    ap.add_argument("--results", default="gguf_vs_llamacpp", help="stem of the files written in bench/results")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t_start = time.perf_counter()
    tools = llamacpp.tools()
    train, test = texts(args.work)
    f16 = f16_gguf(args.work, args.model)
    imatrix = importance_matrix(tools, f16, train, args.work, args.ctx, args.calib_chunks, args.threads)
    base = args.work / "f16.kld"
    base_log = args.work / "ppl-f16.log"
    if not base.exists():
        run([tools["llama-perplexity"], "-m", f16, "-f", test, "-c", args.ctx, "--chunks", args.chunks, "-t",
             args.threads, "-b", args.ctx, "--kl-divergence-base", base, *NO_REPACK], base_log)
    m = re.search(rf"Final estimate: PPL = {_NUM} \+/- {_NUM}", base_log.read_text(errors="replace"))
    f16_ppl = float(m.group(1)) if m else None
    rows: list[dict] = [{"who": "F16", "name": "F16", "ppl": f16_ppl, "file_bytes": f16.stat().st_size,
                         **block_linear_bpw(f16), "mixq_ppl": torch_ppl_as_llamacpp(None, f16, test, args)}]
    failed: dict[str, str] = {}
    if not args.skip_stock:
        for qtype in [t for t in args.types.split(",") if t]:
            try:
                g = stock(tools, f16, imatrix, qtype, args)
                rows.append({"who": "llama.cpp", "name": qtype, **kld_eval(tools, g, base, test, args, qtype)})
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                failed[qtype] = str(e).splitlines()[0]
            _save(rows, failed, args, None, t_start)
    check = None
    if not args.skip_mixq:
        while args.measurement is not None and not args.measurement.exists():  # made by another process
            time.sleep(30)
        if args.measurement is None:
            args.measurement = args.work / "measure.json"
            if not args.measurement.exists():
                run(mixq_cmd("measure", "--model", args.model, "--candidates", "gguf", "--calib", "ptb", "--nsamples", args.nsamples,
                             "--seqlen", args.ctx, "--algorithm", "gptq", "--out", args.measurement),
                    args.work / "measure.log", env)
        if args.without:
            args.measurement = _without(args.measurement, args.without.split(","), args.work)
        for bpw in [float(b) for b in args.bpw.split(",") if b]:
            d, g = mixq_plan_gguf(bpw, args, env)
            rep = json.loads(Path(str(g) + ".report.json").read_text())
            rows.append({"who": "mixq", "name": f"mixq {bpw:g}", "plan_bpw": bpw, "exact_export": rep.get("exact"),
                         "exact_tensors": rep["totals"]["exact_tensors"], "tensors": rep["totals"]["tensors"],
                         **kld_eval(tools, g, base, test, args, f"mixq-{bpw:g}"),
                         "mixq_ppl": torch_ppl_as_llamacpp(d, g, test, args)})
            _save(rows, failed, args, check, t_start)
            if bpw == args.check_bpw:
                check = agreement(tools, d, g, test, args, env)
                _save(rows, failed, args, check, t_start)
    _save(rows, failed, args, check, t_start)


def _without(measurement: Path, names: list, work: Path) -> Path:
    """A copy of ``measurement`` (in ``work``) whose layers have no candidate named in ``names``."""
    from mixq.allocate.table import SensitivityTable

    out = work / f"{measurement.stem}-without-{'+'.join(sorted(names))}.json"
    if not out.exists():
        SensitivityTable.load(measurement).without(names).save(out)
    return out


def _measurement_meta(path) -> dict | None:
    if path is None or not Path(path).exists():
        return None
    return json.loads(Path(path).read_text()).get("meta")


def _save(rows, failed, args, check, t_start) -> None:
    doc = {"command": " ".join(sys.argv), "model": args.model, "ctx": args.ctx, "chunks": args.chunks, "calib_chunks": args.calib_chunks,
           "rows": rows, "failed": failed, "check": check, "seconds": time.perf_counter() - t_start,
           "llama_cpp": f"llama-cpp-python {llamacpp.VERSION} sdist, vendor/llama.cpp", "note": args.note,
           "nsamples": args.nsamples, "measurement": _measurement_meta(args.measurement),
           "without": [n for n in args.without.split(",") if n]}
    (RESULTS / f"{args.results}.json").write_text(json.dumps(doc, indent=1))
    write_md(doc, RESULTS / f"{args.results}.md")
    if any("kld" in r for r in rows):
        plot(rows, RESULTS / f"{args.results}.png", args.model)


def _measured(doc: dict) -> str:
    """How the mixq measurement was made, from its own header (``doc["measurement"]``)."""
    m = doc.get("measurement") or {}
    shape = m.get("calibration_shape") or ["?", "?"]
    return (f"{m.get('algorithm', '?').upper()} errors, metric {m.get('metric', '?')}, {shape[0]} x {shape[1]} "
            f"{(m.get('calibration_record') or {}).get('corpus', '?')} rows")


def _agreement_table(doc: dict) -> list[str]:
    rows = [r for r in doc["rows"] if r.get("mixq_ppl") and r.get("ppl")]
    if not rows:
        return []
    lines = ["", "## llama.cpp's perplexity against mixq's own, file by file", "",
             f"mixq's PPL of the same model (the fp32 model for F16, the plan's fake-quant model for mixq's files) on "
             f"llama.cpp's tokens and protocol ({doc['chunks']} x {doc['ctx']}, second halves), in fp32 and with every "
             "linear layer's input rounded as llama.cpp's CPU dot product for its ggml type rounds it "
             "(`mixq.export.ggml_actsim`: q8_0 / q8_1 / q8_K / fp16).  diff = llama.cpp / mixq - 1.", "",
             "| file | PPL llama.cpp | mixq fp32 | diff | mixq, llama.cpp's activation rounding | diff |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["mixq_ppl"]
        lines.append(f"| {r['name']} | {r['ppl']:.3f} | {m['torch_ppl']:.3f} | {r['ppl'] / m['torch_ppl'] - 1:+.2%} | "
                     f"{m['torch_ppl_actsim']:.3f} | {r['ppl'] / m['torch_ppl_actsim'] - 1:+.2%} |")
    return lines


def write_md(doc: dict, path: Path) -> None:
    lines = header(f"GGUF files by llama.cpp and by mixq, measured by llama.cpp ({doc.get('model', 'smollm2-135m')}, "
                   "PTB test)",
                   "OMP_NUM_THREADS=1 python " + doc["command"].replace(str(Path.cwd()) + "/", ""))
    lines += [f"- llama.cpp: {doc['llama_cpp']}, built by bench/llamacpp.py (Release, GGML_NATIVE=ON)",
              f"- evaluation: `llama-perplexity --kl-divergence` against the F16 GGUF's logits, first {doc['chunks']} "
              f"chunks of {doc['ctx']} tokens of PTB test (second half of each chunk scored: "
              f"{doc['chunks'] * doc['ctx'] // 2} tokens); imatrix: `llama-imatrix` on {doc['calib_chunks']} x "
              f"{doc['ctx']} tokens of PTB train; mixq: `mixq measure --candidates gguf` ({_measured(doc)}) and "
              f"GPTQ on {doc['nsamples']} x {doc['ctx']} PTB-train rows; every llama.cpp tool that runs a quantized "
              "file with `-nr` (weight repacking off: see NO_REPACK in the script)",
              "- every file keeps token_embd F16 (stock: `--token-embedding-type f16 --output-tensor-type f16`; "
              "mixq keeps embeddings in floating point), so files differ only in the block linears",
              *([f"- mixq's plans without the candidates {', '.join(doc['without'])} (left out of the "
                   "measurement's table before planning)"] if doc.get("without") else []),
              *([f"- {doc['note']}"] if doc.get("note") else []),
              "", "| file | block-linear bpw | file MiB | PPL (llama.cpp) | mean KLD | KLD p99 | same top-1 % | "
              "block-linear types |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["rows"]:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r.get("block_linear_types", {}).items()))
        f = (lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "")  # noqa: E731
        lines.append(f"| {r['name']} | {f('block_linear_bpw', '.3f')} | {r['file_bytes'] / 2**20:.1f} | "
                     f"{f('ppl', '.3f')} | {f('kld', '.4f')} | {f('kld_p99', '.3f')} | {f('same_top_p', '.2f')} | "
                     f"{types} |")
    lines += _agreement_table(doc)
    if doc["failed"]:
        lines += ["", "Stock types llama-quantize did not make: " +
                  "; ".join(f"{k}: {v}" for k, v in doc["failed"].items())]
    c = doc.get("check")
    if c:
        t = c.get("tokens")
        lines += ["", "## mixq's own evaluation of the same plan", "",
                  *([f"- tokens: `llama-tokenize` of PTB test gave {t['llama_cpp']:,} ids, the HF tokenizer "
                     f"{t['hf']:,} (BOS first in both where the model adds it); the scored "
                     f"{doc['chunks']} x {doc['ctx']} ids {'are the same' if t['same_scored_ids'] else 'differ'}"
                     + ("" if t["first_difference"] is None else f" (first difference at id {t['first_difference']:,})")]
                    if t else []),
                  f"- PPL on the same {doc['chunks']} x {doc['ctx']} tokens (HF tokenizer), llama.cpp's protocol "
                  f"(second half of each chunk) in torch, fp32: reference {c['torch_ppl_fp32']:.3f}, mixq plan "
                  f"{c['torch_ppl_mixq']:.3f}",
                  f"- `mixq eval` (its own protocol: every token of each {doc['ctx']}-token window, KL vs fp32): "
                  f"{json.dumps(c['mixq_eval'])}",
                  f"- `{c['llama_cli']['command']}` (generation from mixq's file; this llama.cpp's llama-cli is "
                  f"a chat front end over its server, llama-completion the plain tool): {c['llama_cli']['output']!r}"]
    lines += ["", f"Total time {doc['seconds'] / 60:.0f} min."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
