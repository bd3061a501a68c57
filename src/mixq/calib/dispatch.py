"""Models spread over several devices by accelerate's ``device_map`` (GPUs, CPU RAM, disk), walked block by block.

``load_model(..., device_map="auto", max_memory=..., offload_folder=...)`` gives a model whose blocks live where
accelerate placed them: on a GPU, or *offloaded* (parameters on ``meta``; an ``AlignDevicesHook`` copies them
from CPU RAM or from the safetensors files onto its execution device for each forward and drops them after).
The calibration walk must not move such blocks (``block.to(device)`` would break the hooks), and a measurement
must see, and may temporarily replace, real weights.  :class:`DispatchedBlocks` is the walk's
:class:`~mixq.calib.capture.BlockSource` for them: visiting block i materializes its offloaded parameters on
their execution device (a private copy, so an in-place ``set_weight`` never writes into the offload store) and
switches the hooks' offloading off; leaving it returns them to ``meta``.  One offloaded block is real at a
time, so host or device memory holds the resident blocks plus one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .capture import InMemoryBlocks

NAMED_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's; else {module: device}


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed ``model`` with a ``device_map`` (hooks move inputs between devices)."""
    return bool(getattr(model, "hf_device_map", None)) and any(hasattr(m, "_hf_hook") for m in model.modules())


def _offloaded(m: nn.Module) -> bool:
    hook = getattr(m, "_hf_hook", None)
    return hook is not None and bool(getattr(hook, "offload", False)) and hasattr(hook, "weights_map")


def input_device(model: nn.Module) -> torch.device:
    """Where the token ids go: the input embedding's execution device (its hook's, if offloaded)."""
    emb = model.get_input_embeddings()
    hook = getattr(emb, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return emb.weight.device


def materialize(block: nn.Module) -> list[nn.Module]:
    """Load ``block``'s offloaded parameters onto their execution devices and stop their hooks from offloading;
    returns the modules to hand to :func:`offload` afterwards."""
    done = []
    with torch.no_grad():
        for m in block.modules():
            if not _offloaded(m):
                continue
            m._hf_hook.pre_forward(m)
            for name, p in list(m.named_parameters(recurse=m._hf_hook.place_submodules)):
                owner, leaf = _owner(m, name)
                owner._parameters[leaf] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            m._hf_hook.offload = False
            done.append(m)
    return done


def offload(modules: list[nn.Module]) -> None:
    """Undo :func:`materialize`: offloading back on, parameters back to ``meta``."""
    for m in modules:
        m._hf_hook.offload = True
        m._hf_hook.post_forward(m, None)


@contextlib.contextmanager
def materialized(module: nn.Module):
    """``module`` with every offloaded parameter real for the duration of the block."""
    mods = materialize(module)
    try:
        yield module
    finally:
        offload(mods)


@dataclass
class DispatchedBlocks:
    """Blocks stay where accelerate put them; an offloaded one is materialized while the walk visits it."""

    def __post_init__(self):
        self._live: dict[int, list[nn.Module]] = {}

    def load(self, i: int, block: nn.Module, device) -> nn.Module:  # noqa: ARG002 - the hooks choose the device
        self._live[i] = materialize(block)
        return block

    def release(self, i: int, block: nn.Module) -> None:  # noqa: ARG002
        offload(self._live.pop(i, []))


def walk_placement(model: nn.Module):
    """``(device, source)`` for :func:`~mixq.calib.capture.walk_blocks` over ``model`` where it is: a dispatched
    model's blocks stay in place (:class:`DispatchedBlocks`), token ids go to the embedding's device; any other
    model is walked on the device of its parameters, and its blocks go back there."""
    if is_dispatched(model):
        return input_device(model), DispatchedBlocks()
    device = next(model.parameters()).device
    return device, InMemoryBlocks(home=device)


def _owner(m: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (m.get_submodule(path) if path else m), leaf


def stored_tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    """The real value of state-dict entry ``name`` whose parameter is offloaded (on ``meta``): read from the
    offloading hook's weights map (CPU RAM or the safetensors / offload files); ``None`` if no hook holds it."""
    parts = name.split(".")
    for k in range(len(parts) - 1, -1, -1):
        try:
            m = model.get_submodule(".".join(parts[:k]))
        except AttributeError:
            continue
        if _offloaded(m):
            rel = ".".join(parts[k:])
            try:
                return m._hf_hook.weights_map[rel]
            except KeyError:
                return None
    return None


@dataclass(frozen=True)
class Placement:
    """How ``from_pretrained`` spreads a model (accelerate's big-model inference options).

    ``device_map``: one of :data:`NAMED_DEVICE_MAPS` or ``{module name: device}`` (``0``, ``"cpu"``,
    ``"disk"``); ``max_memory``: ``{device: bytes or "70GiB"}`` per GPU index and ``"cpu"``; ``offload_folder``:
    where weights that fit nowhere go (safetensors checkpoints are read in place where accelerate can).
    """

    device_map: str | dict
    max_memory: dict | None = None
    offload_folder: str | None = None

    def kwargs(self) -> dict:
        out: dict = {"device_map": self.device_map}
        if self.max_memory:
            out["max_memory"] = dict(self.max_memory)
        if self.offload_folder:
            out["offload_folder"] = str(self.offload_folder)
        return out


def parse_max_memory(text: str | None, gpus: list[int] | None = None) -> dict | None:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` → ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``; ``gpu=X`` means each of
    ``gpus`` (this process's, under torchrun) or, if ``None``, every visible GPU."""
    if not text:
        return None
    out: dict = {}
    for part in text.split(","):
        key, sep, val = part.strip().partition("=")
        if not sep or not val.strip():
            raise ValueError(f"--max-memory {text!r}: expected DEVICE=SIZE items such as 0=70GiB,cpu=200GiB")
        key, val = key.strip(), val.strip()
        if key == "gpu":
            out.update({g: val for g in (gpus if gpus is not None else range(torch.cuda.device_count()))})
        elif key.isdigit():
            out[int(key)] = val
        elif key in ("cpu", "disk", "mps"):
            out[key] = val
        else:
            raise ValueError(f"--max-memory {text!r}: unknown device {key!r} (a GPU index, gpu, cpu or disk)")
    return out
