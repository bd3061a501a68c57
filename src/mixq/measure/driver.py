"""``mixq measure``: one pass over the model fills a :class:`~mixq.allocate.SensitivityTable`.

For every block linear and every candidate spec that fits its shape, the weight is quantized
with the algorithm that will be used (``rtn``, or ``gptq``) and the metric's error is recorded.
The table is saved after every block (atomically) under a key made of the model fingerprint,
the calibration data hash, the candidate set and the metric; an interrupted measurement resumes
from the blocks already done, and a finished one is reused for any number of budgets.

``algorithm="gptq"`` runs GPTQ for every candidate of every layer, which is exact but slow; the
default ``gptq_refs="per-bits"`` runs GPTQ once per element family and bit width (on the candidate with
the median cost) and scales the RTN errors of that family and width by the measured GPTQ/RTN ratio —
the ratio depends mostly on those two, and this keeps measurement within minutes.  ``+ip``
candidates over a plain grid (:mod:`mixq.algorithms.composite.incoherence`) are measured the same way in their own
transformed basis, with their own ratio per bit width; other composites always run exactly.

The block-output metrics (``block``, ``block-rel``) run decoder block i on the first
``block_samples`` calibration rows once per (layer, candidate), with that one layer replaced by
its quantized weight, and compare with the fp block output — the most faithful and the slowest
measurement (one block forward per candidate).
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..allocate import LayerEntry, SensitivityTable
from ..allocate.table import normalized_row_weight
from ..amp import key_entry
from ..arch import arch_for, get_weight, set_weight
from ..calib.capture import run_block, walk_blocks
from ..calib.dispatch import input_device, walk_placement
from ..calib.stats import gram
from ..config import QuantSpec
from ..data import calibration_hash
from ..models import model_fingerprint
from ..threadmap import thread_map
from .distributed import Group, current_group, measure_shared
from .gradients import gradient_stats
from .layer import LayerJob
from .layer import measure_layer as _measure_layer
from .metrics import (BLOCK_METRICS, METRICS, MODEL_LABELS, PER_TOKEN_KV, SKIP_KV, TOKEN_WEIGHTED, LayerSensitivity,
                      block_error, layer_error)
from .partial import load_partial, partial_file, save_partial

log = logging.getLogger(__name__)
ALGORITHMS = ("rtn", "gptq", "gptq-exact")


def measurement_key(model: nn.Module, calib_ids: torch.Tensor, candidates: list[QuantSpec], metric: str,
                    algorithm: str, amp: str = "off") -> dict:
    """What a measurement is of: a partial or finished table is reused only when every field matches.  ``amp``:
    the walk's and gradient pass's compute, resolved on the model's device (``bf16``, or absent for float32)."""
    return {
        "model": model_fingerprint(model),
        "calibration": calibration_hash(calib_ids),
        "calibration_shape": list(calib_ids.shape),
        "candidates": [c.name for c in candidates],
        "metric": metric,
        "algorithm": algorithm,
        **key_entry(amp, input_device(model)),
    }


_OPTIONAL_KEY = ("block_samples", "amp")  # entries a key has only where they apply


def is_measurement_of(meta: dict, key: dict) -> bool:
    """Whether a table whose meta is ``meta`` was measured under ``key``: every entry equal, the optional ones
    included (a table with one that ``key`` lacks was made with other settings)."""
    return all(meta.get(k) == key.get(k) for k in {*key, *_OPTIONAL_KEY})


