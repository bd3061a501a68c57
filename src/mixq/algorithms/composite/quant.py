"""Quantize a weight with a :class:`~mixq.config.CompositeSpec`, by RTN or GPTQ.

:func:`quantize_composite` ``(W, spec, H=None, method="rtn"|"gptq")`` returns the stored parts
(:class:`CompositeQTensor`) and ``Ŵ``.  Steps, for ``W [R, C]`` (``H = XᵀX/N``, damped as GPTQ does):

1. **fp16 columns** (``+cK``, OWQ): input column j's sensitivity is ``s_j = H_jj · ‖W_:j − Q(W)_:j‖²``
   (OWQ's weak-column score, ``Q`` = RTN on the base grid; ``H_jj = 1`` without ``H``); the K largest
   are kept in fp16.  The dense part is the other ``n = C − K`` columns, in their natural order,
   grouped in ``gN`` group columns (the last one may be partial).
2. **Outliers** (``+oP``): the ``K_o`` weights with the largest quantization damage ``d_ij (w_ij − q(w_ij))²``
   are kept in fp16 (CSR).  ``d_ij`` is the OBS weight of the coordinate: ``1 / [H⁻¹]_jj`` for GPTQ
   (the loss increase of quantizing that one weight with the others free to compensate, as SpQR),
   ``diag(H)_j`` (or the Fisher ``F_ij`` when given) for RTN, 1 without statistics.  The set is refined
   (up to 3 rounds) by refitting the groups with the current outliers excluded, so that the grid is
   not stretched by what is stored apart.
3. **SliM bits** (``SLIM``): group columns are ranked by salience ``Σ d_ij w_ij²``; the top k take
   b+1 bits and the bottom k b−1 (so the mean is exactly b), with k chosen to minimise the summed
   ``d``-weighted RTN error (k = 0 is a candidate, so SLIM never predicts worse than its base).
4. **Dense part**: each group is fitted with the outliers excluded (they are replaced by the mean of the
   group's other weights, which moves no min/max, and weighted 0 by k-means and ``-mse`` clipping);
   k-means codebooks (``KM``, SqueezeLLM) are fitted with weights ``diag(H)`` (or ``F``).  With ``+sq``
   each group column's scales (and fp16 offsets) are quantized along the rows, ``sq_group`` at a
   time, to ``sq_bits`` with an fp16 scale and offset per second-level group (SpQR), and the codes are
   encoded against the quantized scales.
   With ``+dD`` each group takes its fp16 absmax scale and the least-error table of the dialect
   formatbook (:mod:`mixq.formats.composite.dialects`), decoded as a per-row codebook ``scale · T_d``.
   RTN encodes every group directly.  GPTQ visits the dense columns in order and the fp16 columns
   last; a kept value (outlier or fp16 column) is fixed to its *current* (already compensated)
   value rounded to fp16 and, like every other column, its rounding error is spread over the columns
   not yet visited (``W_:,k −= e_j U_jk``) -- so the fp16 columns absorb compensation, as in OWQ.

``+h`` specs (MixLLM high-precision output rows) take a separate path: :mod:`mixq.algorithms.composite.rows`;
``BIN`` bases (BiLLM / PB-LLM binarization) another: :mod:`mixq.algorithms.composite.binary`.

Where the steps live: 1 here; 2 and 3 :mod:`mixq.algorithms.composite.selection`; 4
:mod:`mixq.algorithms.composite.dense` (second-level scales: :mod:`mixq.formats.composite.second_level`).  Everything
stored (:class:`~mixq.formats.composite.qtensor.CompositeQTensor`) is exactly what :meth:`CompositeSpec.cost` counts;
:meth:`CompositeQTensor.stored_bits` recounts it from the tensors themselves and :meth:`CompositeQTensor.dequantize`
rebuilds ``Ŵ`` bit for bit.
"""
from __future__ import annotations

import torch

from ... import formats
from ...config import parse_spec
from ...config.composite import CompositeSpec
from ...formats.composite.qtensor import CompositeQTensor, dense_cols
from ...formats.composite.sparse import CSR
from ..gptq import _proxy, inverse_cholesky
from .binary import quantize_binary
from .dense import gptq_dense, rtn_dense
from .importance import importances
from .rows import quantize_rows
from .selection import select_outliers, slim_bits
from .tcq import quantize_tcq
from .vq import quantize_vq


