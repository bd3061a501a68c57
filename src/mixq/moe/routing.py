"""Routing during calibration: tokens per expert, rare experts, and routing-frequency weights.

Routing counts
    ``n_e``: the calibration tokens the router sent to expert ``e`` of one MoE block (a token counts
    once per expert among its top-k), read from the ``n_tokens`` of the expert's ``gate_proj``
    statistics.  ``N``: the tokens that entered the block (every calibration token), so
    ``sum_e n_e = k N``.  Recorded in the measurement (``SensitivityTable.meta["moe"]``).

Rare experts (MoEQuant's problem: an expert that saw few tokens has a Hessian of low rank and noisy
statistics, and GPTQ over-fits it)
    when ``n_e < min_tokens`` (default :data:`MIN_EXPERT_TOKENS` = 64), the expert's statistics are
    padded with ``min_tokens - n_e`` pseudo-tokens drawn from the block's pooled statistics of the same
    projection (all experts' ``XᵀX``, ``|x|`` sums and maxima over all their routed tokens)::

        H_e = (X_eᵀX_e + (τ - n_e) H̄) / τ,    H̄ = Σ_j X_jᵀX_j / Σ_j n_j,   τ = min_tokens

    so an expert that saw no token gets ``H̄``, and one that saw a few gets a blend.  The walk logs one
    warning per block naming them; the measurement lists them (``fallback``).

Routing-frequency weights (how a per-layer error of an expert enters the model-level sum)
    ``hessian``  e = f_e · tr(ΔW H_e ΔWᵀ),  f_e = max(n_e, τ) / N: ``H_e`` is a mean over the expert's
                 own tokens, so its error is per routed token; ``f_e`` makes it per model token, like a
                 dense layer's (rare experts are credited with τ tokens, never zero).
    ``kfac``, ``fisher``  no extra factor: ``G_e = (1/N) Σ_{t→e} (∂ℓ/∂y_t)²`` is already a sum over the
                 expert's routed tokens divided by all tokens (and carries the routing weight through
                 the chain rule).  For a rare expert, or one that received no gradient token, ``G_e``
                 (``F_e``) is replaced by the pooled per-routed-token value of the block's other
                 experts of that projection times ``max(n_e, τ)``.
    block metrics (``block``, ``block-rel``) are refused on MoE models: on a few calibration rows most
    experts see no token and would measure zero error.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from ..calib.stats import LayerStats
from .experts import split_expert_name

log = logging.getLogger(__name__)

MIN_EXPERT_TOKENS = 64


@dataclass
class ExpertStats(LayerStats):
    """An expert's :class:`LayerStats` padded to ``n_tokens = τ``; ``routed_tokens`` is what it really saw."""

    routed_tokens: int = 0

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        out = super().state(prefix)
        out[f"{prefix}.routed_tokens"] = torch.tensor([self.routed_tokens], dtype=torch.int64)
        return out


def routed_tokens(st: LayerStats) -> int:
    """Tokens a layer really saw (an :class:`ExpertStats`' count before padding)."""
    return st.routed_tokens if isinstance(st, ExpertStats) else st.n_tokens


def _groups(names) -> dict[tuple[str, str], dict[int, str]]:
    """``(experts module, projection) -> {expert index: layer name}`` for the expert layers among ``names``."""
    out: dict[tuple[str, str], dict[int, str]] = {}
    for n in names:
        parts = split_expert_name(n)
        if parts is not None:
            out.setdefault((parts[0], parts[2]), {})[parts[1]] = n
    return out


def _pooled(members: list[LayerStats]):
    n = sum(s.n_tokens for s in members)
    if n == 0:
        return None
    xtx = None
    if all(s._xtx is not None for s in members if s.n_tokens):
        xtx = sum(s._xtx for s in members if s.n_tokens) / n
    abssum = sum(s._abssum for s in members if s.n_tokens) / n
    absmax = torch.stack([s._absmax for s in members if s.n_tokens]).amax(0)
    return xtx, abssum, absmax


def pad_rare_experts(stats: dict[str, LayerStats], min_tokens: int = MIN_EXPERT_TOKENS,
                     where: str = "") -> dict[str, LayerStats]:
    """``stats`` with every expert layer that saw fewer than ``min_tokens`` tokens padded (see the module doc).

    Layers that are not experts, and experts that saw enough, are returned as they are.  ``where``
    names the block in the warning.
    """
    out = dict(stats)
    rare: dict[str, list[str]] = {}
    for (module, _proj), members in _groups(stats).items():
        pool = _pooled([stats[n] for n in members.values()])
        for e, name in sorted(members.items()):
            st = stats[name]
            if st.n_tokens >= min_tokens or pool is None:
                continue
            xtx, abssum, absmax = pool
            pad = min_tokens - st.n_tokens
            new = ExpertStats(st.in_features, keep_hessian=st.keep_hessian, n_tokens=min_tokens,
                              routed_tokens=st.n_tokens)
            if st.keep_hessian and xtx is not None:
                new._xtx = xtx * pad + (st._xtx if st._xtx is not None else 0)
            new._abssum = abssum * pad + (st._abssum if st._abssum is not None else 0)
            new._absmax = absmax if st._absmax is None else torch.maximum(absmax, st._absmax)
            out[name] = new
            rare.setdefault(module, [])
            if f"{e}:{st.n_tokens}" not in rare[module]:
                rare[module].append(f"{e}:{st.n_tokens}")
    for module, items in rare.items():
        log.warning("%s%s: expert(s) %s (index:tokens) saw fewer than %d calibration tokens; their statistics are "
                    "padded with the block's pooled expert statistics", where, module, ", ".join(items), min_tokens)
    return out


