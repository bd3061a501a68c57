"""``mixq bench``: every method × budget on one model, under one protocol, resumable.

For each budget (bits per weight over the block linears, every stored bit counted):

* a **uniform** method (``rtn``, ``gptq``, ``awq``, ``awq+gptq``) quantizes every layer with the
  single candidate spec that the ``uniform`` solver picks within the budget from the measurement
  (the spec of least predicted error among those that fit — the baseline of bench/allocation.py);
* a **mixed** method (``mixq-rtn``, ``mixq-gptq``, ``mixq-awq``, …) quantizes with the exact
  (multiple-choice knapsack) plan from the same measurement.

One sensitivity measurement serves every budget and method; it is kept in ``DIR/measurement.json``
(and resumed from ``measurement.json.partial`` if interrupted).  Every finished row is written at
once, atomically, to ``DIR/rows/<method>_<budget>bpw.json``; a rerun with the same settings skips
the rows that exist, so an interrupted bench loses at most the row in progress.  Rows that failed
with an error are retried.  Changing a setting that affects the numbers (model, corpora, tokens,
calibration, metric, …) is refused unless ``--force`` starts over; adding budgets or methods is not.

Calibration (GPTQ, AWQ, the measurement) comes from :func:`mixq.calibset.build_calibration`
(``--calib``, default :data:`mixq.calibset.DEFAULT_CALIB`); ``bench.json`` keeps its record (sources,
rows per source, sha256), and a resumed run must rebuild the same ids.

Evaluation runs on several domains (:mod:`mixq.eval.domains`; ``--corpus A,B``, default
:data:`~mixq.eval.domains.DEFAULT_DOMAINS`: the calibration domain and text calibration never saw).
The first is the primary: its figures are the row's top-level ``perplexity``, ``kl``,
``top1_agreement``, ``ci``, ``per_window`` (and ``zeroshot``, scored once).  With more than one
domain a row also holds ``domains`` (corpus → ``perplexity``, ``nll``, ``kl``, ``top1_agreement``,
``n_scored``, ``ci``; the primary included) and ``kl_ratio`` (each other corpus → its KL / the
primary's KL).  Each domain has its own windows, reference cache and protocol: ``bench.json`` keeps
``protocol`` (the primary's) and ``protocols`` (corpus → protocol, all of them).  The settings key
records the domains actually evaluated (a default domain that is not installed is skipped with a
warning), so a directory evaluated on other domains is refused: a bench written before several
domains existed (``ptb`` only) resumes with ``--corpus ptb``.

Each row is evaluated once, window by window (:func:`mixq.eval.stats.evaluate_windows`):
perplexity, KL to the unquantized model (its log-probs cached in fp16) and top-1 agreement are the
token-weighted sums, with percentile bootstrap intervals over windows; the per-window sums are kept
in the row, so the report can run paired (same-window) comparisons of mixed vs uniform.

Layout of DIR::

    bench.json          settings, protocol, machine, mixq version and commit
    measurement.json    the sensitivity table (one for all budgets)
    rows/*.json         one per (method, budget) and rows/fp.json for the unquantized model
    results.json        everything above in one document
    results.md          tables and figures (figures/*.png)
    report.html         the same, self-contained (figures embedded)
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ..jsonio import read_json, write_json_atomic
from .report import finish
from .settings import (BENCH_VERSION, FP_ROW, OWN_FILES, ROWS, BenchConfig, BenchError, machine, method_info,
                       mixq_version, now, row_name)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- the run
class Bench:
    """One bench directory.  ``run()`` computes the missing rows and writes the results."""

    def __init__(self, cfg: BenchConfig, out: str | Path, *, force: bool = False, progress: bool = True,
                 command: str | None = None):
        cfg.check()
        self.cfg, self.out, self.force, self.progress = cfg, Path(out), force, progress
        self.command = command
        self.rows_dir = self.out / ROWS
        self.texts: dict[str, str] | None = None  # evaluation text by corpus (see load_inputs)

    def load_inputs(self) -> None:
        """Load the evaluation corpora and check ``--calib`` (no model yet: a bad input costs nothing).
        A default domain that cannot be had here is skipped with a warning."""
        from ..calibset import parse_sources
        from ..eval.domains import load_domains

        if self.texts is not None:
            return
        names, defaults = self.cfg.corpora()
        try:
            parse_sources(self.cfg.calib)
        except ValueError as e:
            raise BenchError(str(e)) from None
        self.texts = load_domains(names, self.cfg.split, defaults)

    def key(self) -> dict:
        """:meth:`BenchConfig.key` with the corpora actually evaluated here."""
        self.load_inputs()
        return {**self.cfg.key(), "corpus": ",".join(self.texts)}

    # -------------------------------------------------------------- directory state
    def prepare(self) -> None:
        """Check DIR against the settings before any heavy work; ``force`` clears mixq's files."""
        meta = self.out / "bench.json"
        if self.out.exists() and not self.out.is_dir():
            raise BenchError(f"--out {self.out} is a file: give a directory")
        key = self.key()
        if self.force:
            for name in OWN_FILES:
                p = self.out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        elif meta.exists():
            old = read_json(meta).get("key", {})
            # "bos" is newer than some benches: those are checked on the protocol's BOS once the model is loaded
            diff = {k: (old.get(k), v) for k, v in key.items()
                    if old.get(k, v if k == "bos" else None) != v}
            if diff:
                what = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in sorted(diff.items()))
                hint = ""
                if "corpus" in diff and old.get("corpus"):
                    hint = f" (it was evaluated on {old['corpus']}: --corpus {old['corpus']} resumes it)"
                raise BenchError(f"{self.out} holds a bench run with other settings ({what}){hint}: resume it with "
                                 "the same settings, choose another --out, or pass --force to start over")
        elif self.out.exists() and any(self.out.iterdir()):
            raise BenchError(f"--out {self.out} exists and is not a bench directory: choose another --out "
                             "(or pass --force to write into it)")
        self.rows_dir.mkdir(parents=True, exist_ok=True)

    def done_rows(self) -> dict[str, dict]:
        """Finished rows on disk (rows that ended in an error are not finished)."""
        out = {}
        for p in sorted(self.rows_dir.glob("*.json")):
            try:
                r = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                log.warning("ignoring the damaged row file %s (it is computed again)", p)
                continue
            if r.get("status") in ("ok", "infeasible"):
                out[p.stem] = r
        return out

    # -------------------------------------------------------------- setup
    def setup(self) -> None:
        from ..bos import resolve_bos
        from ..calibset import build_calibration, corpus_rows
        from ..eval.scorer import DomainScorer
        from ..eval.stats import overlap_warning
        from ..models import load_model, model_fingerprint

        c = self.cfg
        self.load_inputs()  # corpora and --calib first: a missing corpus costs nothing
        if c.zeroshot:
            from ..eval.suite import build_suite

            self.suite = build_suite(c.zeroshot_tasks, c.zeroshot, c.seed)
        self.model, self.tok = load_model(c.model)
        if self.tok is None:
            raise BenchError(f"{c.model} has no tokenizer")
        self.fingerprint = model_fingerprint(self.model)
        self.bos = resolve_bos(self.tok, self.model, c.bos)
        # one (windows, protocol, reference cache) per domain; the first is the primary
        scorer = DomainScorer(self.model, self.tok, texts=self.texts, split=c.split, tokens=c.tokens,
                              seqlen=c.seqlen, bos=self.bos, batch_size=c.batch_size,
                              tokenizer_name=getattr(self.tok, "name_or_path", "") or c.model)
        self.domains = {corpus: (win, proto, scorer.caches[corpus]) for corpus, win, proto in scorer.windows}
        self.windows, self.protocol, self.cache = next(iter(self.domains.values()))
        self.calibration = build_calibration(self.model, self.tok, c.calib, c.nsamples, c.calib_seqlen, c.seed,
                                             bos_id=self.bos.bos_id, progress=self.progress)
        self.calib = self.calibration.ids
        # the overlap check compares the corpus rows only (self-generated rows quote no corpus)
        rows = corpus_rows(self.calibration.record(), self.tok)
        warnings = []
        for corpus, (win, _, _) in self.domains.items():
            w = overlap_warning(rows, win) if rows is not None else None
            if w:
                warnings.append(w if len(self.domains) == 1 else f"{corpus}: {w}")
        self.overlap = "; ".join(warnings) or None
        if self.overlap:
            log.warning("%s", self.overlap)
        self.meta = self._write_meta()

    def _write_meta(self) -> dict:
        path = self.out / "bench.json"
        old = read_json(path) if path.exists() else {}
        if old.get("model_fingerprint") not in (None, self.fingerprint):
            raise BenchError(f"{self.out} was run on another model (fingerprint {old['model_fingerprint']}, now "
                             f"{self.fingerprint}): choose another --out or pass --force to start over")
        if (old.get("protocol") or {}).get("bos") not in (None, self.protocol.bos):
            raise BenchError(f"{self.out} was evaluated with BOS {old['protocol']['bos']}, now {self.protocol.bos} "
                             f"(--bos {self.cfg.bos}): pass the --bos of that run, or --force to start over")
        record = self.calibration.record()
        old_cal = old.get("calibration") or {}
        if old_cal.get("sha256") not in (None, record["sha256"]):
            raise BenchError(f"{self.out} was calibrated on other ids (sha256 {old_cal['sha256'][:12]}…, now "
                             f"{record['sha256'][:12]}…; self-generated text can differ on another machine or torch "
                             "version): resume it where it was run, choose another --out, or pass --force to start "
                             "over")
        if old_cal and "sha256" not in old_cal and self.bos.bos_id is not None:
            # written before the calibration record: its rows were drawn without BOS, these start with it
            raise BenchError(f"{self.out} was calibrated on rows without BOS, this run prepends it (--bos "
                             f"{self.cfg.bos}), so its rows would not match: choose another --out or pass --force "
                             "to start over")
        c = self.cfg
        meta = {
            "_type": "mixq-bench", "_version": BENCH_VERSION, "key": self.key(),
            "created": old.get("created", now()), "updated": now(),
            "model": c.model, "model_fingerprint": self.fingerprint,
            "protocol": self.protocol.to_dict(),
            "protocols": {corpus: proto.to_dict() for corpus, (_, proto, _) in self.domains.items()},
            "calibration": {**record, "grad_samples": c.grad_samples},
            "bootstrap": {"resamples": c.resamples, "confidence": c.confidence, "seed": c.seed,
                          "unit": "evaluation window", "interval": "percentile"},
            "zeroshot": ({"tasks": c.zeroshot_tasks, "n": c.zeroshot, "seed": c.seed} if c.zeroshot else None),
            "reference": "the unquantized model (log-probs cached in float16)",
            "overlap_warning": self.overlap,
            "machine": machine(), "mixq": mixq_version(),
            "command": self.command or old.get("command"),
            "methods": list(dict.fromkeys([*old.get("methods", []), *c.methods])),
            "budgets": sorted(set(old.get("budgets", [])) | set(c.budgets)),
        }
        write_json_atomic(path, meta, overwrite=True)
        return meta

    def measurement(self):
        from .. import pipeline as P
        from ..allocate import SensitivityTable

        path = self.out / "measurement.json"
        c = self.cfg
        if path.exists():
            table = SensitivityTable.load(path)
            if table.meta.get("model") not in (None, self.fingerprint):
                raise BenchError(f"{path} was measured on another model: pass --force to start over")
            log.info("reusing the measurement %s", path)
            return table
        return P.measure(self.model, self.calib, candidates=c.candidates, metric=c.metric, algorithm=c.algorithm,
                         grad_samples=c.grad_samples, block_samples=c.block_samples, out=path, progress=self.progress)

    # -------------------------------------------------------------- evaluation
    def evaluate(self, model) -> dict:
        """The primary domain's figures at the top level; with several domains, ``domains`` and ``kl_ratio``
        (module docstring)."""
        t0 = time.perf_counter()
        per = {corpus: self._evaluate_domain(model, win, cache) for corpus, (win, _, cache) in self.domains.items()}
        names = list(per)
        out = dict(per[names[0]])
        if len(names) > 1:
            out["domains"] = {n: {k: v for k, v in r.items() if k != "per_window"} for n, r in per.items()}
            k0 = out["kl"]
            out["kl_ratio"] = {n: (per[n]["kl"] / k0 if k0 else None) for n in names[1:]}
        out["eval_seconds"] = time.perf_counter() - t0
        if self.cfg.zeroshot:
            out["zeroshot"] = self.zeroshot(model)
        return out

    def _evaluate_domain(self, model, windows, cache) -> dict:
        from ..eval.stats import confidence_intervals, evaluate_windows

        c = self.cfg
        pw = evaluate_windows(model, windows, cache, batch_size=c.batch_size)
        n = int(pw["n_tokens"].sum())
        out = {"perplexity": math.exp(float(pw["nll_sum"].sum()) / n), "nll": float(pw["nll_sum"].sum()) / n,
               "kl": float(pw["kl_sum"].sum()) / n, "top1_agreement": float(pw["agree"].sum()) / n, "n_scored": n,
               "ci": None}
        if c.resamples:
            ci = confidence_intervals(pw, n_resamples=c.resamples, confidence=c.confidence, seed=c.seed)
            out["ci"] = {k: [v["low"], v["high"]] for k, v in ci.items() if v is not None}
        out["per_window"] = {k: np.asarray(v).tolist() for k, v in pw.items() if v is not None}
        return out

    def zeroshot(self, model) -> dict:
        from ..eval.suite import run_suite
        from ..eval.zeroshot import MixqLM

        lm = MixqLM(model, self.tok, batch_size=8, bos_id=self.bos.bos_id)
        res = run_suite(lm, self.suite, greedy=False, confidence=self.cfg.confidence)
        return {t: {"acc": r["acc"]["value"], "ci": r["acc"]["ci"], "acc_norm": r["acc_norm"]["value"],
                    "n": r["n"], "chance": r["chance"], "fingerprint": r["fingerprint"]} for t, r in res.items()}

    def _provenance(self) -> dict:
        return {"date": now(), "machine": self.meta["machine"], "mixq": self.meta["mixq"]}

    def fp_row(self) -> dict:
        r = {"method": "unquantized", "budget": None, "status": "ok", "bpw": 32.0 if self.protocol.dtype ==
             "float32" else 16.0, **self.evaluate(self.model), **self._provenance()}
        return r

    def row(self, table, method: str, budget: float) -> dict:
        from .. import pipeline as P
        from ..allocate import InfeasibleBudget

        algo, solver, uniform = method_info(method)
        base = {"method": method, "budget": budget, "algorithm": algo, "solver": solver, "uniform": uniform}
        t0 = time.perf_counter()
        try:
            plan = P.plan(table, bpw=budget, solver=solver)
        except InfeasibleBudget as e:
            return {**base, "status": "infeasible", "error": str(e).splitlines()[0], **self._provenance()}
        solve_ms = (time.perf_counter() - t0) * 1000
        model = copy.deepcopy(self.model)
        specs = dict(plan.layers)
        t0 = time.perf_counter()
        size = P.quantize(model, plan=plan, method=algo, calib=None if algo == "rtn" else self.calib,
                          progress=False).meta["size"]
        quant_s = time.perf_counter() - t0
        ev = self.evaluate(model)
        del model
        counts = Counter(s.name for s in specs.values())
        label = next(iter(counts)) if len(counts) == 1 else f"{len(counts)} specs"
        return {**base, "status": "ok", "bpw": plan.achieved_bpw, "specs": label, "spec_counts": dict(counts),
                "predicted": plan.predicted_error, "bytes_all": size["bytes_all"], "bpw_all": size["bpw_all"],
                "solve_ms": solve_ms, "quant_seconds": quant_s, **ev,
                "plan": {f: {"spec": r["spec"] if isinstance(r["spec"], str) else specs[f].name, "bpw": r["bpw"]}
                         for f, r in plan.per_layer.items()},
                **self._provenance()}

    # -------------------------------------------------------------- driver
    def run(self) -> dict:
        from tqdm.auto import tqdm

        self.prepare()
        self.setup()
        table = self.measurement()
        done = self.done_rows()
        if FP_ROW not in done:
            done[FP_ROW] = self.fp_row()
            write_json_atomic(self.rows_dir / f"{FP_ROW}.json", done[FP_ROW], overwrite=True)
        todo = [(m, b) for b in self.cfg.budgets for m in self.cfg.methods]
        bar = tqdm(total=len(todo), desc="bench rows", unit="row", disable=not self.progress)
        bar.update(sum(row_name(m, b) in done for m, b in todo))
        for m, b in todo:
            name = row_name(m, b)
            if name in done:
                continue
            bar.set_postfix_str(f"{m} @ {b:g} bpw")
            try:
                r = self.row(table, m, b)
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:  # noqa: BLE001 - recorded; a rerun retries the row
                if os.environ.get("MIXQ_DEBUG"):
                    raise
                log.warning("%s failed: %s", name, e)
                r = {"method": m, "budget": b, "status": "error", "error": f"{type(e).__name__}: {e}",
                     **self._provenance()}
            write_json_atomic(self.rows_dir / f"{name}.json", r, overwrite=True)
            done[name] = r
            bar.update(1)
        bar.close()
        return finish(self.out)
