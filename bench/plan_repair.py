"""Does the additive proxy misjudge a plan's blocks, and does a block-level repair of the plan help?

    OMP_NUM_THREADS=2 python bench/plan_repair.py --measurement M.json --bpw 3.0 [--rows 6]

``M.json``: a saved measurement of SmolLM2 on the default calibration (a `mixq quantize` run's measurement.json, or
bench/cache/generalization-*.json of bench/generalization.py).  Steps:

1. the exact plan at ``--bpw``, quantized with GPTQ on the default calibration (32 x 512, seed 0);
2. for every block b: the KL to fp32 of the fp model with only block b's layers replaced by their quantized
   weights, on ``--rows`` held-out calibration rows (seed 1: never seen by GPTQ or the measurement), against the
   plan's predicted error of that block (the sum of its layers' table entries) -> alpha_b = measured / predicted;
   the whole quantized model's KL against the plan's predicted total;
3. the repair: every table entry of block b multiplied by alpha_b, the plan solved again at the same budget,
   quantized with GPTQ and scored with the original on PTB test and fortunes (4,096 tokens each).

Writes bench/results/plan_repair.json (and prints the rows).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from common import RESULTS, domain_scorer, git_rev, machine

from mixq import pipeline as P
from mixq.allocate import SensitivityTable
from mixq.arch import iter_layers


def _block(fqn: str) -> int:
    return int(fqn.split(".")[2])


class RowKL:
    """KL to the fp model on a few rows, the fp log-probs computed once."""

    def __init__(self, ref, ids):
        self.ids = ids
        with torch.no_grad():
            self.ref = [F.log_softmax(ref(ids[i:i + 1]).logits.float(), -1) for i in range(ids.shape[0])]

    @torch.no_grad()
    def __call__(self, model) -> float:
        tot = 0.0
        for i, lr in enumerate(self.ref):
            lq = F.log_softmax(model(self.ids[i:i + 1]).logits.float(), -1)
            tot += float((lr.exp() * (lr - lq)).sum(-1).mean())
        return tot / len(self.ref)


def block_alphas(ref, qmodel, plan, kl: RowKL) -> list[dict]:
    """Per block: predicted error, KL with only that block quantized, and their ratio."""
    qw = {r.fqn: qmodel.get_submodule(r.fqn).weight.detach().clone() for r in iter_layers(qmodel)}
    h = copy.deepcopy(ref)
    mods = {r.fqn: h.get_submodule(r.fqn) for r in iter_layers(h)}
    out = []
    for b in sorted({_block(f) for f in plan.layers}):
        fs = [f for f in plan.layers if _block(f) == b]
        fw = {f: mods[f].weight.detach().clone() for f in fs}
        with torch.no_grad():
            for f in fs:
                mods[f].weight.copy_(qw[f])
        k = kl(h)
        with torch.no_grad():
            for f in fs:
                mods[f].weight.copy_(fw[f])
        pred = sum(plan.errors[f] for f in fs)
        out.append({"block": b, "predicted": pred, "measured": k, "alpha": k / pred if pred else 1.0})
        print(f"block {b}: predicted {pred:.4f} measured {k:.4f}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--measurement", required=True)
    ap.add_argument("--bpw", type=float, default=3.0)
    ap.add_argument("--rows", type=int, default=6, help="held-out calibration rows the block KLs are measured on")
    args = ap.parse_args()
    ref, tok = P.load_model()
    table = SensitivityTable.load(args.measurement)
    cal = P.build_calibration(ref, tok, None, 32, 512, progress=False)
    held = RowKL(ref, P.build_calibration(ref, tok, None, args.rows, 512, seed=1, progress=False).ids)
    scorer = domain_scorer(ref, tok, "smollm2-135m", 4096)

    def quantized(plan):
        m = copy.deepcopy(ref)
        P.quantize(m, plan=plan, method="gptq", calib=cal, progress=False)
        r = scorer.metrics(m)
        return m, {"ptb": r["ptb"]["kl"], "fortunes": r["fortunes"]["kl"]}

    t = time.perf_counter()
    plan = P.plan(table, bpw=args.bpw)
    qm, before = quantized(plan)
    blocks = block_alphas(ref, qm, plan, held)
    whole = held(qm)
    del qm
    alpha = {x["block"]: x["alpha"] for x in blocks}
    rescaled = SensitivityTable(tuple(replace(x, errors=tuple(e * alpha[_block(x.fqn)] for e in x.errors))
                                      for x in table.layers), table.metric, table.meta)
    plan2 = P.plan(rescaled, bpw=args.bpw)
    changed = sum(plan.layers[f].name != plan2.layers[f].name for f in plan.layers)
    _, after = quantized(plan2)
    row = {"bpw": args.bpw, "measurement": args.measurement, "rows": args.rows, "commit": git_rev(),
           "predicted_total": plan.predicted_error, "held_out_kl_total": whole,
           "sum_of_block_kls": sum(x["measured"] for x in blocks), "blocks": blocks,
           "layers_changed_by_repair": changed, "plan": before, "repaired_plan": after,
           "seconds": time.perf_counter() - t}
    path = RESULTS / "plan_repair.json"
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    doc.update(command="OMP_NUM_THREADS=2 python bench/plan_repair.py --measurement M --bpw B", machine=machine())
    doc["rows"].append(row)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "blocks"}, indent=1))


if __name__ == "__main__":
    main()
