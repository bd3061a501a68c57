"""The default recipe: the CLI's defaults come from it, and a directory records what a run changed."""
from __future__ import annotations

from types import SimpleNamespace

from mixq.cli import build_parser
from mixq.recipe import DEFAULT_RECIPE, RECIPE_NAME, recipe_record


def test_quantize_defaults_are_the_recipe():
    args = build_parser().parse_args(["quantize", "--bpw", "3", "--out", "x"])
    assert recipe_record(args) == {"name": RECIPE_NAME, "deviations": {}}
    assert args.method == "gptq" and args.calib == DEFAULT_RECIPE["calib"] and args.nsamples == DEFAULT_RECIPE["nsamples"]


def test_deviations_are_named():
    args = build_parser().parse_args(["quantize", "--bpw", "3", "--method", "rtn", "--nsamples", "8", "--out", "x"])
    dev = recipe_record(args)["deviations"]
    assert dev == {"method": "rtn", "nsamples": 8, "algorithm": "rtn", "finetune": "none"}  # RTN: no data, no tuning
    args = build_parser().parse_args(["quantize", "--bpw", "3", "--finetune", "block", "--out", "x"])
    assert args.finetune == "block" and recipe_record(args)["deviations"] == {"finetune": "block"}
    assert build_parser().parse_args(["quantize", "--bpw", "3", "--finetune", "--out", "x"]).finetune == "e2e"
    assert recipe_record(SimpleNamespace(method="gptq", algorithm="gptq-exact"))["deviations"] == {"algorithm": "gptq-exact"}
    args = build_parser().parse_args(["quantize", "--bpw", "3", "--tcq-state-bits", "8", "--out", "x"])
    assert args.tcq_state_bits == 8 and recipe_record(args)["deviations"] == {"tcq_state_bits": 8}
    assert build_parser().parse_args(["plan", "m", "--bpw", "3"]).tcq_state_bits == DEFAULT_RECIPE["tcq_state_bits"]


def test_gptq_target_is_a_recipe_setting():
    other = "quantized" if DEFAULT_RECIPE["gptq_target"] == "fp" else "fp"
    args = build_parser().parse_args(["quantize", "--bpw", "3", "--gptq-target", other, "--out", "x"])
    assert recipe_record(args)["deviations"] == {"gptq_target": other}
