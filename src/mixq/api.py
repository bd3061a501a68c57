"""Stage functions: resolve specs, calibrate, quantize a model, account its size.

Each function takes and returns plain artifacts (a model, a ``{fqn: QuantSpec}`` mapping,
``{fqn: QTensor}``), so the CLI and user scripts compose them the same way.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .algorithms.composite.hooks import quantize_layer
from .algorithms.gptq import _proxy, check_shrink, fp_target, shrink_hessian
from .amp import check as check_amp
from .arch import LayerPolicy, LayerRef, arch_for, get_weight, iter_layers, set_weight
from .calib.capture import walk_blocks
from .calib.dispatch import walk_placement
from .config import BitCost, QuantSpec, is_composite, parse_spec
from .formats import QTensor
from .granularity import PerGroup
from .moe.routing import RoutingRecord
from .threadmap import thread_map

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "awq", "awq+gptq")
GROUP_FALLBACKS = ("error", "shrink")  # resolve_specs' group_fallback (--group-fallback)


def resolve_specs(
    model: nn.Module,
    spec: str | QuantSpec | dict[str, str | QuantSpec],
    *,
    lm_head: str | QuantSpec | None = None,
    embeddings: str | QuantSpec | None = None,
    group_fallback: str = "error",
    allow_empty: bool = False,
) -> dict[str, QuantSpec]:
    """Map every quantizable layer's fqn to its spec.

    ``spec`` is one spec for all block linears, or a mapping whose keys are exact fqns or
    ``re:<regex>`` patterns (first match wins; block linears matching nothing are *kept* in
    floating point and reported as such).  ``lm_head`` / ``embeddings``: ``None`` keeps them,
    a spec quantizes them.  Every spec is checked against its layer's shape up front.
    ``group_fallback``: what to do when a group size does not divide a layer's row length —
    ``"error"`` (default) or ``"shrink"`` to the largest divisor of the row length below it
    (e.g. g128 → g96 on 576-wide rows; the exact cost of what is used is what gets reported).
    """
    if group_fallback not in GROUP_FALLBACKS:
        raise ValueError(f"group_fallback must be one of {', '.join(GROUP_FALLBACKS)}, got {group_fallback!r}")
    policy = LayerPolicy(lm_head="keep" if lm_head is None else "quantize",
                         embeddings="keep" if embeddings is None else "quantize")
    out: dict[str, QuantSpec] = {}
    for ref in iter_layers(model, policy):
        if ref.kind == "lm_head":
            s = parse_spec(lm_head)
        elif ref.kind == "embedding":
            s = parse_spec(embeddings)
        else:
            s = _lookup(spec, ref.fqn)
        if s is None:
            continue
        try:
            s.cost(ref.shape)
        except ValueError as e:
            if group_fallback == "shrink" and isinstance(s.granularity, PerGroup):
                s = replace(s, granularity=PerGroup(_largest_divisor(ref.shape[1], s.granularity.size)))
                log.info("%s: %s", ref.fqn, f"group size does not divide {ref.shape[1]}; using {s.name}")
            else:
                raise ValueError(f"{ref.fqn} {ref.shape}: {e}; or pass --group-fallback shrink") from None
        out[ref.fqn] = s
    if not out and not allow_empty:
        raise ValueError("the spec mapping matched no layer of this model: check the layer names (`mixq inspect MODEL`)")
    return out


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def fallbacks(specs: dict[str, QuantSpec], requested: QuantSpec) -> dict[str, str]:
    """Layers whose spec differs from the requested one (group-size fallback), fqn → spec name."""
    return {f: s.name for f, s in specs.items() if s != requested}


def _lookup(spec, fqn: str) -> QuantSpec | None:
    if not isinstance(spec, dict):
        return parse_spec(spec)
    if fqn in spec:
        return parse_spec(spec[fqn])
    for k, v in spec.items():
        if k.startswith("re:") and re.search(k[3:], fqn):
            return parse_spec(v)
    return None


@dataclass(frozen=True)
class QuantResult:
    """What :func:`quantize_model` (and :func:`mixq.quantize`) returns; the model itself was changed in place.

    ``qtensors``: the stored form of every quantized layer, fqn → :class:`~mixq.formats.QTensor` (what
    :func:`mixq.save_quantized` bit-packs).  ``specs``: fqn → the spec applied.  ``method``: ``rtn``, ``gptq``,
    ``awq`` or ``awq+gptq``.  ``seconds``: wall time.  ``proxy_loss``: GPTQ/AWQ's per-layer proxy loss (empty
    for RTN).  ``meta``: what :func:`mixq.quantize` records for the directory's ``mixq.json`` (spec label,
    plan, calibration record, size report); empty from :func:`quantize_model`.
    """

    qtensors: dict[str, QTensor]
    specs: dict[str, QuantSpec]
    method: str
    seconds: float
    proxy_loss: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    # MoE, GPTQ: tokens per expert in this walk (mixq.moe.RoutingRecord.to_dict; blocks restored from a walk
    # checkpoint were counted by the run that did them, not here)
    routing: dict | None = None


def _refs(model, specs) -> dict[str, LayerRef]:
    """LayerRefs of the layers named in ``specs`` (the policy follows from which names are present)."""
    arch = arch_for(model)
    policy = LayerPolicy(lm_head="quantize" if arch.lm_head in specs else "keep",
                         embeddings="quantize" if any(e in specs for e in arch.embeddings) else "keep")
    return {r.fqn: r for r in iter_layers(model, policy)}


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    specs: dict[str, QuantSpec],
    *,
    method: str = "rtn",
    calib_ids: torch.Tensor | None = None,
    device=None,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    source=None,
    progress: bool = True,
    rotate: bool = False,
    online_rotation: bool = True,
    checkpoint=None,
    offload_dir=None,
    row_weights: dict | None = None,
    gptq_target: str = "quantized",
    amp: str = "off",
    hessian_shrink: float = 0.0,
) -> QuantResult:
    """Quantize ``model`` in place (fake-quant: dequantized weights written back).

    ``method="rtn"`` needs no data.  ``method="gptq"`` walks the decoder block by block on
    ``calib_ids [n, L]`` (sequential: each block is calibrated on the quantized outputs of the
    previous one); layers outside the blocks (lm_head, embeddings) are always RTN.
    ``source``: where blocks live between visits (a :class:`~mixq.calib.capture.BlockSource`,
    e.g. :class:`~mixq.calib.lazy.LazySafetensorsBlocks` for a model that never fits in memory).
    ``method="awq"`` / ``"awq+gptq"``: AWQ scaling and clipping, then RTN / GPTQ
    (:func:`mixq.algorithms.awq.apply_awq`; needs ``calib_ids``).  ``rotate``: QuaRot rotation of
    the residual stream first (:func:`mixq.algorithms.rotation.rotate_model`, RMSNorm families,
    model in memory); ``online_rotation`` adds the run-time rotation of the MLP down-projection
    input, which a saved mixq directory does not carry (pass ``False`` before saving).
    ``checkpoint`` (GPTQ): a directory or a :class:`~mixq.calib.checkpoint.WalkCheckpoint`; every
    block is saved there as soon as it is done, and a re-run with the same model, data, specs and
    options restores the blocks done and goes on from the next (bit-identical result; anything else
    there is wiped with a warning).  Its key is :func:`~mixq.calib.checkpoint.walk_key` unless the
    checkpoint was given one.  The caller deletes it when done (``WalkCheckpoint.clear``).
    ``offload_dir`` (GPTQ): keep the walk's two ``[n, L, hidden]`` activation buffers in
    memory-mapped files there rather than in RAM (:mod:`mixq.calib.offload`).
    ``device``: where each block is quantized (it goes back to where it was afterwards); default: where the
    model is -- the device of its parameters, or block by block where accelerate's ``device_map`` put them
    (:func:`mixq.calib.dispatch.walk_placement`); the CPU with a ``source``.
    ``gptq_target`` (GPTQ): ``"quantized"`` fits each layer to its own weight on the inputs the partly quantized
    model gives it (GPTQ as published); ``"fp"`` fits the layers that read their block's own input (q/k/v) to the
    full-precision model's output of their full-precision inputs (:func:`mixq.algorithms.gptq.fp_target`; the
    walk carries the fp stream too: one more block forward per block, two more activation buffers).
    ``row_weights``: fqn -> each output row's weight in the loss (a plan's ``row_weights``, from the measurement's
    ``G``), handed to quantizers that trade error between rows (``+ip1`` trellises); other specs ignore it.
    ``hessian_shrink`` (GPTQ): each layer's error feedback through ``H`` with its off-diagonal part scaled by
    ``1 - hessian_shrink`` (:func:`mixq.algorithms.gptq.shrink_hessian`); its proxy loss stays on ``H`` itself.
    ``amp`` (GPTQ): the walk's block forwards and Gram products under bf16 autocast (:mod:`mixq.amp`,
    :func:`mixq.calib.stats.gram`); the quantization itself stays float32.  Part of the checkpoint's key.
    Returns the stored form of every quantized layer.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if gptq_target not in ("quantized", "fp"):
        raise ValueError(f"gptq_target must be 'quantized' or 'fp', got {gptq_target!r}")
    check_shrink(hessian_shrink)
    check_amp(amp)
    if method != "gptq" and (checkpoint is not None or offload_dir is not None):
        raise ValueError("checkpoint and offload_dir apply to the GPTQ block walk: use method='gptq'")
    t0 = time.perf_counter()
    if device is None:
        device, placed = ("cpu", None) if source is not None else walk_placement(model)
        source = source if source is not None else placed
    mods = dict(model.named_modules())
    refs = _refs(model, specs)
    q: dict[str, QTensor] = {}
    losses: dict[str, float] = {}
    routing = None
    block_fqns = {f for f, r in refs.items() if r.block is not None and f in specs}
    # ---- rotation / AWQ dispatch (mixq.algorithms.rotation, mixq.algorithms.awq) ----
    if method in ("awq", "awq+gptq") and any(is_composite(s) for s in specs.values()):
        raise ValueError("AWQ does not take intra-tensor composite specs (+o/+c/+sq/SLIM): use --method rtn or gptq")
    if method in ("awq", "awq+gptq") and calib_ids is None:
        raise ValueError("AWQ needs calibration data: pass calib_ids (e.g. --calib ptb --nsamples 128)")
    if rotate:
        from .algorithms.rotation import rotate_model

        rotate_model(model, online_down=online_rotation)
    if method in ("awq", "awq+gptq"):
        from .algorithms.awq import apply_awq

        r = apply_awq(model, calib_ids, {f: specs[f] for f in block_fqns},
                      then="gptq" if method == "awq+gptq" else "rtn", device=device, damp=damp,
                      act_order=act_order, block_size=block_size, source=source, progress=progress)
        q.update(r.qtensors)
        losses.update(r.proxy_loss)
    # ---- end of rotation / AWQ dispatch ----
    if method == "gptq":
        if calib_ids is None:
            raise ValueError("GPTQ needs calibration data: pass calib_ids (e.g. --calib ptb --nsamples 128)")
        prefix = arch_for(model).blocks
        routing = RoutingRecord(tokens=int(calib_ids.numel()))

        def on_block(i: int, block: nn.Module, stats) -> None:
            routing.add_block(f"{prefix}.{i}", stats)
            todo = [(f"{prefix}.{i}.{name}", block.get_submodule(name), st) for name, st in stats.items()
                    if f"{prefix}.{i}.{name}" in specs]

            def one(item):  # every layer of the block is fitted on the same inputs: independent of the others
                fqn, mod, st = item
                W = get_weight(mod)
                if gptq_target == "fp" and st.D is not None:
                    W = fp_target(W, st.H, st.D, damp)
                qt, Wq, loss = quantize_layer(W, specs[fqn], shrink_hessian(st.H, hessian_shrink), "gptq",
                                              damp=damp, act_order=act_order, block_size=block_size,
                                              **_row_weight(row_weights, fqn))
                if hessian_shrink:  # the loss on the inputs themselves, not on the shrunk H
                    loss = _proxy(W.float() - Wq.to(W.device).float(), st.H)
                return qt, Wq, loss

            cpu = all(get_weight(m).device.type == "cpu" for _, m, _ in todo)
            for (fqn, mod, _), (qt, Wq, loss) in zip(todo, thread_map(one, todo, parallel=cpu,
                                                                      size=lambda t: get_weight(t[1]).numel())):
                q[fqn], losses[fqn] = qt, loss
                set_weight(mod, Wq)

        ckpt = None
        if checkpoint is not None:
            from .calib.checkpoint import WalkCheckpoint, walk_key

            ckpt = checkpoint if isinstance(checkpoint, WalkCheckpoint) else WalkCheckpoint(checkpoint)
            if ckpt.key is None:
                ckpt.key = walk_key(model, calib_ids, specs, method=method, damp=damp, act_order=act_order,
                                    block_size=block_size, device=device, source=source, row_weights=row_weights,
                                    gptq_target=gptq_target, amp=amp, hessian_shrink=hessian_shrink)
            ckpt.attach(prefix, specs, q, losses)
        walk_blocks(model, calib_ids, on_block, device=device, source=source, progress=progress,
                    checkpoint=ckpt, offload_dir=offload_dir, fp_stream=gptq_target == "fp", amp=amp)
        missing = block_fqns - set(q)
        if missing:
            raise RuntimeError(f"GPTQ saw no inputs for {sorted(missing)[:3]}...: the block walk did not reach them")
    for fqn, spec in specs.items():
        if fqn in q:
            continue
        mod = mods[fqn]
        q[fqn], Wq, _ = quantize_layer(get_weight(mod), spec, **_row_weight(row_weights, fqn))
        set_weight(mod, Wq)
    routed = routing.to_dict() if routing is not None and routing.counts else None
    return QuantResult(q, dict(specs), method, time.perf_counter() - t0, losses, routing=routed)