@dataclass
class RoutingRecord:
    """Tokens per expert of every MoE block seen in one calibration walk, and the weights derived from them.

    ``tokens``: tokens that entered each MoE block (N); ``counts``: experts module fqn -> ``[n_e]``;
    ``fallback``: expert layer fqns whose statistics were padded.
    """

    tokens: int
    min_tokens: int = MIN_EXPERT_TOKENS
    counts: dict[str, list[int]] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)

    def add_block(self, prefix: str, stats: dict[str, LayerStats]) -> None:
        """Record the counts of block ``prefix`` (e.g. ``model.layers.3``) from its (padded) stats."""
        for (module, proj), members in _groups(stats).items():
            fq = f"{prefix}.{module}"
            if proj == "gate_proj" or fq not in self.counts:
                n = max(members) + 1
                self.counts[fq] = [routed_tokens(stats[members[e]]) if e in members else 0 for e in range(n)]
            for name in members.values():
                if isinstance(stats[name], ExpertStats) and f"{prefix}.{name}" not in self.fallback:
                    self.fallback.append(f"{prefix}.{name}")

    def count(self, fqn: str) -> int | None:
        """Routed tokens of the expert owning layer ``fqn``; None for a layer that is not an expert."""
        parts = split_expert_name(fqn)
        if parts is None or parts[0] not in self.counts:
            return None
        return self.counts[parts[0]][parts[1]]

    def frequency(self, fqn: str) -> float:
        """``f_e = max(n_e, τ) / N`` for an expert layer, 1.0 for any other layer."""
        n = self.count(fqn)
        return 1.0 if n is None else max(n, self.min_tokens) / max(self.tokens, 1)

    def weight(self, fqn: str, metric: str) -> float:
        """Factor on a layer's measured error: ``f_e`` under ``hessian``, else 1 (module doc)."""
        return self.frequency(fqn) if metric == "hessian" else 1.0

    def fill_gradients(self, grads: dict[str, dict[str, torch.Tensor]], prefix: str, names) -> None:
        """Replace ``G``/``F`` of the rare or gradient-less expert layers of block ``prefix`` in place (module doc)."""
        for (module, _proj), members in _groups(names).items():
            fqns = {e: f"{prefix}.{n}" for e, n in members.items()}
            n_e = {e: self.count(f) or 0 for e, f in fqns.items()}
            good = [e for e in fqns if grads.get(fqns[e], {}).get("G") is not None and n_e[e] >= self.min_tokens]
            good = good or [e for e in fqns if grads.get(fqns[e], {}).get("G") is not None]
            denom = sum(n_e[e] for e in good)
            if not good or denom == 0:
                continue
            for key in ("G", "F"):
                if any(grads[fqns[e]].get(key) is None for e in good):
                    continue
                per_token = sum(grads[fqns[e]][key] for e in good) / denom
                for e, f in fqns.items():
                    if n_e[e] < self.min_tokens or grads.get(f, {}).get(key) is None:
                        grads.setdefault(f, {})[key] = per_token * max(n_e[e], self.min_tokens)

    def observe(self, prefix: str, stats: dict[str, LayerStats], grads: dict) -> None:
        """One block of a measurement walk: record its counts, fix its experts' gradient statistics."""
        self.add_block(prefix, stats)
        if grads:
            self.fill_gradients(grads, prefix, stats)

    def weigh(self, entries: dict, metric: str) -> dict:
        """``{fqn: LayerEntry}`` with every expert layer's errors times :meth:`weight` (others unchanged)."""
        out = {}
        for fqn, e in entries.items():
            w = self.weight(fqn, metric)
            out[fqn] = e if w == 1.0 else replace(e, errors=tuple(x * w for x in e.errors))
        return out

    def annotate(self, table) -> None:
        """Record the routing in ``table.meta["moe"]`` and log its summary (no-op for a dense model)."""
        if self.counts:
            table.meta["moe"] = self.to_dict()
            log.info("routing: %s", self.summary())

    def summary(self) -> str:
        """One line: blocks, experts, min / median / max tokens per expert, how many fell back."""
        all_n = sorted(n for c in self.counts.values() for n in c)
        if not all_n:
            return "no MoE blocks"
        return (f"{len(self.counts)} MoE block(s), {sum(len(c) for c in self.counts.values())} experts, tokens per "
                f"expert min {all_n[0]} / median {all_n[len(all_n) // 2]} / max {all_n[-1]} of {self.tokens}; "
                f"{len(self.fallback)} expert layer(s) below {self.min_tokens} tokens padded")

    @classmethod
    def from_dict(cls, d: dict) -> "RoutingRecord":
        """The record :meth:`to_dict` wrote (``measurement.json``'s ``meta["moe"]``)."""
        return cls(int(d["tokens"]), int(d["min_tokens"]), {k: list(v) for k, v in d["counts"].items()},
                   list(d.get("fallback", [])))

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "min_tokens": self.min_tokens, "counts": dict(self.counts),
                "fallback": list(self.fallback),
                "weighting": "hessian: error x max(n_e, min_tokens)/tokens; kfac/fisher: through G (mixq.moe.routing)"}


def routing_for_measure(model, calib_ids: torch.Tensor, block_metric: bool,
                        min_tokens: int = MIN_EXPERT_TOKENS) -> RoutingRecord:
    """The :class:`RoutingRecord` a measurement fills (``N`` = every calibration token).

    Raises ``ValueError`` for a block-output metric on a model with experts (module doc).
    """
    from .experts import has_experts

    if block_metric and has_experts(model):
        raise ValueError("block-output metrics (block, block-rel) are not supported on mixture-of-experts models: on "
                         "the few rows they run, most experts see no token; use --metric kfac or hessian")
    return RoutingRecord(tokens=int(calib_ids.numel()), min_tokens=min_tokens)
