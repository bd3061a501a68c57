"""Stacked MoE experts as one ``nn.Linear`` per expert projection (what the rest of mixq quantizes).

transformers 5 keeps the experts of Qwen2/3-MoE, Mixtral, OLMoE, ... as two stacked 3-D parameters::

    experts.gate_up_proj  [E, 2I, H]   rows [:I] the gate, rows [I:] the up projection of each expert
    experts.down_proj     [E, H, I]

with ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``.  :func:`expose_experts`
replaces every such module by an :class:`ExpertList` computing the same function, whose expert ``e``
holds ``gate_proj [I, H]``, ``up_proj [I, H]`` and ``down_proj [H, I]`` as ``nn.Linear``.  Each expert
projection is then an ordinary layer of the plan, named as in the families' original checkpoints::

    model.layers.0.mlp.experts.3.gate_proj   model.layers.0.mlp.experts.3.up_proj
    model.layers.0.mlp.experts.3.down_proj

and everything that walks linears (calibration hooks, GPTQ, the native format, QuantLinear, the HF
exports) works unchanged.  A forward hook on expert ``e``'s linears sees exactly the rows routed to
``e``, so its ``LayerStats`` hold that expert's Hessian and its ``n_tokens`` is the routing count.

The routers (``mlp.gate``: a ``TopKRouter`` with a bare ``weight``, not an ``nn.Linear``) are never
layers of the plan: they stay in the model's dtype, in ``rest.safetensors``.

Only the layout above (concatenated ``[gate; up]``, not transposed, no bias, no per-expert norm) is
unfused; any other stacked-experts module (gpt-oss's interleaved and biased layout, ...) is refused
with :class:`UnsupportedExpertsError` rather than silently left unquantized.
"""
from __future__ import annotations

import json
import logging
import re

import torch
from torch import nn

log = logging.getLogger(__name__)

#: block-relative or full names of expert projections: ``<experts module>.<e>.<proj>``
EXPERT_RE = re.compile(r"^(?P<module>(?:.*\.)?experts)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)$")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class UnsupportedExpertsError(ValueError):
    """A stacked-experts module whose layout mixq does not unfuse."""


def split_expert_name(name: str) -> tuple[str, int, str] | None:
    """``"model.layers.0.mlp.experts.3.down_proj"`` -> ``("model.layers.0.mlp.experts", 3, "down_proj")``; else None."""
    m = EXPERT_RE.match(name)
    return None if m is None else (m["module"], int(m["expert"]), m["proj"])


