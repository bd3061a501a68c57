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
candidates over a plain grid (:mod:`mixq.intra.incoherence`) are measured the same way in their own
transformed basis, with their own ratio per bit width; other composites always run exactly.

The block-output metrics (``block``, ``block-rel``) run decoder block i on the first
``block_samples`` calibration rows once per (layer, candidate), with that one layer replaced by
its quantized weight, and compare with the fp block output — the most faithful and the slowest
measurement (one block forward per candidate).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from ..algorithms.gptq import gptq_quantize, prepare_hessian
from ..algorithms.rtn import rtn_quantize
from ..allocate import LayerEntry, SensitivityTable, candidates_for
from ..allocate.table import write_json_atomic
from ..arch import arch_for, get_weight
from ..calib.capture import walk_blocks
from ..config import QuantSpec
from ..config import is_composite
from ..data import ids_sha256
from ..intra import composite_weight
from ..models import model_fingerprint
from .gradients import gradient_stats
from ..arch import set_weight
from ..calib.capture import run_block
from .metrics import BLOCK_METRICS, METRICS, LayerSensitivity, block_error, layer_error

log = logging.getLogger(__name__)
ALGORITHMS = ("rtn", "gptq", "gptq-exact")


def calibration_hash(calib_ids: torch.Tensor) -> str:
    """A short hash of the calibration token ids (keys measurements to their data)."""
    return ids_sha256(calib_ids)[:16]


def measurement_key(model: nn.Module, calib_ids: torch.Tensor, candidates: list[QuantSpec], metric: str,
                    algorithm: str) -> dict:
    return {
        "model": model_fingerprint(model),
        "calibration": calibration_hash(calib_ids),
        "calibration_shape": list(calib_ids.shape),
        "candidates": [c.name for c in candidates],
        "metric": metric,
        "algorithm": algorithm,
    }


def measure(model: nn.Module, calib_ids: torch.Tensor, candidates: list[QuantSpec], *, metric: str = "kfac",
            algorithm: str = "rtn", grad_samples: int = 16, block_samples: int = 4,
            out: str | Path | None = None, progress: bool = True) -> SensitivityTable:
    """Measure every (layer, candidate) error.  ``out``: the table's path, also used to resume.

    ``block_samples``: calibration rows the block-output metrics run each candidate on.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    t0 = time.perf_counter()
    key = measurement_key(model, calib_ids, candidates, metric, algorithm)
    if metric in BLOCK_METRICS:
        key["block_samples"] = int(min(block_samples, calib_ids.shape[0]))
    partial_path = Path(str(out) + ".partial") if out else None
    done: dict[str, LayerEntry] = _load_partial(partial_path, key)
    grads = {}
    prefix = arch_for(model).blocks
    entries: dict[str, LayerEntry] = dict(done)
    if metric in ("kfac", "fisher", "block"):
        grads = gradient_stats(model, calib_ids[:grad_samples], want_fisher=metric == "fisher",
                               want_blocks=metric == "block", progress=progress)
    block_stats: dict = {}

    def on_stats(i: int, stats) -> None:
        if metric in BLOCK_METRICS:
            block_stats.clear()
            block_stats.update(stats)  # measured in on_io, which also sees the block's inputs/outputs
            return
        block = model.get_submodule(f"{prefix}.{i}")
        new = False
        for name, st in stats.items():
            fqn = f"{prefix}.{i}.{name}"
            if fqn in entries:
                continue
            W = get_weight(block.get_submodule(name)).detach().float()
            g = grads.get(fqn, {})
            sens = LayerSensitivity(H=st.H, G=g.get("G"), F=g.get("F"))
            err = lambda Wq, W=W, sens=sens: layer_error(W - Wq, sens, metric)  # noqa: E731
            entries[fqn] = _measure_layer(fqn, W, sens, candidates, algorithm, err)
            new = True
        if new and partial_path is not None:
            _save_partial(partial_path, key, entries)

    def on_io(i: int, block: nn.Module, inps: torch.Tensor, outs: torch.Tensor, kwargs: dict) -> None:
        if metric not in BLOCK_METRICS:
            return
        k = key["block_samples"]
        x, y = inps[:k], outs[:k].clone()
        y_q = torch.empty_like(y)
        G = grads.get(f"{prefix}.{i}", {}).get("G")
        new = False
        for name, st in block_stats.items():
            fqn = f"{prefix}.{i}.{name}"
            if fqn in entries:
                continue
            mod = block.get_submodule(name)
            W0 = get_weight(mod).detach().clone()
            W = W0.float()

            def err(Wq, mod=mod, W0=W0):
                set_weight(mod, Wq.to(W0.dtype))
                try:
                    run_block(block, x, kwargs, out=y_q)
                finally:
                    set_weight(mod, W0)
                return block_error(y_q - y, y, metric, G)

            entries[fqn] = _measure_layer(fqn, W, LayerSensitivity(H=st.H), candidates, algorithm, err)
            new = True
        if new and partial_path is not None:
            _save_partial(partial_path, key, entries)

    walk_blocks(model, calib_ids, None, sequential=False, stats_sink=on_stats, io_sink=on_io, progress=progress)
    order = [f for f in entries]
    table = SensitivityTable(layers=tuple(entries[f] for f in order), metric=metric,
                             meta={**key, "seconds": time.perf_counter() - t0, "resumed_layers": len(done)})
    if out:
        table.save(out, overwrite=True)
        if partial_path.exists():
            partial_path.unlink()
    return table


def _measure_layer(fqn, W, sens, candidates, algorithm, err) -> LayerEntry:
    """``err(Wq) -> float``: the metric's error of one quantized weight of this layer."""
    shape = tuple(W.shape)
    cands = candidates_for(shape, candidates, fqn=fqn)
    errs = []
    hc = prepare_hessian(sens.H) if algorithm.startswith("gptq") else None
    for c in cands:
        if _scalable(c) and algorithm == "gptq":  # +ip over a plain grid: RTN in the transformed basis, scaled below
            Wq = composite_weight(W, c, sens, "rtn")
        elif is_composite(c):  # intra-tensor composites: always measured with their own RTN / GPTQ
            Wq = composite_weight(W, c, sens, algorithm, hc)
        elif algorithm == "gptq-exact" and not c.is_float_keep:
            Wq = gptq_quantize(W, sens.H, c, hinv_chol=hc).weight
        else:
            _, Wq = rtn_quantize(W, c)
        errs.append(err(Wq))
    if algorithm == "gptq":
        errs = _scale_by_gptq(W, sens, cands, errs, err, hc)
    return LayerEntry(fqn=fqn, shape=shape, candidates=tuple(cands), errors=tuple(errs))


