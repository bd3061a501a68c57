"""mixq's GPTQ export read by a third-party reader: AutoGPTQ's own ``QuantLinear`` (not mixq's re-reader).

    python bench/gptq_thirdparty.py [--work /tmp/gptq3p] [--tokens 1024] [--autogptq DIR]

Why AutoGPTQ: GPTQModel (the maintained loader, and what transformers' GPTQ integration calls) requires a newer
torch than the 2.13 mixq pins, and transformers 5.23 no longer imports AutoGPTQ's package.  AutoGPTQ 0.7.1's
``nn_modules/qlinear/qlinear_cuda_old.py`` -- the layer its loaders put in place of each quantized linear -- needs
only torch and numpy, and without its CUDA extension it unpacks ``qweight`` / ``qzeros`` (2, 3, 4, 8 bits; the
v1 "zeros minus one" convention) and multiplies in torch.  That file is loaded here from the AutoGPTQ source
distribution, installed once with ``pip install --no-deps --no-build-isolation --target <cache>/auto_gptq-0.7.1``
(``BUILD_CUDA_EXT=0``); this script does that when ``--autogptq`` is not given and the cache has none.

What runs: SmolLM2-135M quantized with RTN by a mixed plan over every bit width and group kind the GPTQ format
holds (``PLAN``: 3-bit g32 and 8-bit per channel in attention, 4-bit g64 asymmetric and 2-bit g32 in the MLP,
o_proj 4-bit per channel), saved as a native directory, exported with :func:`mixq.export.hf.export_gptq` (fp16), then

1. per layer: AutoGPTQ's ``QuantLinear`` built with the layer's (bits, group_size) from the exported config (its
   ``dynamic`` rules resolved here, first match wins, as GPTQModel does -- AutoGPTQ itself has no per-module
   settings), the file's ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` copied in (scales widened to float32,
   exactly), the weight read as ``QuantLinear(I)``; compared with mixq's dequantized weight of the same layer;
2. the whole model with every quantized linear replaced by its AutoGPTQ layer, KL to the fp32 model on PTB test
   and fortunes, next to mixq's own fake-quant model of the plan.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import domain_scorer, header  # noqa: E402

import mixq  # noqa: E402
from mixq import api  # noqa: E402
from mixq.arch import get_weight  # noqa: E402
from mixq.export.hf import export_gptq  # noqa: E402
from mixq.export.native import load_quantized  # noqa: E402
from mixq.export.native_write import save_quantized  # noqa: E402
from mixq.jsonio import write_json_atomic  # noqa: E402

AUTOGPTQ = "0.7.1"
PLAN = {"re:q_proj|k_proj": "W3-g32", "re:v_proj": "W8-channel", "re:o_proj": "W4-channel",
        "re:gate_proj|up_proj": "W4-g64-asym", "re:down_proj": "W2-g32"}
OUT = Path(__file__).resolve().parent / "results"


def autogptq_dir(cache: Path) -> Path:
    """The directory holding AutoGPTQ's package, installed from its sdist without its CUDA extension if absent."""
    target = cache / f"auto_gptq-{AUTOGPTQ}"
    if (target / "auto_gptq" / "nn_modules" / "qlinear" / "qlinear_cuda_old.py").exists():
        return target
    env = {**os.environ, "BUILD_CUDA_EXT": "0"}
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target",
                        str(Path(tmp) / "pkg"), f"auto-gptq=={AUTOGPTQ}", "--no-binary", "auto-gptq"], check=True,
                       env=env)
        os.replace(Path(tmp) / "pkg", target)
    return target


def autogptq_quantlinear(root: Path):
    """AutoGPTQ's ``QuantLinear`` class (cuda-old: torch unpacking when its CUDA extension is absent), loaded
    from its file: the package's ``__init__`` imports transformers APIs that 5.x removed."""
    path = root / "auto_gptq" / "nn_modules" / "qlinear" / "qlinear_cuda_old.py"
    spec = importlib.util.spec_from_file_location("autogptq_qlinear_cuda_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.QuantLinear


def settings(qcfg: dict, fqn: str) -> dict | None:
    """(bits, group_size) of ``fqn``: the first ``dynamic`` rule whose pattern matches, else the base (GPTQModel's
    reading of the field); None for a module a ``-:`` rule leaves unquantized."""
    base = {"bits": qcfg["bits"], "group_size": qcfg["group_size"]}
    for pattern, over in (qcfg.get("dynamic") or {}).items():
        neg = pattern.startswith("-:")
        if re.match(pattern[2:] if pattern[:2] in ("-:", "+:") else pattern, fqn):
            return None if neg else {**base, **{k: over[k] for k in ("bits", "group_size") if k in over}}
    return base


@torch.no_grad()
def autogptq_layers(gptq_dir: Path, QuantLinear) -> dict[str, torch.nn.Module]:
    qcfg = json.loads((gptq_dir / "quantize_config.json").read_text())
    layers = {}
    with safe_open(gptq_dir / "model.safetensors", "pt") as f:
        for key in f.keys():
            if not key.endswith(".qweight"):
                continue
            fqn = key[: -len(".qweight")]
            st = settings(qcfg, fqn)
            if st is None:
                raise SystemExit(f"{fqn} has a qweight but the config leaves it unquantized")
            scales = f.get_tensor(f"{fqn}.scales")
            g_idx = f.get_tensor(f"{fqn}.g_idx")
            in_f, out_f = g_idx.numel(), scales.shape[1]
            ql = QuantLinear(st["bits"], st["group_size"], in_f, out_f, False, weight_dtype=torch.float32)
            for name in ("qweight", "qzeros", "g_idx"):
                t = f.get_tensor(f"{fqn}.{name}")
                if tuple(t.shape) != tuple(getattr(ql, name).shape):
                    raise SystemExit(f"{fqn}.{name}: file {tuple(t.shape)}, AutoGPTQ expects "
                                     f"{tuple(getattr(ql, name).shape)} for {st}")
                getattr(ql, name).copy_(t)
            ql.scales.copy_(scales.float())
            layers[fqn] = ql
    return layers


def _set_module(model, fqn: str, new) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="where the directories go (default: a temporary one)")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens of each test text scored")
    ap.add_argument("--autogptq", type=Path, default=None, help="a directory holding the auto_gptq package")
    args = ap.parse_args()
    torch.manual_seed(0)
    cache = Path(os.environ.get("MIXQ_CACHE_DIR", Path.home() / ".cache" / "mixq")).expanduser()
    QuantLinear = autogptq_quantlinear(args.autogptq or autogptq_dir(cache))
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="gptq3p-") as tmp:  # the directories go when the run ends
            return run(args, QuantLinear, Path(tmp))
    args.work.mkdir(parents=True, exist_ok=True)
    return run(args, QuantLinear, args.work)


