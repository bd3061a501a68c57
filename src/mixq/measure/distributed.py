"""The sensitivity measurement over several processes, with ``torch.distributed``.

Launch ``mixq measure`` under ``torchrun`` (gloo on CPU, NCCL when ``--device cuda``)::

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m mixq measure --model M --out m.json

Every process loads the model and runs the block-wise calibration walk (the forward passes, the
statistics and the gradient pass are cheap next to the measurement, and every process needs the
block inputs).  For each block, the work units of its layers (:mod:`mixq.measure.layer`: one per
layer × candidate, plus one per GPTQ reference) are shared out by :func:`assign` — a deterministic
longest-processing-time split by estimated cost, the same in every process — each process
evaluates its share, and the values are merged with ``all_gather_object``, so every process ends a
block with every layer's row.  Each value is computed by the same code on the same inputs as in one
process, so the merged table equals the single-process one float for float (given the same number
of threads per process: ``torchrun`` sets ``OMP_NUM_THREADS=1`` unless it is set, and a matrix product
may round differently on another thread count).  Only rank 0 writes files (the partial table after
each block and the final table, atomically); a resumed run reads rank 0's partial file and
broadcasts it, so the world size may change between the interrupted run and its resumption.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ..allocate import LayerEntry
from ..config import QuantSpec
from .layer import LayerJob, combine, evaluate_units, layer_candidates, unit_cost, units

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Group:
    """This process's place among the measuring processes (``world == 1``: alone, no collectives)."""

    rank: int = 0
    world: int = 1

    @property
    def writer(self) -> bool:
        """Whether this process writes the outputs (rank 0)."""
        return self.rank == 0

    def all_gather(self, obj) -> list:
        """``obj`` of every rank, in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` in every process."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def current_group() -> Group:
    """The default process group if ``torch.distributed`` is initialized, else a group of one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def init_from_env(device: str = "cpu") -> Group:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``…): gloo for CPU, NCCL for CUDA, where each process takes the first of its GPUs
    (:func:`local_gpus`).
    Without ``WORLD_SIZE`` > 1 (a plain run) nothing is initialized and a group of one is returned."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Group()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = torch.device(device).type == "cuda"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_gpus(torch.cuda.device_count())[0])
        dist.init_process_group("nccl" if cuda else "gloo")
    group = current_group()
    log.info("measuring as rank %d of %d (%s)", group.rank, group.world, dist.get_backend())
    return group


def shutdown() -> None:
    """Leave the process group :func:`init_from_env` joined (a no-op without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_gpus(n_gpus: int) -> list[int]:
    """This process's GPUs under torchrun: the node's ``n_gpus`` split into ``LOCAL_WORLD_SIZE`` equal runs, run
    ``LOCAL_RANK`` (8 GPUs, 2 processes per node: ``[0..3]`` and ``[4..7]``); every GPU in a plain run."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    if per_node <= 1:
        return list(range(n_gpus))
    k = max(1, n_gpus // per_node)
    return list(range(rank * k, rank * k + k))


def process_device(device: str, group: Group) -> str:
    """The device this process computes on: ``cuda`` becomes the first of :func:`local_gpus` under torchrun."""
    if group.world > 1 and device == "cuda":
        return f"cuda:{local_gpus(torch.cuda.device_count())[0]}"
    return device


def assign(costs: list[float], world: int) -> list[int]:
    """The rank of each unit: longest processing time first (largest cost to the least loaded rank, ties to
    the lower rank and the earlier unit).  Depends only on ``costs`` and ``world``, so every process computes
    the same split."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for u in sorted(range(len(costs)), key=lambda u: (-costs[u], u)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[u] = r
        load[r] += costs[u]
    return owner


def measure_shared(jobs: list[LayerJob], candidates: list[QuantSpec], algorithm: str,
                   group: Group) -> dict[str, LayerEntry]:
    """Every layer of ``jobs`` (one block's) measured by the processes of ``group`` together; each process
    returns all rows.  Must be called by every process with the same jobs (a collective)."""
    plans = [(job, layer_candidates(job.fqn, job.shape, candidates)) for job in jobs]
    flat = [(j, u) for j, (job, cands) in enumerate(plans) for u in units(cands, job.shape, algorithm)]
    owner = assign([unit_cost(u, plans[j][0].shape) for j, u in flat], group.world)
    mine: dict[int, list] = {}
    for (j, u), r in zip(flat, owner):
        if r == group.rank:
            mine.setdefault(j, []).append(u)
    values: dict[tuple[str, str, int], float] = {}
    for j, todo in mine.items():
        job, cands = plans[j]
        for (kind, k), v in evaluate_units(job, cands, todo, algorithm).items():
            values[(job.fqn, kind, k)] = v
    merged: dict[tuple[str, str, int], float] = {}
    for part in group.all_gather(values):
        merged.update(part)
    missing = len(flat) - len(merged)
    if missing:
        raise RuntimeError(f"distributed measurement lost {missing} of {len(flat)} units (ranks disagree on the "
                           "layers or candidates: same model, data and options in every process?)")
    return {job.fqn: combine(job.fqn, job.shape, cands, algorithm,
                             {(kind, k): v for (f, kind, k), v in merged.items() if f == job.fqn})
            for job, cands in plans}
