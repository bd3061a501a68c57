"""Reading a GGUF file back: every tensor dequantized by ``gguf.quants.dequantize`` against what it should hold."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np
import torch

from ..formats import dequantize as mixq_dequantize
from .ggml_choice import _rel


def mixq_values(t: torch.Tensor, q=None, perm: np.ndarray | None = None) -> np.ndarray:
    """The float32 values a tensor should decode to: mixq's dequantized weight (``q``, its QTensor) when it was
    quantized, else the model's tensor ``t``; rows reordered by ``perm`` (the rope order of q/k)."""
    x = (mixq_dequantize(q) if q is not None else t.detach()).float().cpu().numpy()
    return np.ascontiguousarray(x[perm] if perm is not None else x, np.float32)


class _Expected(Mapping):
    """What each tensor of the file should decode to, computed on demand (``verify_gguf``'s ``expected``)."""

    def __init__(self, values: dict[str, Any]):
        self._values = values  # name -> zero-argument callable returning float32 ndarray

    def __getitem__(self, name: str) -> np.ndarray:
        return self._values[name]()

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def verify_gguf(path: str | os.PathLike, expected: Mapping[str, torch.Tensor | np.ndarray]) -> dict:
    """Read a GGUF file back and compare every tensor with what it should hold.

    Each tensor is dequantized with ``gguf.quants.dequantize`` and compared with
    ``expected[name]`` (its intended values, in the file's row order: q/k rows permuted for rope).
    Returns ``{"tensors": {name: {ggml_type, shape, max_abs_err, rel_err, exact}}, "max_abs_err",
    "max_rel_err", "n_exact", "missing", "unexpected", "shape_mismatch", "ok"}`` with ``rel_err``
    the relative L2 error ``||got - want|| / ||want||``; ``ok`` means every expected tensor is
    present with its shape (errors are reported, not judged).
    """
    reader = gguf.GGUFReader(path)
    in_file = {t.name: t for t in reader.tensors}
    tensors: dict[str, dict] = {}
    missing, mismatch = [], []
    for name in expected:
        t = in_file.get(name)
        if t is None:
            missing.append(name)
            continue
        want = expected[name]
        want = want.detach().float().cpu().numpy() if isinstance(want, torch.Tensor) else np.asarray(want, np.float32)
        got = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if got.size != want.size:
            mismatch.append(name)
            continue
        got = got.reshape(want.shape)
        diff = got.astype(np.float64) - want.astype(np.float64)
        max_abs = float(np.abs(diff).max()) if diff.size else 0.0
        ref = float(np.linalg.norm(want.astype(np.float64)))
        tensors[name] = {"ggml_type": t.tensor_type.name, "shape": list(want.shape), "max_abs_err": max_abs,
                         "rel_err": _rel(float(np.square(diff).sum()), ref * ref), "exact": max_abs == 0.0}
    return {"path": str(path), "tensors": tensors,
            "max_abs_err": max((r["max_abs_err"] for r in tensors.values()), default=0.0),
            "max_rel_err": max((r["rel_err"] for r in tensors.values()), default=0.0),
            "n_exact": sum(r["exact"] for r in tensors.values()),
            "missing": missing, "unexpected": sorted(set(in_file) - set(expected)), "shape_mismatch": mismatch,
            "ok": not missing and not mismatch}
