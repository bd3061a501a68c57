"""``mixq specs``: the named spec presets and their exact bits per weight."""
from __future__ import annotations

import math

from ..config import PRESETS, parse_spec
from ..config.registry import families, owner
from ..export.registry import EXPORTERS
from .common import UserError


def register(sub) -> None:
    s = sub.add_parser("specs", help="list the named spec presets and their exact bits per weight",
                       description="Without SPEC: the presets and the registered element formats.  With SPEC (any "
                                   "name the grammar takes, composites included): its exact bits, the tensors a "
                                   "weight of --shape stores under it, and how each export target maps it.")
    s.add_argument("spec", nargs="?", help="one spec to explain, e.g. W3-g64+o0.5 or TCQ3-channel+ip")
    s.add_argument("--shape", default="576x1536", help="tensor shape OUTxIN for the bpw column (default 576x1536)")
    s.set_defaults(func=cmd_specs)


def cmd_specs(args) -> int:
    try:
        rows, cols = (int(x) for x in args.shape.lower().split("x"))
    except ValueError:
        raise UserError(f"--shape {args.shape!r} is not OUTxIN, e.g. 576x1536") from None
    if args.spec:
        return _explain(parse_spec(args.spec), (rows, cols))
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


def _explain(spec, shape: tuple[int, int]) -> int:
    """One spec: its canonical name, exact cost, stored tensors for ``shape`` and export mappings."""
    import torch

    from ..algorithms.composite.hooks import stored_tensors

    cost = spec.cost(shape)
    print(f"{spec.name}: {cost.bpw:.4f} bpw for a {shape[0]}x{shape[1]} tensor ({cost.total} bits: "
          + ", ".join(f"{k} {v}" for k, v in cost.to_dict().items() if k in ("codes", "scales", "zeros", "codebook",
                                                                              "extra") and v) + ")")
    print("stores:")
    for name, (dtype, dims) in stored_tensors(spec, shape).items():
        bits = torch.tensor([], dtype=dtype).element_size() * 8
        print(f"  {name:<24}{str(dtype).removeprefix('torch.'):<10}{'x'.join(map(str, dims)) or 'scalar':<16}"
              f"{bits * math.prod(dims):>12} bits")
    for target in (t for t in EXPORTERS if t != "native"):
        ex = spec.export_to(target)
        print(f"export {target}: {ex.kind}" + (f" ({ex.note})" if ex.note else ""))
    return 0
