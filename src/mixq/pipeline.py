"""mixq's stages as plain functions; :mod:`mixq` re-exports them at the top level.

    model, tok = load_model("smollm2-135m")                       # embedded, no network
    calib = build_calibration(model, tok, "ptb", nsamples=32, seqlen=512)
    table = measure(model, calib)                                 # every layer x candidate spec, once
    p = plan(table, bpw=3.5)                                      # exact solver, any number of budgets
    result = quantize(model, plan=p, method="gptq", calib=calib)  # or quantize(model, "W4-g64")
    save_quantized("runs/mixed", model, tok, result)
    qmodel, qtok, info = load_quantized("runs/mixed")
    evaluate(qmodel, qtok, reference=load_model()[0], corpus="ptb,fortunes")   # mixq.eval.scorer

Each stage takes and returns plain artifacts (a model and tokenizer, a
:class:`~mixq.calibset.CalibrationSet`, a :class:`~mixq.allocate.SensitivityTable`, a
:class:`~mixq.allocate.Plan`, a :class:`~mixq.api.QuantResult`, a directory, a JSON-ready dict) and does
what the ``mixq`` command of the same name does, without a command line.  Imports are made inside the
functions: importing this module loads neither torch nor transformers, and each stage loads what it uses.
This module never imports the CLI.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, replace


# model -> the name it was loaded under (what save_quantized records as the directory's base model)
_LOADED_AS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------- models
def load_model(name_or_path: str | None = None, *, dtype=None, device="cpu"):
    """Load a causal LM and its tokenizer: returns ``(model, tokenizer)``, the model in eval mode.

    ``name_or_path``: None or ``"smollm2-135m"`` (the default, :data:`mixq.models.DEFAULT_MODEL`: embedded, no network; the first load converts it to a
    cached safetensors copy, ~20 s), a local directory saved with ``save_pretrained`` (safetensors only) or a
    Hugging Face hub id.  ``dtype``: default ``torch.float32``.  The name is remembered, so
    :func:`save_quantized` records it as the directory's base model (the reference ``mixq eval`` uses).
    See :func:`mixq.models.load_model`.
    """
    import torch

    from .models import DEFAULT_MODEL
    from .models import load_model as _load

    name_or_path = DEFAULT_MODEL if name_or_path is None else name_or_path
    model, tokenizer = _load(name_or_path, dtype=torch.float32 if dtype is None else dtype, device=device)
    _LOADED_AS[model] = str(name_or_path)
    return model, tokenizer


# ---------------------------------------------------------------------------- calibration
def build_calibration(model, tokenizer, calib: str | None = None, nsamples: int = 128, seqlen: int = 512,
                      seed: int = 0, *, bos="auto", progress: bool = True):
    """The calibration rows GPTQ, AWQ and the sensitivity measurement are fitted on (``--calib``).

    ``calib``: ``"self"`` (text the model writes itself: seeded, cached), ``"ptb"``, ``"fortunes"``,
    ``"wikitext2"``, ``"c4"``, a ``.txt``/``.jsonl`` path, or a mixture joined by ``+``; default
    :data:`mixq.calibset.DEFAULT_CALIB` (``"self+ptb"``).  ``nsamples`` rows of ``seqlen`` tokens from
    ``seed``.  ``bos``: ``"auto"`` (as the tokenizer does), ``"always"``, ``"never"`` (:mod:`mixq.bos`) or a
    :class:`~mixq.bos.BosDecision`: whether every row starts with BOS.
    Returns a :class:`~mixq.calibset.CalibrationSet` (``.ids``: LongTensor ``[nsamples, seqlen]``;
    ``.record()``: what a directory's metadata keeps of it).
    """
    from .bos import resolve_bos
    from .calibset import DEFAULT_CALIB
    from .calibset import build_calibration as _build

    return _build(model, tokenizer, DEFAULT_CALIB if calib is None else calib, nsamples, seqlen, seed,
                  bos_id=resolve_bos(tokenizer, model, bos).bos_id, progress=progress)


def _calib_ids(calib):
    """LongTensor ``[n, L]`` of a CalibrationSet or of a tensor given directly."""
    ids = getattr(calib, "ids", calib)
    if getattr(ids, "ndim", None) != 2:
        raise ValueError("calib must be a CalibrationSet (mixq.build_calibration) or a LongTensor [nsamples, seqlen], "
                         f"got {type(calib).__name__}")
    return ids


def _record(calib) -> dict | None:
    return calib.record() if hasattr(calib, "record") else None


def statistics(model, calib, *, layers=None, hessian: bool = False, progress: bool = True):
    """Every block linear's input statistics from one calibration pass: a frozen
    :class:`~mixq.calib.statistics.Statistics` (``.absmax()``, ``.absmean()``, ``.hessians()`` with
    ``hessian=True``, ``.save(path)`` / ``Statistics.load(path)``), keyed to ``calib``'s rows by their sha256.
    ``layers``: None (all block linears), a regex searched in the fqn, or a list of fqns."""
    from .calib.statistics import collect_statistics
    from .runtime.act_quant import select_linears

    return collect_statistics(model, _calib_ids(calib), select_linears(model, layers), hessian=hessian,
                              progress=progress)


# ---------------------------------------------------------------------------- measure / plan
def measure(model, calib, *, metric: str | None = None, candidates="default", algorithm: str = "rtn",
            grad_samples: int = 16, block_samples: int = 4, out: str | os.PathLike | None = None,
            progress: bool = True, amp: str = "off"):
    """The sensitivity table: every block linear's error under every candidate spec (``mixq measure``).

    ``calib``: a :class:`~mixq.calibset.CalibrationSet` (:func:`build_calibration`) or ids ``[n, L]``.
    ``metric``: None for the default recipe's (:mod:`mixq.recipe`), ``kfac`` (output error weighted by the loss
    gradient, in nats), ``kfac-tok``, ``hessian``, ``fisher``, ``block``, ``block-rel``
    (:mod:`mixq.measure.metrics`).  ``candidates``: ``"default"``, a named set (``"default+intra"``), a file of
    spec names, or a list of specs / spec names.
    ``algorithm``: whose error is measured, ``rtn`` or ``gptq``.  ``grad_samples``: rows for the gradient
    statistics; ``block_samples``: rows the block metrics run each candidate on.  ``out``: save the table
    there (JSON); an interrupted measurement resumes from it.  ``amp``: the forward passes under bf16 autocast
    (:mod:`mixq.amp`; ``mixq measure`` and ``mixq quantize`` pass ``--walk-amp``, the recipe's ``auto``).  Returns a
    :class:`~mixq.allocate.SensitivityTable`; measure once, :func:`plan` for any number of budgets.
    """
    from .measure import measure as _measure
    from .recipe import DEFAULT_RECIPE

    table = _measure(model, _calib_ids(calib), _candidates(candidates), metric=metric or DEFAULT_RECIPE["metric"],
                     algorithm=algorithm, grad_samples=grad_samples, block_samples=block_samples, out=out, progress=progress,
                     amp=amp)
    if _record(calib) is not None:
        table.meta["calibration_record"] = _record(calib)
        if out is not None:
            table.save(out, overwrite=True)
    return table


def _candidates(candidates) -> list:
    from .allocate import default_candidates, load_candidates

    if isinstance(candidates, (str, os.PathLike)):
        return default_candidates() if str(candidates) == "default" else load_candidates(candidates)
    from .config import parse_spec

    out = [parse_spec(c) for c in candidates]
    if not out:
        raise ValueError("candidates: name at least one spec")
    return out


def plan(table, bpw: float | None = None, *, bytes: int | str | None = None, solver: str = "exact",  # noqa: A002
         keep=(), force=None, min_bits=None, max_bits=None, tied=(), fast_on: str | None = None,
         tie_experts: bool = False, constraints=None, uniform: str | None = None, tcq_state_bits: int | None = None):
    """Choose one spec per layer of ``table`` minimising the summed predicted error within a budget (``mixq plan``).

    ``table``: a :class:`~mixq.allocate.SensitivityTable` (:func:`measure`) or the path of one.  The budget is
    exactly one of ``bpw`` (bits per weight over the measured layers, every stored bit counted) or ``bytes``
    (an int, or ``"50MB"``/``"512KB"``); the plan never exceeds it, and an infeasible budget raises
    :class:`~mixq.allocate.InfeasibleBudget` naming the minimum feasible one.  ``solver``: ``exact`` (default),
    ``dp``, ``greedy`` or ``uniform`` (with ``uniform=`` a spec name: the best single spec otherwise).
    Constraints, as the CLI flags: ``keep`` (regexes of layers kept in fp16), ``force`` (``{regex: spec}``),
    ``min_bits`` / ``max_bits`` (``{regex: bits}``), ``tied`` (regexes of layers in a block sharing a spec),
    ``fast_on="cpu"`` (only specs a fast CPU kernel runs), ``tie_experts`` (a MoE block's experts of one projection
    share a spec, as GGUF needs; ``Constraints(target="gguf")`` implies it); or a ready :class:`~mixq.allocate.Constraints`.
    ``tcq_state_bits``: the trellis the plan's TCQ layers are encoded with (:func:`mixq.allocate.tcq_states.reprice`;
    default the recipe's, 10; a ``uniform=`` spec is kept as named).
    Returns a :class:`~mixq.allocate.Plan` (``.save(path)``, ``.achieved_bpw``, ``.layers``).
    """
    from .allocate import Budget, Constraints, SensitivityTable, allocate, parse_bytes
    from .recipe import DEFAULT_RECIPE

    if isinstance(table, (str, os.PathLike)):
        table = SensitivityTable.load(table)
    if (bpw is None) == (bytes is None):
        raise ValueError("give exactly one budget: bpw=3.5 or bytes='50MB'")
    budget = Budget(bpw=bpw) if bpw is not None else Budget(bytes=parse_bytes(bytes))
    keep, tied = ((keep,) if isinstance(keep, str) else keep), ((tied,) if isinstance(tied, str) else tied)
    fields = dict(keep=tuple(keep), force=tuple(dict(force or {}).items()), min_bits=dict(min_bits or {}),
                  max_bits=dict(max_bits or {}), tied=tuple(tied), fast_on=fast_on, tie_experts=tie_experts)
    if constraints is None:
        constraints = Constraints(**fields)
    elif fields != dict(keep=(), force=(), min_bits={}, max_bits={}, tied=(), fast_on=None, tie_experts=False):
        raise ValueError("give either constraints=Constraints(...) or the keep/force/min_bits/max_bits/tied/fast_on/"
                         "tie_experts keywords, not both")
    if tcq_state_bits is None:
        tcq_state_bits = 8 if uniform is not None else DEFAULT_RECIPE["tcq_state_bits"]
    return allocate(table, budget, constraints=constraints, method=solver, uniform=uniform,
                    tcq_state_bits=tcq_state_bits)


# ---------------------------------------------------------------------------- quantize / save / load
@dataclass(frozen=True)
class LayerSpecs:
    """Every quantized layer's spec, resolved for one model (:func:`layer_specs`); :func:`quantize` takes it as
    ``spec``.  ``label`` names the choice in ``mixq.json``; ``requested`` is the one spec asked for (None for a
    plan or a mapping); ``plan`` the plan it came from."""

    specs: dict
    label: str
    requested: object = None
    plan: object = None
    lm_head: object = None
    target: str | None = None


def layer_specs(model, spec=None, *, plan=None, lm_head=None, group_fallback: str = "error",
                target: str | None = None) -> LayerSpecs:
    """Resolve one spec or a plan to ``{fqn: spec}`` for ``model`` (as :func:`quantize` does; a tied output head is
    untied when ``lm_head`` quantizes it).  ``target``: a runtime (``gguf``, ...) every spec must be held exactly
    by for its layer's shape, else ``ValueError`` naming the first layers."""
    from . import api
    from .allocate import Plan
    from .arch import iter_layers, untie_lm_head
    from .config import parse_spec

    if isinstance(spec, Plan) and plan is None:
        spec, plan = None, spec
    if (spec is None) == (plan is None):
        raise ValueError("give exactly one of spec (e.g. 'W4-g64', or {regex: spec}) or plan=")
    head = None if lm_head is None or lm_head == "keep" else parse_spec(lm_head)
    if head is not None:
        untie_lm_head(model)
    requested = None
    shapes = {r.fqn: r.shape for r in iter_layers(model)}
    if plan is not None:
        if isinstance(plan, (str, os.PathLike)):
            plan = Plan.load(plan)
        plan.check(shapes)
        specs = dict(plan.layers)  # FP16 "keep" choices too: cast through fp16, counted at 16 bits
        if head is not None:
            specs.update(api.resolve_specs(model, {}, lm_head=head, allow_empty=True))
        label = f"mixed plan ({plan.achieved_bpw:.3f} bpw, {plan.metric}/{plan.solver})"
    else:
        if not isinstance(spec, dict):
            requested = parse_spec(spec)
        specs = api.resolve_specs(model, spec if requested is None else requested, lm_head=head,
                                  group_fallback=group_fallback)
        label = requested.name if requested is not None else "by layer"
    if target:
        from .export.runtime_targets import holds_exactly

        bad = [f"{fqn} ({s.name} on {tuple(shapes[fqn])})" for fqn, s in specs.items()
               if fqn in shapes and not holds_exactly(target, s, shapes[fqn])]
        if bad:
            raise ValueError(f"--target {target}: {len(bad)} layer(s) have specs the runtime does not hold exactly: "
                             f"{', '.join(bad[:3])}{', …' if len(bad) > 3 else ''}; plan with --target {target}")
        from .moe.experts import refuse_untied_experts

        refuse_untied_experts(specs, f"--target {target}", layers=shapes)
    return LayerSpecs(specs, label, requested, plan, head, target or None)


def quantize(model, spec=None, *, plan=None, method: str = "rtn", calib=None, lm_head=None,
             group_fallback: str = "error", rotate: bool = False, damp: float = 0.01, act_order: bool = False,
             target: str | None = None, progress: bool = True, **options):
    """Quantize ``model`` in place with one spec or a plan (``mixq quantize``); returns a :class:`~mixq.api.QuantResult`.

    Exactly one of ``spec`` (a name such as ``"W4-g64"``, ``"NF4-g64"``, ``"MXFP4"`` for every block linear,
    a mapping ``{fqn or "re:<regex>": spec}`` -- block linears matching nothing are kept -- or the
    :class:`LayerSpecs` of :func:`layer_specs`) or ``plan`` (a :class:`~mixq.allocate.Plan` from :func:`plan`, or
    a plan JSON path).  ``method``: ``rtn`` (no data),
    ``gptq``, ``awq`` or ``awq+gptq``, which need ``calib`` (a :class:`~mixq.calibset.CalibrationSet` from
    :func:`build_calibration`, or ids ``[n, L]``).  ``lm_head``: a spec to quantize the output head (RTN; a
    tied head is untied first), default kept.  ``group_fallback``: ``"error"`` or ``"shrink"`` a group size
    that does not divide a layer's rows.  ``target``: a runtime every spec must be held exactly by
    (:func:`layer_specs`).  ``rotate``: QuaRot rotation of the residual stream first (fused
    into the weights; ``online_rotation=True`` adds the run-time rotation that a saved directory cannot
    carry).  ``damp`` / ``act_order``: GPTQ options.  Other ``options`` go to
    :func:`mixq.api.quantize_model` (``device``, ``block_size``, ``checkpoint``, ``offload_dir``, ``source``, ...).
    The model holds the dequantized weights (ready to evaluate); ``result.qtensors`` the stored form, which
    :func:`save_quantized` writes bit-packed.
    """
    from . import api

    if method not in api.METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(api.METHODS)}")
    if method != "rtn" and calib is None:
        raise ValueError(f"method {method!r} needs calibration data: "
                         "calib=mixq.build_calibration(model, tokenizer, 'ptb', nsamples=128)")
    calib_ids = _calib_ids(calib) if method != "rtn" else None
    ls = spec if isinstance(spec, LayerSpecs) else layer_specs(model, spec, plan=plan, lm_head=lm_head,
                                                               group_fallback=group_fallback, target=target)
    options.setdefault("online_rotation", False)
    if ls.plan is not None and ls.plan.row_weights:
        options.setdefault("row_weights", ls.plan.row_weights)
    res = api.quantize_model(model, ls.specs, method=method, calib_ids=calib_ids, damp=damp, act_order=act_order,
                             rotate=rotate, progress=progress, **options)
    meta = {"method": method, "spec": ls.label, "rotate": rotate,
            "lm_head": "keep" if ls.lm_head is None else ls.lm_head.name,
            "size": api.size_report(model, ls.specs),
            "group_fallback": api.fallbacks(ls.specs, ls.requested) if ls.requested is not None else {},
            "plan": ls.plan.to_dict() if ls.plan is not None else None,
            "calibration": _record(calib) if calib_ids is not None else None,
            "seconds": res.seconds, "proxy_loss": res.proxy_loss or None}
    if ls.target:
        meta["target"] = ls.target
    if res.routing:  # MoE: tokens each expert saw in the GPTQ walk
        meta["moe"] = res.routing
    return replace(res, meta=meta)


