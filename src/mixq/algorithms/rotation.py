"""QuaRot-style rotation of the residual stream (Ashkboos et al., 2024, arXiv:2404.00456).

For an orthogonal ``Q`` (``Q Qᵀ = I``) and an RMSNorm without weight, ``unit(x Q) = unit(x) Q``
(the RMS is rotation invariant).  So, after fusing every RMSNorm's weight into the linears
that read it (§3 "computational invariance"), the residual stream ``h`` can be replaced by ``h Q``:

    embeddings      E ← E Q
    readers         W ← diag(g) … → W ← (W diag(g)) Q       (q/k/v, gate/up, lm_head; g = offset + w)
    writers         W ← Qᵀ W,  b ← Qᵀ b                      (o_proj, down_proj)

and the fp model computes the same logits, while the activations and weights seen by the
quantizer are "incoherent": an outlier channel of ``h`` is spread over all channels.

``Q = H diag(±1)/√d`` is a randomised Hadamard matrix when one of order ``d`` can be built
(:mod:`mixq.hadamard`: Sylvester ⊗ Paley, e.g. SmolLM2's ``576 = 16·36``), else a
Haar-random orthogonal matrix (QR of a seeded Gaussian).  With ``online_down`` the input of
the MLP's output projection (the last residual writer of each block) is rotated as well:
``W_down ← W_down Q_d`` and a forward pre-hook computes ``z Q_d`` at run time
(:class:`~mixq.algorithms.transforms.OnlineRotation`, applied factor by factor; e.g.
``1536 = 12·128``).

Norms applied to the writers' outputs before the residual add (Gemma 2 and 3's "sandwich" norms,
found structurally: direct children of the block of the same type as the input norms that are
no group's ``prev``) do not commute with ``Q`` because of their weight; there the writers are
left unrotated on their output side and the post-norm's output is rotated online instead.

LayerNorm families (mean subtraction, bias: gpt2, opt, phi, gpt_neox, falcon) are not supported, nor blocks
with no norm before attention and MLP (OLMo 2's post-norms only).
All rotation arithmetic is float64; weights are written back in their own dtype.

Caveat, measured on SmolLM2-135M: two residual channels hold ~40% of the normalised energy
while their norm weights are ~1e-4 (massive activations the model switches off).  Unrotated,
rounding errors in those weight columns are multiplied by the tiny norm weight; rotated, the
energy reaches every column of the fused weights and the layer output error of RTN grows ~3×,
so weight-only RTN after rotation is *worse* there (W3-g64: PTB ppl 640 → 27769).  Follow the
rotation with a data-aware quantizer (AWQ/GPTQ, which see ``H``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import arch_for, get_blocks, get_weight, set_weight, untie_lm_head
from ..arch_table import ArchInfo
from ..hadamard import dense, random_orthogonal_factors
from .transforms import OnlineRotation, attach_input_rotation

log = logging.getLogger(__name__)

class RotationUnsupported(NotImplementedError, ValueError):
    """The model's layout cannot be rotated (a ValueError too, so that ``mixq`` prints it as one line)."""


SUPPORTED = "llama, qwen2, mistral, gemma, gemma2, gemma3, qwen3, phi3, granite (RMSNorm families)"


@dataclass
class RotationInfo:
    """What :func:`rotate_model` did: the residual rotation's kind and size, the online ones."""

    hidden: int
    kind: str                       # "hadamard" | "random"
    seed: int
    online: dict[str, str] = field(default_factory=dict)  # fqn -> "input <kind> <n>" | "output <kind> <n>"


@dataclass(frozen=True)
class _BlockPlan:
    readers: tuple[tuple[str, tuple[str, ...]], ...]  # (norm, linears reading it)
    writers: tuple[str, ...]                          # linears writing the residual, module order
    post_norms: tuple[str, ...]                       # norms between writers and the residual add


def _plan(block: nn.Module, arch: ArchInfo) -> _BlockPlan:
    readers = tuple((g.prev, g.linears) for g in arch.input_groups if g.prev_kind == "norm")
    if not readers:
        raise RotationUnsupported(
            f"{type(block).__name__} has no norm before its attention or MLP (post-norms only, as OLMo 2): rotation "
            "fuses the norm that precedes each reader of the residual stream and is not implemented without one; "
            f"supported: {SUPPORTED}. Use AWQ or GPTQ without --rotate")
    read = {n for _, lins in readers for n in lins}
    grouped = {n for g in arch.input_groups for n in g.linears}
    order = [n for n, _ in block.named_modules() if n in grouped]
    writers = tuple(n for n in order if n not in read)
    norm_types = {type(block.get_submodule(n)) for n, _ in readers}
    prevs = {n for n, _ in readers}
    post = tuple(n for n, m in block.named_children() if type(m) in norm_types and n not in prevs)
    if post and len(post) != len(writers):
        raise RotationUnsupported(f"{len(post)} post-norms for {len(writers)} residual writers in "
                                  f"{type(block).__name__}: rotation supports {SUPPORTED}")
    return _BlockPlan(readers, writers, post)


