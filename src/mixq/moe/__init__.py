"""Mixture-of-experts support: experts as layers of the plan, routing counts, rare-expert fallback.

* :mod:`mixq.moe.experts`  stacked 3-D experts (transformers 5) exposed as one ``nn.Linear`` per expert
  projection (``model.layers.0.mlp.experts.3.down_proj``); routers stay out of the plan.
* :mod:`mixq.moe.routing`  tokens per expert during calibration, padding of rare experts' statistics,
  routing-frequency weights of the measured errors.
* :mod:`mixq.moe.checkpoint`  how families' checkpoints name experts and routers (exports, ``--lazy``).
"""
from .experts import (ExpertList, ExpertMLP, UnsupportedExpertsError, expose_experts, has_experts,
                      is_expert_layer, refuse_untied_experts, split_expert_name, stacked_experts,
                      untied_experts)
from .checkpoint import checkpoint_name, routers, stored_as
from .routing import MIN_EXPERT_TOKENS, ExpertStats, RoutingRecord, pad_rare_experts, routed_tokens

__all__ = ["ExpertList", "ExpertMLP", "ExpertStats", "MIN_EXPERT_TOKENS", "RoutingRecord", "UnsupportedExpertsError",
           "expose_experts", "has_experts", "is_expert_layer", "pad_rare_experts", "routed_tokens",
           "split_expert_name", "stacked_experts", "checkpoint_name", "routers", "stored_as", "refuse_untied_experts",
           "untied_experts"]