def save_quantized(out_dir: str | os.PathLike, model, tokenizer, result, meta: dict | None = None, *,
                   base_model: str | None = None, overwrite: bool = False, rest_dtype=None):
    """Write the native mixq directory (bit-packed, atomic; ``mixq.json`` with sizes and sha256 per file).

    ``result``: the :class:`~mixq.api.QuantResult` of :func:`quantize` (its ``meta`` goes into ``mixq.json``:
    spec, method, plan, calibration, size) or a bare ``{fqn: QTensor}``.  ``meta``: more entries (they win).
    ``base_model``: recorded as the model the directory was made from, which ``mixq eval DIR`` compares with;
    default the name :func:`load_model` loaded ``model`` under (else ``model.name_or_path``).  An existing
    ``out_dir`` is refused unless ``overwrite``.  ``rest_dtype``: cast the unquantized tensors (e.g.
    ``torch.bfloat16``).  Returns the directory's path; :func:`load_quantized` reads it back.
    """
    from .export.native_write import save_quantized as _save

    qtensors = getattr(result, "qtensors", result)
    info = dict(getattr(result, "meta", None) or {})
    if hasattr(result, "specs"):
        if "size" not in info:
            from .api import size_report

            info["size"] = size_report(model, result.specs)
        info.setdefault("method", result.method)
    if base_model is None:
        base_model = _LOADED_AS.get(model) or getattr(model, "name_or_path", None) or None
    info["base_model"] = base_model
    info.update(meta or {})
    return _save(out_dir, model, tokenizer, qtensors, info, overwrite=overwrite, rest_dtype=rest_dtype)


