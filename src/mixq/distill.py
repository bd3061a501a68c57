"""Fine-tuning of a quantized model with its codes fixed: block-wise distillation of the continuous parameters.

What is trained (everything else stays as quantized):

* every quantized block linear stored on a plain grid with a float group scale (int / NF grids with an fp16,
  bf16 or fp32 scale; ``+ip`` layers over such a grid, in their transformed basis) or on a VQ codebook (its
  per-row / per-group scale; the codebook is fixed) or a trellis (TCQ: likewise, the bits fixed): the scale, as ``s = s₀ · exp(θ)`` with ``θ`` starting at 0,
  and the fp16 offsets of ``-asymf`` grids;
* the block's own floating-point parameters (RMSNorm / LayerNorm weights, biases), ``--tune-norms``.

Procedure (OmniQuant / EfficientQAT's block-wise stage): the fp model and the quantized one are walked block by
block on the calibration rows.  Block ``i`` of the quantized model gets the inputs its quantized predecessors
produce and is trained to reproduce the fp block's output on the fp inputs (mean squared error, Adam), so each
block also corrects what the blocks before it left.  The rows are split: the last ``val_frac`` of them (the
calibration set interleaves its sources, so they mix them too) are never trained on, their loss is measured
before training and after every epoch, and the parameters of the best epoch are kept -- epoch 0 (no change)
included, so a block the tuning does not help is left as it was.  Scales are rounded to their stored dtype at
the end; the directory written holds exactly the accounted bits, as before.

Resumable: each finished block's parameters go to ``checkpoint`` (safetensors, with a key of the directory,
the calibration rows and the settings); a re-run restores them and goes on from the next block.
The end-to-end stage on the logits that follows (EfficientQAT's second) is :mod:`mixq.distill_e2e`; the layer that
trains is :class:`mixq.tunable.TunableLinear`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .arch import arch_for, get_blocks, get_weight, set_weight
from .calib.capture import _block_out, capture_block_inputs, run_block
from .tunable import _set_child, _swap_in

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 2
    lr: float = 1e-2          # Adam on θ (log-scale) and offsets (1e-2 beat 1e-3: bench/results/frontier)
    norm_lr: float = 1e-4     # Adam on the block's norm weights and biases
    batch: int = 2            # rows per step
    val_frac: float = 0.25    # held-out share of the calibration rows
    tune_norms: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch < 1 or not 0 < self.val_frac < 1 or self.lr <= 0 or self.norm_lr < 0:
            raise ValueError(f"bad fine-tuning settings {asdict(self)}: epochs and batch >= 1, 0 < val_frac < 1, "
                             "lr > 0, norm_lr >= 0")


def _norm_params(block: nn.Module, swapped: dict) -> list[nn.Parameter]:
    skip = {id(t.theta) for _, t in swapped.values()} | {id(t.offset) for _, t in swapped.values()}
    linear_w = set()
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear) and name not in swapped:
            linear_w.add(id(mod.weight))
    return [p for p in block.parameters() if id(p) not in skip and id(p) not in linear_w and p.dtype.is_floating_point]


def _loss(block, x, y, kw) -> torch.Tensor:
    kw = dict(kw)
    args = kw.pop("_args", ())
    return F.mse_loss(_block_out(block(x, *args, **kw)), y)


@torch.no_grad()
def _val(block, X, Y, kw, batch) -> float:
    tot = 0.0
    for s in range(0, X.shape[0], batch):
        tot += float(_loss(block, X[s:s + batch], Y[s:s + batch], kw)) * X[s:s + batch].shape[0]
    return tot / X.shape[0]


def finetune_blockwise(qmodel: nn.Module, ref: nn.Module, qtensors: dict, calib_ids: torch.Tensor,
                       cfg: FinetuneConfig = FinetuneConfig(), *, checkpoint: str | Path | None = None,
                       key: dict | None = None, progress: bool = True) -> tuple[dict, dict]:
    """Tune ``qmodel`` (fake-quantized, its stored parts in ``qtensors``) towards ``ref`` block by block.

    Returns ``(new qtensors, report)``; ``qmodel``'s weights and norms are updated in place.  ``report``: per
    block the held-out loss before and after, the epoch kept and the loss curve (train and held-out per epoch).
    """
    n = calib_ids.shape[0]
    n_val = max(1, round(n * cfg.val_frac))
    if n - n_val < 1:
        raise ValueError(f"{n} calibration rows leave none to train on with val_frac={cfg.val_frac}: "
                         "use more --nsamples")
    prefix = arch_for(qmodel).blocks
    bq, bf = get_blocks(qmodel), get_blocks(ref)
    ckpt = _Checkpoint(checkpoint, {**(key or {}), "config": asdict(cfg), "rows": list(calib_ids.shape)})
    t0 = time.perf_counter()
    Xq, kw = capture_block_inputs(qmodel, calib_ids)
    Xf, _ = capture_block_inputs(ref, calib_ids)
    out = dict(qtensors)
    report = {"config": asdict(cfg), "rows": {"train": n - n_val, "held_out": n_val}, "blocks": []}
    bar = range(len(bq))
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="finetune", unit="block")
    for i in bar:
        bpre = f"{prefix}.{i}"
        Yf = run_block(bf[i], Xf, kw[i])
        swapped = _swap_in(bq[i], bpre, out)
        norms = _norm_params(bq[i], swapped) if cfg.tune_norms else []
        saved = ckpt.load(i)
        if saved is not None:
            _load_state(swapped, norms, saved["tensors"])
            rec = saved["record"]
        else:
            g = torch.Generator().manual_seed(cfg.seed * 100_003 + i)  # per block: a resumed run shuffles alike
            rec = _train_block(bq[i], swapped, norms, Xq, Yf, kw[i], n_val, cfg, g)
            ckpt.save(i, _state(swapped, norms), rec)
        report["blocks"].append({"block": i, **rec})
        with torch.no_grad():
            for name, (orig, t) in swapped.items():
                qt = t.stored()
                out[f"{bpre}.{name}"] = qt
                set_weight(orig, t.weight_hat(rounded=True).to(get_weight(orig).dtype))
                _set_child(bq[i], name, orig)
        for p in bq[i].parameters():
            p.requires_grad_(False)
        Xq = run_block(bq[i], Xq, kw[i])
        Xf = Yf
    report["seconds"] = time.perf_counter() - t0
    ckpt.clear()
    return out, report


def _train_block(block, swapped, norms, Xq, Yf, kw, n_val, cfg, g) -> dict:
    n = Xq.shape[0]
    tr, va = slice(0, n - n_val), slice(n - n_val, n)
    groups = [{"params": [p for _, t in swapped.values() for p in (t.theta, t.offset) if p is not None],
               "lr": cfg.lr}]
    if norms:
        groups.append({"params": norms, "lr": cfg.norm_lr})
    for p in block.parameters():
        p.requires_grad_(False)
    for grp in groups:
        for p in grp["params"]:
            p.requires_grad_(True)
    if not any(grp["params"] for grp in groups):
        v = _val(block, Xq[va], Yf[va], kw, cfg.batch)
        return {"held_out_before": v, "held_out_after": v, "epoch_kept": 0, "train": [], "held_out": [v]}
    opt = torch.optim.Adam([grp for grp in groups if grp["params"]])
    curve_val = [_val(block, Xq[va], Yf[va], kw, cfg.batch)]
    curve_train = []
    best, best_epoch = _state(swapped, norms), 0
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(n - n_val, generator=g)
        tot = 0.0
        for s in range(0, n - n_val, cfg.batch):
            idx = order[s:s + cfg.batch]
            loss = _loss(block, Xq[tr][idx], Yf[tr][idx], kw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * idx.numel()
        curve_train.append(tot / (n - n_val))
        curve_val.append(_val(block, Xq[va], Yf[va], kw, cfg.batch))
        if curve_val[-1] < curve_val[best_epoch]:
            best, best_epoch = _state(swapped, norms), epoch
    _load_state(swapped, norms, best)
    return {"held_out_before": curve_val[0], "held_out_after": curve_val[best_epoch], "epoch_kept": best_epoch,
            "train": curve_train, "held_out": curve_val}


def _state(swapped, norms) -> dict[str, torch.Tensor]:
    st = {}
    for name, (_, t) in swapped.items():
        st[f"{name}.theta"] = t.theta.detach().clone()
        if t.offset is not None:
            st[f"{name}.offset"] = t.offset.detach().clone()
    for k, p in enumerate(norms):
        st[f"norm.{k}"] = p.detach().clone()
    return st


@torch.no_grad()
def _load_state(swapped, norms, st) -> None:
    for name, (_, t) in swapped.items():
        t.theta.copy_(st[f"{name}.theta"])
        if t.offset is not None:
            t.offset.copy_(st[f"{name}.offset"])
    for k, p in enumerate(norms):
        p.copy_(st[f"norm.{k}"])


class _Checkpoint:
    """Finished blocks' tuned tensors in ``dir/block-<i>.safetensors`` (+ ``.json`` record), under a key."""

    def __init__(self, path, key: dict):
        self.dir = None if path is None else Path(path)
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))
        if self.dir is None:
            return
        kf = self.dir / "key.json"
        if self.dir.exists() and (not kf.exists() or json.loads(kf.read_text()) != self.key):
            log.warning("%s belongs to another fine-tuning run: starting over", self.dir)
            self.clear()
        self.dir.mkdir(parents=True, exist_ok=True)
        if not kf.exists():
            from .jsonio import write_json_atomic

            write_json_atomic(kf, self.key, overwrite=True)

    def load(self, i: int) -> dict | None:
        if self.dir is None or not (self.dir / f"block-{i}.json").exists():
            return None
        from safetensors.torch import load_file

        return {"tensors": load_file(self.dir / f"block-{i}.safetensors"),
                "record": json.loads((self.dir / f"block-{i}.json").read_text())}

    def save(self, i: int, tensors: dict, record: dict) -> None:
        if self.dir is None:
            return
        from safetensors.torch import save_file

        from .fsmode import publish
        from .jsonio import write_json_atomic

        tmp = self.dir / f".block-{i}.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        publish(tmp)  # safetensors writes files private
        tmp.replace(self.dir / f"block-{i}.safetensors")
        write_json_atomic(self.dir / f"block-{i}.json", record, overwrite=True)  # written last: marks the block done

    def clear(self) -> None:
        if self.dir is not None and self.dir.exists():
            import shutil

            shutil.rmtree(self.dir)


