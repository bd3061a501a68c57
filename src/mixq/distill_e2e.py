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
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .arch import arch_for, get_blocks, get_weight, set_weight
from .distill import FinetuneConfig, _Checkpoint, _load_state, _set_child, _state, _swap_in

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class E2EConfig(FinetuneConfig):
    """The block-wise stage's settings (and checks) with this stage's defaults: one epoch, Adam at 1e-3 on θ and
    offsets of every layer at once, 1e-5 on the norms, one row per step."""

    epochs: int = 1
    lr: float = 1e-3
    norm_lr: float = 1e-5
    batch: int = 1


def kl_loss(logits_q: torch.Tensor, logits_ref: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(p_ref ‖ p_q)`` (nats), float32."""
    lq = F.log_softmax(logits_q.float().reshape(-1, logits_q.shape[-1]), -1)
    lr = F.log_softmax(logits_ref.float().reshape(-1, logits_ref.shape[-1]), -1)
    return F.kl_div(lq, lr, log_target=True, reduction="batchmean")


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


def _logits(model, ids):
    return model(ids).logits


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
    swapped = {}
    for i, block in enumerate(get_blocks(qmodel)):
        for name, pair in _swap_in(block, f"{prefix}.{i}", qtensors).items():
            swapped[f"{prefix}.{i}.{name}"] = pair
    for p in list(qmodel.parameters()) + list(ref.parameters()):
        p.requires_grad_(False)
    norms = _norm_params(qmodel, swapped) if cfg.tune_norms else []
    tuned = [p for _, t in swapped.values() for p in (t.theta, t.offset) if p is not None]
    for p in tuned + norms:
        p.requires_grad_(True)
    ckpt = _Checkpoint(checkpoint, {**(key or {}), "stage": "e2e", "config": asdict(cfg),
                                    "rows": list(calib_ids.shape)})
    train_ids, val_ids = calib_ids[: n - n_val], calib_ids[n - n_val:]
    report = {"config": asdict(cfg), "rows": {"train": n - n_val, "held_out": n_val},
              "layers_tuned": len(swapped), "norm_tensors_tuned": len(norms)}
    try:
        if not tuned and not norms:
            v = _val(qmodel, ref, val_ids, cfg.batch)
            report.update(held_out_before=v, held_out_after=v, epoch_kept=0, train=[], held_out=[v])
            return dict(qtensors), report
        groups = [{"params": tuned, "lr": cfg.lr}] + ([{"params": norms, "lr": cfg.norm_lr}] if norms else [])
        opt = torch.optim.Adam([g for g in groups if g["params"]])
        curve_val, curve_train = [_val(qmodel, ref, val_ids, cfg.batch)], []
        best, best_epoch = _state(swapped, norms), 0
        g = torch.Generator().manual_seed(cfg.seed)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.epochs * (n - n_val), desc="finetune e2e", unit="row")
        for epoch in range(1, cfg.epochs + 1):
            order = torch.randperm(n - n_val, generator=g)  # drawn even when resumed: later epochs shuffle alike
            saved = ckpt.load(epoch)
            if saved is not None:
                _load_state(swapped, norms, saved["tensors"])  # Adam's moments restart after a resume
                curve_train.append(saved["record"]["train"])
                curve_val.append(saved["record"]["held_out"])
                if bar is not None:
                    bar.update(n - n_val)
            else:
                tot = 0.0
                for s in range(0, n - n_val, cfg.batch):
                    x = train_ids[order[s:s + cfg.batch]]
                    with torch.no_grad():
                        target = _logits(ref, x)
                    loss = kl_loss(_logits(qmodel, x), target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    tot += float(loss.detach()) * x.shape[0]
                    if bar is not None:
                        bar.update(x.shape[0])
                        bar.set_postfix(kl=f"{float(loss.detach()):.4f}")
                curve_train.append(tot / (n - n_val))
                curve_val.append(_val(qmodel, ref, val_ids, cfg.batch))
                ckpt.save(epoch, _state(swapped, norms), {"train": curve_train[-1], "held_out": curve_val[-1]})
            if curve_val[-1] < curve_val[best_epoch]:
                best, best_epoch = _state(swapped, norms), epoch
        if bar is not None:
            bar.close()
        _load_state(swapped, norms, best)
        report.update(held_out_before=curve_val[0], held_out_after=curve_val[best_epoch], epoch_kept=best_epoch,
                      train=curve_train, held_out=curve_val)
    finally:
        out = _fold_back(qmodel, swapped, qtensors)
        for p in qmodel.parameters():
            p.requires_grad_(False)
    report["seconds"] = time.perf_counter() - t0
    ckpt.clear()
    return out, report


@torch.no_grad()
def _fold_back(qmodel: nn.Module, swapped: dict, qtensors: dict) -> dict:
    """Put the original linears back with the tuned (rounded) weights; the tuned stored parts."""
    out = dict(qtensors)
    for fqn, (orig, t) in swapped.items():
        out[fqn] = t.stored()
        set_weight(orig, t.weight_hat(rounded=True).to(get_weight(orig).dtype))
        _set_child(qmodel, fqn, orig)
    return out
