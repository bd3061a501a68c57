"""``mixq bench``: the survey's comparison — uniform baselines vs mixed-precision plans at several
budgets — on one model, with one measurement, resumable, written as JSON, Markdown and one HTML file."""
from __future__ import annotations

import shlex

from ..allocate import load_candidates
from ..bench.html import fmt
from ..bench.report import domain_rows, finish
from ..bench.runner import Bench
from ..bench.settings import (ALGORITHMS, DEFAULT_METHODS, MIXED_PREFIX, BenchConfig, BenchError, parse_budgets,
                              parse_methods)
from ..eval.suite import TASKS, parse_tasks
from ..measure.metrics import BLOCK_METRICS
from ..models import DEFAULT_MODEL
from .common import UserError, calib_args, eval_args, measure_args


def register(sub) -> None:
    uniform, mixed = ", ".join(ALGORITHMS), ", ".join(MIXED_PREFIX + a for a in ALGORITHMS)
    b = sub.add_parser(
        "bench", help="uniform vs mixed precision at several budgets: tables, Pareto curves, one HTML report",
        description=f"For each method × budget: uniform methods ({uniform}) use the best single spec "
                    f"within the budget, {MIXED_PREFIX}<algorithm> the exact mixed plan; one measurement serves all "
                    "budgets. Each row is evaluated on every --corpus (perplexity, KL to the unquantized model, top-1, "
                    "bootstrap intervals; KL side by side with its ratio to the primary corpus) and saved as it "
                    "finishes: rerun the same command to resume. Writes DIR/results.json, "
                    "DIR/results.md and DIR/report.html.")
    b.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"hub id, local path or embedded name "
                                                                     f"(default {DEFAULT_MODEL})")
    b.add_argument("--bpw", default="2.5,3,3.5,4", help="budgets in bits per weight (default 2.5,3,3.5,4)")
    b.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated: {uniform} (uniform) and {mixed} (mixed) (default {DEFAULT_METHODS})")
    eval_args(b, tokens=4096, stride=False)
    calib_args(b, nsamples=32, seqlen="--calib-seqlen", bos=False,
               seed="seed of the calibration sampler, bootstrap and zero-shot items")
    measure_args(b, algorithm="rtn")
    b.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    b.add_argument("--zeroshot", type=int, default=0, metavar="N",
                   help="also score the offline zero-shot suite with N items per task (default 0: skip)")
    tasks = ",".join(TASKS)
    b.add_argument("--zeroshot-tasks", default=tasks, help=f"zero-shot tasks (default {tasks})")
    b.add_argument("--batch-size", type=int, default=1, help="evaluation windows per forward pass")
    b.add_argument("--out", required=True, help="results directory (resumed if it holds this bench)")
    b.add_argument("--force", action="store_true", help="discard the results in --out and start over")
    b.add_argument("--report-only", action="store_true",
                   help="rewrite results.json/md and report.html from the rows in --out, compute nothing")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    try:
        if args.report_only:
            doc = finish(args.out)
            _summary(doc, args.out)
            return 0
        cfg = BenchConfig(model=args.model, budgets=parse_budgets(args.bpw), methods=parse_methods(args.methods),
                          corpus=args.corpus, split=args.split, tokens=args.tokens, seqlen=args.seqlen,
                          calib=args.calib, nsamples=args.nsamples, calib_seqlen=args.calib_seqlen, seed=args.seed,
                          metric=args.metric, algorithm=args.algorithm, candidates=args.candidates,
                          grad_samples=args.grad_samples, block_samples=args.block_samples,
                          resamples=args.resamples, zeroshot=args.zeroshot, zeroshot_tasks=args.zeroshot_tasks,
                          batch_size=args.batch_size, bos=args.bos)
        if cfg.zeroshot:
            parse_tasks(cfg.zeroshot_tasks)
        if cfg.candidates != "default":
            load_candidates(cfg.candidates)
        bench = Bench(cfg, args.out, force=args.force, progress=not args.no_progress, command=_command(cfg, args.out))
        doc = bench.run()
    except BenchError as e:
        raise UserError(str(e)) from None
    _summary(doc, args.out)
    return 0


def _command(cfg, out) -> str:
    """The command that reproduces this bench, every setting spelled out."""
    c = cfg
    parts = ["mixq", "bench", c.model, "--bpw", ",".join(f"{b:g}" for b in c.budgets), "--methods", ",".join(c.methods),
             *(["--corpus", c.corpus] if c.corpus is not None else []), "--split", c.split, "--tokens", c.tokens,
             "--seqlen", c.seqlen, "--calib", c.calib,
             "--nsamples", c.nsamples, "--calib-seqlen", c.calib_seqlen, "--seed", c.seed, "--metric", c.metric,
             "--algorithm", c.algorithm, "--candidates", c.candidates, "--grad-samples", c.grad_samples,
             "--resamples", c.resamples]
    if c.metric in BLOCK_METRICS:
        parts += ["--block-samples", c.block_samples]
    if c.zeroshot:
        parts += ["--zeroshot", c.zeroshot, "--zeroshot-tasks", c.zeroshot_tasks]
    parts += ["--bos", c.bos]
    return " ".join(shlex.quote(str(x)) for x in [*parts, "--out", out])


def _summary(doc: dict, out) -> None:
    print(f"{'method':<14}{'budget':>7}{'bpw':>8}  {'perplexity':>11}  {'KL':>9}  {'top-1':>6}  spec(s)")
    fp = doc.get("unquantized")
    if fp:
        print(f"{'unquantized':<14}{'':>7}{'':>8}  {fmt(fp['perplexity']):>11}  {fmt(fp['kl']):>9}  "
              f"{fmt(fp['top1_agreement']):>6}")
    for r in doc["rows"]:
        if r.get("status") != "ok":
            print(f"{r['method']:<14}{r['budget']:>7g}  {r['status']}: {r.get('error', '')}")
            continue
        print(f"{r['method']:<14}{r['budget']:>7g}{r['bpw']:>8.3f}  {fmt(r['perplexity']):>11}  {fmt(r['kl']):>9}  "
              f"{fmt(r['top1_agreement']):>6}  {r['specs']}")
    names, drows = domain_rows(doc)
    if drows:
        print(f"KL on each corpus (the figures above: {names[0]}; ratio = KL / KL on {names[0]}):")
        for x in drows:
            kl = "  ".join(f"{n} {fmt(x['kl'][n])}" for n in names)
            ratio = "  ".join(f"×{fmt(x['kl_ratio'][n], 3)}" for n in names[1:])
            print(f"{x['method']:<14}{x['budget']:>7g}  {kl}  {ratio}")
    if doc.get("overlap_warning"):
        print(f"warning: {doc['overlap_warning']}")
    print(f"wrote {out}/results.json, {out}/results.md, {out}/report.html")
