"""End-to-end distillation of a quantized model with its codes fixed (the second stage after :mod:`mixq.distill`).

EfficientQAT's E2E-QP stage, on the fp model's logits instead of labels: every tunable quantized linear of every
block (the same set as the block-wise stage, :func:`mixq.distill.tunable`: float group scales as
``s = s₀ · exp(θ)``, the fp16 offsets of ``-asymf`` grids) and, optionally, the model's norm weights and biases
are trained together on::

    L = mean over tokens t of  KL( p_fp(· | x_<t) ‖ p_q(· | x_<t) )

the divergence the evaluation reports, so what the block-wise stage could not see -- how errors of different
blocks add up and what the final norm and the head make of them -- is what this stage fits.  The teacher's
logits are computed on the fly (one fp forward per step; nothing vocabulary-sized is cached).

Guard against fitting the calibration text: the last ``val_frac`` of the calibration rows are never trained on;
their KL is measured before training and after every epoch and the best epoch's parameters are kept (epoch 0,
no change, included).  Scales are rounded to their stored dtype at the end, so the written directory holds
exactly the accounted bits.  Resumable: the state after each epoch goes to ``checkpoint`` (safetensors plus a
JSON record under a key of the source, the calibration rows and the settings); a resumed run goes on
from the last finished epoch, with Adam's moments restarted.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .amp import autocast, check as check_amp, resolve as resolve_amp
from .arch import arch_for, get_blocks, get_weight, set_weight
from .memtrim import release_free_memory
from .distill import FinetuneConfig, _Checkpoint, _load_state, _state
from .tunable import _set_child, _swap_in

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class E2EConfig(FinetuneConfig):
    """The block-wise stage's settings (and checks) with this stage's defaults: one epoch, Adam at 1e-3 on θ and
    offsets of every layer at once, 1e-5 on the norms, one row per step; ``amp``: the quantized model's training
    forward under bf16 autocast (:mod:`mixq.amp`; ``auto``: where the device multiplies bf16 natively).  The
    teacher's logits and the held-out KL stay float32."""

    epochs: int = 1
    lr: float = 1e-3
    norm_lr: float = 1e-5
    batch: int = 1
    amp: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        check_amp(self.amp)


def kl_loss(logits_q: torch.Tensor, logits_ref: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(p_ref ‖ p_q)`` (nats), float32; differentiable in ``logits_q``.

    Computed a few tokens at a time (:class:`_ChunkedKL`): the softmaxes and the gradient
    ``(p_q - p_ref) / n`` never exist for all tokens at once but the gradient itself, so a 512-token row of a
    49k-word vocabulary costs one logits-sized buffer on top of the two logits instead of about six.
    """
    V = logits_q.shape[-1]
    return _ChunkedKL.apply(logits_q.reshape(-1, V), logits_ref.detach().reshape(-1, V))


KL_CHUNK = 64  # tokens per step of _ChunkedKL


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lq, lr):
        tot = torch.zeros((), dtype=torch.float64)
        for i in range(0, lq.shape[0], KL_CHUNK):
            a, b = F.log_softmax(lq[i:i + KL_CHUNK].float(), -1), F.log_softmax(lr[i:i + KL_CHUNK].float(), -1)
            tot += (b.exp() * (b - a)).sum(dtype=torch.float64)
        ctx.save_for_backward(lq, lr)
        return (tot / lq.shape[0]).float()

    @staticmethod
    def backward(ctx, g):
        lq, lr = ctx.saved_tensors
        out = torch.empty_like(lq)
        scale = g / lq.shape[0]
        for i in range(0, lq.shape[0], KL_CHUNK):
            d = F.softmax(lq[i:i + KL_CHUNK].float(), -1) - F.softmax(lr[i:i + KL_CHUNK].float(), -1)
            out[i:i + KL_CHUNK] = (d * scale).to(out.dtype)
        return out, None


def _norm_params(model: nn.Module, swapped_all: dict) -> list[nn.Parameter]:
    """Float parameters of norm layers (weights and biases of modules that are not linears or embeddings)."""
    out, seen = [], set()
    for _, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) or any(mod is t for _, t in swapped_all.values()):
            continue
        for p in mod.parameters(recurse=False):
            if p.dtype.is_floating_point and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _logits(model, ids):
    return model(ids, use_cache=False).logits  # no KV cache: a checkpointed block re-runs its forward


@contextmanager
def _checkpointed(blocks):
    """Each block's forward under activation checkpointing: backward keeps the blocks' inputs, not every
    intermediate of all of them, and runs each block's forward once more (a 512-token row of a 30-block model:
    about a gigabyte less at a third more time per step)."""
    for b in blocks:
        b.forward = partial(checkpoint, b.forward, use_reentrant=False)  # the instance attribute shadows the method
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


def _share_frozen(qmodel: nn.Module, ref: nn.Module, trained: set) -> None:
    """Parameters of ``qmodel`` this stage does not train that equal ``ref``'s (embeddings, a tied output head)
    use ``ref``'s storage: one copy of them instead of two."""
    theirs = dict(ref.named_parameters())
    for name, p in qmodel.named_parameters():
        r = theirs.get(name)
        if (r is not None and id(p) not in trained and p.shape == r.shape and p.dtype == r.dtype
                and p.device == r.device and torch.equal(p, r)):
            p.data = r.data


