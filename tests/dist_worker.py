"""Run by ``tests/test_distributed.py`` under ``torchrun``: the distributed measurement of a tiny model.

Every rank measures with the process group (gloo) and writes ``OUT/rank{r}-{metric}-{algorithm}.json``
with the table it returned and how many units it evaluated; rank 0 then measures again alone (same
thread settings) and writes ``OUT/single-{metric}-{algorithm}.json``.
Then, if arguments follow ``--``, every rank runs ``mixq`` with them (``mixq measure`` under torchrun: it
uses the process group and leaves it at the end).
Usage: ``torchrun --standalone --nproc-per-node 2 tests/dist_worker.py OUT metric:algorithm ... [-- measure ...]``
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_tiny  # noqa: E402

import mixq.measure.layer as layer  # noqa: E402
from mixq.config import parse_spec  # noqa: E402
from mixq.measure import measure  # noqa: E402
from mixq.measure.distributed import Group, current_group  # noqa: E402

# plain int grids of several widths (GPTQ references per width), an NF grid, +ip composites, a float keep
CANDIDATES = ["W2-g32-asym", "W3-g64", "W3-g128", "W4-g32", "W4-g64", "NF4-g64", "W8-channel", "FP16",
              "W3-g64+ip", "W4-g64+ip"]


def main(out: Path, runs: list[str], cli: list[str]) -> None:
    dist.init_process_group("gloo")
    group = current_group()
    model = make_tiny("llama")
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    cands = [parse_spec(n) for n in CANDIDATES]
    count = [0]
    real = layer.evaluate

    def counting(*a, **k):
        count[0] += 1
        return real(*a, **k)

    layer.evaluate = counting
    for run in runs:
        metric, algorithm = run.split(":")
        count[0] = 0
        t = measure(model, ids, cands, metric=metric, algorithm=algorithm, grad_samples=2, progress=False,
                    out=out / f"m-{metric}-{algorithm}.json")
        doc = {"table": t.to_dict(), "evaluated": count[0], "world": group.world}
        (out / f"rank{group.rank}-{metric}-{algorithm}.json").write_text(json.dumps(doc))
        dist.barrier()
        if group.rank == 0:
            count[0] = 0
            t = measure(model, ids, cands, metric=metric, algorithm=algorithm, grad_samples=2, progress=False,
                        group=Group())
            doc = {"table": t.to_dict(), "evaluated": count[0], "world": 1}
            (out / f"single-{metric}-{algorithm}.json").write_text(json.dumps(doc))
        dist.barrier()
    layer.evaluate = real
    if cli:
        from mixq.cli import main as mixq_main

        if mixq_main(cli) != 0:
            raise SystemExit(f"mixq {' '.join(cli)} failed")
    else:
        dist.destroy_process_group()


if __name__ == "__main__":
    args = sys.argv[2:]
    cut = args.index("--") if "--" in args else len(args)
    main(Path(sys.argv[1]), args[:cut], args[cut + 1:])
