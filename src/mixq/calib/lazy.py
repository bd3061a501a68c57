"""Quantize a model that is never fully materialized: blocks streamed from safetensors.

The model skeleton is built on the ``meta`` device (:func:`skeleton_from_config`: parameters take no
memory, buffers such as rotary tables are real).  Tensors are read from the safetensors files with
plain file I/O, one tensor's bytes at a time (the header is validated against the file size first;
nothing is unpickled or mmapped).  Everything outside the decoder blocks
(embeddings, final norm, lm_head) is loaded up front with :func:`load_outside_blocks`; each
block is materialized by :class:`LazySafetensorsBlocks` when the calibration walk reaches it and
returned to ``meta`` when the walk leaves it, after handing its (quantized) tensors to a sink.
Peak memory is one block plus the activation buffers, whatever the depth; the buffers can go to
disk too (``offload_dir``, :mod:`mixq.calib.offload`), and a
:class:`~mixq.calib.checkpoint.WalkCheckpoint` makes the walk resumable per block (keyed to the
shards by :meth:`LazySafetensorsBlocks.fingerprint`; restored blocks are loaded and released once
more so that the sink sees every block, as in an uninterrupted walk).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..arch import arch_for
from ..moe.checkpoint import stored_as
from ..stio import header as _header
from ..stio import read_tensor as _read_tensor

def _shard_index(path: str | os.PathLike) -> dict[str, Path]:
    """tensor name → file, for a single ``.safetensors`` file or a directory of shards."""
    p = Path(path)
    if p.is_file():
        return {k: p for k in _header(p)[1]}
    idx = p / "model.safetensors.index.json"
    if idx.is_file():
        return {k: p / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {p}: lazy loading reads safetensors only")
    out = {}
    for fp in files:
        out.update({k: fp for k in _header(fp)[1]})
    return out


def _load_into(module: nn.Module, prefix: str, index: dict[str, Path], device) -> None:
    """Materialize ``module``'s parameters on ``device`` and fill them from ``index``."""
    module.to_empty(device=device)
    names = dict(module.named_parameters(remove_duplicate=False))
    by_file: dict[Path, list[str]] = {}
    stored: dict[str, tuple] = {}  # MoE: per-expert weights stored under another name, or stacked
    for n in names:
        key = f"{prefix}{n}"
        if key not in index:
            stored[n] = stored_as(key, index) or ()
            if not stored[n]:
                raise KeyError(f"tensor {key} is not in the checkpoint: is it the same model?")
            key = stored[n][0]
        by_file.setdefault(index[key], []).append(n)
    with torch.no_grad():
        for fp, ns in by_file.items():
            stacked: dict[str, torch.Tensor] = {}  # a stacked experts tensor is read once per block
            for n in ns:
                if n in stored:
                    name, select = stored[n]
                    if name not in stacked:
                        stacked[name] = _read_tensor(fp, name)
                    t = select(stacked[name])
                else:
                    t = _read_tensor(fp, f"{prefix}{n}")
                if t.shape != names[n].shape:
                    raise ValueError(f"{prefix}{n}: checkpoint shape {tuple(t.shape)} != model {tuple(names[n].shape)}")
                names[n].copy_(t)
                del t


def load_outside_blocks(model: nn.Module, path, device="cpu") -> None:
    """Load every parameter that is not inside a decoder block (embeddings, norms, head)."""
    arch = arch_for(model)
    index = _shard_index(path)
    blocks_prefix = arch.blocks + "."
    for name, mod in model.named_modules():
        if name.startswith(blocks_prefix) or name == arch.blocks:
            continue
        own = dict(mod.named_parameters(recurse=False))
        if not own:
            continue
        mod.to_empty(device=device, recurse=False)
        with torch.no_grad():
            for pn, p in own.items():
                key = f"{name}.{pn}" if name else pn
                if key in index:
                    getattr(mod, pn).copy_(_read_tensor(index[key], key))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


@dataclass
class LazySafetensorsBlocks:
    """A :class:`~mixq.calib.capture.BlockSource` that streams blocks from safetensors.

    ``sink(i, state_dict)`` receives each block's tensors when the walk leaves it (e.g. to write
    the quantized block to disk); the block then goes back to ``meta``.  ``max_live`` records the
    largest number of blocks materialized at once (1 in a correct walk).
    """

    path: str | os.PathLike
    blocks_prefix: str
    sink: Callable[[int, dict[str, torch.Tensor]], None] | None = None
    live: set[int] = field(default_factory=set)
    max_live: int = 0

    def __post_init__(self):
        self._index = _shard_index(self.path)

    def fingerprint(self) -> str:
        """16 hex digits identifying the shards (name, size, mtime and safetensors header of each), without
        reading the weights: what a resumable walk (:func:`mixq.calib.checkpoint.walk_key`) is keyed to."""
        h = hashlib.sha256()
        for fp in sorted(set(self._index.values())):
            st = fp.stat()
            h.update(f"{fp.name}|{st.st_size}|{st.st_mtime_ns}|".encode())
            with open(fp, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                h.update(f.read(n))
        return h.hexdigest()[:16]

    def load(self, i: int, block: nn.Module, device) -> nn.Module:
        _load_into(block, f"{self.blocks_prefix}.{i}.", self._index, device)
        self.live.add(i)
        self.max_live = max(self.max_live, len(self.live))
        return block

    def release(self, i: int, block: nn.Module) -> None:
        if self.sink is not None:
            self.sink(i, {k: v.detach().cpu().clone() for k, v in block.state_dict().items()})
        block.to("meta")
        self.live.discard(i)


def skeleton_from_config(config, dtype=torch.float32) -> nn.Module:
    """A causal LM with parameters on ``meta`` (no memory) and real buffers.

    Built under ``torch.device("meta")``, so not even the untouched ``torch.empty`` of a parameter is
    allocated (that virtual memory counts against a ``RLIMIT_DATA`` cap: the embedding alone is 113 MB on
    SmolLM2); the buffers this leaves on meta are rebuilt on CPU — rotary embeddings by re-creating the
    module from the config.  A model with other meta buffers is built the slower way instead
    (accelerate's ``init_empty_weights``, which allocates each parameter before moving it to meta).
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)) and "RotaryEmbedding" in type(mod).__name__:
            try:
                fresh = type(mod)(config=config)
            except TypeError:
                continue
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, fresh)
    if any(b.is_meta for b in model.buffers()):
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
