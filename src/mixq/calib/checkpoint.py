"""A resumable GPTQ block walk: what the walk has done is kept on disk after every block.

:class:`WalkCheckpoint` is handed to :func:`mixq.api.quantize_model` (``checkpoint=``), which
attaches its results to it and passes it to :func:`mixq.calib.capture.walk_blocks`.  After block
``i`` is quantized and re-run, :meth:`WalkCheckpoint.commit` writes, each file atomically
(temporary file, fsync, rename)::

    DIR/block-<i>.safetensors  block i's quantized layers at their stored size: "<layer>.<part>"
                               (its spec's stored form: PackedWeight codes/scale/zero/..., or PackedComposite
                               parts: mixq.algorithms.composite.storage.stored_form), and
                               "<layer>.__weight__" only where dequantizing them would not give back
                               the weight the walk left in the block (never for GPTQ so far)
    DIR/block-<i>.json         {"block": i, "layers": {layer: {"kind", "spec", "shape", "parts",
                               "proxy_loss"}}}  (parts: the tensor names stored for the layer)
    DIR/inputs-<i+1>.safetensors  the walk's inputs of block i+1 ([n, L, hidden], streamed in chunks)
    DIR/progress.json          {"format", "key", "last_block": i, "inputs": {...}, "blocks": [...]}:
                               written last, it is the commit point; then the previous inputs
                               file is deleted (only the latest is kept)

``progress.json`` records the size and sha256 of every block file and the size of the inputs
file.  On the next run :meth:`resume` checks the key (model weights, calibration data, every
layer's spec, method and GPTQ options, device, torch version: :func:`walk_key`), every file, and
decodes every saved block *before* touching the model; anything amiss (another key, a truncated or
altered file) is reported as a warning, the checkpoint is wiped and the walk starts over.  Restored
blocks get the exact codes, params and weights of the uninterrupted run.

``release=True`` (what ``mixq quantize`` uses) makes the walk's output out-of-core: once block ``i`` is
committed, its entries in the results become :class:`StoredLayer` handles on its file, so the codes of
finished blocks are not kept in memory (the native writer streams them from there into the output
directory, one tensor at a time), and a resume decodes each saved block only when the walk restores it
(every file's sha256 is still checked first).

Cost per block: one write of the inputs buffer (``n * L * hidden`` elements) and of the packed
block; hashing the (small) block files.  The inputs file is the big one (150 MB for 128 x 512
tokens at hidden 576 in float32).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .. import stio
from ..algorithms.composite.storage import pack_layer, stored_form
from ..arch import get_weight, set_weight
from ..atomic import atomic_file

log = logging.getLogger(__name__)

FORMAT = "mixq-walk-checkpoint"
VERSION = 1
PROGRESS = "progress.json"
_CHUNK = 64 * 2**20  # bytes per write/read of the inputs buffer
_NO_LOSS = object()


def walk_key(model: nn.Module, calib_ids: torch.Tensor, specs: dict, *, method: str = "gptq", damp: float = 0.01,
             act_order: bool = False, block_size: int = 128, sequential: bool = True, device="cpu",
             source=None, row_weights: dict | None = None, gptq_target: str = "quantized", amp: str = "off",
             hessian_shrink: float = 0.0) -> dict:
    """What a checkpoint must match to be resumed: a different value of any field starts over.

    ``model``: :func:`mixq.models.model_fingerprint` of the model as the walk starts (after any
    rotation), or ``source.fingerprint()`` for a source that streams the blocks (the model is on
    ``meta`` then; :class:`~mixq.calib.lazy.LazySafetensorsBlocks` fingerprints its shards).
    ``row_weights`` (the plan's, :func:`mixq.api.quantize_model`) enter as a hash when there are any; ``amp``
    (:mod:`mixq.amp`) as ``"bf16"`` when it resolves to bf16 on ``device``.
    """
    from ..amp import key_entry
    from ..data import calibration_hash
    from ..models import model_fingerprint

    fp = source.fingerprint() if hasattr(source, "fingerprint") else model_fingerprint(model)
    spec_doc = json.dumps([[f, specs[f].to_dict()] for f in sorted(specs)], sort_keys=True)
    return {"model": fp, "calibration": calibration_hash(calib_ids.cpu()), "calibration_shape": list(calib_ids.shape),
            "specs": hashlib.sha256(spec_doc.encode()).hexdigest()[:16], "n_layers": len(specs),
            "method": method, "damp": float(damp), "act_order": bool(act_order), "block_size": int(block_size),
            "sequential": bool(sequential), "device": torch.device(device).type, "torch": torch.__version__,
            **({"row_weights": _row_weights_hash(row_weights)} if row_weights else {}),
            **({"gptq_target": gptq_target} if gptq_target != "quantized" else {}),
            **({"hessian_shrink": float(hessian_shrink)} if hessian_shrink else {}),
            **key_entry(amp, device)}


def _row_weights_hash(row_weights: dict) -> str:
    doc = json.dumps({f: [round(float(v), 6) for v in w] for f, w in row_weights.items()}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


class WalkCheckpoint:
    """Per-block checkpoint of a GPTQ walk in ``directory`` (see the module docstring).

    ``key``: :func:`walk_key` (``None``: :func:`mixq.api.quantize_model` fills it in).
    ``announce``: called with a one-line message when a walk resumes (default: logged at INFO).
    ``resumed_from``: the first block the last :meth:`resume` walked (0: started afresh).
    """

    def __init__(self, directory: str | os.PathLike, key: dict | None = None, *,
                 announce: Callable[[str], None] | None = None, release: bool = False):
        self.dir = Path(directory)
        self.key = key
        self.release = release
        self.announce = announce or log.info
        self.resumed_from = 0
        self._doc: dict | None = None
        self._records: dict[int, dict] = {}
        self._results = None

    # ---------------------------------------------------------------- wiring (quantize_model)
    def attach(self, prefix: str, specs: dict, qtensors: dict, losses: dict) -> None:
        """Where the walk's results live: restored layers go into ``qtensors`` / ``losses`` (keyed by
        fqn ``<prefix>.<i>.<layer>``); :meth:`commit` saves block i's entries from there."""
        self._results = (prefix, specs, qtensors, losses)

    # ---------------------------------------------------------------- walk_blocks protocol
    def resume(self, n_blocks: int, inputs: torch.Tensor, fp_inputs: torch.Tensor | None = None) -> int:
        """Validate what is on disk; load the saved inputs into ``inputs`` (and the full-precision stream's into
        ``fp_inputs``, a walk that carries one); return the first block to walk."""
        if self._results is None or self.key is None:
            raise RuntimeError("WalkCheckpoint: attach() it and set its key first (mixq.api.quantize_model does)")
        self.key = json.loads(json.dumps(self.key))  # as it reads back from progress.json (tuples -> lists)
        self._doc, self._records, self.resumed_from = None, {}, 0
        problem = self._load_valid(n_blocks, inputs, fp_inputs is not None)
        if problem is not None:
            if problem:
                log.warning("walk checkpoint %s: %s; starting the walk over", self.dir, problem)
            self._wipe()
            self._doc = {"format": FORMAT, "version": VERSION, "key": self.key, "last_block": -1,
                         "inputs": None, "blocks": []}
            return 0
        k = self._doc["last_block"]
        self._read_inputs(self.dir / self._doc["inputs"]["file"], inputs)
        if fp_inputs is not None:
            self._read_inputs(self.dir / self._doc["inputs"]["file"], fp_inputs, "fp_inputs")
        self.resumed_from = k + 1
        if k + 1 < n_blocks:
            self.announce(f"resuming the block walk at block {k + 1} of {n_blocks} "
                          f"(blocks 0-{k} restored from {self.dir})")
        else:
            self.announce(f"all {n_blocks} blocks of the walk restored from {self.dir}: nothing left to walk")
        return k + 1

    def restore(self, i: int, block: nn.Module) -> None:
        """Put block i's saved layers into the results and its (fake-quant) weights into ``block``."""
        prefix, _, q, losses = self._results
        rec = self._records.pop(i)
        for name, (qt, packed, loss, weight) in (rec if rec is not None else self._read_block(i)).items():
            fqn = f"{prefix}.{i}.{name}"
            stem = f"block-{i:05d}.safetensors"
            q[fqn] = qt if not self.release else StoredLayer(self.dir / stem, name, self._layer_info(i, name),
                                                              self._doc["blocks"][i][stem])
            if loss is not _NO_LOSS:
                losses[fqn] = loss
            set_weight(block.get_submodule(name), weight if weight is not None else packed.dequantize())

    def commit(self, i: int, block: nn.Module, next_inputs: torch.Tensor,
               next_fp_inputs: torch.Tensor | None = None) -> None:
        """Save block i (done: quantized and re-run) and the inputs of block i + 1 (and its full-precision
        inputs, in a walk that carries them)."""
        doc = self._doc
        if doc is None or i != doc["last_block"] + 1:
            raise RuntimeError(f"WalkCheckpoint.commit({i}) out of order (last saved block {doc and doc['last_block']})")
        prefix, _, q, losses = self._results
        pre = f"{prefix}.{i}."
        tensors, layers = {}, {}
        for fqn, qt in q.items():
            if not fqn.startswith(pre):
                continue
            name = fqn[len(pre):]
            packed = _pack_cpu(qt)
            parts = dict(packed.tensors())
            w = get_weight(block.get_submodule(name)).detach().cpu()
            if not _reproduces(packed, w):
                parts["__weight__"] = w.contiguous()
            tensors.update({f"{name}.{k}": t for k, t in parts.items()})
            layers[name] = {"kind": type(packed).__name__, "spec": qt.spec.name, "shape": list(packed.shape),
                            "parts": list(parts)}
            if fqn in losses:
                layers[name]["proxy_loss"] = losses[fqn]
        stem = f"block-{i:05d}"
        _atomic(self.dir / f"{stem}.safetensors", lambda p: save_file(tensors, p))
        _atomic(self.dir / f"{stem}.json", lambda p: p.write_text(json.dumps({"block": i, "layers": layers})))
        inputs_name = f"inputs-{i + 1:05d}.safetensors"
        _atomic(self.dir / inputs_name, lambda p: _write_inputs(p, next_inputs, next_fp_inputs))
        old = doc["inputs"]
        doc["blocks"].append({n: _file_info(self.dir / n) for n in (f"{stem}.safetensors", f"{stem}.json")})
        doc["inputs"] = {"file": inputs_name, "size": (self.dir / inputs_name).stat().st_size,
                         "shape": list(next_inputs.shape), "dtype": str(next_inputs.dtype),
                         "fp_stream": next_fp_inputs is not None}
        doc["last_block"] = i
        _atomic(self.dir / PROGRESS, lambda p: p.write_text(json.dumps(doc, indent=1)))
        if old is not None and old["file"] != inputs_name:
            (self.dir / old["file"]).unlink(missing_ok=True)
        if self.release:  # the block's layers now live in its file: hand back their memory
            for name, info in layers.items():
                q[f"{pre}{name}"] = StoredLayer(self.dir / f"{stem}.safetensors", name, info,
                                                doc["blocks"][-1][f"{stem}.safetensors"])

    # ---------------------------------------------------------------- housekeeping
    def clear(self) -> None:
        """Delete the checkpoint's files (and the directory, if nothing else is in it)."""
        self._wipe()
        try:
            self.dir.rmdir()
        except OSError:
            pass

    def _wipe(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in self.dir.iterdir():
            if p.is_file() and (p.name == PROGRESS or p.name.startswith(("block-", "inputs-", ".tmp-"))):
                p.unlink(missing_ok=True)

    def _load_valid(self, n_blocks: int, inputs: torch.Tensor, fp_stream: bool = False) -> str | None:
        """``None`` if the checkpoint is usable (and decoded into ``_records``), ``""`` if there is none,
        else what is wrong with it."""
        path = self.dir / PROGRESS
        if not path.is_file():
            return ""
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != FORMAT or doc.get("version") != VERSION:
                return f"{PROGRESS} is not a version-{VERSION} {FORMAT}"
            if doc.get("key") != self.key:
                old = doc.get("key") or {}
                diff = sorted(k for k in {*old, *self.key} if old.get(k) != self.key.get(k))
                return f"it belongs to another run (differs in: {', '.join(diff)})"
            k = doc["last_block"]
            if not (0 <= k < n_blocks) or len(doc["blocks"]) != k + 1:
                return f"it records block {k} of a {n_blocks}-block walk"
            for files in doc["blocks"]:
                for name, info in files.items():
                    if not (self.dir / name).is_file() or _file_info(self.dir / name) != info:
                        return f"{name} is missing, truncated or altered"
            inp = doc["inputs"]
            if inp["shape"] != list(inputs.shape) or inp["dtype"] != str(inputs.dtype):
                return (f"saved inputs are {inp['dtype']} {inp['shape']}, the walk's are "
                        f"{inputs.dtype} {list(inputs.shape)}")
            if bool(inp.get("fp_stream")) != fp_stream:
                return "its saved inputs " + ("lack" if fp_stream else "carry") + " the full-precision stream"
            f = self.dir / inp["file"]
            if not f.is_file() or f.stat().st_size != inp["size"]:
                return f"{inp['file']} is missing or truncated"
            with safe_open(f, "pt") as st:
                for name in ("inputs", "fp_inputs") if fp_stream else ("inputs",):
                    s = st.get_slice(name)
                    if s.get_shape() != inp["shape"] or s.get_dtype() != stio.NAMES.get(inputs.dtype):
                        return f"{inp['file']} holds another tensor than progress.json says"
            # decoded now (checked before the model is touched); with release, one block at a time in restore()
            # (each file's sha256 was checked above), so resuming does not load the whole result at once
            self._records = {i: None if self.release else self._read_block(i) for i in range(k + 1)}
        except Exception as e:  # noqa: BLE001 - any unreadable piece means: start over
            self._records = {}
            return f"unreadable ({type(e).__name__}: {e})"
        self._doc = doc
        return None

    def _read_block(self, i: int) -> dict:
        prefix, specs, _, _ = self._results
        stem = self.dir / f"block-{i:05d}"
        meta = json.loads(stem.with_suffix(".json").read_text())
        if meta["block"] != i:
            raise ValueError(f"{stem}.json describes block {meta['block']}")
        out = {}
        with safe_open(f"{stem}.safetensors", "pt") as f:
            for name, info in meta["layers"].items():
                spec = specs.get(f"{prefix}.{i}.{name}")
                if spec is None or spec.name != info["spec"]:
                    raise ValueError(f"{prefix}.{i}.{name} was saved as {info['spec']}, the run asks for "
                                     f"{spec and spec.name}")
                parts = {k: f.get_tensor(f"{name}.{k}") for k in info["parts"]}
                weight = parts.pop("__weight__", None)
                packed = stored_form(spec).from_tensors(parts, spec, info["shape"])
                qt = packed.to_qtensor()
                if hasattr(qt, "proxy_loss"):  # composites carry it on the tensor too
                    qt.proxy_loss = info.get("proxy_loss")
                out[name] = (qt, packed, info.get("proxy_loss", _NO_LOSS), weight)
        return out

    def _layer_info(self, i: int, name: str) -> dict:
        return json.loads((self.dir / f"block-{i:05d}.json").read_text())["layers"][name]

    def _read_inputs(self, path: Path, into: torch.Tensor, name: str = "inputs") -> None:
        rows = max(1, _CHUNK // max(1, into[0].numel() * into.element_size()))
        with safe_open(path, "pt") as f:
            s = f.get_slice(name)
            for a in range(0, into.shape[0], rows):
                into[a : a + rows] = s[a : a + rows]


class StoredLayer:
    """A quantized layer whose stored form lives in a checkpoint block file, not in memory.

    What :class:`WalkCheckpoint` leaves in the results with ``release=True``: it has the ``spec``,
    ``shape``, ``nbytes``, ``tensor_meta()`` and ``tensors()`` of the packed layer it stands for, so
    :func:`mixq.export.native_write.save_quantized` copies it into the output one tensor at a time;
    :meth:`packed` / :meth:`to_qtensor` load it.  Valid while the checkpoint directory exists.
    ``expect``: the file's size and sha256 as the walk wrote it (``progress.json``); the file is checked against
    them once, before the first tensor is read from it, so an output never assembles a block some other process
    changed since.
    """

    _verified: set[tuple[str, str]] = set()  # (path, sha256) pairs already checked in this process

    def __init__(self, path: Path, name: str, info: dict, expect: dict | None = None):
        from ..config import parse_spec

        self.expect = expect
        self.path, self.name = Path(path), name
        self.spec = parse_spec(info["spec"])
        self.shape = tuple(info["shape"])
        self.parts = [k for k in info["parts"] if k != "__weight__"]
        self.proxy_loss = info.get("proxy_loss")

    def _check(self) -> None:
        if self.expect is None or (str(self.path), self.expect["sha256"]) in self._verified:
            return
        if _file_info(self.path) != self.expect:
            raise ValueError(f"{self.path} changed after this run wrote it (size or sha256 differ): another process "
                             f"wrote into {self.path.parent}; run the command again (the walk starts over)")
        self._verified.add((str(self.path), self.expect["sha256"]))

    def tensor_meta(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        self._check()
        entries = stio.header(self.path)[1]
        return {k: (stio.DTYPES[entries[f"{self.name}.{k}"]["dtype"]], tuple(entries[f"{self.name}.{k}"]["shape"]))
                for k in self.parts}

    @property
    def nbytes(self) -> int:
        total = 0
        for dt, shape in self.tensor_meta().values():
            n = dt.itemsize
            for d in shape:
                n *= d
            total += n
        return total

    def tensor(self, part: str) -> torch.Tensor:
        self._check()
        return stio.read_tensor(self.path, f"{self.name}.{part}")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: self.tensor(k) for k in self.parts}

    def packed(self):
        return stored_form(self.spec).from_tensors(self.tensors(), self.spec, self.shape)

    def to_qtensor(self):
        return self.packed().to_qtensor()


def _pack_cpu(qt):
    """The stored form of ``qt`` with every tensor on the CPU (a GPU walk leaves params on the device)."""
    p = pack_layer(qt)
    return type(p).from_tensors({k: t.detach().cpu().contiguous() for k, t in p.tensors().items()}, p.spec, p.shape)


def _reproduces(packed, w: torch.Tensor) -> bool:
    """Does restoring ``packed`` (``set_weight`` of its dequantized form) give back the weight ``w`` exactly?"""
    return torch.equal(packed.dequantize().to(w.dtype), w)


def _file_info(p: Path) -> dict:
    with open(p, "rb") as f:
        return {"size": p.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary sibling (:func:`mixq.atomic.atomic_file`), then fsync its folder."""
    with atomic_file(path) as tmp:
        write(tmp)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # directories cannot be fsynced everywhere
        pass


def _write_inputs(path: Path, t: torch.Tensor, fp: torch.Tensor | None = None) -> None:
    """``t`` as a safetensors file with the tensor ``"inputs"`` (and ``fp`` as ``"fp_inputs"``), written a chunk
    at a time (:func:`mixq.stio.write`; ``safetensors.torch.save_file`` would copy the whole buffer into memory
    first)."""
    if not t.dtype.is_floating_point or t.dtype not in stio.NAMES:
        raise ValueError(f"cannot checkpoint {t.dtype} block inputs")
    parts = {"inputs": t, **({"fp_inputs": fp} if fp is not None else {})}
    stio.write(path, [(n, x.dtype, tuple(x.shape)) for n, x in parts.items()], parts.__getitem__, {"format": FORMAT})
