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


def test_the_recipe_runs_on_widths_that_are_not_powers_of_two(tmp_path):
    """``mixq quantize --bpw 3`` with every default (self-generated + PTB calibration, the trellis candidates with
    their one-sided transforms, GPTQ, the end-to-end epoch) on a tiny Qwen2 of hidden 112 = 16 * 7 and MLP 304 =
    16 * 19, widths whose transforms are not one Sylvester-Hadamard factor: it writes a mixed trellis plan at the
    budget whose packed decode step gives the fake-quant model's logits, and ``mixq eval`` scores it."""
    import torch
    import transformers as tf
    from tiny import make_tiny_tokenizer

    import mixq
    from mixq.cli import main

    cfg = tf.Qwen2Config(vocab_size=128, hidden_size=112, intermediate_size=304, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    src = tmp_path / "m"
    tf.Qwen2ForCausalLM(cfg).eval().save_pretrained(src)
    make_tiny_tokenizer().save_pretrained(src)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(src), "--bpw", "3", "--nsamples", "8", "--seqlen", "64",
                 "--out", str(out)]) == 0
    import json

    plan = json.loads((out / "plan.json").read_text())
    chosen = [v["spec"] for v in plan["layers"].values()]
    tcq = [s for s in chosen if s.startswith("TCQ")]
    # several trellis rates, and trellis layers nearly everywhere (a scalar grid may win a layer of a random model)
    assert len(set(tcq)) > 1 and len(tcq) >= 0.8 * len(chosen), chosen
    assert abs(plan["total_bits"] / sum(a * b for a, b in (v["shape"] for v in plan["layers"].values())) - 3) < 0.05
    fake, _, _ = mixq.load_quantized(out)
    packed, _, _ = mixq.load_quantized(out, packed=True)
    ids = torch.randint(4, 99, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # prompt, then one decode step (the one-token kernels) with the cache
        step = [m(ids[:, :11], use_cache=True) for m in (fake, packed)]
        last = [m(ids[:, 11:], past_key_values=s.past_key_values).logits for m, s in zip((fake, packed), step)]
    torch.testing.assert_close(last[1], last[0], rtol=1e-3, atol=1e-3)
    assert main(["eval", str(out), "--tokens", "256", "--seqlen", "64", "--corpus", "ptb"]) == 0
