"""Where things live in each Hugging Face causal-LM family: one declarative table, with a default.

Algorithms never match model names (ARCHITECTURE.md rule 7); they ask :func:`arch_for` for an
:class:`~mixq.arch_table.ArchInfo` and walk the model with :func:`iter_layers` / :func:`get_weight` /
:func:`set_weight`.  Adding a family is adding one entry to :data:`mixq.arch_table.ARCH_TABLE`.  A
``model_type`` missing from the table falls back to discovery (the largest ``ModuleList`` of identical blocks,
the output embeddings as ``lm_head``), without input groups.

Weight convention: every matrix is seen as ``[out_features, in_features]`` (``y = x @ W.T``).
GPT-2's ``Conv1D`` stores ``[in, out]``; :func:`get_weight` / :func:`set_weight` transpose it.
An embedding table ``[vocab, hidden]`` is treated as ``[out=vocab, in=hidden]``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .arch_table import ARCH_TABLE, ArchInfo

log = logging.getLogger(__name__)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, Conv1D))


def _module(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise ValueError(f"{what} expected at '{path}' in {type(model).__name__} but not found; "
                         "pass the full *ForCausalLM model, or fix its ARCH_TABLE entry") from err


def _discover(model: nn.Module) -> ArchInfo:
    """Default for unknown families: the largest ModuleList of same-type blocks holding linears."""
    candidates = []
    for name, mod in model.named_modules():
        kids = list(mod.children()) if isinstance(mod, nn.ModuleList) else []
        if kids and len({type(k) for k in kids}) == 1 and any(_is_linear(m) for m in kids[0].modules()):
            candidates.append((sum(p.numel() for p in mod.parameters()), name))
    if not candidates:
        raise ValueError(f"cannot find decoder blocks in {type(model).__name__}: no nn.ModuleList of "
                         "identical blocks containing linears; add an entry to mixq.arch_table.ARCH_TABLE")
    blocks = max(candidates)[1]
    outside = [(n, m) for n, m in model.named_modules() if n and not n.startswith(blocks + ".") and n != blocks]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = [n for n, m in outside if (m is head if head is not None else isinstance(m, nn.Linear))]
    if not heads:
        raise ValueError(f"cannot find the lm_head of {type(model).__name__}; add an entry to mixq.arch_table.ARCH_TABLE")
    embeddings = tuple(n for n, m in outside if isinstance(m, nn.Embedding))
    info = ArchInfo(blocks, embeddings, None, heads[-1], (), discovered=True)
    log.warning("model_type %r not in mixq.arch_table.ARCH_TABLE; discovered blocks=%r lm_head=%r embeddings=%r "
                "(no input groups: AWQ/SmoothQuant/rotation unavailable)",
                getattr(getattr(model, "config", None), "model_type", None), blocks, info.lm_head, embeddings)
    return info


def arch_for(model: nn.Module) -> ArchInfo:
    """The :class:`ArchInfo` of ``model``: table lookup by ``config.model_type``, else discovery.

    Raises ``ValueError`` (with the fix) when discovery finds no decoder blocks or no lm_head.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    info = ARCH_TABLE.get(model_type)
    if info is None:  # discover once per model instance (and warn once), remembered on the instance
        cached = model.__dict__.get("_mixq_discovered_arch")
        if cached is None or cached[0] != model_type:
            cached = (model_type, _discover(model))
            model.__dict__["_mixq_discovered_arch"] = cached
        return cached[1]
    failed = [(k, v) for k, v in info.config_checks if getattr(config, k, None) != v]
    if failed and info.input_groups:
        log.warning("%s: config %s differs from what the input groups assume; dropping input groups",
                    config.model_type, ", ".join(f"{k}!={v!r}" for k, v in failed))
        info = replace(info, input_groups=())
    return info


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of decoder blocks, in forward order.

    MoE models: stacked experts are first replaced, in place, by one linear per expert projection
    (:func:`mixq.moe.expose_experts`, the same function of the inputs), so that every walk sees them.
    """
    from .moe.experts import expose_experts

    expose_experts(model)
    path = arch_for(model).blocks
    blocks = _module(model, path, "decoder blocks")
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"'{path}' is a {type(blocks).__name__}, expected nn.ModuleList of decoder blocks")
    return blocks


def block_linears(block: nn.Module, arch: ArchInfo) -> dict[str, nn.Module]:
    """Block-relative name -> ``nn.Linear`` / ``Conv1D`` inside one block (minus ``arch.skip``), in module order."""
    return {n: m for n, m in block.named_modules() if _is_linear(m) and n not in arch.skip}


@dataclass(frozen=True)
class LayerPolicy:
    """Whether the embeddings and the lm_head are quantized (``"keep"`` or ``"quantize"``); block linears always are."""

    lm_head: str = "keep"
    embeddings: str = "keep"

    def __post_init__(self):
        for field_name in ("lm_head", "embeddings"):
            if getattr(self, field_name) not in ("keep", "quantize"):
                raise ValueError(f"LayerPolicy.{field_name} must be 'keep' or 'quantize', "
                                 f"got {getattr(self, field_name)!r}")


@dataclass(frozen=True)
class LayerRef:
    """One quantizable matrix.

    ``fqn``    full dotted module name, e.g. ``"model.layers.3.self_attn.q_proj"``
    ``block``  block index, ``None`` for the lm_head and embeddings
    ``name``   name relative to its block, or the fqn for non-block layers
    ``kind``   ``"linear" | "conv1d" | "embedding" | "lm_head"``
    ``shape``  ``(out_features, in_features)``; Conv1D: the transpose of its stored weight
    ``shares_weight_with``  fqns of other modules holding this very tensor (tied lm_head/embedding)
    """

    fqn: str
    block: int | None
    name: str
    kind: str
    shape: tuple[int, int]
    shares_weight_with: tuple[str, ...] = ()


class TiedWeightsError(ValueError):
    """The lm_head shares its weight with an embedding, and only one of them is to be quantized."""


def _weight_param(module: nn.Module) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise TypeError(f"{type(module).__name__} has no 2-D weight to quantize")
    return w


def get_weight(model_or_module: nn.Module, ref: LayerRef | None = None) -> torch.Tensor:
    """The weight as ``[out, in]``: a detached view sharing storage (Conv1D: transposed view).

    With ``ref`` the module is looked up in ``model_or_module`` by ``ref.fqn``.  Clone before
    modifying it in place; write back with :func:`set_weight`.
    """
    module = model_or_module if ref is None else _module(model_or_module, ref.fqn, "layer")
    w = _weight_param(module).detach()
    return w.t() if isinstance(module, Conv1D) else w


def set_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write ``W`` (``[out, in]``) into ``module`` in place, in the module's own layout, dtype and device."""
    param = _weight_param(module)
    target = param.t() if isinstance(module, Conv1D) else param
    if tuple(W.shape) != tuple(target.shape):
        raise ValueError(f"set_weight: {type(module).__name__} expects [out, in] = {tuple(target.shape)}, "
                         f"got {tuple(W.shape)}")
    with torch.no_grad():
        target.copy_(W)