@torch.no_grad()
def quantize_composite(W: torch.Tensor, spec: CompositeSpec | str, H: torch.Tensor | None = None,
                       method: str = "rtn", *, fisher: torch.Tensor | None = None, damp: float = 0.01,
                       block_size: int = 128, hinv_chol: tuple[torch.Tensor, float] | None = None,
                       row_weight: torch.Tensor | None = None) -> tuple[CompositeQTensor, torch.Tensor]:
    """Quantize ``W [R, C]`` with a composite spec (steps in the module docstring).

    H          ``[C, C]`` input second moment ``XᵀX/N``; needed by GPTQ, optional for RTN (then it
               weights the outlier / column / SLIM choices and the k-means fit by ``diag(H)``)
    fisher     optional ``[R, C]`` diagonal Fisher: the RTN importance instead of ``diag(H)`` (SqueezeLLM)
    hinv_chol  :func:`mixq.algorithms.gptq.prepare_hessian` of ``H`` to reuse across specs (natural order)
    row_weight optional ``[R]`` output-gradient energy ``G``: weights the choice of ``+h`` rows
    Returns ``(stored parts, Ŵ float32)``; for ``+h`` specs the parts are a
    :class:`~mixq.formats.composite.rows_tensor.RowSplitQTensor`, for ``BIN`` bases a
    :class:`~mixq.formats.composite.binary_tensor.BinaryQTensor`.
    """
    spec = parse_spec(spec)
    if not isinstance(spec, CompositeSpec):
        raise ValueError(f"{spec.name} is not a composite spec: use rtn_quantize / gptq_quantize")
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(W.shape)}")
    W0 = W.detach().to(torch.float32).cpu()
    R, C = W0.shape
    spec.cost((R, C))  # validates the shape (group size, column / outlier counts)
    n, bounds = spec.layout((R, C))
    if method == "gptq" and H is None:
        raise ValueError("GPTQ needs the layer's H = XᵀX/N")
    if H is not None and tuple(H.shape) != (C, C):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({C}, {C})")
    if fisher is not None and tuple(fisher.shape) != (R, C):
        raise ValueError(f"fisher has shape {tuple(fisher.shape)}, expected ({R}, {C})")

    if spec.vq_dim:  # vector codebooks (mixq.algorithms.composite.vq)
        return quantize_vq(W0, spec, H, method, damp=damp, block_size=block_size, hinv_chol=hinv_chol)
    if spec.trellis:  # trellis-coded (mixq.algorithms.composite.tcq)
        return quantize_tcq(W0, spec, H, method, damp=damp, block_size=block_size, hinv_chol=hinv_chol,
                            row_weight=row_weight)
    if spec.binary:  # BiLLM / PB-LLM binarization (mixq.algorithms.composite.binary)
        return quantize_binary(W0, spec, None if H is None else H.detach().float().cpu(), method, fisher=fisher,
                               damp=damp, block_size=block_size, hinv_chol=hinv_chol)
    if spec.hi_rows:
        qt, W_hat = quantize_rows(W0, spec, None if H is None else H.detach().float().cpu(), method,
                                  row_weight=row_weight, damp=damp, block_size=block_size, hinv_chol=hinv_chol)
        if H is not None:
            qt.proxy_loss = _proxy(W0 - W_hat, H.detach().float().cpu())
        return qt, W_hat
    W0, Hf, Hfix, fit_imp, score_imp, U_nat = importances(W0, H, method, fisher, damp, hinv_chol)
    base = spec.base

    # 1. fp16 input columns (OWQ)
    if spec.columns:
        E2 = (W0 - formats.fake_quantize(W0, base)) ** 2
        colscore = (E2 * (torch.diagonal(Hf)[None] if Hf is not None else 1.0)).sum(0)
        fp16_cols = torch.topk(colscore, spec.columns).indices.sort().values
    else:
        fp16_cols = torch.zeros(0, dtype=torch.long)
    dense = dense_cols(C, fp16_cols)
    Wd = W0[:, dense]
    imp_d = None if fit_imp is None else fit_imp[:, dense]
    sc_d = None if score_imp is None else score_imp[:, dense]

    # 2. outliers, 3. SliM bits
    mask = select_outliers(Wd, spec.n_outliers((R, C)), bounds, spec, sc_d, imp_d)
    bits = slim_bits(Wd, mask, bounds, spec, sc_d, imp_d) if spec.slim else (base.bits,) * len(bounds)
    ts = formats.compute_tensor_scale(Wd.masked_fill(mask, 0.0), base)

    # 4. dense part
    if method == "rtn":
        codes, params, l2, Qd = rtn_dense(Wd, mask, bounds, spec, bits, imp_d, ts)
        Qd = torch.where(mask, Wd.half().float(), Qd)
        fp16_values = W0[:, fp16_cols].half()
    else:
        perm = torch.cat([dense, fp16_cols])
        if spec.columns:
            U, _ = inverse_cholesky(Hfix[perm][:, perm], damp)
        else:
            U = U_nat
        codes, params, l2, Qp = gptq_dense(W0[:, perm], U, n, bounds, spec, bits, mask, imp_d, ts, block_size)
        Qd, fp16_values = Qp[:, :n], Qp[:, n:].half()
    W_hat = torch.empty(R, C)
    W_hat[:, dense] = Qd
    W_hat[:, fp16_cols] = fp16_values.float()
    sparse = None
    if spec.outliers:
        full = torch.zeros(R, C, dtype=torch.bool)
        full[:, dense] = mask
        sparse = CSR.from_mask(W_hat, full)
    qt = CompositeQTensor(spec, (R, C), codes, params, tuple(bits), fp16_cols, fp16_values, sparse,
                          l2 if spec.sq_bits else None)
    if Hf is not None:
        qt.proxy_loss = _proxy(W.detach().float().cpu() - W_hat, Hf)
    return qt, W_hat


def dequantize_composite(qt: CompositeQTensor) -> torch.Tensor:
    return qt.dequantize()
