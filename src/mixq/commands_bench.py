"""``mixq bench``: the survey's comparison — uniform baselines vs mixed-precision plans at several
budgets — on one model, with one measurement, resumable, written as JSON, Markdown and one HTML file."""
from __future__ import annotations

import shlex

from .bos import add_bos_argument
from .cli import DEFAULT_MODEL, UserError


def register(sub) -> None:
    from .bench.settings import DEFAULT_METHODS
    from .calibset import DEFAULT_CALIB
    from .data import CORPORA
    from .eval.domains import DEFAULT_DOMAINS

    domains = ",".join(DEFAULT_DOMAINS)

    b = sub.add_parser(
        "bench", help="uniform vs mixed precision at several budgets: tables, Pareto curves, one HTML report",
        description="For each method × budget: uniform methods (rtn, gptq, awq, awq+gptq) use the best single spec "
                    "within the budget, mixq-<algorithm> the exact mixed plan; one measurement serves all budgets. "
                    "Each row is evaluated on every --corpus (perplexity, KL to the unquantized model, top-1, bootstrap "
                    "intervals; KL side by side with its ratio to the primary corpus) and saved as it finishes: rerun "
                    "the same command to resume. Writes DIR/results.json, "
                    "DIR/results.md and DIR/report.html.")
    b.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"hub id, local path or embedded name "
                                                                     f"(default {DEFAULT_MODEL})")
    b.add_argument("--bpw", default="2.5,3,3.5,4", help="budgets in bits per weight (default 2.5,3,3.5,4)")
    b.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated: rtn, gptq, awq, awq+gptq (uniform) and mixq-rtn, mixq-gptq, mixq-awq, "
                        f"mixq-awq+gptq (mixed) (default {DEFAULT_METHODS})")
    b.add_argument("--corpus", default=None,
                   help=f"evaluation corpora joined by ',', each {', '.join(CORPORA)} or a .txt/.jsonl path; the first "
                        f"is the primary (the tables and curves), KL on every one is shown side by side (default "
                        f"{domains}: the calibration domain and text calibration never saw; a default one that is "
                        f"not installed is skipped with a warning)")
    b.add_argument("--split", default="test", help="evaluation split (default test)")
    b.add_argument("--tokens", type=int, default=4096, help="score the first N tokens (default 4096)")
    b.add_argument("--seqlen", type=int, default=512, help="evaluation window length (default 512)")
    b.add_argument("--calib", default=DEFAULT_CALIB,
                   help=f"calibration text: self (written by the model itself), {', '.join(CORPORA)} (train split), a "
                        f".txt/.jsonl path, or a mixture joined by '+' (default {DEFAULT_CALIB}; see mixq.calibset)")
    b.add_argument("--nsamples", type=int, default=32, help="calibration samples (default 32)")
    b.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration sample (default 512)")
    b.add_argument("--seed", type=int, default=0, help="seed of the calibration sampler, bootstrap and zero-shot items")
    b.add_argument("--metric", default="kfac", choices=["kfac", "hessian", "fisher", "block", "block-rel"],
                   help="sensitivity metric of the one measurement (default kfac)")
    b.add_argument("--algorithm", default="rtn", choices=["rtn", "gptq", "gptq-exact"],
                   help="algorithm whose errors are measured (default rtn)")
    b.add_argument("--candidates", default="default", help="'default' or a file listing spec names")
    b.add_argument("--grad-samples", type=int, default=16, help="calibration samples for the gradient statistics")
    b.add_argument("--block-samples", type=int, default=4, help="rows per candidate for the block metrics")
    b.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    b.add_argument("--zeroshot", type=int, default=0, metavar="N",
                   help="also score the offline zero-shot suite with N items per task (default 0: skip)")
    b.add_argument("--zeroshot-tasks", default="lastword,choice", help="zero-shot tasks (default lastword,choice)")
    b.add_argument("--batch-size", type=int, default=1, help="evaluation windows per forward pass")
    add_bos_argument(b)
    b.add_argument("--out", required=True, help="results directory (resumed if it holds this bench)")
    b.add_argument("--force", action="store_true", help="discard the results in --out and start over")
    b.add_argument("--report-only", action="store_true",
                   help="rewrite results.json/md and report.html from the rows in --out, compute nothing")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from .bench.report import finish
    from .bench.runner import Bench
    from .bench.settings import BenchConfig, BenchError, parse_budgets, parse_methods

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
            from .eval.suite import parse_tasks

            parse_tasks(cfg.zeroshot_tasks)
        if cfg.candidates != "default":
            from .allocate import load_candidates

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
    if c.metric in ("block", "block-rel"):
        parts += ["--block-samples", c.block_samples]
    if c.zeroshot:
        parts += ["--zeroshot", c.zeroshot, "--zeroshot-tasks", c.zeroshot_tasks]
    parts += ["--bos", c.bos]
    return " ".join(shlex.quote(str(x)) for x in [*parts, "--out", out])


def _summary(doc: dict, out) -> None:
    from .bench.html import fmt
    from .bench.report import domain_rows

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
