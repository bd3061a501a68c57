"""Fine-tuning with codes fixed (`mixq finetune`): KL before and after, in domain and out of domain.

    OMP_NUM_THREADS=1 python bench/finetune.py --spec W3-g64+ip --epochs 2 --lr 1e-2 --e2e-epochs 1 --e2e-lr 1e-3
    OMP_NUM_THREADS=1 python bench/finetune.py --measurement M.json --bpw 3.0 --tag default3   # a mixed plan

SmolLM2-135M quantized with GPTQ and one spec everywhere (or the exact plan at ``--bpw`` from a saved
``--measurement``, e.g. bench/cache/generalization-*.json of bench/generalization.py) on the default calibration (self+ptb, 32 x 512), saved,
then `mixq.finetune` (block-wise distillation of scales and norms, then ``--e2e-epochs`` of end-to-end distillation
on the fp32 logits; the last quarter of its 32 calibration rows held out) into a second directory; both scored against fp32 on the first 4,096 tokens of PTB test and of the fortunes
test split (512-token windows).  Appends a row per run to bench/results/frontier/finetune.json (the quantized
directory is kept in --work and reused by runs that change only the fine-tuning settings).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from common import RESULTS, git_rev, machine

from mixq import pipeline as P
from mixq.distill import FinetuneConfig
from mixq.eval.scorer import DomainScorer
from mixq.distill_e2e import E2EConfig
from mixq import load_quantized
from mixq.export.native import read_info
from mixq.jsonio import write_json_atomic


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="W3-g64+ip")
    ap.add_argument("--epochs", type=int, default=2, help="block-wise epochs (0: no block-wise stage, e2e only)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--e2e-epochs", type=int, default=1, help="end-to-end stage after the block-wise one (0: none)")
    ap.add_argument("--e2e-lr", type=float, default=1e-3)
    ap.add_argument("--e2e-norm-lr", type=float, default=E2EConfig.norm_lr, help="end-to-end learning rate of the norms")
    ap.add_argument("--measurement", default=None)
    ap.add_argument("--bpw", type=float, default=None)
    ap.add_argument("--tag", default="default3", help="names the mixed curve: the recipe whose --measurement it is")
    ap.add_argument("--work", default="/tmp/mixq-bench-finetune")
    args = ap.parse_args()
    ref, tok = P.load_model()

    scorer = DomainScorer(ref, tok, corpus="ptb,fortunes", tokens=4096)

    def ev(m):
        r = scorer.metrics(m)
        return r["ptb"]["kl"], r["fortunes"]["kl"]

    plan = None
    if args.measurement:
        plan = P.plan(args.measurement, bpw=args.bpw)
    name = f"mixed-{args.bpw}-{args.tag}" if plan else args.spec.replace("+", "_")
    src = Path(args.work) / name
    path = RESULTS / "frontier" / "finetune.json"
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    base = f"mixed GPTQ {args.bpw} [{args.tag}]" if plan else f"uniform GPTQ {args.spec}"
    if not src.exists():
        cal = P.build_calibration(ref, tok, None, 32, 512, progress=False)
        m = copy.deepcopy(ref)
        t = time.perf_counter()
        res = P.quantize(m, None if plan else args.spec, plan=plan, method="gptq", calib=cal, progress=False)
        P.save_quantized(src, m, tok, res)
        secs = time.perf_counter() - t
        if not any(r["curve"] == base for r in doc["rows"]):
            kp, kf = ev(m)
            doc["rows"].append({"curve": base, "spec": "mixed" if plan else args.spec, "bpw": res.meta["size"]["bpw_quantized"],
                                "ptb": kp, "fortunes": kf, "seconds": secs, "commit": git_rev()})
    norm = "" if args.e2e_norm_lr == E2EConfig.norm_lr else f"-nlr{args.e2e_norm_lr:g}"
    out = src.with_name(f"{src.name}-ft-e{args.epochs}-lr{args.lr}-e2e{args.e2e_epochs}-lr{args.e2e_lr}{norm}")
    t = time.perf_counter()
    e2e = E2EConfig(epochs=args.e2e_epochs, lr=args.e2e_lr, norm_lr=args.e2e_norm_lr) if args.e2e_epochs else None
    if not args.epochs and not e2e:
        raise SystemExit("--epochs 0 --e2e-epochs 0 leaves nothing to run")
    rep = P.finetune(src, out, nsamples=32, config=FinetuneConfig(epochs=max(args.epochs, 1), lr=args.lr), e2e=e2e,
                     block=args.epochs > 0, overwrite=True, progress=False)
    secs = time.perf_counter() - t
    q, _, _ = load_quantized(out)
    kp, kf = ev(q)
    stage = (f" + e2e{'' if args.epochs else ' only'} (lr {args.e2e_lr:g}"
             f"{'' if not norm else f', norms {args.e2e_norm_lr:g}'}, {args.e2e_epochs} "
             f"epoch{'s' if args.e2e_epochs > 1 else ''})" if e2e else "")
    block = f" + finetune (lr {args.lr:g}, {args.epochs} epochs)" if args.epochs else ""
    doc["rows"].append({"curve": f"{base}{block}{stage}",
                        "spec": "mixed" if plan else args.spec,
                        "bpw": read_info(out)["size"]["bpw_quantized"], "ptb": kp, "fortunes": kf, "seconds": secs,
                        "held_out_gain": rep.get("held_out_gain"), "commit": git_rev(),
                        **({"e2e_held_out_kl": [rep["e2e"]["held_out_before"], rep["e2e"]["held_out_after"]],
                            "e2e_seconds": rep["e2e"]["seconds"]} if e2e else {})})
    doc.update(command="OMP_NUM_THREADS=1 python bench/finetune.py [--spec S | --measurement M --bpw X --tag T] --epochs E --lr LR --e2e-epochs N "
                       "--e2e-lr LR2 [--e2e-norm-lr LR3]", machine=machine())
    write_json_atomic(path, doc, overwrite=True)
    print(json.dumps(doc["rows"][-1]))


if __name__ == "__main__":
    main()
