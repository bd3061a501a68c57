"""The block-by-block calibration walk (the GPTQ ``sequential`` pattern, no graph tracing).

1. Capture the inputs of decoder block 0 (hidden states) and the keyword arguments the model
   passes to *each* block (attention mask, rotary position embeddings, ...: they differ between
   blocks where a model mixes attention kinds, e.g. Gemma 2/3's sliding-window and global layers with
   their own masks and RoPE tables) by running the model with catchers in place of the blocks that
   record and stop the forward pass (the first batch passes every catcher, the others stop at block 0;
   no block is computed).
2. For each block i: bring it to the compute device (``BlockSource.load``), hook its linear
   layers to accumulate :class:`LayerStats`, run all calibration samples through it, hand the
   block and its statistics to a callback (which quantizes it), then compute the block's outputs
   — from the *quantized* block in sequential mode (default), or the fp block — which become the
   inputs of block i+1.  The block goes back to its home (``BlockSource.release``).

Only one block is on the compute device at a time and the buffers are two ``[n, L, hidden]``
tensors, so memory stays flat as depth grows.  A :class:`BlockSource` decides where blocks live
between visits (in memory by default; lazily from disk in :mod:`mixq.calib.lazy`).  The two
buffers can live on disk instead of RAM (``offload_dir``, :mod:`mixq.calib.offload`), and a
:class:`~mixq.calib.checkpoint.WalkCheckpoint` makes the walk resumable block by block
(``checkpoint``): blocks already done are restored, the walk goes on from the saved inputs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from ..amp import autocast
from ..arch import arch_for, block_linears, get_blocks
from ..memtrim import release_free_memory
from ..moe.routing import MIN_EXPERT_TOKENS, pad_rare_experts
from .stats import LayerStats, release_shared_input

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block ``index``: records the keyword arguments of its first call (and, for block 0, every
    input), then stops the forward pass -- or, while the first batch passes every block (``passing``), hands
    its input on unchanged so that the model calls the next block with that block's own arguments."""

    def __init__(self, block: nn.Module, index: int, last: bool):
        super().__init__()
        self.block, self.index, self.last = block, index, last
        self.inputs: list[torch.Tensor] = []
        self.kwargs: dict | None = None
        self.passing = False

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.inputs.append(hidden_states.detach())
        if self.kwargs is None:
            # positional extras (GPT-2 passes a few Nones) are replayed as "_args"; caches are dropped
            self.kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
            self.kwargs["use_cache"] = False
            self.kwargs["_args"] = tuple(None if isinstance(a, Cache) else a for a in args)
        if self.passing and not self.last:
            return hidden_states
        raise _StopForward


class BlockSource(Protocol):
    """Where decoder blocks live between visits."""

    def load(self, i: int, block: nn.Module, device: torch.device) -> nn.Module: ...

    def release(self, i: int, block: nn.Module) -> None: ...