def _check_norm(norm: nn.Module, name: str, hidden: int) -> None:
    w = getattr(norm, "weight", None)
    if isinstance(norm, nn.LayerNorm) or getattr(norm, "bias", None) is not None or w is None or w.shape != (hidden,):
        raise RotationUnsupported(
            f"rotation needs RMSNorm (no mean subtraction, no bias, a [{hidden}] weight), but '{name}' is a "
            f"{type(norm).__name__}; supported: {SUPPORTED}. LayerNorm families (gpt2, opt, phi, gpt_neox, falcon) "
            "would first need their norms converted (SliceGPT); use AWQ or GPTQ without --rotate")


def _mm(W: torch.Tensor, Q: torch.Tensor, side: str) -> torch.Tensor:
    Wd, Qd = W.to(torch.float64), Q.to(W.device)
    return (Wd @ Qd if side == "right" else Qd.T @ Wd).to(W.dtype)


@torch.no_grad()
def _fuse_norm(norm: nn.Module, linears: list[nn.Module], offset: float) -> None:
    """``W ← W diag(offset + w)`` for each reader, then ``offset + w = 1``."""
    g = offset + norm.weight.to(torch.float64)
    for lin in linears:
        W = get_weight(lin)
        set_weight(lin, (W.to(torch.float64) * g.to(W.device)).to(W.dtype))
    norm.weight.fill_(1.0 - offset)


def _online(factors, signs) -> OnlineRotation:
    return OnlineRotation([f.to(torch.float32) for f in factors], signs.to(torch.float32))


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, online_down: bool = True) -> RotationInfo:
    """Rotate ``model``'s residual stream in place; the fp logits are unchanged (up to rounding).

    Unties a tied lm_head (``arch.untie_lm_head``).  ``online_down``: also rotate the MLP
    output projection's input at run time (a forward pre-hook whose buffers are in the state
    dict, so a loader unaware of it fails loudly instead of silently computing garbage).
    Raises :class:`RotationUnsupported` (a ``NotImplementedError``) for LayerNorm families and blocks without
    pre-norms, before anything is changed.
    """
    arch = arch_for(model)
    if not arch.input_groups:
        raise RotationUnsupported(f"{type(model).__name__} has no input groups in mixq.arch_table.ARCH_TABLE: "
                                  f"rotation supports {SUPPORTED}")
    blocks = get_blocks(model)
    embeds = [model.get_submodule(n) for n in arch.embeddings]
    hidden = embeds[0].weight.shape[1]
    plans = [_plan(b, arch) for b in blocks]
    for i, (b, p) in enumerate(zip(blocks, plans)):
        for name in [n for n, _ in p.readers] + list(p.post_norms):
            _check_norm(b.get_submodule(name), f"{arch.blocks}.{i}.{name}", hidden)
    if arch.final_norm is None:
        raise RotationUnsupported(f"no final norm known for {type(model).__name__}: rotation supports {SUPPORTED}")
    final = model.get_submodule(arch.final_norm)
    _check_norm(final, arch.final_norm, hidden)

    untie_lm_head(model)
    factors, signs, kind = random_orthogonal_factors(hidden, seed)
    Q = dense(factors, signs)
    info = RotationInfo(hidden, kind, seed)
    log.info("rotating the residual stream (%d) with a %s matrix, seed %d", hidden, kind, seed)
    for e in embeds:
        e.weight.copy_(_mm(e.weight, Q, "right"))
    q_d = {}
    for i, (b, p) in enumerate(zip(blocks, plans)):
        for norm, lins in p.readers:
            mods = [b.get_submodule(n) for n in lins]
            _fuse_norm(b.get_submodule(norm), mods, arch.norm_offset)
            for m in mods:
                set_weight(m, _mm(get_weight(m), Q, "right"))
        if p.post_norms:  # writers keep their output basis; the post-norm output is rotated online
            for name in p.post_norms:
                norm = b.get_submodule(name)
                norm.add_module("output_rotation", _online(factors, signs))
                norm.register_forward_hook(lambda mod, args, out: mod.output_rotation(out))
                info.online[f"{arch.blocks}.{i}.{name}"] = f"output {kind} {hidden}"
        else:
            for name in p.writers:
                m = b.get_submodule(name)
                set_weight(m, _mm(get_weight(m), Q, "left"))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_((Q.T.to(m.bias.device) @ m.bias.to(torch.float64)).to(m.bias.dtype))
        if online_down:
            down = b.get_submodule(p.writers[-1])
            n = get_weight(down).shape[1]
            if n not in q_d:
                q_d[n] = random_orthogonal_factors(n, seed + 1)
                log.info("online rotation of the %d-dim down-projection input: %s", n, q_d[n][2])
            f_d, s_d, kind_d = q_d[n]
            set_weight(down, _mm(get_weight(down), dense(f_d, s_d), "right"))
            attach_input_rotation(down, _online(f_d, s_d))
            info.online[f"{arch.blocks}.{i}.{p.writers[-1]}"] = f"input {kind_d} {n}"
    head = model.get_submodule(arch.lm_head)
    _fuse_norm(final, [head], arch.norm_offset)
    set_weight(head, _mm(get_weight(head), Q, "right"))
    return info