def _tied_embedding(model: nn.Module, arch: ArchInfo) -> str | None:
    """Name of the embedding whose weight *is* the lm_head weight, if any."""
    head = _weight_param(_module(model, arch.lm_head, "lm_head"))
    for name in arch.embeddings:
        w = _module(model, name, "embedding").weight
        if w is head or (w.data_ptr() == head.data_ptr() and w.shape == head.shape):
            return name
    return None


def untie_lm_head(model: nn.Module) -> None:
    """Give the lm_head its own copy of a tied embedding weight; sets ``config.tie_word_embeddings=False``.

    Needed when exactly one of lm_head / embeddings is quantized.  A no-op (logged) if not tied.
    """
    arch = arch_for(model)
    if _tied_embedding(model, arch) is None:
        log.info("untie_lm_head: lm_head is not tied; nothing to do")
        return
    head = _module(model, arch.lm_head, "lm_head")
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for cfg in (config, text):
            cfg.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers 5 caches the tie map at init
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def iter_layers(model: nn.Module, policy: LayerPolicy = LayerPolicy()) -> list[LayerRef]:
    """Every matrix to quantize under ``policy``: embeddings, block linears in forward order, lm_head.

    A tied lm_head/embedding quantized together is one :class:`LayerRef` (kind ``"lm_head"``,
    ``shares_weight_with`` naming the embedding).  Raises :class:`TiedWeightsError` if tied and
    only one of them is to be quantized: call :func:`untie_lm_head` first.
    """
    arch = arch_for(model)
    tied = _tied_embedding(model, arch)
    if tied is not None and policy.lm_head != policy.embeddings:
        raise TiedWeightsError(
            f"lm_head shares its weight with '{tied}' but the policy quantizes only one of them "
            f"(lm_head={policy.lm_head!r}, embeddings={policy.embeddings!r}); call "
            "mixq.arch.untie_lm_head(model) first, or use the same choice for both")
    refs: list[LayerRef] = []
    if policy.embeddings == "quantize":
        for name in arch.embeddings:
            if name != tied:
                refs.append(LayerRef(name, None, name, "embedding", _shape(_module(model, name, "embedding"))))
    for i, block in enumerate(get_blocks(model)):
        for name, mod in block_linears(block, arch).items():
            kind = "conv1d" if isinstance(mod, Conv1D) else "linear"
            refs.append(LayerRef(f"{arch.blocks}.{i}.{name}", i, name, kind, _shape(mod)))
    if policy.lm_head == "quantize":
        shape = _shape(_module(model, arch.lm_head, "lm_head"))
        refs.append(LayerRef(arch.lm_head, None, arch.lm_head, "lm_head", shape, (tied,) if tied else ()))
    return refs


def _shape(module: nn.Module) -> tuple[int, int]:
    out_f, in_f = get_weight(module).shape
    return (out_f, in_f)


def count_params(model: nn.Module, policy: LayerPolicy = LayerPolicy()) -> dict[str, int]:
    """Weight counts for bits-per-weight reporting (each tensor counted once, tied ones included).

    ``linear``: weights of block linears; ``embedding``: embedding tables; ``lm_head``: its weight
    (0 when tied to an embedding, already counted there); ``other``: everything else (norms,
    biases, ...); ``total``; ``quantizable``: weights of :func:`iter_layers` under ``policy``;
    ``kept``: ``total - quantizable``.
    """
    arch = arch_for(model)
    total = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied tensors
    linear = sum(get_weight(m).numel() for b in get_blocks(model) for m in block_linears(b, arch).values())
    embedding = sum(_module(model, n, "embedding").weight.numel() for n in arch.embeddings)
    head = 0 if _tied_embedding(model, arch) else _weight_param(_module(model, arch.lm_head, "lm_head")).numel()
    quantizable = sum(r.shape[0] * r.shape[1] for r in iter_layers(model, policy))
    return {"linear": linear, "embedding": embedding, "lm_head": head,
            "other": total - linear - embedding - head, "total": total,
            "quantizable": quantizable, "kept": total - quantizable}
