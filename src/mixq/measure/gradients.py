"""Output-gradient statistics of every block linear on the calibration loss (for ``kfac``/``fisher``).

One backward pass per calibration sample of the summed next-token cross-entropy; hooks record,
for each linear ``y = x Wᵀ``:

    G[o]    = E_t[(∂ℓ_t/∂y_to)²]              (``kfac``)
    F[o, i] = E_t[(∂ℓ_t/∂y_to)² · x_ti²]      (``fisher``, only if ``want_fisher``)

and, with ``want_blocks``, for each decoder block's output ``Y`` (the residual stream), keyed by
the block's name (e.g. ``model.layers.3``):

    G[o]    = E_t[(∂ℓ_t/∂Y_to)²]              (``block``)

The loss is a sum over tokens, so ``∂ℓ/∂y_t`` is the per-token gradient (no 1/T factor).
Parameters are frozen: gradients flow only to activations, so no weight-gradient memory is used.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import arch_for, block_linears, get_blocks


def gradient_stats(model: nn.Module, input_ids: torch.Tensor, *, want_fisher: bool = False,
                   want_blocks: bool = False, progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """``{fqn: {"G": [out], "F": [out, in] (optional)}}`` averaged over all predicted tokens."""
    arch = arch_for(model)
    mods: dict[str, nn.Module] = {}
    for i, block in enumerate(get_blocks(model)):
        for name, m in block_linears(block, arch).items():
            mods[f"{arch.blocks}.{i}.{name}"] = m
    acc: dict[str, dict[str, torch.Tensor]] = {f: {} for f in mods}
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for fqn, m in mods.items():
        handles.append(m.register_forward_hook(_save_input(fqn, inputs)))
        handles.append(m.register_full_backward_hook(_grad_hook(fqn, acc, inputs, want_fisher)))
    if want_blocks:
        for i, block in enumerate(get_blocks(model)):
            fqn = f"{arch.blocks}.{i}"
            acc[fqn] = {}
            handles.append(block.register_forward_hook(_block_grad_hook(acc[fqn])))
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    n_tok = 0
    try:
        emb = model.get_input_embeddings()
        for s in tqdm(range(input_ids.shape[0]), desc="gradients", disable=not progress, unit="sample"):
            ids = input_ids[s : s + 1]
            x = emb(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, use_cache=False).logits[:, :-1].float()
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                               reduction="sum")
            loss.backward()
            n_tok += ids.shape[1]
            inputs.clear()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    return {f: {k: v / n_tok for k, v in d.items()} for f, d in acc.items()}


def _save_input(fqn, inputs):
    def hook(module, args, output):
        inputs[fqn] = args[0].detach()

    return hook


def _grad_hook(fqn, acc, inputs, want_fisher):
    def hook(module, grad_input, grad_output):
        g = grad_output[0].detach().reshape(-1, grad_output[0].shape[-1]).float()
        g2 = g * g
        d = acc[fqn]
        d["G"] = d.get("G", 0) + g2.sum(0)
        if want_fisher:
            x = inputs[fqn].reshape(-1, inputs[fqn].shape[-1]).float()
            F = g2.T @ (x * x)
            d["F"] = d.get("F", 0) + F

    return hook


def _block_grad_hook(d):
    def hook(module, args, output):
        y = output[0] if isinstance(output, (tuple, list)) else output
        if not y.requires_grad:
            return

        def on_grad(g):
            g = g.detach().reshape(-1, g.shape[-1]).float()
            d["G"] = d.get("G", 0) + (g * g).sum(0)

        y.register_hook(on_grad)

    return hook
