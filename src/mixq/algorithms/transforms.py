"""Equivalence transforms: rescale the channels between an op and the linears that read it.

For an :class:`~mixq.arch_table.InputGroup` ``prev → linears`` and a positive per-input-channel scale
``s ∈ R^in`` (AWQ eq. 4, SmoothQuant eq. 3)::

    Y = X Wᵀ = (X diag(s)⁻¹) (W diag(s))ᵀ

so dividing ``prev``'s output channels by ``s`` and multiplying the following linears' input
columns by ``s`` leaves the fp model unchanged.  How ``X / s`` is produced depends on
``prev_kind``:

``"norm"``    ``y = x̂ ⊙ (offset + w) + b``  →  ``w' = (offset + w)/s − offset``, ``b' = b/s``
              (Gemma's ``x̂·(1+w)`` norms have ``offset = 1``, :attr:`ArchInfo.norm_offset`).
``"linear"``  rows (and bias) of ``prev`` divided by ``s``; exact through ``act(gate) ⊙ up`` and
              through positively homogeneous activations (ReLU).
``"act"``     the activation module is wrapped: :class:`ScaledActivation` computes ``act(x)/s``.

If the linears carry an online input rotation (:class:`OnlineRotation`, attached by
:mod:`mixq.algorithms.rotation`), their input is ``(z Q)`` and the scale is folded into the
rotation's output (``(z Q)/s``) instead of ``prev`` — ``prev``'s channels are no longer the
linears' channels.

Grouped-query attention (``v_proj → o_proj`` with ``kv_heads < heads``): head ``h`` reads kv
head ``h // n_rep`` (HF ``repeat_kv``), so o_proj's input column ``(k·n_rep + r)·head_dim + d``
is v_proj's output channel ``k·head_dim + d``.  A scale folded into v_proj must therefore be
shared by the ``n_rep`` repeats: build it per v channel and expand it with :func:`kv_expand`;
:func:`fold_scale` recovers the per-v-channel scale with :func:`kv_reduce` and rejects a scale
that is not shared.  All arithmetic is done in float64 and written back in the module's dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from ..arch import get_weight, set_weight
from ..arch_table import InputGroup


class ScaledActivation(nn.Module):
    """``act(x) / s`` per channel (AWQ's ``ScaledActivation``) for ``prev_kind="act"`` groups."""

    def __init__(self, act: nn.Module, inv_scale: torch.Tensor):
        super().__init__()
        self.act = act
        self.register_buffer("inv_scale", inv_scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) * self.inv_scale.to(x.dtype)


class OnlineRotation(nn.Module):
    """``x ↦ (x Q) ⊙ out_scale`` with ``Q = (F₁ ⊗ … ⊗ F_k) diag(signs)`` applied factor by factor.

    ``factors``: square orthonormal matrices whose Kronecker product is ``n × n`` (one dense
    matrix for a random orthogonal ``Q``); ``signs [n]``: ±1.  Applying the factors separately
    costs ``n·Σ nᵢ`` multiply-adds per token instead of ``n²``.  ``out_scale`` (ones at first)
    lets AWQ/SmoothQuant fold a per-channel scale into the rotated input.
    """

    def __init__(self, factors: list[torch.Tensor], signs: torch.Tensor):
        super().__init__()
        self.sizes = [int(f.shape[0]) for f in factors]
        for i, f in enumerate(factors):
            self.register_buffer(f"factor{i}", f.detach().to(torch.float32).clone())
        self.register_buffer("signs", signs.detach().to(torch.float32).clone())
        self.register_buffer("out_scale", torch.ones(signs.numel(), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        y = x.to(torch.float32).reshape(-1, *self.sizes)
        for i in range(len(self.sizes)):  # contract axis i+1 with factor i: y[..., a_i, ...] @ F_i
            f = getattr(self, f"factor{i}")
            y = torch.movedim(torch.tensordot(torch.movedim(y, i + 1, -1), f, dims=1), -1, i + 1)
        y = y.reshape(shape) * (self.signs * self.out_scale)
        return y.to(dtype)

    def matrix(self) -> torch.Tensor:
        """The dense ``Q`` (float64, without ``out_scale``)."""
        q = torch.ones(1, 1, dtype=torch.float64)
        for i in range(len(self.sizes)):
            q = torch.kron(q, getattr(self, f"factor{i}").to(torch.float64))
        return q * self.signs.to(torch.float64)


def input_rotation(linear: nn.Module) -> OnlineRotation | None:
    """The :class:`OnlineRotation` applied to ``linear``'s input, if one was attached."""
    rot = getattr(linear, "input_rotation", None)
    return rot if isinstance(rot, OnlineRotation) else None


def attach_input_rotation(linear: nn.Module, rot: OnlineRotation) -> None:
    """Make ``linear`` read ``rot(x)``: a child module (so its buffers are in the state dict,
    and a loader that does not know it fails loudly) and a forward pre-hook."""
    if input_rotation(linear) is not None:
        raise ValueError(f"{type(linear).__name__} already has an input rotation; rotate a fresh model")
    linear.add_module("input_rotation", rot)
    linear.register_forward_pre_hook(lambda mod, args: (mod.input_rotation(args[0]), *args[1:]))


# ---------------------------------------------------------------------------- GQA layout
def kv_expand(s_v: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """Per-v-channel ``[kv·hd]`` → per-o-column ``[kv·n_rep·hd]`` in ``repeat_kv`` order."""
    kv = s_v.numel() // head_dim
    return s_v.reshape(kv, 1, head_dim).expand(kv, n_rep, head_dim).reshape(-1)


def kv_reduce(s_o: torch.Tensor, n_rep: int, head_dim: int, how: str = "mean") -> torch.Tensor:
    """Per-o-column ``[heads·hd]`` → per-v-channel ``[kv·hd]``: ``mean``/``max`` over the repeats,
    or ``shared`` (checks that the repeats are equal, then takes the first)."""
    v = s_o.reshape(-1, n_rep, head_dim)
    if how == "mean":
        return v.mean(1).reshape(-1)
    if how == "max":
        return v.amax(1).reshape(-1)
    if how == "shared":
        if not torch.allclose(v, v[:, :1].expand_as(v), rtol=1e-6, atol=0.0):
            raise ValueError("a scale folded into v_proj under grouped-query attention must be shared by the "
                             f"{n_rep} query heads of each kv head: build it with kv_expand(s_v, n_rep, head_dim)")
        return v[:, 0].reshape(-1)
    raise ValueError(f"kv_reduce: how must be 'mean', 'max' or 'shared', got {how!r}")


def head_dim_of(model: nn.Module) -> int | None:
    """Attention head size from the model config (``head_dim``, else ``hidden / heads``)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hd = getattr(cfg, "head_dim", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    return int(hd) if hd else (hidden // heads if hidden and heads else None)


def kv_repeat(block: nn.Module, group: InputGroup) -> int:
    """How many input columns of the group share one output channel of a linear ``prev`` (1 unless GQA)."""
    if group.prev_kind != "linear":
        return 1
    n_in = get_weight(block.get_submodule(group.linears[0])).shape[1]
    n_out = get_weight(block.get_submodule(group.prev)).shape[0]
    if n_in % n_out:
        raise ValueError(f"{group.prev} has {n_out} outputs but {group.linears[0]} reads {n_in}: cannot fold a scale")
    return n_in // n_out


# ---------------------------------------------------------------------------- folding
@torch.no_grad()
def scale_columns_(linear: nn.Module, s: torch.Tensor) -> None:
    """``W ← W diag(s)`` (input columns)."""
    W = get_weight(linear)
    set_weight(linear, (W.to(torch.float64) * s.to(W.device, torch.float64)).to(W.dtype))


@torch.no_grad()
def scale_rows_(linear: nn.Module, s: torch.Tensor) -> None:
    """``W ← diag(s) W``, ``b ← s ⊙ b`` (output channels)."""
    W = get_weight(linear)
    s = s.to(W.device, torch.float64)
    set_weight(linear, (W.to(torch.float64) * s[:, None]).to(W.dtype))
    if getattr(linear, "bias", None) is not None:
        linear.bias.copy_((linear.bias.to(torch.float64) * s).to(linear.bias.dtype))


@torch.no_grad()
def scale_norm_(norm: nn.Module, s: torch.Tensor, offset: float = 0.0) -> None:
    """Multiply a norm's output by ``s``: ``(offset + w) ← (offset + w)·s``, ``b ← b·s``."""
    w = norm.weight
    s = s.to(w.device, torch.float64)
    w.copy_(((offset + w.to(torch.float64)) * s - offset).to(w.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.to(torch.float64) * s).to(norm.bias.dtype))


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@torch.no_grad()
def scale_act_(block: nn.Module, path: str, s: torch.Tensor) -> None:
    """Multiply the activation at ``path`` by ``s`` (wrapping it in a :class:`ScaledActivation`)."""
    act = block.get_submodule(path)
    s = s.to(torch.float32)
    if isinstance(act, ScaledActivation):
        act.inv_scale.mul_(s.to(act.inv_scale.device))
    else:
        _set_submodule(block, path, ScaledActivation(act, s))


@torch.no_grad()
def fold_scale(block: nn.Module, group: InputGroup, s: torch.Tensor, *, norm_offset: float = 0.0,
               head_dim: int | None = None) -> None:
    """Fold ``X → X/s``, ``W → W diag(s)`` into one input group of ``block`` (fp function unchanged).

    ``s [in]``: positive, one per input channel of the group's linears.  For a GQA ``v → o``
    group ``s`` must be shared across repeats (see :func:`kv_expand`); ``head_dim`` is then needed.
    """
    s = s.detach().to(torch.float64).flatten()
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError("fold_scale needs finite positive scales (clamp them, e.g. s.clamp_min(1e-4))")
    if group.prev_kind is None:
        raise ValueError(f"group {group.linears} has no prev op to fold a scale into (prev_kind=None); skip it")
    linears = [block.get_submodule(n) for n in group.linears]
    rot = input_rotation(linears[0])
    if rot is not None:  # the linears read (z Q): the channels are the rotation's outputs
        rot.out_scale.div_(s.to(rot.out_scale.device, torch.float32))
    elif group.prev_kind == "norm":
        scale_norm_(block.get_submodule(group.prev), 1.0 / s, norm_offset)
    elif group.prev_kind == "linear":
        n_rep = kv_repeat(block, group)
        s_prev = s
        if n_rep > 1:
            if head_dim is None:
                raise ValueError(f"{group.prev} → {group.linears}: grouped-query layout needs head_dim "
                                 "(pass head_dim=head_dim_of(model))")
            s_prev = kv_reduce(s, n_rep, head_dim, how="shared")
        scale_rows_(block.get_submodule(group.prev), 1.0 / s_prev)
    else:  # "act"
        scale_act_(block, group.prev, 1.0 / s)
    for lin in linears:
        scale_columns_(lin, s)
