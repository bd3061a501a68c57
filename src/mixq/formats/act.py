"""Activation formats: which specs quantize a linear's input, their names, and quantize → dequantize of ``X [T, n]``.

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

Names: :func:`parse_act_spec` (``A8``, ``INT4``, ``FP8``, ``MXFP4``, ``NVFP4``, or any spec name), and the W/A
presets of :func:`parse_wa_preset` (``W4A8``, ``W8A8``, ``W4A4-rot``, ``W8A8-fp8``, ``MXFP4``, ``NVFP4`` → weight
spec, activation spec, rotate).  The weight spec goes to the weight quantizer (RTN/GPTQ/AWQ, with the usual
group fallback), the activation spec to :func:`mixq.runtime.act_quant.apply_act_quant` (which installs
:func:`fake_quant_act` on each chosen linear), and ``rotate`` to
:func:`mixq.runtime.act_outliers.prepare_for_act_quant` (before both).
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch

from ..config import QuantSpec, parse_spec
from ..config.registry import owner
from ..granularity import PerChannel, PerGroup, PerTensor, PerToken, rows_view
from .base import compute_tensor_scale, fake_quantize, fit, round_to_grid

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


class WAPreset(NamedTuple):
    """``(weight spec | None, activation spec | None, rotate)`` of a ``W<b>A<b>`` preset name."""

    weight: QuantSpec | None
    act: QuantSpec | None
    rotate: bool


def parse_wa_preset(name: str, mode: str = "dynamic") -> WAPreset:
    """``W4A8``, ``W8A8``, ``W4A4-rot``, ``W4A16-g64``, ``W8A8-fp8``, ``MXFP4``, ``NVFP4-rot`` → :class:`WAPreset`.

    ``W<wb>A<ab>``: int weights (``-g<N>``, default ``channel`` for 8 bits, else ``g128``; ``W16`` keeps
    them), int activations ``A<ab>`` per token (``A16``: none); ``-fp8`` makes both FP8 (weights per
    channel, activations per token); ``MXFP4``/``MXFP8``/``NVFP4`` use the block format for both;
    ``-rot`` asks for a QuaRot rotation first (:func:`mixq.runtime.act_outliers.prepare_for_act_quant`).
    """
    toks = [t for t in str(name).strip().split("-") if t]
    if not toks:
        raise ValueError("empty W/A preset: use e.g. W4A8, W8A8, W4A4-rot, MXFP4, NVFP4")
    head, rest = toks[0].upper(), [t.lower() for t in toks[1:]]
    rotate = "rot" in rest
    rest = [t for t in rest if t != "rot"]
    if head in ("MXFP4", "MXFP8", "MXFP6", "NVFP4"):
        if rest:
            raise ValueError(f"{head} preset takes only -rot, got {rest}")
        return WAPreset(parse_spec(head), parse_act_spec(head, mode), rotate)
    m = re.fullmatch(r"W(\d+)A(\d+)", head)
    if not m:
        raise ValueError(f"unknown W/A preset {name!r}: use W<bits>A<bits>[-gN][-fp8][-rot], MXFP4 or NVFP4")
    wb, ab = int(m.group(1)), int(m.group(2))
    fp8 = "fp8" in rest
    rest = [t for t in rest if t != "fp8"]
    gran = None
    for t in rest:
        if re.fullmatch(r"g\d+|channel", t):
            gran = t
        else:
            raise ValueError(f"W/A preset {name!r}: unknown option {t!r}")
    if fp8:
        if (wb, ab) != (8, 8) or gran:
            raise ValueError(f"-fp8 applies to W8A8 only (FP8 weights per channel), got {name!r}")
        return WAPreset(parse_spec("FP8"), parse_act_spec("FP8", mode), rotate)
    weight = None if wb == 16 else parse_spec(f"W{wb}-{gran or ('channel' if wb >= 8 else 'g128')}")
    act = None if ab == 16 else parse_act_spec(f"A{ab}", mode)
    return WAPreset(weight, act, rotate)


__all__ = ["MODES", "WAPreset", "check_act_spec", "fake_quant_act", "parse_act_spec", "parse_wa_preset"]