def _release_weights(swapped: dict) -> dict:
    """Drop the storage of the linears the tunable ones replace (their weight is rewritten from the tuned parts
    when they go back, :func:`_fold_back`); returns each one's shape."""
    shapes = {}
    for fqn, (orig, _) in swapped.items():
        p = orig.weight
        shapes[fqn] = tuple(p.shape)
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return shapes


@torch.no_grad()
def _val(qmodel, ref, ids, batch) -> float:
    tot = 0.0
    for s in range(0, ids.shape[0], batch):
        x = ids[s:s + batch]
        tot += float(kl_loss(_logits(qmodel, x), _logits(ref, x))) * x.shape[0]
    return tot / ids.shape[0]


def finetune_e2e(qmodel: nn.Module, ref: nn.Module, qtensors: dict, calib_ids: torch.Tensor,
                 cfg: E2EConfig = E2EConfig(), *, checkpoint=None, key: dict | None = None,
                 progress: bool = True) -> tuple[dict, dict]:
    """Tune ``qmodel`` (fake-quantized, its stored parts in ``qtensors``) on ``ref``'s logits, all blocks at once.

    Returns ``(new qtensors, report)``; ``qmodel``'s weights and norms are updated in place.  ``report``: the
    held-out KL before and after, the epoch kept, the train / held-out curves and the seconds taken.
    """
    n = calib_ids.shape[0]
    n_val = max(1, round(n * cfg.val_frac))
    if n - n_val < 1:
        raise ValueError(f"{n} calibration rows leave none to train on with val_frac={cfg.val_frac}: "
                         "use more --nsamples")
    t0 = time.perf_counter()
    prefix = arch_for(qmodel).blocks
    swapped, shapes = {}, {}
    for i, block in enumerate(get_blocks(qmodel)):
        here = {f"{prefix}.{i}.{name}": pair for name, pair in _swap_in(block, f"{prefix}.{i}", qtensors).items()}
        shapes.update(_release_weights(here))
        swapped.update(here)
        release_free_memory()  # the replaced weights and the bases' temporaries, block by block (mixq.memtrim)
    for p in list(qmodel.parameters()) + list(ref.parameters()):
        p.requires_grad_(False)
    norms = _norm_params(qmodel, swapped) if cfg.tune_norms else []
    _share_frozen(qmodel, ref, {id(p) for p in norms})
    release_free_memory()
    tuned = [p for _, t in swapped.values() for p in (t.theta, t.offset) if p is not None]
    for p in tuned + norms:
        p.requires_grad_(True)
    ckpt = _Checkpoint(checkpoint, {**(key or {}), "stage": "e2e", "config": asdict(cfg),
                                    "rows": list(calib_ids.shape)})
    train_ids, val_ids = calib_ids[: n - n_val], calib_ids[n - n_val:]
    report = {"config": asdict(cfg), "rows": {"train": n - n_val, "held_out": n_val},
              "layers_tuned": len(swapped), "norm_tensors_tuned": len(norms),
              "amp": resolve_amp(cfg.amp, _device(qmodel))}
    try:
        if not tuned and not norms:
            v = _val(qmodel, ref, val_ids, cfg.batch)
            report.update(held_out_before=v, held_out_after=v, epoch_kept=0, train=[], held_out=[v])
            return dict(qtensors), report
        with _checkpointed(get_blocks(qmodel)):
            report.update(_train(qmodel, ref, swapped, norms, tuned, train_ids, val_ids, cfg, ckpt, progress))
    finally:
        out = _fold_back(qmodel, swapped, qtensors, shapes)
        for p in qmodel.parameters():
            p.requires_grad_(False)
    report["seconds"] = time.perf_counter() - t0
    ckpt.clear()
    return out, report


