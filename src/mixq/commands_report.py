"""Subcommands that report on results: ``mixq inspect`` (a plan's allocation) and ``mixq zeroshot``
(offline zero-shot accuracy)."""
from __future__ import annotations

import logging
from pathlib import Path

from .bos import add_bos_argument
from .cli import DEFAULT_MODEL, UserError, write_json_atomic

log = logging.getLogger(__name__)

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

    z = sub.add_parser("zeroshot", help="offline zero-shot accuracy (PTB last word, next sentence) with 95%% CIs",
                       description="Score TARGET on the offline zero-shot suite built from the PTB test sentences: "
                                   "'lastword' (pick the last word of a sentence among 5) and 'choice' (pick the next "
                                   "sentence among 4).  Items are identical across runs for a given --n and --seed.")
    z.add_argument("target", nargs="?", default=DEFAULT_MODEL, help="mixq directory, hub id, local path or embedded name")
    z.add_argument("--task", default="lastword,choice", help="comma-separated tasks: lastword, choice (default both)")
    z.add_argument("--n", type=int, default=200, help="items per task (default 200)")
    z.add_argument("--seed", type=int, default=0, help="seed of the item sampler (default 0)")
    z.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    z.add_argument("--no-greedy", action="store_true", help="skip the greedy-generation metric of lastword")
    add_bos_argument(z)
    z.add_argument("--out", default=None, help="write the results JSON here")
    z.add_argument("--force", action="store_true", help="replace --out if it exists")
    z.set_defaults(func=cmd_zeroshot)


def _check_out(out: str | None, force: bool, suffixes: tuple[str, ...] | None = None) -> None:
    if not out:
        return
    p = Path(out)
    if p.is_dir():
        raise UserError(f"--out {out} is a directory: give a file name")
    if suffixes and p.suffix.lower() not in suffixes:
        raise UserError(f"--out {out}: the figure's file name must end in {', '.join(suffixes)}")
    if p.exists() and not force:
        raise FileExistsError(f"{out} already exists: choose another --out or pass --force")


# ---------------------------------------------------------------------------- inspect
def cmd_inspect(args) -> int:
    _check_out(args.out, args.force, FIGURE_SUFFIXES)
    from .report.inspect import inspect_allocation

    text, figure = inspect_allocation(args.source, args.out, title=args.title)
    print(text)
    if figure is not None:
        print(f"wrote {figure}")
    return 0


# ---------------------------------------------------------------------------- zeroshot
def cmd_zeroshot(args) -> int:
    from .eval.suite import build_suite, parse_tasks

    _check_out(args.out, args.force)
    for name in ("n", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    tasks = parse_tasks(args.task)
    suite = build_suite(tasks, args.n, args.seed)  # before loading the model: a bad --n costs nothing
    from .bos import resolve_bos
    from .commands import load_target
    from .eval.suite import run_suite, suite_info
    from .eval.zeroshot import MixqLM

    model, tok, info = load_target(args.target)
    if tok is None:
        raise UserError(f"{args.target} has no tokenizer files: re-quantize it with this mixq version")
    bos = resolve_bos(tok, model, args.bos)
    lm = MixqLM(model, tok, batch_size=args.batch_size, progress=True, bos_id=bos.bos_id)
    results = run_suite(lm, suite, greedy=not args.no_greedy)
    doc = {"target": args.target, "spec": (info or {}).get("spec"), "base_model": (info or {}).get("base_model"),
           "suite": suite_info(args.n, args.seed), "bos": bos.to_dict(),
           "tasks": results}
    for task, r in results.items():
        line = f"{task:<9} acc {_acc(r['acc'])}"
        if task == "choice":
            line += f"   acc_norm {_acc(r['acc_norm'])}"
        if r.get("greedy_acc"):
            line += f"   greedy {_acc(r['greedy_acc'])}"
        print(f"{line}   (n={r['n']}, chance {r['chance']:.2f}, items {r['fingerprint']}, {r['seconds']:.1f} s)")
    if args.out:
        write_json_atomic(args.out, doc, overwrite=True)
        print(f"wrote {args.out}")
    return 0


def _acc(a: dict) -> str:
    return f"{a['value']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}]"
