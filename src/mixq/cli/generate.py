"""``mixq generate``: greedy decoding of a prompt with a native mixq directory, and its tokens/s.

The text goes to stdout, the timing line to stderr.
"""
from __future__ import annotations

import argparse
import sys

from ..runtime.generate import DTYPES, ENGINES
from .common import UserError


def register(sub) -> None:
    g = sub.add_parser("generate", help="greedy-decode a prompt with a mixq directory and report tokens/s",
                       description="Load DIR (packed QuantLinear layers by default) and greedily decode after "
                                   "--prompt.  The text goes to stdout, the timing line to stderr.")
    g.add_argument("dir", help="native mixq directory")
    g.add_argument("--prompt", required=True, help="prompt text (plain; --chat applies the chat template)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                   help="packed QuantLinear layers (default) or --no-packed: the dequantized fake-quant model")
    g.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                   help="activation / model dtype (default: bf16 with --packed, where the CPU int4 kernel "
                        "needs it; fp32 otherwise)")
    g.add_argument("--kernel", default="auto",
                   help="QuantLinear kernel: auto (default: cpu-int4 where it applies, else reference), reference, "
                        "cpu-int4 (bf16, params rounded to bf16), cpu-int4-exact (bf16, exact params)")
    g.add_argument("--engine", default="auto", choices=ENGINES,
                   help="what runs the blocks: lean (mixq's own forward of Llama-shaped models: the same modules "
                        "and arithmetic, less time a step), transformers, or auto (default: lean where it can)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-sequence token")
    g.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    import torch

    from ..export.native import read_info
    from ..runtime import canonical_name, greedy_generate, kernel_usage
    from ..runtime.generate import max_positions, resolve_engine

    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not args.prompt:
        raise UserError("--prompt is empty: give some text to continue")
    if args.kernel != "auto" and not args.packed:
        raise UserError(f"--kernel {args.kernel} needs --packed (the fake-quant model has no QuantLinear layers)")
    canonical_name(args.kernel)
    read_info(args.dir)
    dtype_name = args.dtype or ("bf16" if args.packed else "fp32")
    dtype = DTYPES[dtype_name]
    from ..export.native import load_quantized

    model, tok, info = load_quantized(args.dir, dtype=dtype, packed=args.packed, kernel=args.kernel)
    if tok is None:
        raise UserError(f"{args.dir} has no tokenizer files: re-quantize it with this mixq version")
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise UserError(f"the tokenizer of {args.dir} has no chat template: drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise UserError("the prompt encodes to no tokens")
    limit = max_positions(model)
    if limit is not None and ids.shape[1] + args.max_new_tokens > limit:
        raise UserError(f"prompt ({ids.shape[1]} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the "
                        f"model's {limit} positions")
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    try:
        engine = resolve_engine(model, args.engine)
    except ValueError as e:
        raise UserError(str(e)) from e
    res = greedy_generate(model, ids, args.max_new_tokens, eos_token_id=eos, stop_at_eos=not args.no_stop,
                          engine=engine)
    print(tok.decode(res.new_ids, skip_special_tokens=True))
    speed = res.decode_tokens_per_s
    kernels = ", ".join(f"{k} x{n}" for k, n in sorted(kernel_usage(model).items())) if args.packed else "fake-quant"
    print(f"{len(res.new_ids)} new tokens after {res.prompt_tokens}: decode "
          f"{'-' if speed is None else f'{speed:.1f}'} tokens/s, prefill {res.prefill_s * 1000:.0f} ms "
          f"({dtype_name}, {'packed' if args.packed else 'fake-quant'}, kernels: {kernels}, "
          f"{torch.get_num_threads()} threads, engine {res.engine})", file=sys.stderr)
    return 0