def plot_curves(report: dict, path: str | Path) -> Path:
    """Held-out loss before and after per block, and each block's held-out curve over epochs (PNG); a report of the
    end-to-end stage alone: its held-out and train KL per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "blocks" not in report:  # the end-to-end stage alone: its held-out KL per epoch
        e = report["e2e"]
        fig, a = plt.subplots(figsize=(6, 4))
        a.plot(range(len(e["held_out"])), e["held_out"], "o-", label="held-out KL")
        a.plot(range(1, len(e["train"]) + 1), e["train"], "o-", label="train KL (epoch mean)")
        a.set_xlabel("epoch")
        a.set_ylabel("KL to the base model (nats / token)")
        a.legend()
        fig.suptitle(f"end-to-end fine-tuning ({e['rows']['train']} train / {e['rows']['held_out']} held-out rows)")
        return _save_png(fig, path)
    blocks = report["blocks"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["block"] for r in blocks]
    a.semilogy(x, [r["held_out_before"] for r in blocks], "o-", label="before")
    a.semilogy(x, [r["held_out_after"] for r in blocks], "o-", label="after (epoch kept)")
    a.set_xlabel("block")
    a.set_ylabel("held-out block-output MSE")
    a.legend()
    for r in blocks:
        v = r["held_out"]
        if v and v[0] > 0:
            b.plot(range(len(v)), [u / v[0] for u in v], alpha=0.6)
    b.set_xlabel("epoch")
    b.set_ylabel("held-out loss / before")
    b.axhline(1.0, color="k", lw=0.5)
    fig.suptitle(f"block-wise fine-tuning ({report['rows']['train']} train / {report['rows']['held_out']} held-out rows)")
    return _save_png(fig, path)


def _save_png(fig, path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def mean_gain(report: dict) -> float:
    """Geometric mean over blocks of held-out loss after / before (1.0: no change)."""
    r = [b["held_out_after"] / b["held_out_before"] for b in report["blocks"] if b["held_out_before"] > 0]
    return math.exp(sum(math.log(max(v, 1e-12)) for v in r) / len(r)) if r else 1.0
