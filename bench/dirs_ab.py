"""Side by side: `mixq quantize` output directories, each scored in two (or more) domains by `mixq eval`.

    python bench/dirs_ab.py --name hessian_shrink base=/tmp/d30 s0.1=/tmp/ds/e3.0 [...] --corpus ptb,fortunes

For an A/B of command-line runs (one setting changed, the rest of the recipe as it is): every ``LABEL=DIR`` is
scored with ``mixq eval DIR --corpus C --tokens N --out bench/results/<name>/<LABEL>.json`` unless that JSON
exists (so a run resumes, and a directory once scored need not be kept), and ``bench/results/<name>.md`` gets
one row per directory: its recipe deviations and run time from its ``mixq.json``, bpw, KL per corpus and the
ratio of each to the first corpus.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from common import RESULTS, header


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", metavar="LABEL=DIR")
    ap.add_argument("--name", required=True, help="results name: bench/results/<name>.md and <name>/")
    ap.add_argument("--corpus", default="ptb,fortunes")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--title", default=None)
    ap.add_argument("--note", action="append", default=[],
                    help="a line for the results file (e.g. what a run changed that its mixq.json cannot say)")
    args = ap.parse_args()
    out_dir = RESULTS / args.name
    out_dir.mkdir(parents=True, exist_ok=True)
    corpora = args.corpus.split(",")
    rows = []
    for item in args.dirs:
        label, sep, d = item.partition("=")
        if not sep or not label:
            ap.error(f"{item!r}: give each directory as LABEL=DIR")
        path = out_dir / f"{label}.json"
        if not path.exists():
            cmd = [sys.executable, "-m", "mixq", "eval", d, "--corpus", args.corpus, "--tokens", str(args.tokens),
                   "--out", str(path)]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            meta = json.loads((Path(d) / "mixq.json").read_text())
            doc = json.loads(path.read_text())
            doc["run"] = {"dir": d, "recipe": meta.get("recipe"), "seconds": meta.get("seconds"),
                          "base_model": meta.get("base_model")}
            path.write_text(json.dumps(doc, indent=1))
        rows.append((label, json.loads(path.read_text())))
    lines = header(args.title or f"A/B of mixq quantize runs: {args.name}", "python " + shlex.join(sys.argv))
    lines += [f"- {n}" for n in args.note] + ([""] if args.note else [])
    lines += [f"KL to the full-precision model on the first {args.tokens} tokens of each corpus's test split "
              f"({', '.join(corpora)}); ratio: KL on a corpus / KL on {corpora[0]}; bpw over the block linears, "
              "every stored bit counted; deviations: the run's settings that differ from its recipe; quantize s: the "
              "run's own time as its mixq.json has it (a measurement made or reused, other jobs on the cores or "
              "not): not a timing.", "",
              "| run | model | recipe | deviations | bpw | " + " | ".join(f"KL {c}" for c in corpora)
              + " | " + " | ".join(f"ratio {c}" for c in corpora[1:]) + " | quantize s |",
              "|---|---|---|---|---:|" + "---:|" * (2 * len(corpora) - 1) + "---:|"]
    for label, doc in rows:
        run, dom = doc.get("run", {}), doc["domains"]
        recipe = run.get("recipe") or {}
        kls = [dom[c]["kl"] for c in corpora]
        secs = run.get("seconds")
        lines.append(f"| {label} | {run.get('base_model', '')} | {recipe.get('name', '')} | "
                     f"{recipe.get('deviations', '')} | {doc['size']['bpw_linears']:.3f} | "
                     + " | ".join(f"{k:.4f}" for k in kls) + " | "
                     + " | ".join(f"{k / kls[0]:.2f}" for k in kls[1:])
                     + (f" | {secs:.0f} |" if secs is not None else " | |"))
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