@dataclass
class InMemoryBlocks:
    """Blocks stay in the model; ``load`` moves one to the compute device, ``release`` moves it home."""

    home: torch.device | str = "cpu"

    def load(self, i: int, block: nn.Module, device) -> nn.Module:
        return block.to(device)

    def release(self, i: int, block: nn.Module) -> None:
        block.to(self.home)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, *, device="cpu", batch_size: int = 1,
                         alloc: Callable[[tuple, torch.dtype], torch.Tensor] | None = None):
    """Run the model up to block 0 for every calibration sample.

    ``input_ids``: ``[n, L]``.  Returns ``(inputs [n, L, hidden], kwargs)``; ``kwargs[i]`` are the keyword
    arguments the model passes to block ``i`` (shared by all samples of length L; blocks of one attention
    kind share the same tensors).  Only the modules before block 0 (embeddings, rotary tables) and between
    the blocks need to be materialized: no block runs.
    ``alloc(shape, dtype)``: where the inputs go (e.g. :func:`mixq.calib.offload.disk_tensor`);
    each batch is copied there as it is captured, so the whole set is never in RAM at once.
    """
    blocks = get_blocks(model)
    catchers = [_Catcher(b, i, i == len(blocks) - 1) for i, b in enumerate(blocks)]
    for i, c in enumerate(catchers):
        blocks[i] = c
    catcher = catchers[0]
    n, buf = input_ids.shape[0], None
    try:
        for s in range(0, n, batch_size):
            for c in catchers:
                c.passing = s == 0
            try:
                model(input_ids[s : s + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            if alloc is not None and catcher.inputs:
                x = catcher.inputs.pop()
                if buf is None:
                    buf = alloc((n, *x.shape[1:]), x.dtype)
                buf[s : s + x.shape[0]] = x
    finally:
        for i, c in enumerate(catchers):
            blocks[i] = c.block
    if buf is None and not catcher.inputs:
        raise RuntimeError("block 0 was never called: is the architecture table's block path right?")
    first = catcher.kwargs or {}
    kwargs = [c.kwargs if c.kwargs is not None else first for c in catchers]
    return (buf if buf is not None else torch.cat(catcher.inputs, 0)), kwargs


def _block_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: torch.Tensor, kwargs: dict, *, batch_size: int = 1,
              out: torch.Tensor | None = None, device=None):
    """Run ``inputs [n, L, h]`` through one block; returns ``[n, L, h]`` (written into ``out`` if given).

    ``device``: where each batch is moved before the block sees it (buffers kept on disk or in host
    memory while the block runs on an accelerator); ``None`` leaves the batches where they are.
    """
    out = torch.empty_like(inputs) if out is None else out
    kw = dict(kwargs)
    args = kw.pop("_args", ())
    for s in range(0, inputs.shape[0], batch_size):
        x = inputs[s : s + batch_size]
        out[s : s + batch_size] = _block_out(block(x if device is None else x.to(device), *args, **kw))
    return out


BlockCallback = Callable[[int, nn.Module, dict[str, LayerStats]], None]


@torch.no_grad()
def walk_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    on_block: BlockCallback | None = None,
    *,
    device="cpu",
    sequential: bool = True,
    keep_hessian: bool = True,
    batch_size: int = 1,
    source: BlockSource | None = None,
    stats_sink: Callable[[int, dict[str, LayerStats]], None] | None = None,
    io_sink: Callable[[int, nn.Module, torch.Tensor, torch.Tensor, dict], None] | None = None,
    checkpoint=None,
    offload_dir=None,
    progress: bool = True,
    min_expert_tokens: int = MIN_EXPERT_TOKENS,
    fp_stream: bool = False,
    amp: str = "off",
) -> None:
    """Walk the decoder block by block, accumulating per-linear input statistics.

    ``on_block(i, block, stats)`` is called with block i on ``device`` and ``stats`` keyed by
    the linear's name relative to the block (e.g. ``"self_attn.q_proj"``); it may change the
    block's weights in place (quantize it).  With ``sequential=True`` the next block sees the
    outputs of the block *after* the callback (quantized), else the fp outputs.
    ``stats_sink(i, stats)`` receives each block's statistics (e.g. to save them).
    ``io_sink(i, block, inputs, fp_outputs, kwargs)`` sees the block with its fp inputs and
    outputs ``[n, L, hidden]`` and the keyword arguments to replay it with :func:`run_block` (block ``i``'s own)
    (block-output measurement); it must leave the block as it found it.

    ``checkpoint``: a :class:`~mixq.calib.checkpoint.WalkCheckpoint` (attached to the caller's
    results).  Blocks it has done are restored (``load``, ``checkpoint.restore``, ``release``: the
    source's sink sees them as in an uninterrupted walk), the walk goes on from its saved inputs,
    and ``checkpoint.commit`` saves every block as soon as it is done (callback and re-run).
    ``offload_dir``: keep the two ``[n, L, hidden]`` buffers in memory-mapped files there instead
    of RAM (:mod:`mixq.calib.offload`; each batch is moved to ``device`` when the block runs).
    ``min_expert_tokens``: MoE experts routed fewer calibration tokens have their statistics padded with
    their block's pooled expert statistics (:func:`mixq.moe.routing.pad_rare_experts`; logged).
    ``fp_stream``: also carry the full-precision model's block inputs (a third and fourth ``[n, L, hidden]``
    buffer, one more block forward per block; checkpointed and offloaded with the others) and give every linear
    the cross statistics of its full-precision input against the one it sees (:meth:`LayerStats.update_cross`,
    ``stats[name].D``).
    ``amp``: the blocks' forward passes under bf16 autocast (:mod:`mixq.amp`: ``auto``, ``bf16``, ``off``); the
    Hessians are bf16 Gram products accumulated in float64 (:func:`~mixq.calib.stats.gram`), and ``on_block``
    (GPTQ's own arithmetic) runs outside it, in float32.
    """
    source = source or InMemoryBlocks()
    arch = arch_for(model)
    blocks = get_blocks(model)
    alloc = None
    if offload_dir is not None:
        from .offload import disk_tensor

        alloc = lambda shape, dtype: disk_tensor(offload_dir, shape, dtype)  # noqa: E731
    inps, block_kwargs = capture_block_inputs(model, input_ids, device=device, batch_size=batch_size, alloc=alloc)
    outs = torch.empty_like(inps) if alloc is None else alloc(tuple(inps.shape), inps.dtype)
    fp_inps = fp_outs = None
    if fp_stream:
        new = (lambda: torch.empty_like(inps)) if alloc is None else (lambda: alloc(tuple(inps.shape), inps.dtype))
        fp_inps, fp_outs = new(), new()
        fp_inps.copy_(inps)
    start = 0
    if checkpoint is not None:  # the saved inputs of block `start` replace the captured ones
        start = checkpoint.resume(len(blocks), inps, *(() if fp_inps is None else (fp_inps,)))
        for i in range(start):
            block = source.load(i, blocks[i], device)
            checkpoint.restore(i, block)
            source.release(i, block)
    run_dev = device if alloc is not None else None
    bar = tqdm(range(start, len(blocks)), desc="blocks", disable=not progress, unit="block",
               initial=start, total=len(blocks))
    for i in bar:
        block = source.load(i, blocks[i], device)
        kwargs = block_kwargs[i]
        lins = block_linears(block, arch)
        stats = {n: LayerStats(_in_features(m), keep_hessian=keep_hessian) for n, m in lins.items()}
        hooks = [] if fp_stream else [m.register_forward_hook(_stat_hook(stats[n])) for n, m in lins.items()]
        try:
            with autocast(amp, device):
                if fp_stream:
                    _paired_run(block, lins, stats, fp_inps, fp_outs, inps, outs, kwargs, batch_size, run_dev)
                else:
                    run_block(block, inps, kwargs, batch_size=batch_size, out=outs, device=run_dev)
        finally:
            for h in hooks:
                h.remove()
            release_shared_input()
        stats = pad_rare_experts(stats, min_expert_tokens, where=f"block {i}: ")  # MoE (mixq.moe.routing)
        if stats_sink is not None:
            stats_sink(i, stats)
        if io_sink is not None:
            io_sink(i, block, inps, outs, kwargs)
        if on_block is not None:
            on_block(i, block, stats)
            if sequential:
                with autocast(amp, device):
                    run_block(block, inps, kwargs, batch_size=batch_size, out=outs, device=run_dev)
        if checkpoint is not None:
            checkpoint.commit(i, block, outs, *(() if fp_outs is None else (fp_outs,)))  # block i + 1's inputs
        source.release(i, block)
        inps, outs = outs, inps
        if fp_stream:
            fp_inps, fp_outs = fp_outs, fp_inps
        release_free_memory()  # the block's freed temporaries back to the system (mixq.memtrim)
    bar.close()