def _scalable(c) -> bool:
    """Plain grids, and ``+ip`` over a plain grid: RTN errors scaled by a measured GPTQ/RTN ratio."""
    return not is_composite(c) or (c.incoherent and not is_composite(c.inner))


def _scale_by_gptq(W, sens, cands, errs, err, hc) -> list[float]:
    """Scale RTN errors by the GPTQ/RTN ratio measured on one reference candidate per element family and bit
    width (an NF grid gains a different share of its error from GPTQ than an int grid of the same bits, and
    ``+ip`` candidates another again, in the transformed basis)."""
    by_bits: dict[tuple[str, int, bool], list[int]] = {}
    for k, c in enumerate(cands):
        if not c.is_float_keep and _scalable(c):
            by_bits.setdefault((c.dtype, c.bits, is_composite(c)), []).append(k)
    out = list(errs)
    for (_, bits, ip), ks in by_bits.items():
        ref = sorted(ks, key=lambda k: cands[k].cost(tuple(W.shape)).total)[len(ks) // 2]
        e_rtn = errs[ref]
        if ip:
            e_gptq = err(composite_weight(W, cands[ref], sens, "gptq"))
        else:
            e_gptq = err(gptq_quantize(W, sens.H, cands[ref], hinv_chol=hc).weight)
        ratio = min(1.0, e_gptq / e_rtn) if e_rtn > 0 else 1.0
        for k in ks:
            out[k] = errs[k] * ratio
    return out


def _load_partial(path: Path | None, key: dict) -> dict[str, LayerEntry]:
    if path is None or not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("ignoring unreadable partial measurement %s", path)
        return {}
    if doc.get("key") != key:
        log.warning("partial measurement %s belongs to another model/calibration/candidate set; starting over", path)
        return {}
    t = SensitivityTable.from_dict(doc["table"])
    log.info("resuming measurement: %d layers already measured", len(t.layers))
    return {e.fqn: e for e in t.layers}


def _save_partial(path: Path, key: dict, entries: dict[str, LayerEntry]) -> None:
    t = SensitivityTable(layers=tuple(entries.values()), metric=key["metric"], meta=key)
    write_json_atomic(path, {"key": key, "table": t.to_dict()}, overwrite=True)
