"""Mixture-of-experts blocks in GGUF: a block's experts as stacked tensors of one ggml type, and its router.

mixq holds expert ``e``'s projections as layers ``model.layers.N.mlp.experts.E.{gate,up,down}_proj``
(:mod:`mixq.moe`); llama.cpp holds the experts of one projection as one 3-D tensor, expert ``e`` its ``e``-th
matrix (torch order; ggml's ``ne`` is the reverse)::

    blk.N.ffn_gate_exps.weight  [n_expert, n_ff_exp, n_embd]    ggml ne {n_embd, n_ff_exp, n_expert}
    blk.N.ffn_up_exps.weight    [n_expert, n_ff_exp, n_embd]
    blk.N.ffn_down_exps.weight  [n_expert, n_embd, n_ff_exp]
    blk.N.ffn_gate_inp.weight   [n_expert, n_embd]              the router (``mlp.gate``), F32, never quantized

One stacked tensor has one ggml type, so the experts of one projection must carry one spec: a ``--target gguf``
plan ties them (:attr:`mixq.allocate.Constraints.ties_experts`), and a plan that gave them different specs is
refused naming them (:func:`mixq.moe.experts.refuse_untied_experts`).  With that one spec the stack is written as
a dense layer is (:func:`mixq.export.ggml_choice.layer_choice`): the ggml type that holds it exactly, filled per
expert from mixq's codes and scales; or, for an approximate export, one type chosen for all the experts' rows
together (the least total squared error) and fit to each expert's rows (ggml blocks never cross a row, so this is
the per-expert fit, stacked).

Families (:mod:`.gguf_arch`): Qwen3-MoE as llama.cpp's ``qwen3moe``, Mixtral as ``llama`` with expert tensors
(llama.cpp's own conversion of both).  llama.cpp renormalises the top-k routing weights of both and makes every
block a MoE block, so a Qwen3-MoE with ``norm_topk_prob`` false or dense blocks (``mlp_only_layers``,
``decoder_sparse_step``) is refused: the file would compute another function.
"""
from __future__ import annotations

import re
from dataclasses import replace

import gguf
import numpy as np

from ..config import QuantSpec
from ..formats import QTensor
from .ggml_choice import _Choice, _choose_type, _float_data, exact_choice, is_exact_write
from .ggml_fit import _Grid, _grid_of

_EXPERT_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED = {"gate_proj": gguf.MODEL_TENSOR.FFN_GATE_EXP, "up_proj": gguf.MODEL_TENSOR.FFN_UP_EXP,
            "down_proj": gguf.MODEL_TENSOR.FFN_DOWN_EXP}
ROUTER = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_INP].removeprefix("blk.{bid}")  # ".ffn_gate_inp"


def expert_slot(hf_name: str) -> tuple[str, int] | None:
    """``model.layers.3.mlp.experts.5.down_proj.weight`` -> ``("blk.3.ffn_down_exps.weight", 5)``; else None."""
    m = _EXPERT_WEIGHT.match(hf_name)
    if m is None:
        return None
    return f"{gguf.TENSOR_NAMES[_STACKED[m[3]]].format(bid=int(m[1]))}.weight", int(m[2])


def is_router(gguf_name: str) -> bool:
    return gguf_name.startswith("blk.") and gguf_name.endswith(ROUTER + ".weight")


def check_moe_config(config) -> None:
    """Refuse a MoE config llama.cpp would compute differently (module doc)."""
    if config.model_type != "qwen3_moe":
        return
    why = []
    if not getattr(config, "norm_topk_prob", False):
        why.append("norm_topk_prob is false (llama.cpp's qwen3moe always renormalises the top-k routing weights)")
    if list(getattr(config, "mlp_only_layers", None) or []) or getattr(config, "decoder_sparse_step", 1) != 1:
        why.append(f"some blocks are dense (mlp_only_layers={getattr(config, 'mlp_only_layers', None)}, "
                   f"decoder_sparse_step={getattr(config, 'decoder_sparse_step', 1)}; llama.cpp's qwen3moe makes "
                   "every block a MoE block)")
    if why:
        raise ValueError(f"cannot export this qwen3_moe model to GGUF: {'; '.join(why)}; export compressed-tensors "
                         "or gptq instead, or keep the native mixq directory")


def expert_members(names) -> dict[str, dict[int, str]]:
    """Stacked GGUF name -> {expert: HF weight name} over ``names``; refuses a stack whose experts are not 0..E-1."""
    out: dict[str, dict[int, str]] = {}
    for n in names:
        slot = expert_slot(n)
        if slot is not None:
            out.setdefault(slot[0], {})[slot[1]] = n
    for name, members in out.items():
        if sorted(members) != list(range(len(members))):
            raise ValueError(f"{name}: the model's experts are numbered {sorted(members)[:8]}, "
                             f"not 0..{len(members) - 1}")
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def _stacked_grid(qts: list[QTensor | None]) -> _Grid | None:
    """The experts' grids one under the other (rows of expert 0 first), when every expert has one of one kind."""
    grids = [_grid_of(q, None) if q is not None else None for q in qts]
    if any(g is None for g in grids) or len({(g.group, g.integral, g.mx) for g in grids}) != 1:
        return None
    g = grids[0]
    return _Grid(np.concatenate([x.step for x in grids]), np.concatenate([x.zero for x in grids]), g.group,
                 g.integral, g.mx)


def encode_experts(name: str, xs: list[np.ndarray], spec: QuantSpec | None, qts: list[QTensor | None],
                   exact: bool, float_qt) -> _Choice:
    """One ggml type and its blocks ``[n_expert, rows, row bytes]`` (or float values) for a stack of experts
    ``xs`` (each ``[rows, cols]``, mixq's values) that share ``spec`` (None: not quantized by mixq)."""
    n, (rows, cols) = len(xs), xs[0].shape
    x = np.stack(xs)
    if spec is None:
        return _Choice(float_qt, _float_data(x, float_qt), None, None,
                       "not quantized by mixq: written as " + float_qt.name, False, {}, {})
    if is_exact_write(spec, qts[0], (rows, cols), exact):
        parts = [exact_choice(xe, spec, q, None, f"{name} (expert {e})") for e, (xe, q) in enumerate(zip(xs, qts))]
        return replace(parts[0], data=np.stack([p.data for p in parts]))  # one spec and shape: one type
    choice = _choose_type(x.reshape(n * rows, cols), spec, _stacked_grid(qts))
    return replace(choice, data=choice.data.reshape(n, rows, *choice.data.shape[1:]),
                   how=f"{choice.how} (one type for the rows of all {n} experts)")
