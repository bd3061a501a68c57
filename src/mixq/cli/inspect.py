"""``mixq inspect``: a plan's per-layer allocation (spec, bits per weight, predicted error) and its heatmap."""
from __future__ import annotations

from .common import check_out_file

FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def register(sub) -> None:
    i = sub.add_parser("inspect", help="print a plan's per-layer allocation and draw it as a heatmap",
                       description="Print the spec, bits per weight and predicted error of every layer of a plan "
                                   "JSON or a mixq directory, with totals; --out draws the allocation heatmap.")
    i.add_argument("source", metavar="PLAN|DIR", help="a plan JSON from `mixq plan`, or a mixq directory")
    i.add_argument("--out", default=None, help="write the heatmap here (.png, .pdf or .svg)")
    i.add_argument("--title", default=None, help="figure title (default: bpw and budget)")
    i.add_argument("--force", action="store_true", help="replace --out if it exists")
    i.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    check_out_file(args.out, args.force, suffixes=FIGURE_SUFFIXES, example="allocation.png")
    from ..report.inspect import inspect_allocation

    text, figure = inspect_allocation(args.source, args.out, title=args.title)
    print(text)
    if figure is not None:
        print(f"wrote {figure}")
    return 0
