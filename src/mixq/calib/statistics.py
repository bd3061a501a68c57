"""The statistics artifact: every chosen block linear's input statistics from one calibration pass.

:func:`collect_statistics` walks the model once over the calibration rows (:func:`mixq.calib.capture.walk_blocks`,
inputs as the linears see them, after any pre-hooks) and returns a frozen :class:`Statistics`: per layer a
:class:`~mixq.calib.stats.LayerStats` (absmax and mean |x| per input channel, and with ``hessian=True`` the
``XᵀX/N`` GPTQ and ResQ use), keyed to its calibration rows by their sha256.  It saves to one safetensors file
(a versioned header in the file's metadata, written atomically) and loads back without unpickling, so one pass
serves static activation scales (``apply_act_quant(absmax=stats.absmax())``), outlier studies and plots.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import torch

from .stats import LayerStats

FORMAT = "mixq-statistics"
VERSION = 1


@dataclass(frozen=True)
class Statistics:
    """``layers``: fqn -> :class:`LayerStats` (read-only mapping); ``calibration``: sha256 of the calibration ids;
    ``hessian``: whether ``XᵀX`` was kept; ``model``: the model fingerprint (None when not known)."""

    layers: Mapping[str, LayerStats]
    calibration: str
    hessian: bool
    model: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))

    def absmax(self) -> dict[str, torch.Tensor]:
        """fqn -> per-input-channel max |x| (``[in]``)."""
        return {f: s.absmax for f, s in self.layers.items()}

    def absmean(self) -> dict[str, torch.Tensor]:
        """fqn -> per-input-channel mean |x| (``[in]``)."""
        return {f: s.absmean for f, s in self.layers.items()}

    def hessians(self) -> dict[str, torch.Tensor]:
        """fqn -> ``XᵀX/N`` (float32 ``[in, in]``); needs ``hessian=True`` at collection."""
        if not self.hessian:
            raise ValueError("these statistics were collected without Hessians: collect them with hessian=True")
        return {f: s.H for f, s in self.layers.items()}

    def check(self, calib_ids: torch.Tensor) -> None:
        """Refuse to stand for other calibration rows than those these statistics were collected on."""
        from ..data import ids_sha256

        mine = ids_sha256(calib_ids)
        if mine != self.calibration:
            raise ValueError(f"statistics were collected on other calibration rows (sha256 {self.calibration[:16]}, "
                             f"these {mine[:16]}): collect them again on these rows")

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """One safetensors file at ``path`` (atomic; an existing file is replaced only with ``overwrite``)."""
        from safetensors.torch import save_file

        from ..atomic import atomic_file

        p = Path(path)
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} already exists: choose another path or pass overwrite=True (--force)")
        tensors = {}
        for fqn, s in self.layers.items():
            tensors.update({k: v.contiguous() for k, v in s.state(fqn).items()})
        header = {"format": FORMAT, "version": VERSION, "calibration": self.calibration, "hessian": self.hessian,
                  "model": self.model, "layers": list(self.layers)}
        with atomic_file(p) as tmp:
            save_file(tensors, str(tmp), metadata={"mixq": json.dumps(header)})
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Statistics":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("mixq")
            header = json.loads(raw) if raw else {}
            if header.get("format") != FORMAT:
                raise ValueError(f"{path} is not a mixq statistics file (written by mixq.statistics(...).save)")
            if header.get("version", 0) > VERSION:
                raise ValueError(f"{path} has statistics format version {header['version']}; this mixq reads up to "
                                 f"{VERSION}: upgrade mixq")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        layers = {fqn: LayerStats.from_state(fqn, tensors) for fqn in header["layers"]}
        return cls(layers, header["calibration"], bool(header["hessian"]), header.get("model"))


def collect_statistics(model, calib_ids: torch.Tensor, fqns=None, *, hessian: bool = False, device="cpu",
                       fingerprint: bool = True, progress: bool = False) -> Statistics:
    """One calibration walk over ``calib_ids [n, L]``: the :class:`Statistics` of the block linears named in
    ``fqns`` (all of them with None).  ``fingerprint``: record the model's (about a second per 100M parameters)."""
    from ..arch import arch_for
    from ..data import ids_sha256
    from ..models import model_fingerprint
    from .capture import walk_blocks

    blocks = arch_for(model).blocks
    wanted = None if fqns is None else set(fqns)
    out: dict[str, LayerStats] = {}

    def sink(i, stats):
        for name, s in stats.items():
            fqn = f"{blocks}.{i}.{name}"
            if (wanted is None or fqn in wanted) and s.n_tokens:
                out[fqn] = s

    walk_blocks(model, calib_ids, None, device=device, keep_hessian=hessian, stats_sink=sink, progress=progress)
    return Statistics(out, ids_sha256(calib_ids), hessian, model_fingerprint(model) if fingerprint else None)
