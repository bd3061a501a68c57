"""Time of the allocation solvers on saved SmolLM2 measurements (bench/cache/, written by bench/allocation.py).

    OMP_NUM_THREADS=1 python bench/solver_time.py

For each cached measurement and budget: the exact solver (best of 3) and the greedy one, in ms.
Writes bench/results/solver_time.md.
"""
from __future__ import annotations

import time
from pathlib import Path

from common import RESULTS, header

import mixq
from mixq.allocate import SensitivityTable

CACHE = Path(__file__).parent / "cache"
BUDGETS = (2.5, 3.0, 3.25, 3.5, 4.0, 4.5)


def main():
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--note", default="", help="a sentence on the conditions (e.g. other jobs running)")
    args = ap.parse_args()
    cmd = "OMP_NUM_THREADS=1 python bench/solver_time.py" + (f" --note '{args.note}'" if args.note else "")
    lines = header("Allocation solver time — SmolLM2-135M measurements", cmd)
    lines += ["210 layers, 18–26 candidates each (mixq's default set). Exact: greedy bound + Lagrangian reduced-cost "
              "fixing + HiGHS MILP (gap 0); greedy: convex-hull upgrades. Best of 3 runs, in ms. " + args.note, "",
              "| measurement | solver | " + " | ".join(f"{b:g} bpw" for b in BUDGETS) + " |",
              "|---|---|" + "---:|" * len(BUDGETS)]
    for path in sorted(CACHE.glob("measure-*.json")):
        table = SensitivityTable.load(path)
        for method in ("exact", "greedy"):
            ms = []
            for b in BUDGETS:
                best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    mixq.plan(table, bpw=b, solver=method)
                    best = min(best, time.perf_counter() - t)
                ms.append(f"{best * 1000:.0f}")
            lines.append(f"| {path.stem.removeprefix('measure-')} | {method} | " + " | ".join(ms) + " |")
    (RESULTS / "solver_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