def run(args, QuantLinear, work: Path) -> None:
    cmd = "python bench/gptq_thirdparty.py" + (f" --tokens {args.tokens}" if args.tokens != 1024 else "")
    ref, tok = mixq.load_model("smollm2-135m")
    model, _ = mixq.load_model("smollm2-135m")
    specs = api.resolve_specs(model, PLAN)
    res = api.quantize_model(model, specs, method="rtn", progress=False)
    native = save_quantized(work / "native", model, tok, res.qtensors,
                            {"base_model": "smollm2-135m", "method": "rtn"}, overwrite=True)
    t0 = time.perf_counter()
    rep = export_gptq(native, work / "gptq", overwrite=True, dtype="fp16")
    t_export = time.perf_counter() - t0

    mixq_model, _, info = load_quantized(native)
    mods = dict(mixq_model.named_modules())
    theirs = autogptq_layers(work / "gptq", QuantLinear)
    per_layer, worst = [], 0.0
    for fqn, ql in theirs.items():
        w_mixq = get_weight(mods[fqn]).float()
        w_theirs = ql(torch.eye(ql.infeatures)).t()
        diff = float((w_theirs - w_mixq).abs().max())
        worst = max(worst, diff)
        per_layer.append({"layer": fqn, "bits": ql.bits, "group_size": ql.group_size, "in_features": ql.infeatures,
                          "max_abs_diff": diff,
                          "max_abs_weight": float(w_mixq.abs().max())})
    missing = sorted(set(info["layers"]) - set(theirs))

    scorer = domain_scorer(ref, tok, "smollm2-135m", args.tokens)
    m_mixq = scorer.metrics(mixq_model)
    del mixq_model
    for fqn, ql in theirs.items():
        _set_module(ref, fqn, ql)
    m_theirs = scorer.metrics(ref)

    kinds = {}
    for r in per_layer:
        k = f"{r['bits']}-bit " + ("per channel" if r["group_size"] == r["in_features"] else f"g{r['group_size']}")
        kinds.setdefault(k, []).append(r)
    doc = {"command": cmd, "plan": PLAN, "autogptq": AUTOGPTQ, "export": {k: rep[k] for k in ("exact", "max_abs_diff")},
           "export_seconds": t_export, "layers": per_layer, "missing": missing, "max_abs_diff": worst,
           "mixq": m_mixq, "autogptq_model": m_theirs, "quantize_config": json.loads(
               (work / "gptq" / "quantize_config.json").read_text())}
    write_json_atomic(OUT / "gptq_thirdparty.json", doc, overwrite=True)

    lines = header("mixq's GPTQ export read by AutoGPTQ's QuantLinear (SmolLM2-135M, mixed RTN plan)", cmd)
    lines += [f"- reader: AutoGPTQ {AUTOGPTQ} `nn_modules/qlinear/qlinear_cuda_old.py` (its torch unpacking; no CUDA "
              "extension), loaded from its source distribution; per-module settings from the export's `dynamic` "
              "rules (resolved by this script, first match wins)",
              f"- plan (RTN): `{json.dumps(PLAN)}`; export `dtype=fp16`; mixq's own re-reader: exact "
              f"{rep['exact']}, max |diff| {rep['max_abs_diff']:.3g}",
              f"- scored: first {args.tokens} tokens of PTB test and fortunes test, 512-token windows, KL to fp32",
              "- the plan checks the format, not quality: 2-bit RTN on down_proj makes the KL large; what matters "
              "is that both rows are the same model", "",
              "| layers | count | max abs diff AutoGPTQ vs mixq | largest weight |", "|---|---:|---:|---:|"]
    for k, rows in sorted(kinds.items()):
        lines.append(f"| {k} | {len(rows)} | {max(r['max_abs_diff'] for r in rows):.3g} | "
                     f"{max(r['max_abs_weight'] for r in rows):.3g} |")
    lines += ["", "| model | KL PTB | KL fortunes | PPL PTB | PPL fortunes |", "|---|---:|---:|---:|---:|"]
    for name, m in (("mixq fake-quant (its own evaluation)", m_mixq), ("AutoGPTQ QuantLinear layers", m_theirs)):
        lines.append(f"| {name} | {m['ptb']['kl']:.5f} | {m['fortunes']['kl']:.5f} | "
                     f"{m['ptb']['perplexity']:.3f} | {m['fortunes']['perplexity']:.3f} |")
    if missing:
        lines += ["", f"Layers of the plan with no qweight in the export: {', '.join(missing)}"]
    (OUT / "gptq_thirdparty.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
