"""Mixed GPTQ plans from a sensitivity table merged from two measurements of the same rows and candidates.

    OMP_NUM_THREADS=1 python bench/merge_tables.py smollm2-135m KFAC.json KFAC_TOK.json --budgets 4,3 \
        --rows-from-first 'k_proj$|v_proj$' --out bench/results/generalization/default4-kfacpos.json

Layers whose name matches ``--rows-from-first`` take their row from the first table, every other layer from the
second; the result is planned at each budget (exact solver), quantized with GPTQ on the default recipe's
calibration (the tables' own rows: checked by hash) and scored like bench/generalization.py's rows
(common.domain_scorer / score_row: KL, perplexity and top-1 on the first 4,096 tokens of PTB test and fortunes
test).  With kfac and kfac-tok tables of one calibration and ``k_proj$|v_proj$`` this is the ``kfac-pos`` metric
(``tests/test_measure_kfac_tok.py`` checks the metric equals that merge), evaluated without measuring again.
Rows are written in bench/generalization.py's format, so ``--report`` there lists them.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
from collections import Counter
from pathlib import Path

from common import domain_scorer, git_rev, machine, score_row

import mixq
from mixq.allocate import SensitivityTable
from mixq.recipe import DEFAULT_RECIPE as R


def merged(first: SensitivityTable, second: SensitivityTable, pattern: str, metric: str) -> SensitivityTable:
    """``second`` with the rows of the layers matching ``pattern`` taken from ``first`` (same layers, rows)."""
    if [e.fqn for e in first.layers] != [e.fqn for e in second.layers]:
        raise SystemExit("the two tables measure different layers")
    if first.meta.get("calibration") != second.meta.get("calibration"):
        raise SystemExit("the two tables were measured on different calibration rows")
    a = {e.fqn: e for e in first.layers}
    rx = re.compile(pattern)
    layers = tuple(a[e.fqn] if rx.search(e.fqn) else e for e in second.layers)
    return SensitivityTable(layers, metric, {**second.meta, "merged": {"rows_from_first": pattern}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("first")
    ap.add_argument("second")
    ap.add_argument("--rows-from-first", default=r"k_proj$|v_proj$")
    ap.add_argument("--metric", default="kfac-pos", help="the name the merged table's metric is given")
    ap.add_argument("--budgets", default="3,4")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    table = merged(SensitivityTable.load(args.first), SensitivityTable.load(args.second), args.rows_from_first,
                   args.metric)
    ref, tok = mixq.load_model(args.model)
    evals = domain_scorer(ref, tok, args.model, args.tokens)
    bos = evals.bos
    cal = mixq.build_calibration(ref, tok, R["calib"], R["nsamples"], R["seqlen"], seed=0, bos=bos, progress=False)
    if cal.sha256[:16] != table.meta.get("calibration"):
        raise SystemExit(f"the tables were not measured on the default calibration rows ({cal.sha256[:16]})")
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"rows": []}
    argv = [args.model, args.first, args.second, "--budgets", args.budgets,
            "--rows-from-first", f"'{args.rows_from_first}'", "--out", args.out]
    doc.update(command="OMP_NUM_THREADS=1 python bench/merge_tables.py " + " ".join(argv), machine=machine(),
               commit=git_rev(), model=args.model, metric=args.metric, calibration=cal.record(), damp=R["damp"],
               act_order=R["act_order"], protocols={c: p.to_dict() for c, p in evals.protocols.items()})
    for bpw in [float(x) for x in args.budgets.split(",")]:
        plan = mixq.plan(table, bpw=bpw)
        m = copy.deepcopy(ref)
        res = mixq.quantize(m, plan=plan, method="gptq", calib=cal, damp=R["damp"], act_order=R["act_order"],
                            progress=False)
        row = {"variant": "mixed GPTQ", "budget": bpw, "bpw": plan.achieved_bpw, "seconds": res.seconds,
               "spec": None, "specs": dict(Counter(s.name for s in plan.layers.values()))}
        doc["rows"] = [x for x in doc["rows"] if x["budget"] != bpw]
        score_row(row, m, evals, doc, out, f"{args.metric} mixed GPTQ {bpw}")
        del m

if __name__ == "__main__":
    main()
