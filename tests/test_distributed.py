"""The measurement over two CPU processes (``torchrun``, gloo) equals the single-process table, float for float."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixq.cli import main
from mixq.measure.distributed import Group, assign

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


def test_assign_is_deterministic_complete_and_balanced():
    costs = [7.0, 1.0, 3.0, 3.0, 2.0, 8.0, 1.0, 5.0]
    owner = assign(costs, 3)
    assert owner == assign(list(costs), 3)  # a pure function of the costs: every process computes the same split
    assert sorted(set(owner)) == [0, 1, 2]
    load = [sum(c for c, r in zip(costs, owner) if r == k) for k in range(3)]
    assert max(load) - min(load) <= max(costs)  # LPT: no rank exceeds another by more than one unit
    assert load == [10.0, 10.0, 10.0]
    assert assign(costs, 1) == [0] * len(costs)
    assert Group().writer and not Group(rank=1, world=2).writer
    assert Group().all_gather({"a": 1.0}) == [{"a": 1.0}] and Group().broadcast(3) == 3


def test_two_processes_measure_the_single_process_table(tiny_dir, tmp_path):
    """One ``torchrun --nproc-per-node 2`` launch (gloo, one thread per process):

    * the API, kfac with GPTQ references (units of one layer on both ranks, ratios combined after the merge) and
      the block-output metric (each unit a block forward): both ranks return the whole table, equal to one process;
    * ``mixq measure`` under torchrun: rank 0 builds the calibration rows and alone writes --out, equal to a
      one-process ``mixq measure``.
    """
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(200)))
    cands = tmp_path / "cands.txt"
    cands.write_text("W2-g32-asym\nW3-g32\nW4-g32\nNF4-g64\nW8-channel\nFP16\n")
    common = ["measure", "--model", str(tiny_dir), "--calib", str(corpus), "--nsamples", "4", "--seqlen", "32",
              "--grad-samples", "2", "--algorithm", "gptq", "--candidates", str(cands)]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    r = _torchrun(str(HERE / "dist_worker.py"), str(tmp_path), "kfac:gptq", "block:rtn", "--", *common,
                  "--out", str(two))

    for run in ("kfac-gptq", "block-rtn"):
        single = json.loads((tmp_path / f"single-{run}.json").read_text())
        ranks = [json.loads((tmp_path / f"rank{r}-{run}.json").read_text()) for r in (0, 1)]
        written = json.loads((tmp_path / f"m-{run}.json").read_text())
        assert len(single["table"]["layers"]) == 14
        for doc in ranks:
            assert doc["world"] == 2
            assert doc["table"]["layers"] == single["table"]["layers"], run  # same keys, same floats
        assert written["layers"] == single["table"]["layers"]  # rank 0's file
        assert written["metric"] == single["table"]["metric"]
        # the work was shared, not repeated: each rank evaluated part of the units, together all of them once
        n0, n1, n = ranks[0]["evaluated"], ranks[1]["evaluated"], single["evaluated"]
        assert 0 < n0 < n and 0 < n1 < n and n0 + n1 == n, (n0, n1, n)
        assert not (tmp_path / f"m-{run}.json.partial").exists()

    assert r.stdout.count("wrote ") == 1  # one writer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each torchrun process (OMP_NUM_THREADS=1)
    try:
        assert main([*common, "--out", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["layers"] == b["layers"] and len(a["layers"]) == 14
    assert a["meta"]["processes"] == 1 and b["meta"]["processes"] == 2
    skip = {"seconds", "processes"}
    assert {k: v for k, v in a["meta"].items() if k not in skip} == {k: v for k, v in b["meta"].items() if k not in skip}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == ["two.json"]


@pytest.mark.parametrize("world", [2, 5])
def test_every_unit_has_one_owner(world):
    costs = [float(c) for c in range(1, 40)]
    owner = assign(costs, world)
    assert len(owner) == len(costs) and all(0 <= r < world for r in owner)
