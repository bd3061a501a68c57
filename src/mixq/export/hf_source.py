"""The source side of the Hugging Face exports (:mod:`.hf`): a native mixq directory read as layers, kept
weights and the rest, and what each format (compressed-tensors, GPTQ) can hold exactly.  Every layer a format
cannot hold is reported at once, naming the spec to use instead."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config.protocol import suggest
from ..formats import QTensor, dequantize
from ..granularity import PerChannel, PerGroup
from .native import CheckpointError, read_info, read_qtensors, refuse_composites
from ..moe.checkpoint import CHECKPOINT_RENAMES, checkpoint_name


class ExportError(ValueError):
    """The directory cannot be written in the requested format; ``problems`` maps fqn -> reason."""

    def __init__(self, message: str, problems: dict[str, str] | None = None):
        super().__init__(message)
        self.problems = problems or {}


# ---------------------------------------------------------------------- reading the source
@dataclass
class Source:
    path: Path
    info: dict
    config: dict                     # config.json as a dict
    layers: dict[str, QTensor]       # quantized layers (keep dtypes excluded)
    keep: dict[str, torch.Tensor]    # layers whose "spec" keeps them in float: module-layout weight
    rest: dict[str, torch.Tensor]
    modules: dict[str, str]          # every Linear / Conv1D / Embedding: fqn -> "linear" | "conv1d" | "embedding"
    lm_head: str


def read_source(src_dir) -> Source:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from ..arch import arch_for
    from ..moe.checkpoint import routers
    from ..moe.experts import expose_experts

    path = Path(src_dir)
    info, qtensors, rest = read_qtensors(path)  # any native version; sizes and sha256 checked first
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}; the directory is damaged") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        expose_experts(model)  # MoE: one linear per expert projection, as the directory holds them
    modules, shapes = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, Conv1D):
            modules[name], shapes[name] = "conv1d", tuple(m.weight.shape[::-1])
        elif isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            modules[name] = "linear" if isinstance(m, torch.nn.Linear) else "embedding"
            shapes[name] = tuple(m.weight.shape)
    for name in routers(model):  # MoE routers: kept in float, named in the exports' ignore lists
        modules[name] = "linear"
    layers, keep = {}, {}
    for fqn, q in qtensors.items():
        if fqn in shapes and (shapes[fqn] != tuple(q.shape) or tuple(q.codes.shape) != tuple(q.shape)):
            raise CheckpointError(f"{path}: {fqn} has shape {tuple(q.codes.shape)} in the checkpoint but the model "
                                  f"expects {shapes[fqn]}")
        if q.spec.is_float_keep:
            w = dequantize(q).to({"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[q.spec.dtype])
            keep[fqn] = w.t().contiguous() if modules.get(fqn) == "conv1d" else w
        else:
            layers[fqn] = q
    return _checkpoint_names(Source(path, info, config, layers, keep, rest, modules, arch_for(model).lm_head))


def _checkpoint_names(src: Source) -> Source:
    """Every name as the family's checkpoints spell it (Mixtral's experts: ``block_sparse_moe.experts.E.w1``)."""
    mt = src.config.get("model_type")
    if mt not in CHECKPOINT_RENAMES:
        return src
    ren = lambda d: {checkpoint_name(mt, k): v for k, v in d.items()}  # noqa: E731
    return replace(src, layers=ren(src.layers), keep=ren(src.keep), rest=ren(src.rest), modules=ren(src.modules))


# ---------------------------------------------------------------------- what each format can hold
def _common_problem(fqn: str, q: QTensor, src: Source, fmt: str) -> str | None:
    spec = q.spec
    kind = src.modules.get(fqn)
    if kind is None:
        return "not a module of this model"
    if kind == "embedding":
        return f"quantized embeddings are not exported to {fmt}: keep embeddings in floating point"
    if kind == "conv1d" and fmt == "compressed-tensors":
        return ("GPT-2 style Conv1D layers are not nn.Linear, which compressed-tensors quantizes: "
                "export this model as GPTQ instead")
    if fqn == src.lm_head and src.config.get("tie_word_embeddings", False):
        return "the lm_head is tied to the embeddings: quantize it untied (mixq unties it with --lm-head alone)"
    mapping = spec.export_to(fmt)  # the element-format family decides (mixq.config.families)
    if mapping.kind != "exact":
        return mapping.note if mapping.kind == "refused" else f"only approximately ({mapping.note})"
    if not isinstance(spec.granularity, (PerGroup, PerChannel)):
        return f"{spec.granularity} granularity is not exported: use {suggest(spec, granularity=PerChannel())} or gN"
    return None


def ct_problem(q: QTensor) -> str | None:
    spec = q.spec
    if spec.bits == 1 and spec.symmetric:
        return ("the binary grid ±scale has no zero level (compressed-tensors' int1 is {-1, 0} * scale): "
                f"use {suggest(spec, symmetric=False)} or W2")
    return None


def gptq_problem(q: QTensor) -> str | None:
    spec = q.spec
    out_f, in_f = q.shape
    if (in_f * spec.bits) % 32 or (out_f * spec.bits) % 32:
        return (f"shape {q.shape}: GPTQ packs whole 32-bit words, so in and out features times {spec.bits} "
                "must divide by 32")
    scale = q.params.scale
    if not torch.equal(scale.to(torch.float16).float(), scale.float()):
        return (f"its {spec.scale_dtype} scales are not all exact in fp16 (GPTQ stores fp16 scales): "
                f"use {suggest(spec, scale_dtype='fp16')}")
    if not spec.symmetric and bool((q.params.zero == 0).any()):
        n = int((q.params.zero == 0).sum())
        return (f"{n} group(s) have zero point 0, which GPTQ v1 (zeros stored minus one) cannot hold: "
                f"use {suggest(spec, symmetric=True, zero_dtype='int')} or export compressed-tensors")
    return None


def _raise_problems(fmt: str, problems: dict[str, str], layers: dict[str, QTensor]) -> None:
    if not problems:
        return
    by_reason: dict[tuple[str, str], list[str]] = {}
    for fqn, why in problems.items():
        by_reason.setdefault((layers[fqn].spec.name, why), []).append(fqn)
    parts = []
    for (name, why), fqns in by_reason.items():
        shown = ", ".join(fqns[:3]) + (f" (+{len(fqns) - 3} more)" if len(fqns) > 3 else "")
        parts.append(f"{name} on {shown}: {why}")
    raise ExportError(f"cannot export to {fmt}: {len(problems)} layer(s) use specs it cannot represent exactly: "
                      + "; ".join(parts), problems)


def open_source(src_dir, fmt: str, layer_problem) -> "Source":
    """Read ``src_dir`` for export to ``fmt``; every layer ``fmt`` cannot hold exactly is reported at once."""
    refuse_composites(read_info(src_dir), fmt, ExportError)
    src = read_source(src_dir)
    problems = {f: p for f, q in src.layers.items() if (p := _common_problem(f, q, src, fmt) or layer_problem(q))}
    _raise_problems(fmt, problems, src.layers)
    if not src.layers:
        raise ExportError(f"cannot export to {fmt}: the directory has no quantized layer")
    return src