def is_expert_layer(name: str) -> bool:
    return split_expert_name(name) is not None


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, inter: int, act_fn: nn.Module, *, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden, inter, **kw)
        self.up_proj = nn.Linear(hidden, inter, **kw)
        self.down_proj = nn.Linear(inter, hidden, **kw)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertList(nn.ModuleList):
    """Drop-in for a stacked experts module: ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``.

    Same loop as transformers' eager experts: for each expert hit, its routed rows go through it,
    are scaled by their routing weight and summed into the output (``index_add_``).
    """

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.num_experts = len(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        hit = torch.unique(top_k_index[(top_k_index >= 0) & (top_k_index < self.num_experts)])
        for e in hit.tolist():
            token_idx, pos = torch.where(top_k_index == e)
            y = self[e](hidden_states[token_idx])
            y = y * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _is_stacked(module: nn.Module) -> bool:
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.ndim == 3 and dn.ndim == 3


def _check_layout(name: str, module: nn.Module) -> None:
    bad = [f"{k}={getattr(module, k)}" for k, ok in (("is_transposed", False), ("has_bias", False),
                                                      ("is_concatenated", True), ("has_gate", True),
                                                      ("has_post_expert_norm", False))
           if getattr(module, k, ok) != ok]
    E, two_i, H = module.gate_up_proj.shape
    if tuple(module.down_proj.shape) != (E, H, two_i // 2) or two_i % 2:
        bad.append(f"shapes gate_up_proj {tuple(module.gate_up_proj.shape)} / down_proj "
                   f"{tuple(module.down_proj.shape)}")
    if bad:
        raise UnsupportedExpertsError(
            f"{name} ({type(module).__name__}): stacked experts with {', '.join(bad)} are not supported; mixq unfuses "
            "only [E, 2I, H] gate_up_proj (gate rows first) + [E, H, I] down_proj without bias")


@torch.no_grad()
def unfuse(module: nn.Module, name: str = "experts") -> ExpertList:
    """An :class:`ExpertList` holding copies of ``module``'s stacked weights (same dtype and device)."""
    _check_layout(name, module)
    gu, dn = module.gate_up_proj, module.down_proj
    E, two_i, H = gu.shape
    inter = two_i // 2
    experts = []
    for e in range(E):
        ex = ExpertMLP(H, inter, module.act_fn, dtype=gu.dtype, device=gu.device)
        ex.gate_proj.weight.copy_(gu[e, :inter])
        ex.up_proj.weight.copy_(gu[e, inter:])
        ex.down_proj.weight.copy_(dn[e])
        experts.append(ex)
    return ExpertList(experts)


def stacked_experts(model: nn.Module) -> list[str]:
    """Names of the stacked-experts modules still in ``model``."""
    return [n for n, m in model.named_modules() if _is_stacked(m)]


def expose_experts(model: nn.Module) -> list[str]:
    """Replace every stacked-experts module of ``model`` by an equivalent :class:`ExpertList`, in place.

    Idempotent and cheap when there is nothing to do (one pass over the module names).  Returns the
    names replaced.  Peak memory: one module's experts twice, while it is copied.  A model dispatched by
    accelerate keeps working when its experts are in memory (the new modules take their device); experts
    offloaded by accelerate (weights on ``meta`` behind a hook) are refused.
    """
    names = stacked_experts(model)
    hooked = names and any(hasattr(m, "_hf_hook") for m in model.modules())
    for name in names:
        if hooked and model.get_submodule(name).gate_up_proj.is_meta:
            raise UnsupportedExpertsError(
                f"{name}: its experts are offloaded by accelerate (device_map with cpu/disk offload), so their "
                "weights are not in memory to unfuse; load the model without offloading, or quantize it with --lazy")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, unfuse(parent.get_submodule(child), name))
    if names:
        log.info("mixq: %d stacked-experts module(s) unfused into per-expert linears (%s%s)", len(names),
                 names[0], ", ..." if len(names) > 1 else "")
    return names


def has_experts(model: nn.Module) -> bool:
    """True when ``model`` holds experts (stacked or already exposed)."""
    return any(isinstance(m, ExpertList) or _is_stacked(m) for m in model.modules())


def untied_experts(specs, layers=None) -> dict[tuple[str, str], dict[int, str | None]]:
    """The expert groups (experts module, projection) whose layers do not all carry one spec.

    ``specs``: layer name -> spec (a :class:`~mixq.config.QuantSpec`, its dict or name, or a ``mixq.json`` layer
    entry); ``layers``: every layer
    name of the model (default: those of ``specs``), an expert layer missing from ``specs`` counting as no spec.
    Returns ``{(module, proj): {expert: spec name or None}}`` of the mixed groups only.
    """
    def name(s) -> str | None:
        if isinstance(s, dict):  # a spec's dict, or a mixq.json layer entry {"spec": {...}, ...}
            from ..config import QuantSpec

            d = s.get("spec", s)
            try:
                return QuantSpec.from_dict(d).name
            except (ValueError, TypeError, KeyError):
                return json.dumps(d, sort_keys=True)
        return s if s is None or isinstance(s, str) else getattr(s, "name", str(s))

    groups: dict[tuple[str, str], dict[int, str | None]] = {}
    for n in (specs if layers is None else layers):
        parts = split_expert_name(n)
        if parts is not None:
            groups.setdefault((parts[0], parts[2]), {})[parts[1]] = name(specs.get(n))
    return {k: dict(sorted(v.items())) for k, v in groups.items() if len(set(v.values())) > 1}


def refuse_untied_experts(specs, where: str = "cannot export to GGUF", layers=None) -> None:
    """Raise ``ValueError`` (starting with ``where``) naming the expert groups of ``specs`` whose experts carry
    different specs (:func:`untied_experts`): GGUF stores the experts of one projection as one tensor of one type."""
    bad = untied_experts(specs, layers)
    if bad:
        shown = "; ".join(f"{m}.*.{p}: " + ", ".join(f"{e}={s or 'unquantized'}" for e, s in list(v.items())[:4])
                          + (", ..." if len(v) > 4 else "") for (m, p), v in list(bad.items())[:3])
        raise ValueError(f"{where}: the experts of {len(bad)} MoE projection(s) carry different specs ({shown}"
                         f"{'; ...' if len(bad) > 3 else ''}); GGUF (llama.cpp) stores a block's experts of one "
                         "projection as one stacked tensor of one ggml type: re-plan with --target gguf (or "
                         "--tie-experts), which gives them one spec")
