"""Error proxies: how much a quantized weight ``Ŵ`` is predicted to hurt, for one layer.

All metrics take ``ΔW = W − Ŵ`` (``[out, in]``) and the layer's calibration statistics.

``hessian``  (GPTQ / OBS layer-wise proxy, Frantar et al. 2022)
    e = tr(ΔW H ΔWᵀ),   H = E[x xᵀ]                — the mean squared error of the layer's output.
    Local: it does not know how much the rest of the network amplifies the error.

``kfac``  (Kronecker-factored Fisher, as in K-FAC / HAWQ-style second-order allocation)
    e = ½ Σ_o G_o (ΔW H ΔWᵀ)_oo,   G_o = E[(∂ℓ/∂y_o)²]
    The Fisher of the calibration loss approximated as ``diag(G) ⊗ H``: output-gradient energy
    per output channel times the input second moment.  In units of predicted loss increase (nats),
    so errors of different layers are comparable and additive — what the allocator needs.

``kfac-tok``  (``kfac`` without K-FAC's token-independence assumption)
    e = ½ Σ_o G_o (ΔW H_g ΔWᵀ)_oo,   H_g = Σ_t w_t x_t x_tᵀ / Σ_t w_t,   w_t = Σ_o (∂ℓ_t/∂y_to)²
    ``kfac`` factorises E_t[(∂ℓ_t/∂y_to)² x_t x_tᵀ] as E[g²]·E[x xᵀ], as if a token's gradient did not depend
    on its activations.  Where a few tokens carry huge activations and almost no gradient (attention sinks,
    "massive activations" after a norm that divides them away), ``H`` is dominated by tokens the loss does not
    see, and ``kfac`` over-predicts that layer's error by up to two orders of magnitude (gemma3-270m: down_proj
    of blocks 9-15, 70-220x the per-token value); the allocator then starves every other layer.  Weighting each
    token's input by its own gradient energy is exact when ``g_to² = a_t·b_o`` (rank one over tokens and
    outputs) and equals ``kfac`` when every token's gradient energy is the same.  ``H_g`` is accumulated on the
    calibration rows that have gradients; ``H`` (all rows) still drives GPTQ.

``kfac-pos``  (``kfac-tok`` where a token's output is read at its own position only, ``kfac`` elsewhere)
    ``kfac-tok`` on the queries, the attention output and the MLP; ``kfac`` on the key and value projections
    (``ArchInfo.kv_linears``, a fused QKV included), whose output rows every later query reads: there a token's
    output-gradient energy sums the pulls of all the positions that attend to it and says little about the
    error of that token's own input, and the rank-one assumption fails most.  Measured on SmolLM2, ``kfac-tok``
    rated v_proj a median 2.7x (up to 11x) less sensitive than ``kfac`` and its 4.0-bpw plan lost 24 % in KL;
    on gemma3-270m it fixed ``kfac``'s starving plans (bench/results/generalization.md,
    second_model_default.md).

``kfac-kv``  (``kfac-pos`` with the key/value projections measured without any factorisation, on the model's own labels)
    ``kfac-tok`` on the queries, the attention output and the MLP; on the key and value projections the per-token
    quadratic form itself, e = ½ Σ_t (g_tᵀ ΔW x_t)² / N, from each calibration token's input ``x_t`` and output
    gradient ``g_t`` (kept per token for those layers only).  Every gradient is of labels sampled from the model's
    own next-token distribution (seeded), so the statistics estimate the Fisher of KL to the fp model -- what a
    plan is scored by -- rather than the empirical Fisher of the calibration text, which is larger wherever the
    text surprises the model.  Measured on gemma3-270m (single layers quantized with GPTQ, KL on 4 calibration
    rows against the fp model): ``kfac-pos`` rated block 1's k_proj at TCQ3 0.366 nats where quantizing it
    costs 0.0011 (300x; 50x still with model labels under ``kfac``), 20x / 8x for blocks 3 / 5, so its 3.0-bpw plan
    gave 5-8-bit grids to 23 of the 36 key/value projections (8 bits to blocks 1, 3, 5) and lost to a uniform
    trellis rate; the per-token form with model labels is within
    0.2-2x on those layers (bench/results/metric_fidelity.md, second_model_kfackv.md).

``fisher``  (diagonal empirical Fisher, SqueezeLLM / LLM-MQ)
    e = ½ Σ_ij F_ij ΔW_ij²,   F_ij = E[(∂ℓ/∂y_i · x_j)²]
    End-to-end but ignores the correlation between input channels that H carries.

Block-output metrics (EXL2-style measurement: run the decoder block with the candidate applied)
take the change of the block's output ``ΔY = Y(Ŵ) − Y(W)`` on calibration rows instead of a
closed form, so they see what the layer-wise proxies cannot: attention softmax, the SiLU gate,
and the residual connection.

``block-rel``  (ExLlamaV2's measurement)
    e = ‖ΔY‖²_F / ‖Y‖²_F  — relative error of the block output.  Scale-free, but not additive
    across blocks in any unit of loss.

``block``  (block output, weighted by the residual-stream gradient)
    e = ½ Σ_o G^blk_o · E_t[ΔY_to²],   G^blk_o = E_t[(∂ℓ/∂Y_to)²]
    The ``kfac`` construction moved from the layer's output to the block's output: a predicted
    loss increase in nats, comparable and additive across layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LAYER_METRICS = ("hessian", "kfac", "kfac-tok", "kfac-pos", "kfac-kv", "fisher")
TOKEN_WEIGHTED = ("kfac-tok", "kfac-pos", "kfac-kv")  # metrics that read H_g (LayerSensitivity.Hg) where it was measured
SKIP_KV = ("kfac-pos", "kfac-kv")  # token-weighted metrics that do not weight the key/value projections' inputs
PER_TOKEN_KV = ("kfac-kv",)  # metrics that keep each token's gradient and input on the key/value projections
MODEL_LABELS = ("kfac-kv",)  # metrics whose gradients are of labels sampled from the model (the Fisher of KL)
BLOCK_METRICS = ("block", "block-rel")
METRICS = LAYER_METRICS + BLOCK_METRICS


@dataclass
class LayerSensitivity:
    """Per-layer statistics a metric needs (any may be None if the metric does not use it)."""

    H: torch.Tensor | None = None          # [in, in]  E[x xᵀ]
    G: torch.Tensor | None = None          # [out]     E[(∂ℓ/∂y)²]
    F: torch.Tensor | None = None          # [out, in] E[(∂ℓ/∂y · x)²]
    Hg: torch.Tensor | None = None         # [in, in]  Σ_t w_t x xᵀ / Σ_t w_t, w_t = Σ_o (∂ℓ_t/∂y_to)² (kfac-tok)
    Xt: torch.Tensor | None = None         # [T, in]   each gradient token's input (kfac-kv, key/value projections)
    Gt: torch.Tensor | None = None         # [T, out]  its output gradient / sqrt(N), so Σ_t (Gt_t·ΔW Xt_t)² is a mean

    def to(self, device) -> "LayerSensitivity":
        """The statistics on ``device`` (they are gathered on the CPU; the weight may sit on a GPU)."""
        return LayerSensitivity(*(None if t is None else t.to(device)
                                  for t in (self.H, self.G, self.F, self.Hg, self.Xt, self.Gt)))


def per_token_error(dW: torch.Tensor, Xt: torch.Tensor, Gt: torch.Tensor, chunk: int = 4096) -> float:
    """½ Σ_t (Gt_tᵀ ΔW Xt_t)²: the loss change's second-order term with no factorisation (tokens in chunks)."""
    d = dW.to(torch.float32)
    tot = 0.0
    for a in range(0, Xt.shape[0], chunk):
        x = Xt[a:a + chunk].to(d.device, torch.float32)
        g = Gt[a:a + chunk].to(d.device, torch.float32)
        tot += float(((x @ d.T) * g).sum(1).square().sum(dtype=torch.float64))
    return 0.5 * tot