def _row_weight(row_weights: dict | None, fqn: str) -> dict:
    w = (row_weights or {}).get(fqn)
    return {} if w is None else {"row_weight": torch.as_tensor(w, dtype=torch.float32)}


def size_report(model: nn.Module, specs: dict[str, QuantSpec], *, other_bits: int = 16) -> dict:
    """Exact storage of a quantized model.

    ``bpw_quantized``: bits per weight over the quantized layers, all metadata counted.
    ``bpw_linears``: over all block linears (kept ones at ``other_bits``).
    ``bpw_all``: over every parameter (embeddings, norms, biases at ``other_bits``; tied
    tensors counted once).
    """
    all_refs = {r.fqn: r for r in iter_layers(model, LayerPolicy())}
    refs = _refs(model, specs)
    quant = BitCost(0, 0)
    for fqn, spec in specs.items():
        quant = quant + spec.cost(refs[fqn].shape)
    lin_numel = sum(r.shape[0] * r.shape[1] for r in all_refs.values())
    lin_quant_numel = sum(all_refs[f].shape[0] * all_refs[f].shape[1] for f in specs if f in all_refs)
    lin_bits = sum(specs[f].cost(all_refs[f].shape).total for f in specs if f in all_refs)
    lin_bits += (lin_numel - lin_quant_numel) * other_bits
    seen, total_numel = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total_numel += p.numel()
    all_bits = quant.total + (total_numel - quant.numel) * other_bits
    return {
        "quantized_layers": len(specs),
        "quantized_weights": quant.numel,
        "bits_quantized": quant.total,
        "bpw_quantized": quant.bpw if quant.numel else None,
        "bpw_linears": lin_bits / lin_numel if lin_numel else None,
        "bpw_all": all_bits / total_numel,
        "total_params": total_numel,
        "bytes_all": all_bits / 8,
        "other_bits": other_bits,
        "breakdown": quant.to_dict() if quant.numel else None,
    }
