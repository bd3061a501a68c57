"""Simulated activation quantization in the forward pass: the input of chosen linears goes through
quantize → dequantize (:func:`mixq.formats.act.fake_quant_act`; the numerics and the dynamic / static scales are
described in :mod:`mixq.formats.act`).

:func:`apply_act_quant` installs one forward pre-hook per linear (after any hook already there, so
an online rotation attached by :func:`mixq.algorithms.rotation.rotate_model` runs first and the
*rotated* input is quantized) and returns a handle whose ``remove()`` restores the model.  Weights are
untouched: quantize them separately (RTN/GPTQ on the W spec of :func:`mixq.formats.act.parse_wa_preset`).
Outlier handling (LLM.int8() fp columns, Atom/QUIK high-precision channels) is :mod:`.act_outliers`;
static scales and calibrated outliers come from one calibration walk (:func:`calibrate_act_absmax`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import get_weight, iter_layers
from ..config import QuantSpec
from ..formats.act import check_act_spec, fake_quant_act, parse_act_spec
from .act_outliers import FPOutliers, HiChannels, fp_columns, top_k_channels

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


def select_linears(model: nn.Module, layers) -> list[str]:
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
    """``fqn → take(LayerStats)`` for each chosen block linear, from one calibration walk
    (:func:`mixq.calib.statistics.collect_statistics`)."""
    from ..calib.statistics import collect_statistics  # noqa: PLC0415  (heavy import only when calibrating)

    stats = collect_statistics(model, calib_ids, select_linears(model, layers), hessian=hessian, device=device,
                               fingerprint=False, progress=progress)
    return {fqn: take(s) for fqn, s in stats.layers.items()}


def apply_act_quant(model: nn.Module, spec_or_name: str | QuantSpec, *, mode: str = "dynamic", layers=None,
                    calib_ids: torch.Tensor | None = None, absmax: dict[str, torch.Tensor] | None = None,
                    fp_outliers: FPOutliers | None = None, hi_channels: HiChannels | None = None,
                    device="cpu") -> ActQuantHandle:
    """Quantize the input of every chosen block linear of ``model`` in its forward pass.

    ``layers``     ``None`` (all block linears), a regex searched in the fqn, or a list of fqns
    ``mode``       ``"dynamic"`` or ``"static"`` (module doc); static needs ``absmax`` (fqn → ``[in]``,
                   e.g. ``LayerStats.absmax``) or ``calib_ids`` for one calibration pass
    ``fp_outliers`` / ``hi_channels``  outlier handling (:mod:`mixq.runtime.act_outliers`); calibrated
                   choices (``source="calib"``, ``hi_channels``) need ``absmax``/``calib_ids`` in
                   either mode
    Returns an :class:`ActQuantHandle`; call ``remove()`` to restore the fp forward.
    """
    spec = parse_act_spec(spec_or_name, mode)
    chosen = select_linears(model, layers)
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


__all__ = ["ActQuantizer", "ActQuantHandle", "apply_act_quant", "calibrate_act_absmax", "input_stats",
           "select_linears"]