def _train(qmodel, ref, swapped, norms, tuned, train_ids, val_ids, cfg, ckpt, progress) -> dict:
    """The epochs (resumed from ``ckpt``); leaves the best epoch's parameters in place and returns the curves."""
    n_train = train_ids.shape[0]
    groups = [{"params": tuned, "lr": cfg.lr}] + ([{"params": norms, "lr": cfg.norm_lr}] if norms else [])
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    curve_val, curve_train = [_val(qmodel, ref, val_ids, cfg.batch)], []
    best, best_epoch = _state(swapped, norms), 0
    g = torch.Generator().manual_seed(cfg.seed)
    device = _device(qmodel)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs * n_train, desc="finetune e2e", unit="row")
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(n_train, generator=g)  # drawn even when resumed: later epochs shuffle alike
        saved = ckpt.load(epoch)
        if saved is not None:
            _load_state(swapped, norms, saved["tensors"])  # Adam's moments restart after a resume
            curve_train.append(saved["record"]["train"])
            curve_val.append(saved["record"]["held_out"])
            if bar is not None:
                bar.update(n_train)
        else:
            tot = 0.0
            for s in range(0, n_train, cfg.batch):
                x = train_ids[order[s:s + cfg.batch]]
                with torch.no_grad():
                    target = _logits(ref, x)
                with autocast(cfg.amp, device):  # checkpointed blocks recompute under the same autocast
                    logits = _logits(qmodel, x)
                loss = kl_loss(logits, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                release_free_memory()  # a step's logits and recomputed activations, freed
                tot += float(loss.detach()) * x.shape[0]
                if bar is not None:
                    bar.update(x.shape[0])
                    bar.set_postfix(kl=f"{float(loss.detach()):.4f}")
            curve_train.append(tot / n_train)
            curve_val.append(_val(qmodel, ref, val_ids, cfg.batch))
            ckpt.save(epoch, _state(swapped, norms), {"train": curve_train[-1], "held_out": curve_val[-1]})
        if curve_val[-1] < curve_val[best_epoch]:
            best, best_epoch = _state(swapped, norms), epoch
    if bar is not None:
        bar.close()
    _load_state(swapped, norms, best)
    return dict(held_out_before=curve_val[0], held_out_after=curve_val[best_epoch], epoch_kept=best_epoch,
                train=curve_train, held_out=curve_val)


@torch.no_grad()
def _fold_back(qmodel: nn.Module, swapped: dict, qtensors: dict, shapes: dict) -> dict:
    """Put the original linears back with the tuned (rounded) weights; the tuned stored parts."""
    out = dict(qtensors)
    for fqn, (orig, t) in swapped.items():
        p = orig.weight
        p.data = torch.empty(shapes[fqn], dtype=p.dtype, device=p.device)
        out[fqn] = t.stored()
        set_weight(orig, t.weight_hat(rounded=True).to(get_weight(orig).dtype))
        _set_child(qmodel, fqn, orig)
        t.release()  # its basis is no longer needed: one layer's worth of memory at a time
    release_free_memory()
    return out
