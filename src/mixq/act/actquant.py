"""Simulated activation quantization: the input of chosen linears goes through quantize → dequantize.

The numerics are those of :mod:`mixq.formats` (the same grids, scale storage and saturation as the
weight quantizers).  The input ``X [..., n]`` of a linear is viewed as ``[T, n]`` (T tokens) and

``dynamic`` (scales computed at run time from the current batch)
    ``PerToken``   one scale per token (row):         INT8/INT4 ``W8-token``/``W4-token``, FP8 ``FP8-token``
    ``PerGroup(g)``  ``n/g`` scales per token:          MXFP4/MXFP8/MXINT8 (E8M0 per 32), NVFP4 (E4M3 per 16
                   and an fp32 tensor scale from this batch's ``amax``)
    ``PerTensor``  one scale for the whole batch
    ``PerChannel`` one scale per input feature (a column; computed on ``Xᵀ``)
``static`` (scales fixed from calibration, :class:`~mixq.calib.stats.LayerStats` ``absmax``)
    ``PerTensor``  ``a = max_j absmax_j`` and the scale is what the format's ``fit`` gives the
                   two-element row ``[-a, a]`` (e.g. int sym: ``fp16(2a / (2^b - 1))``); values beyond
                   the calibrated range saturate (int: clamp to the extreme code; fp: to the format max)
    ``PerChannel`` the same per input feature from ``absmax_j``
    NVFP4          the fp32 tensor scale is static (``a / (448·6)``), the E4M3 block scales dynamic
                   (ModelOpt's recipe); MX block scales are always dynamic, so MX rejects ``static``.

The symmetric int grid is mixq's (GPTQ convention): ``x̂ = s (q - 2^(b-1))``, ``s = 2·absmax/(2^b-1)``,
so ``+absmax`` rounds half a step off the top and clamps to ``127 s`` (int8) — not the ``absmax/127``
grid of SmoothQuant's kernels; both have the same step up to a factor ``255/254``.

:func:`apply_act_quant` installs one forward pre-hook per linear (after any hook already there, so
an online rotation attached by :func:`mixq.algorithms.rotation.rotate_model` runs first and the
*rotated* input is quantized) and returns a handle whose ``remove()`` restores the model.  Weights are
untouched: quantize them separately (RTN/GPTQ on the W spec of :func:`parse_wa_preset`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import arch_for, get_weight, iter_layers
from ..config import QuantSpec, parse_spec
from ..config.registry import owner
from ..formats import compute_tensor_scale, fake_quantize, fit, round_to_grid
from ..granularity import PerChannel, PerGroup, PerTensor, PerToken, rows_view
from .outliers import FPOutliers, HiChannels, fp_columns, top_k_channels

MODES = ("dynamic", "static")

# activation names -> spec names (dynamic, static); a plain parse_spec name is taken as written
_ACT_NAMES = {
    "INT8": ("W8-token", "W8-tensor"), "A8": ("W8-token", "W8-tensor"),
    "INT4": ("W4-token", "W4-tensor"), "A4": ("W4-token", "W4-tensor"),
    "FP8": ("FP8-token", "FP8-tensor"), "FP8-E4M3": ("FP8-token", "FP8-tensor"),
    "MXFP4": ("MXFP4", None), "MXFP6": ("MXFP6", None), "MXFP8": ("MXFP8", None), "MXINT8": ("MXINT8", None),
    "NVFP4": ("NVFP4", "NVFP4"), "FP16": ("FP16", "FP16"), "BF16": ("BF16", "BF16"),
}


def parse_act_spec(name: str | QuantSpec, mode: str = "dynamic") -> QuantSpec:
    """Activation spec for ``name`` under ``mode``.

    Short names pick the granularity from the mode: ``INT8``/``A8`` → ``W8-token`` (dynamic) or
    ``W8-tensor`` (static); ``INT4``/``A4``; ``FP8`` → ``FP8-token``/``FP8-tensor`` (fp32 scale);
    ``MXFP4``/``MXFP8``/``MXINT8`` (dynamic only), ``NVFP4``, ``FP16``.  ``A<b>`` for other b in 2..8.
    Any other name is a :func:`mixq.config.parse_spec` name taken as written (e.g. ``W8-tensor-asym``).
    """
    if mode not in MODES:
        raise ValueError(f"activation mode must be one of {MODES}, got {mode!r}")
    if isinstance(name, QuantSpec):
        spec = name
    else:
        key = str(name).strip().upper()
        m = re.fullmatch(r"A(\d)", key)
        names = _ACT_NAMES.get(key) or ((f"W{m.group(1)}-token", f"W{m.group(1)}-tensor") if m else None)
        if names is not None:
            dyn, sta = names
            text = dyn if mode == "dynamic" else sta
            if text is None:
                raise ValueError(f"{name} has block scales computed at run time: use mode='dynamic'")
            spec = parse_spec(text)
        else:
            spec = parse_spec(name)
    check_act_spec(spec, mode)
    return spec


def check_act_spec(spec: QuantSpec, mode: str) -> None:
    """Reject specs that cannot quantize activations in ``mode`` (never rewritten silently)."""
    if not owner(spec.dtype).closed_form or spec.clip == "mse":
        raise ValueError(f"{spec.name}: activation quantization needs a closed-form scale (no kmeans, no -mse)")
    if mode == "static" and not spec.is_float_keep:
        g = spec.granularity
        if isinstance(g, PerToken):
            raise ValueError(f"{spec.name}: per-token scales are dynamic by nature; use mode='dynamic' "
                             "or a per-tensor spec (e.g. W8-tensor)")
        if isinstance(g, PerGroup) and not spec.tensor_scale:
            raise ValueError(f"{spec.name}: block scales are computed at run time; use mode='dynamic'")


@torch.no_grad()
def fake_quant_act(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize→dequantize activations ``x [T, n]`` (same dtype back); equations in the module doc.

    ``amax``: ``None`` → dynamic scales; a scalar (per tensor / NVFP4 tensor scale) or ``[n]``
    (``PerChannel``) calibrated maximum → static scales.
    """
    if x.dim() != 2:
        raise ValueError(f"fake_quant_act expects [tokens, features], got shape {tuple(x.shape)}")
    if spec.is_float_keep or x.numel() == 0:
        return fake_quantize(x, spec) if x.numel() else x
    g = spec.granularity
    if amax is None:
        if isinstance(g, PerChannel):  # one scale per feature: rows of xᵀ
            return fake_quantize(x.t().contiguous(), spec).t()
        return fake_quantize(x, spec)
    a = amax.detach().to(device=x.device, dtype=torch.float32)
    xf = x.float()
    if isinstance(g, PerTensor):
        p = fit(torch.stack([-a.max(), a.max()]).reshape(1, 2), spec)
        return round_to_grid(xf, p, spec).to(x.dtype)
    if isinstance(g, PerChannel):
        if a.numel() != x.shape[1]:
            raise ValueError(f"per-channel static amax has {a.numel()} entries for {x.shape[1]} features")
        a = a.reshape(-1, 1)
        p = fit(torch.cat([-a, a], 1), spec)
        return round_to_grid(xf.t(), p, spec).t().to(x.dtype)
    if isinstance(g, PerGroup) and spec.tensor_scale:  # NVFP4: static tensor scale, dynamic block scales
        ts = compute_tensor_scale(a.max().reshape(1, 1), spec)
        rows = rows_view(xf, g)
        return round_to_grid(rows, fit(rows, spec, tensor_scale=ts), spec).reshape(x.shape).to(x.dtype)
    check_act_spec(spec, "static")
    raise AssertionError("unreachable")


