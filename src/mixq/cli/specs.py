"""``mixq specs``: the named spec presets and their exact bits per weight."""
from __future__ import annotations

from ..config import PRESETS, parse_spec
from ..config.registry import families, owner
from ..export.registry import EXPORTERS
from .common import UserError


def register(sub) -> None:
    s = sub.add_parser("specs", help="list the named spec presets and their exact bits per weight")
    s.add_argument("--shape", default="576x1536", help="tensor shape OUTxIN for the bpw column (default 576x1536)")
    s.set_defaults(func=cmd_specs)


def cmd_specs(args) -> int:
    try:
        rows, cols = (int(x) for x in args.shape.lower().split("x"))
    except ValueError:
        raise UserError(f"--shape {args.shape!r} is not OUTxIN, e.g. 576x1536") from None
    print(f"{'preset':<14}{'bpw':>8}  description   (bpw for a {rows}x{cols} tensor, metadata included)")
    for name, desc in PRESETS.items():
        try:
            bpw = f"{parse_spec(name).bpw((rows, cols)):.4f}"
        except ValueError:
            bpw = "n/a"
        print(f"{name:<14}{bpw:>8}  {desc}")
    targets = [t for t in EXPORTERS if t != "native"]  # native stores every format exactly
    print("\nelement formats (mixq.config.registry): family, head, kernels (of its element dtype), "
          f"export to {' / '.join(targets)}")
    for fam in sorted(families(), key=lambda f: not f.dtypes):
        for head in fam.heads:
            probe = parse_spec(head.split("[")[0].replace("<bits>", "4"))  # W<bits> -> W4, FP8[-e5m2] -> FP8
            ex = " / ".join(probe.export_to(t).kind for t in targets)
            print(f"  {fam.family:<14}{head:<18}{', '.join(owner(probe.dtype).kernels):<28}{ex}")
    return 0
