"""Vector codebooks (``VQ<rate>-g64+ip``, :mod:`mixq.algorithms.composite.vq`) end to end: uniform GPTQ plans, KL
in and out of domain.

    OMP_NUM_THREADS=1 python bench/vq.py --specs VQ3-g64+ip,VQ2.5-g64+ip

SmolLM2-135M, every block linear in one spec, GPTQ on the default calibration (self+ptb, 32 x 512), scored against
fp32 on the first 4,096 tokens of PTB test and of the fortunes test split (512-token windows), as
bench/finetune.py and bench/generalization.py score a spec.  One row per spec is appended to
bench/results/vq_e2e.json (a spec already there is skipped); bench/vq_layers.py has the per-layer errors and
bench/vq_speed.py the decode speed; bench/results/vq.md gathers them.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

from common import RESULTS, git_rev, machine, peak_rss_mb

from mixq import pipeline as P
from mixq.eval.scorer import DomainScorer
from mixq.jsonio import write_json_atomic


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", default="VQ3-g64+ip,VQ2.5-g64+ip")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--out", default=str(RESULTS / "vq_e2e.json"))
    args = ap.parse_args()
    ref, tok = P.load_model()
    cal = P.build_calibration(ref, tok, None, 32, 512, progress=False)
    path = __import__("pathlib").Path(args.out)
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    scorer = DomainScorer(ref, tok, corpus="ptb,fortunes", tokens=4096)
    for spec in args.specs.split(","):
        if any(r["spec"] == spec and r["method"] == args.method for r in doc["rows"]):
            continue
        m = copy.deepcopy(ref)
        t = time.perf_counter()
        res = P.quantize(m, spec, method=args.method, calib=cal if args.method != "rtn" else None, progress=False)
        secs = time.perf_counter() - t
        r = scorer.metrics(m)
        doc["rows"].append({"spec": spec, "method": args.method, "bpw": res.meta["size"]["bpw_quantized"],
                            "ptb": r["ptb"]["kl"], "fortunes": r["fortunes"]["kl"],
                            "ppl_ptb": r["ptb"]["perplexity"], "quantize_seconds": secs, "peak_rss_mb": peak_rss_mb(),
                            "commit": git_rev()})
        doc.update(command=f"OMP_NUM_THREADS=1 python bench/vq.py --specs {args.specs} --method {args.method}",
                   machine=machine())
        write_json_atomic(path, doc, overwrite=True)
        print(json.dumps(doc["rows"][-1]), flush=True)
        del m


if __name__ == "__main__":
    main()
