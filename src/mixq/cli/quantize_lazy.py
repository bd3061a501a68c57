"""``mixq quantize --lazy``: the blocks streamed from a local safetensors directory, one at a time through GPTQ's
calibration walk (:mod:`mixq.calib.lazy`): what the flag needs, the model without its blocks, the block source."""
from __future__ import annotations

from pathlib import Path

from .common import UserError


def check_lazy(args) -> None:
    """UserError naming the fix where ``--lazy`` cannot run with these arguments."""
    p = Path(args.model)
    if not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
        raise UserError(f"--lazy needs a local model directory with config.json and *.safetensors, not {args.model}")
    if args.device_map:
        raise UserError("--lazy streams the blocks from disk itself: drop --device-map (--device picks where each "
                        "block is quantized)")
    if args.method != "gptq" or args.rotate or (args.bpw is not None and args.measurement is None):
        raise UserError("--lazy streams the blocks through GPTQ's calibration walk: use --method gptq, no --rotate, "
                        "and with --bpw an existing --measurement")
    from ..calibset import SELF, parse_sources

    if SELF in parse_sources(args.calib):
        raise UserError(f"--lazy never holds the whole model, so it cannot write self-generated calibration text "
                        f"(--calib {args.calib}): pass --calib ptb or a .txt/.jsonl file")


def load_lazy(path: str):
    """The model on ``meta`` with only what lies outside the decoder blocks loaded, and its tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from ..calib.lazy import load_outside_blocks, skeleton_from_config

    model = skeleton_from_config(AutoConfig.from_pretrained(path))
    load_outside_blocks(model, path)
    return model, AutoTokenizer.from_pretrained(path)


def lazy_source(model, path: str, specs: dict):
    """Streams blocks from ``path``; keeps each block's tensors that are not quantized (to save them)."""
    from ..arch import arch_for
    from ..calib.lazy import LazySafetensorsBlocks

    prefix, kept = arch_for(model).blocks, {}

    def sink(i: int, state: dict) -> None:
        for k, v in state.items():
            name = f"{prefix}.{i}.{k}"
            if name.removesuffix(".weight") not in specs:
                kept[name] = v

    return LazySafetensorsBlocks(path, prefix, sink=sink), kept  # the walk trims the heap after each block
