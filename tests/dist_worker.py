"""Run by ``tests/test_distributed.py`` under ``torchrun``: the distributed measurement of a tiny model.

Every rank measures with the process group (gloo) and writes ``OUT/rank{r}-{metric}-{algorithm}.json``
with the table it returned and how many units it evaluated; rank 0 then measures again alone (same
thread settings) and writes ``OUT/single-{metric}-{algorithm}.json``.
Usage: ``torchrun --standalone --nproc-per-node 2 tests/dist_worker.py OUT metric:algorithm ...``
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_tiny  # noqa: E402

import mixq.measure.layer as layer  # noqa: E402
from mixq.allocate import default_candidates  # noqa: E402
from mixq.measure import measure  # noqa: E402
from mixq.measure.distributed import Group, current_group  # noqa: E402


def main(out: Path, runs: list[str]) -> None:
    dist.init_process_group("gloo")
    group = current_group()
    model = make_tiny("llama")
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    cands = default_candidates()
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
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