def _paired_run(block, lins, stats, fp_inps, fp_outs, inps, outs, kwargs, batch_size: int, device=None) -> None:
    """Batch by batch: the block on the full-precision stream (its linears' inputs kept), then on the walk's own
    stream, where each linear's statistics take its input and pair it with the kept one.

    Only the linears that read the block's own input (those called before any linear of the block has returned,
    and any later one given that same tensor: q/k/v, a fused qkv) get cross statistics.  The others' inputs
    depend on linears of the same block, which this walk quantizes together from one pass: their drift would be
    corrected twice (by the earlier layers' targets and by their own), which measured far worse than not at all."""
    kept: dict[str, torch.Tensor] = {}
    state = {"done": False, "block_inputs": []}
    reads_block_input: dict[str, bool] = {}

    def keep(name):
        return lambda mod, args, out: kept.__setitem__(name, args[0].detach())

    def before(name):
        def hook(mod, args):
            x = args[0]
            first = not state["done"]
            if first:
                state["block_inputs"].append(x)
            reads_block_input[name] = first or any(x is t for t in state["block_inputs"])
        return hook

    def pair(name):
        update = _stat_hook(stats[name])

        def hook(mod, args, out):
            state["done"] = True
            update(mod, args, out)
            stats[name].update_cross(kept.get(name) if reads_block_input.get(name) else None, args[0])
        return hook

    for s in range(0, inps.shape[0], batch_size):
        hooks = [m.register_forward_hook(keep(n)) for n, m in lins.items()]
        try:
            run_block(block, fp_inps[s : s + batch_size], kwargs, batch_size=batch_size,
                      out=fp_outs[s : s + batch_size], device=device)
        finally:
            for h in hooks:
                h.remove()
        state.update(done=False, block_inputs=[])
        hooks = [m.register_forward_pre_hook(before(n)) for n, m in lins.items()]
        hooks += [m.register_forward_hook(pair(n)) for n, m in lins.items()]
        try:
            run_block(block, inps[s : s + batch_size], kwargs, batch_size=batch_size, out=outs[s : s + batch_size],
                      device=device)
        finally:
            for h in hooks:
                h.remove()
        kept.clear()
        state["block_inputs"] = []


def _in_features(m: nn.Module) -> int:
    if hasattr(m, "in_features"):
        return m.in_features
    return m.weight.shape[0]  # transformers Conv1D stores [in, out]


def _stat_hook(stats: LayerStats):
    def hook(module, args, output):
        stats.update(args[0])

    return hook