@dataclass
class ActQuantizer:
    """What one linear's input goes through (a plain object: nothing enters the state dict).

    ``spec``      the main ("low") activation spec
    ``amax``      calibrated per-feature ``absmax [n]`` (static scales or calibrated outliers), else ``None``
    ``fp``        LLM.int8()-style columns kept exact (:class:`FPOutliers`)
    ``hi``        Atom/QUIK-style calibrated channels at a higher-precision spec (:class:`HiChannels`)
    ``hi_idx``    the chosen channel indices (from ``amax``/calibration), ``None`` without ``hi``
    ``static``    scales from ``amax`` (static mode); when False ``amax`` only serves calibrated
                  outlier choices and every scale is computed at run time

    Order: fp columns are decided first; hi channels and the remaining ("low") channels are each
    gathered (Atom reorders outliers to the end) and quantized with the fp columns zeroed (as
    bitsandbytes zeroes them before the int8 row statistics); the fp columns are then put back.
    """

    spec: QuantSpec
    amax: torch.Tensor | None = None
    fp: FPOutliers | None = None
    hi: HiChannels | None = None
    hi_idx: torch.Tensor | None = None
    static: bool = False
    calls: int = field(default=0, repr=False)

    def fp_mask(self, x2: torch.Tensor) -> torch.Tensor | None:
        if self.fp is None:
            return None
        return fp_columns(self.fp, x2, self.amax)

    def _static(self, cols: torch.Tensor | None) -> torch.Tensor | None:
        """Static amax of a column subset (per-tensor: max over it; per-channel: the vector).

        With fp outliers the columns whose *calibrated* magnitude reaches the threshold are left
        out of the range (whatever ``fp.source``: a static range cannot follow the batch)."""
        if not self.static:
            return None
        a = self.amax.float()
        if self.fp is not None:
            a = a.masked_fill(a >= self.fp.threshold, 0.0)
        return a if cols is None else a[cols.to(a.device)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x̂ [..., n]`` (same shape and dtype); with autograd on, the gradient passes straight through."""
        self.calls += 1
        out = self._quantize(x.detach())
        return x + (out - x).detach() if x.requires_grad else out

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        fp = self.fp_mask(x2)
        src = x2 if fp is None else x2.masked_fill(fp.to(x2.device), 0)
        if self.hi is None:
            out = fake_quant_act(src, self.spec, self._static(None))
        else:
            hi = self.hi_idx.to(x2.device)
            lo_mask = torch.ones(shape[-1], dtype=torch.bool, device=x2.device)
            lo_mask[hi] = False
            lo = lo_mask.nonzero().flatten()
            out = torch.empty_like(x2)
            out[:, hi] = fake_quant_act(src[:, hi].contiguous(), self.hi.spec, self._static(hi))
            out[:, lo] = fake_quant_act(src[:, lo].contiguous(), self.spec, self._static(lo))
        if fp is not None:
            out = torch.where(fp.to(x2.device), x2, out)
        return out.reshape(shape)


@dataclass
class ActQuantHandle:
    """Installed activation quantizers (``fqn → ActQuantizer``); ``remove()`` (or ``with``) uninstalls them."""

    quantizers: dict[str, ActQuantizer]
    hooks: list = field(default_factory=list, repr=False)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    def __enter__(self) -> "ActQuantHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _select(model: nn.Module, layers) -> list[str]:
    fqns = [r.fqn for r in iter_layers(model)]
    if layers is None:
        return fqns
    if isinstance(layers, str):
        chosen = [f for f in fqns if re.search(layers, f)]
    else:
        wanted = list(layers)
        unknown = sorted(set(wanted) - set(fqns))
        if unknown:
            raise ValueError(f"not block linears of this model: {unknown[:3]} (names are full fqns)")
        chosen = [f for f in fqns if f in set(wanted)]
    if not chosen:
        raise ValueError(f"no block linear matches layers={layers!r}")
    return chosen


@torch.no_grad()
def calibrate_act_absmax(model: nn.Module, calib_ids: torch.Tensor, layers=None, *, device="cpu",
                         progress: bool = False) -> dict[str, torch.Tensor]:
    """``fqn → absmax [in]`` of each chosen block linear's input over ``calib_ids [n, L]``.

    One :func:`mixq.calib.capture.walk_blocks` pass (no Hessians) on the model as it is now (after
    rotation/smoothing/weight quantization; before :func:`apply_act_quant`, whose hooks would
    otherwise be seen).  Statistics see a linear's input after its pre-hooks (online rotations).
    """
    return input_stats(model, calib_ids, layers, lambda s: s.absmax.clone(), hessian=False, device=device,
                       progress=progress)


def input_stats(model: nn.Module, calib_ids: torch.Tensor, layers, take, *, hessian: bool, device="cpu",
                progress: bool = False) -> dict[str, torch.Tensor]:
    """``fqn → take(LayerStats)`` for each chosen block linear, from one calibration walk."""
    from ..calib.capture import walk_blocks  # noqa: PLC0415  (heavy import only when calibrating)

    wanted = set(_select(model, layers))
    blocks = arch_for(model).blocks
    out: dict[str, torch.Tensor] = {}

    def sink(i, stats):
        for name, s in stats.items():
            fqn = f"{blocks}.{i}.{name}"
            if fqn in wanted and s.n_tokens:
                out[fqn] = take(s)

    walk_blocks(model, calib_ids, None, device=device, keep_hessian=hessian, stats_sink=sink, progress=progress)
    return out


def apply_act_quant(model: nn.Module, spec_or_name: str | QuantSpec, *, mode: str = "dynamic", layers=None,
                    calib_ids: torch.Tensor | None = None, absmax: dict[str, torch.Tensor] | None = None,
                    fp_outliers: FPOutliers | None = None, hi_channels: HiChannels | None = None,
                    device="cpu") -> ActQuantHandle:
    """Quantize the input of every chosen block linear of ``model`` in its forward pass.

    ``layers``     ``None`` (all block linears), a regex searched in the fqn, or a list of fqns
    ``mode``       ``"dynamic"`` or ``"static"`` (module doc); static needs ``absmax`` (fqn → ``[in]``,
                   e.g. ``LayerStats.absmax``) or ``calib_ids`` for one calibration pass
    ``fp_outliers`` / ``hi_channels``  outlier handling (:mod:`mixq.act.outliers`); calibrated
                   choices (``source="calib"``, ``hi_channels``) need ``absmax``/``calib_ids`` in
                   either mode
    Returns an :class:`ActQuantHandle`; call ``remove()`` to restore the fp forward.
    """
    spec = parse_act_spec(spec_or_name, mode)
    chosen = _select(model, layers)
    needs_calib = mode == "static" or hi_channels is not None or (fp_outliers is not None
                                                                  and fp_outliers.source == "calib")
    if needs_calib and absmax is None:
        if calib_ids is None:
            raise ValueError("static scales / calibrated outliers need absmax=... or calib_ids=...")
        absmax = calibrate_act_absmax(model, calib_ids, chosen, device=device)
    if hi_channels is not None:
        check_act_spec(hi_channels.spec, mode)
    quantizers: dict[str, ActQuantizer] = {}
    handle = ActQuantHandle(quantizers)
    for fqn in chosen:
        lin = model.get_submodule(fqn)
        a = None
        if needs_calib:
            if fqn not in absmax:
                raise ValueError(f"no calibrated absmax for {fqn}")
            a = absmax[fqn].detach().float().cpu()
            if a.numel() != get_weight(lin).shape[1]:
                raise ValueError(f"{fqn}: absmax has {a.numel()} entries, the layer reads {get_weight(lin).shape[1]}")
        hi_idx = None if hi_channels is None else top_k_channels(a, hi_channels.k)
        q = ActQuantizer(spec, a, fp_outliers, hi_channels, hi_idx, static=mode == "static")
        quantizers[fqn] = q
        handle.hooks.append(lin.register_forward_pre_hook(_hook(q)))
    return handle


def _hook(q: ActQuantizer):
    def pre_hook(module, args):
        return (q(args[0]), *args[1:])
    return pre_hook


__all__ = ["MODES", "ActQuantizer", "ActQuantHandle", "apply_act_quant", "calibrate_act_absmax",
           "check_act_spec", "fake_quant_act", "parse_act_spec"]
