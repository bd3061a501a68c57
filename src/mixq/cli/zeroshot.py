"""``mixq zeroshot``: offline zero-shot accuracy (PTB last word, next sentence) with 95% intervals
(:mod:`mixq.eval.suite`)."""
from __future__ import annotations

from ..bos import add_bos_argument, resolve_bos
from ..eval.suite import TASKS, build_suite, parse_tasks, run_suite, suite_info
from ..eval.zeroshot import MixqLM
from ..jsonio import write_json_atomic
from ..models import DEFAULT_MODEL
from ..targets import load_target
from .common import UserError, check_out_file, check_positive


def register(sub) -> None:
    z = sub.add_parser("zeroshot", help="offline zero-shot accuracy (PTB last word, next sentence) with 95%% CIs",
                       description="Score TARGET on the offline zero-shot suite built from the PTB test sentences: "
                                   "'lastword' (pick the last word of a sentence among 5) and 'choice' (pick the next "
                                   "sentence among 4).  Items are identical across runs for a given --n and --seed.")
    z.add_argument("target", nargs="?", default=DEFAULT_MODEL, help="mixq directory, hub id, local directory or .gguf file, or embedded name")
    z.add_argument("--task", default=",".join(TASKS), help=f"comma-separated tasks: {', '.join(TASKS)} (default all)")
    z.add_argument("--n", type=int, default=200, help="items per task (default 200)")
    z.add_argument("--seed", type=int, default=0, help="seed of the item sampler (default 0)")
    z.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    z.add_argument("--no-greedy", action="store_true", help="skip the greedy-generation metric of lastword")
    add_bos_argument(z)
    z.add_argument("--out", default=None, help="write the results JSON here")
    z.add_argument("--force", action="store_true", help="replace --out if it exists")
    z.set_defaults(func=cmd_zeroshot)


def cmd_zeroshot(args) -> int:
    check_out_file(args.out, args.force, example="zeroshot.json")
    check_positive(n=args.n, batch_size=args.batch_size)
    tasks = parse_tasks(args.task)
    suite = build_suite(tasks, args.n, args.seed)  # before loading the model: a bad --n costs nothing
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
