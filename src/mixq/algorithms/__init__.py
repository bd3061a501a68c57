"""Quantization algorithms: a pure core on tensors per file, plus a thin model-level apply.

``rtn``          round to nearest                          ``rtn_quantize(W, spec)``
``gptq``         second-order error compensation           ``gptq_quantize(W, H, spec)``
``awq``          activation-aware scaling + clipping       ``awq_search_scale``, ``awq_clip``, ``apply_awq``
``smoothquant``  activation → weight difficulty migration  ``smoothquant_scales``, ``smooth_model``
``rotation``     QuaRot residual-stream rotation           ``rotate_model``
``transforms``   the equivalence transforms AWQ/SmoothQuant/rotation fold into the model
``resq``         ResQ: a PCA subspace of each linear's input at 8 bits, the rest at 4 (``fit_resq``,
                 ``apply_resq``; it installs :mod:`mixq.runtime.act_quant` hooks, so it is not imported here)
"""
from .awq import apply_awq, awq_clip, awq_search_scale
from .gptq import gptq_quantize
from .rotation import rotate_model
from .rtn import rtn_quantize
from .smoothquant import smooth_model, smoothquant_scales
from .transforms import fold_scale

__all__ = ["rtn_quantize", "gptq_quantize", "awq_search_scale", "awq_clip", "apply_awq",
           "smoothquant_scales", "smooth_model", "rotate_model", "fold_scale"]