# ---------------------------------------------------------------------------- fine-tuning
FINETUNE_STAGES = ("none", "e2e", "block", "block+e2e")  # what `mixq quantize --finetune` runs after GPTQ


def finetune(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, calib=None,
             nsamples: int = 32, seqlen: int = 512, seed: int = 0, bos="auto", config=None, e2e="default",
             block: bool = True, overwrite: bool = False, plot: bool = True, progress: bool = True) -> dict:
    """Fine-tune the quantized directory ``src_dir`` with its codes fixed and write ``out_dir`` (``mixq finetune``).

    Block-wise distillation of the scales (and norms) towards the directory's base model on ``nsamples`` x
    ``seqlen`` calibration rows of ``calib`` (a source such as ``"self+ptb"``, default
    :data:`mixq.calibset.DEFAULT_CALIB`; or the :class:`~mixq.calibset.CalibrationSet` the model was quantized
    on, used as it is: ``nsamples``, ``seqlen``, ``seed`` and ``bos`` are then its own), the last quarter held
    out to choose each block's stopping epoch (:mod:`mixq.distill`; ``config``: a
    :class:`~mixq.distill.FinetuneConfig`).  Interrupted runs resume from the blocks done (kept beside
    ``out_dir``).  ``plot``: the loss curves as ``finetune.png`` in ``out_dir``.  Returns the report (also recorded as
    ``finetune`` in ``out_dir``'s ``mixq.json``).  ``e2e``: then the end-to-end stage on the base model's logits
    (:mod:`mixq.distill_e2e`), with an :class:`~mixq.distill_e2e.E2EConfig`, ``"default"`` (its defaults) or
    None (block-wise only); its report is ``report["e2e"]``.  ``block=False`` skips the block-wise stage (the
    report then holds the end-to-end one's only, which must run): what ``mixq quantize`` runs by default
    (:mod:`mixq.recipe`).
    """
    from pathlib import Path

    from .export.native import load_quantized as _load_q, read_info, read_qtensors, run_meta
    from .export.native_write import save_quantized as _save
    from .distill import FinetuneConfig, finetune_blockwise, mean_gain, plot_curves

    src, out = Path(src_dir), Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists: choose another --out or pass --force")
    if out.resolve() == src.resolve():
        raise ValueError("finetune writes a new directory: --out must differ from the source")
    if not block and e2e is None:
        raise ValueError("finetune: block=False and e2e=None leave no stage to run")
    cfg = config or FinetuneConfig()
    info = read_info(src)
    base = info.get("base_model")
    if not base:
        raise ValueError(f"{src} records no base model to distil from: re-quantize it with this mixq")
    ref, tok = load_model(base)
    qmodel, qtok, _ = _load_q(src)
    _, qtensors, _ = read_qtensors(src)
    from .calibset import CalibrationSet

    if isinstance(calib, CalibrationSet):
        cal = calib
    else:
        cal = build_calibration(ref, tok, calib, nsamples, seqlen, seed, bos=bos, progress=progress)
    from .memtrim import release_free_memory

    release_free_memory()  # what loading and unpacking left on the heap (mixq.memtrim)
    key = {"source": info.get("files"), "calibration": cal.sha256}
    new, report = qtensors, {}
    if block:
        new, report = finetune_blockwise(qmodel, ref, qtensors, cal.ids, cfg, progress=progress, key=key,
                                         checkpoint=out.with_name(f".{out.name}.partial-finetune"))
        report["held_out_gain"] = mean_gain(report)
    report["calibration"] = cal.record()
    if e2e is not None:
        from .distill_e2e import E2EConfig, finetune_e2e

        new, report["e2e"] = finetune_e2e(qmodel, ref, new, cal.ids, E2EConfig() if e2e == "default" else e2e,
                                          progress=progress, key=key,
                                          checkpoint=out.with_name(f".{out.name}.partial-finetune-e2e"))
    side = {p.name: p.read_bytes() for p in sorted(src.iterdir()) if p.is_file() and p.name in
            ("plan.json", "measurement.json")}
    if plot:  # inside the directory, written (and checksummed) with it
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            side[PLOT_NAME] = plot_curves(report, Path(tmp) / PLOT_NAME).read_bytes()
        report["plot"] = str(out / PLOT_NAME)
    meta = run_meta(info)
    meta["finetune"] = {**report, "source": str(src)}
    _save(out, qmodel, qtok or tok, new, meta, overwrite=overwrite, side_files=side)
    return report


PLOT_NAME = "finetune.png"
