"""``mixq demo``: the main job on the embedded model — quantize, evaluate, print a table (:mod:`mixq.demo`)."""
from __future__ import annotations

from ..bos import add_bos_argument


def register(sub) -> None:
    d = sub.add_parser("demo", help="the main job on the embedded model: quantize, evaluate, print a table")
    d.add_argument("--tokens", type=int, default=4096, help="PTB test tokens to score (default 4096)")
    d.add_argument("--bpw", type=float, default=3.5, help="budget in bits per weight (default 3.5)")
    d.add_argument("--out", default=None, help="also write the table's data as JSON here")
    add_bos_argument(d)
    d.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from ..demo import run_demo

    run_demo(tokens=args.tokens, bpw=args.bpw, out=args.out, bos=args.bos)
    return 0