def layer_error(dW: torch.Tensor, s: LayerSensitivity, metric: str) -> float:
    """The metric's error for one layer (float32 products, float64 sums; H is positive semi-definite,
    so the row terms are sums of non-negative-definite quadratic forms and do not cancel)."""
    d = dW.to(torch.float32)
    if metric == "fisher":
        if s.F is None:
            raise ValueError("the fisher metric needs gradient statistics (F)")
        return 0.5 * float((s.F.to(d.device, torch.float32) * d * d).sum(dtype=torch.float64))
    if metric in PER_TOKEN_KV and s.Xt is not None and s.Gt is not None:
        return per_token_error(d, s.Xt, s.Gt)
    H = s.Hg if metric in TOKEN_WEIGHTED and s.Hg is not None else s.H  # no H_g (MoE experts, kv): kfac
    if H is None:
        raise ValueError(f"the {metric} metric needs the input Hessian H")
    rows = ((d @ H.to(d.device, torch.float32)) * d).sum(1, dtype=torch.float64)  # (ΔW H ΔWᵀ)_oo
    if metric == "hessian":
        return float(rows.sum())
    if metric in ("kfac", *TOKEN_WEIGHTED):
        if s.G is None:
            raise ValueError("the kfac metric needs output-gradient statistics (G)")
        return 0.5 * float((s.G.to(rows.device, torch.float64) * rows).sum())
    raise ValueError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")


def block_error(dY: torch.Tensor, Y: torch.Tensor, metric: str, G: torch.Tensor | None = None) -> float:
    """A block-output metric from ``dY = Y(Ŵ) − Y(W)`` and ``Y`` (``[..., hidden]``)."""
    d = dY.reshape(-1, dY.shape[-1]).to(torch.float32)
    if metric == "block-rel":
        den = float(Y.to(torch.float32).pow(2).sum(dtype=torch.float64))
        return float(d.pow(2).sum(dtype=torch.float64)) / max(den, 1e-30)
    if metric == "block":
        if G is None:
            raise ValueError("the block metric needs the block-output gradient statistics (G)")
        per_channel = d.pow(2).mean(0, dtype=torch.float64)
        return 0.5 * float((G.to(device=per_channel.device, dtype=torch.float64) * per_channel).sum())
    raise ValueError(f"unknown block metric {metric!r}: choose one of {', '.join(BLOCK_METRICS)}")