def measure(model: nn.Module, calib_ids: torch.Tensor, candidates: list[QuantSpec], *, metric: str = "kfac",
            algorithm: str = "rtn", grad_samples: int = 16, block_samples: int = 4,
            out: str | Path | None = None, progress: bool = True, group: Group | None = None,
            amp: str = "off") -> SensitivityTable:
    """Measure every (layer, candidate) error.  ``out``: the table's path, also used to resume.

    ``block_samples``: calibration rows the block-output metrics run each candidate on.  The walk runs on the
    device of the model's parameters, or block by block where accelerate's ``device_map`` put them
    (:mod:`mixq.calib.dispatch`).  ``group``: the processes sharing the work
    (:mod:`mixq.measure.distributed`; default: the initialized ``torch.distributed`` group, else this process
    alone); every process returns the whole table and only rank 0 writes ``out``.  ``amp``: the block walk's and
    the gradient pass's forward passes under bf16 autocast (:mod:`mixq.amp`; the walk's Gram products too, summed
    in float64; the gradient statistics and every layer's error stay float32); recorded in the table's key.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    t0 = time.perf_counter()
    key = measurement_key(model, calib_ids, candidates, metric, algorithm, amp)
    if metric in BLOCK_METRICS:
        key["block_samples"] = int(min(block_samples, calib_ids.shape[0]))
    group = group or current_group()
    partial_path = partial_file(out)
    done: dict[str, LayerEntry] = _load_partial(partial_path if group.writer else None, key)
    if group.world > 1:  # rank 0's partial table, in every process (other ranks may not see its file)
        doc = group.broadcast(_table(done, key).to_dict() if done else None)
        done = {e.fqn: e for e in SensitivityTable.from_dict(doc).layers} if doc else {}
    if not group.writer:
        partial_path = None
    grads = {}
    prefix = arch_for(model).blocks
    entries: dict[str, LayerEntry] = dict(done)
    if metric in ("kfac", *TOKEN_WEIGHTED, "fisher", "block"):
        grads = gradient_stats(model, calib_ids[:grad_samples], want_fisher=metric == "fisher",
                               want_blocks=metric == "block", want_tokens=metric in TOKEN_WEIGHTED,
                               kv_tokens=metric in PER_TOKEN_KV,
                               labels="model" if metric in MODEL_LABELS else "data", progress=progress, amp=amp)
    token_h = _TokenWeightedH(model, grads, skip_kv=metric in SKIP_KV) if metric in TOKEN_WEIGHTED else None
    kv_tokens = _TokenInputs(model, grads) if metric in PER_TOKEN_KV else None
    block_stats: dict = {}
    from ..moe.routing import routing_for_measure  # MoE: tokens per expert, rare experts' G, frequency weights

    routing = routing_for_measure(model, calib_ids, metric in BLOCK_METRICS)

    def on_stats(i: int, stats) -> None:
        routing.observe(f"{prefix}.{i}", stats, grads)
        if metric in BLOCK_METRICS:
            block_stats.clear()
            block_stats.update(stats)  # measured in on_io, which also sees the block's inputs/outputs
            return
        block = model.get_submodule(f"{prefix}.{i}")
        jobs = []
        for name, st in stats.items():
            fqn = f"{prefix}.{i}.{name}"
            if fqn in entries:  # resumed: drop what was gathered for it
                for capture in (token_h, kv_tokens):
                    if capture is not None:
                        capture.pop(fqn)
                grads.get(fqn, {}).pop("gt", None)
                continue
            mod = block.get_submodule(name)
            g = grads.get(fqn, {})
            Xt = kv_tokens.pop(fqn) if kv_tokens is not None else None
            gt = g.pop("gt", None)  # freed with this block: the layer's per-token gradients
            sens = LayerSensitivity(H=st.H, G=g.get("G"), F=g.get("F"),
                                    Hg=token_h.pop(fqn) if token_h is not None else None,
                                    Xt=Xt, Gt=gt.reshape(-1, gt.shape[-1]).float() if Xt is not None else None)
            err = lambda W, Wq, sens=sens: layer_error(W - Wq, sens, metric)  # noqa: E731
            jobs.append(LayerJob(fqn, tuple(get_weight(mod).shape), lambda mod=mod: get_weight(mod).detach().float(),
                                 sens, err))
        _measure_block(jobs)

    def _measure_block(jobs: list[LayerJob]) -> None:
        if not jobs:
            return
        if group.world > 1:
            sens = {j.fqn: j.sens for j in jobs}
            entries.update({f: _with_row_weight(e, sens[f]) for f, e in measure_shared(jobs, candidates, algorithm,
                                                                                        group).items()})
        else:
            def one(j: LayerJob) -> LayerEntry:
                W = j.weight()
                return _measure_layer(j.fqn, W, j.sens.to(W.device), candidates, algorithm,
                                      lambda Wq: j.error(W, Wq))

            # block metrics run the shared block with one layer swapped in: one layer at a time there
            done_now = thread_map(one, jobs, size=lambda j: j.shape[0] * j.shape[1],
                                  parallel=metric not in BLOCK_METRICS and torch.device(device).type == "cpu")
            entries.update({j.fqn: _with_row_weight(e, j.sens) for j, e in zip(jobs, done_now)})
        if partial_path is not None:
            _save_partial(partial_path, key, entries)

    def on_io(i: int, block: nn.Module, inps: torch.Tensor, outs: torch.Tensor, kwargs: dict) -> None:
        if metric not in BLOCK_METRICS:
            return
        k = key["block_samples"]
        x, y = inps[:k], outs[:k].clone()
        y_q = torch.empty_like(y)
        G = grads.get(f"{prefix}.{i}", {}).get("G")
        jobs = []
        for name, st in block_stats.items():
            fqn = f"{prefix}.{i}.{name}"
            if fqn in entries:
                continue
            mod = block.get_submodule(name)
            W0 = get_weight(mod).detach().clone()

            def err(W, Wq, mod=mod, W0=W0):
                set_weight(mod, Wq.to(W0.dtype))
                try:
                    run_block(block, x, kwargs, out=y_q)
                finally:
                    set_weight(mod, W0)
                return block_error(y_q - y, y, metric, G)

            jobs.append(LayerJob(fqn, tuple(W0.shape), lambda W0=W0: W0.float(), LayerSensitivity(H=st.H), err))
        _measure_block(jobs)

    device, source = walk_placement(model)  # one device, or accelerate's device_map (blocks stay in place)
    try:
        walk_blocks(model, calib_ids, None, sequential=False, stats_sink=on_stats, io_sink=on_io, progress=progress,
                    device=device, source=source, amp=amp)
    finally:
        for capture in (token_h, kv_tokens):
            if capture is not None:
                capture.remove()
    entries = routing.weigh(entries, metric)
    table = _table(entries, key, seconds=time.perf_counter() - t0, resumed_layers=len(done))
    routing.annotate(table)
    if out and group.writer:
        table.save(out, overwrite=True)
        if partial_path.exists():
            partial_path.unlink()
    return table


class _GradientRows:
    """Forward hooks on the block linears that see the first ``R`` calibration rows -- those the gradient pass
    ran -- while the walk runs every row in order; :meth:`take` gets each call's part of them (``x[:n]``, ``[n, L,
    in]``) with the index of its first row.  A layer whose calls do not line up with the rows (MoE experts see
    routed tokens only) is marked unusable and :meth:`pop` gives it nothing (its error is then ``kfac``'s)."""

    def __init__(self, model: nn.Module, grads: dict, key: str, include=lambda name, arch: True):
        from ..arch import block_linears, get_blocks

        arch = arch_for(model)
        self.state: dict[str, list] = {}  # fqn -> [rows seen, usable, rows wanted, row length]
        self.handles = []
        for i, block in enumerate(get_blocks(model)):
            for name, m in block_linears(block, arch).items():
                fqn = f"{arch.blocks}.{i}.{name}"
                t = grads.get(fqn, {}).get(key)
                if t is not None and include(name, arch):
                    self.state[fqn] = [0, True, t.shape[0], t.shape[1]]
                    self.start(fqn, t)
                    self.handles.append(m.register_forward_hook(self._hook(fqn)))

    def _hook(self, fqn):
        def hook(module, args, output):
            st = self.state[fqn]
            x = args[0]
            rows = x.shape[0] if x.dim() == 3 else 0
            if not st[1] or st[0] >= st[2]:
                st[0] += rows
                return
            if x.dim() != 3 or x.shape[1] != st[3]:
                st[1] = False
                return
            self.take(fqn, x[: min(rows, st[2] - st[0])].detach(), st[0])
            st[0] += rows
        return hook

    def pop(self, fqn: str):
        st = self.state.pop(fqn, None)
        value = self.finish(fqn)
        return value if st is not None and st[1] else None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _TokenWeightedH(_GradientRows):
    """``H_g`` of every block linear with token weights (``kfac-tok``; ``kfac-pos`` / ``kfac-kv`` skip the arch's
    ``kv_linears``): ``Σ_t w_t x_t x_tᵀ / Σ_t w_t`` over the gradient rows, row ``r`` weighted by
    ``grads[fqn]["w"][r]``."""

    def __init__(self, model: nn.Module, grads: dict, skip_kv: bool = False):
        self.acc: dict[str, list] = {}  # fqn -> [w, sum w x xᵀ, sum w]
        super().__init__(model, grads, "w", lambda name, arch: not (skip_kv and name in arch.kv_linears))

    def start(self, fqn, w):
        self.acc[fqn] = [w, None, 0.0]

    def take(self, fqn, x, row):
        a = self.acc[fqn]
        ws = a[0][row:row + x.shape[0]].reshape(-1)
        h = gram(x.reshape(-1, x.shape[-1]), ws)
        a[1] = h if a[1] is None else a[1] + h
        a[2] += float(ws.sum(dtype=torch.float64))

    def finish(self, fqn):
        a = self.acc.pop(fqn, None)
        if a is None or a[1] is None or a[2] <= 0:
            return None
        return (a[1] / a[2]).to(torch.float32)


class _TokenInputs(_GradientRows):
    """Each gradient row's inputs, token by token, of the layers whose per-token gradients were kept
    (``grads[fqn]["gt"]``, ``kfac-kv``): :meth:`pop` gives ``[T, in]`` float32 in the token order of ``gt``
    flattened (kept as bfloat16 until then, and freed then)."""

    def __init__(self, model: nn.Module, grads: dict):
        self.rows: dict[str, list] = {}
        self.want: dict[str, int] = {}
        super().__init__(model, grads, "gt")

    def start(self, fqn, gt):
        self.rows[fqn] = []
        self.want[fqn] = gt.shape[0] * gt.shape[1]

    def take(self, fqn, x, row):
        self.rows[fqn].append(x.to("cpu", torch.bfloat16).reshape(-1, x.shape[-1]))

    def finish(self, fqn):
        parts, want = self.rows.pop(fqn, None), self.want.pop(fqn, 0)
        if not parts:
            return None
        X = torch.cat(parts).float()  # converted once, not per candidate
        return X if X.shape[0] == want else None


def _with_row_weight(entry: LayerEntry, sens) -> LayerEntry:
    """The entry with its rows' relative weights (the layer's ``G`` at mean 1) when the metric measured ``G`` and
    some candidate weights rows by it (``CompositeSpec.weights_rows``: it was measured with them), for the quantize
    walk to use alike."""
    G = getattr(sens, "G", None)
    if G is None or not any(getattr(c, "weights_rows", False) for c in entry.candidates):
        return entry
    return replace(entry, row_weight=normalized_row_weight(G))


def _table(entries: dict[str, LayerEntry], key: dict, **meta) -> SensitivityTable:
    return SensitivityTable(layers=tuple(entries.values()), metric=key["metric"], meta={**key, **meta})


def _load_partial(path: Path | None, key: dict) -> dict[str, LayerEntry]:
    doc = load_partial(path, key, "measurement", "model/calibration/candidate set")
    if doc is None:
        return {}
    t = SensitivityTable.from_dict(doc["table"])
    log.info("resuming measurement: %d layers already measured", len(t.layers))
    return {e.fqn: e for e in t.layers}


def _save_partial(path: Path, key: dict, entries: dict[str, LayerEntry]) -> None:
    save_partial(path, key, table=_table(entries, key).to_dict())
