"""Importances from calibration statistics, shared by the composite quantizers."""
from __future__ import annotations

import torch

from ..gptq import inverse_cholesky


def importances(W0: torch.Tensor, H: torch.Tensor | None, method: str, fisher: torch.Tensor | None,
                damp: float, hinv_chol=None):
    """What every composite quantizer needs from the calibration statistics.

    Returns ``(W, Hf, Hfix, fit_imp, score_imp, U)``: the weight (GPTQ: a copy with dead input
    columns zeroed), ``H`` in float32 (or None) and with dead diagonal entries set to 1, the per-weight importance used to fit grids (Fisher, else
    diag H), the importance used to pick what is kept apart (GPTQ: ``1/[H⁻¹]_jj``, the OBS weight;
    RTN: as for fitting) and GPTQ's upper Cholesky factor of ``H⁻¹`` (None for RTN).
    """
    W, Hf, Hfix = W0, None, None
    if H is not None:
        Hf = H.detach().to(torch.float32).cpu()
        Hfix = Hf.clone()
        dead = torch.diagonal(Hfix) == 0
        Hfix[dead, dead] = 1.0
        if method == "gptq":
            W = W0.clone()
            W[:, dead] = 0.0
    fit_imp = fisher.detach().float().cpu() if fisher is not None else (
        torch.diagonal(Hf).clamp(min=0)[None] if Hf is not None else None)
    U = None
    if method == "gptq":
        U, _ = hinv_chol if hinv_chol is not None else inverse_cholesky(Hfix, damp)
        score_imp = (1.0 / (U.double() ** 2).sum(0)).float()[None]  # 1 / [H⁻¹]_jj
        score_imp[:, torch.diagonal(Hf) == 0] = 0.0
    else:
        score_imp = fit_imp
    return W, Hf, Hfix, fit_imp, score_imp, U
