"""Shared set-up of the bench scripts: the embedded model, PTB windows, reference cache, machine facts."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import mixq
from mixq import data
from mixq.bench.settings import machine as _machine
from mixq.eval import Protocol, ReferenceCache, evaluate

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    """CPU model, cores, accelerator, torch version and threads (the same line `mixq bench` writes)."""
    return _machine().rsplit(", python", 1)[0]


def git_rev() -> str:
    """HEAD's short hash; ``$MIXQ_COMMIT`` where the tree was copied without its .git (the device machine)."""
    if os.environ.get("MIXQ_COMMIT"):
        return os.environ["MIXQ_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "?"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Setup:
    """fp32 SmolLM2, PTB test windows (first ``tokens`` tokens, ``seqlen`` windows), reference cache."""

    def __init__(self, tokens: int = 32768, seqlen: int = 512, nsamples: int = 128):
        self.ref, self.tok = mixq.load_model("smollm2-135m")
        ids = data.tokenize(data.load_corpus("ptb", "test"), self.tok, progress=False)
        self.windows = data.eval_windows(ids, seqlen, max_tokens=tokens)
        self.protocol = Protocol.for_windows(self.windows, corpus="ptb", split="test", tokenizer="smollm2-135m",
                                             dtype="float32")
        self.cache = ReferenceCache(self.ref, self.windows, progress=False)
        self.seqlen, self.nsamples = seqlen, nsamples
        self._calib = None

    @property
    def calib(self) -> torch.Tensor:
        if self._calib is None:
            self._calib = mixq.build_calibration(self.ref, self.tok, "ptb", self.nsamples, self.seqlen, seed=0,
                                                 bos="never", progress=False).ids  # PTB train rows, no BOS
        return self._calib

    def evaluate(self, model) -> dict:
        return evaluate(model, self.windows, self.protocol, reference=self.cache, progress=False)


def header(title: str, command: str) -> list[str]:
    return [f"# {title}", "", f"- command: `{command}`", f"- machine: {machine()}",
            f"- commit: {git_rev()}, date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- python: {sys.version.split()[0]}", ""]


class RSSSampler:
    """Peak resident memory of this process while a ``with`` block runs (sampled every 20 ms)."""

    def __init__(self, period: float = 0.02):
        self.period, self.peak_mb, self.start_mb = period, 0.0, 0.0

    @staticmethod
    def current_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self):
        import threading

        self.start_mb = self.peak_mb = self.current_mb()
        self._stop = threading.Event()

        def run():
            while not self._stop.wait(self.period):
                self.peak_mb = max(self.peak_mb, self.current_mb())

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak_mb = max(self.peak_mb, self.current_mb())


def decode_speed_rows(spec_names, new_tokens: int, prompt_tokens: int, repeats: int, plans=None) -> list[dict]:
    """Greedy-decode tokens/s of SmolLM2 in fp32, bf16, and with every block linear in each spec (RTN, saved and
    loaded packed, bf16): one row each, median of ``repeats`` after a warm-up, with the kernels the packed layers
    run (``ip_speed.py``, ``vq_speed.py``).  ``plans``: ``{row name: {fqn: spec}}`` rows after the specs' (mixed
    plans; RTN as well: speed does not depend on how the codes were chosen)."""
    import copy
    import statistics
    import tempfile

    from mixq.runtime import greedy_generate, kernel_usage

    def speed(model) -> dict:
        greedy_generate(model, ids, new_tokens, stop_at_eos=False)
        runs = [greedy_generate(model, ids, new_tokens, stop_at_eos=False) for _ in range(repeats)]
        return {"decode_tok_s": statistics.median(r.decode_tokens_per_s for r in runs),
                "decode_tok_s_runs": [r.decode_tokens_per_s for r in runs]}

    ref, tok = mixq.load_model("smollm2-135m")
    ids = data.tokenize(data.load_corpus("ptb", "test"), tok, progress=False)[:prompt_tokens][None]
    rows = []
    for name, model in (("fp32", ref), ("bf16", copy.deepcopy(ref).to(torch.bfloat16))):
        rows.append({"row": name, **speed(model), "kernels": {}})
        print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as work:
        for name in [*spec_names, *(plans or {})]:
            model = copy.deepcopy(ref)
            res = mixq.quantize(model, dict(plans[name]) if name in (plans or {}) else name, progress=False)
            # the bare codes and this meta: the directory these rows were measured with (not res.meta's)
            d = mixq.save_quantized(Path(work) / f"row{len(rows)}", model, tok, res.qtensors, {"method": "rtn"},
                                    base_model="smollm2-135m")
            packed, _, _ = mixq.load_quantized(d, packed=True, dtype=torch.bfloat16)
            rows.append({"row": name, "bpw": res.meta["size"]["bpw_quantized"], **speed(packed),
                         "kernels": kernel_usage(packed)})
            print(rows[-1], flush=True)
            del model, packed
    return rows


def domain_scorer(ref, tok, model_name: str, tokens: int, seqlen: int = 512, corpora=("ptb", "fortunes")):
    """A :class:`mixq.eval.scorer.DomainScorer`: the first ``tokens`` tokens of each corpus's test split in
    ``seqlen``-token windows, BOS as the model's tokenizer wants it (``.bos``), the reference's log-probs made once
    (what :func:`score_row` scores against)."""
    from mixq.eval.scorer import DomainScorer

    return DomainScorer(ref, tok, corpus=list(corpora), tokens=tokens, seqlen=seqlen, tokenizer_name=model_name)


def score_row(row: dict, model, scorer, doc: dict, path, label: str) -> None:
    """Score ``model`` on every domain of ``scorer`` (:func:`domain_scorer`) into ``row`` (KL, perplexity, top-1
    agreement), append it to ``doc["rows"]``, write ``doc`` to ``path`` atomically (a run resumes from it) and print
    one line named ``label``."""
    from mixq.jsonio import write_json_atomic

    row.update(scorer.metrics(model))
    doc["rows"].append(row)
    write_json_atomic(path, doc, overwrite=True)
    secs = f"  ({row['seconds']:.0f} s)" if "seconds" in row else ""
    print(f"{label:<28} bpw {row['bpw']:.3f}  KL ptb {row['ptb']['kl']:.4f}  fortunes {row['fortunes']['kl']:.4f}{secs}",
          flush=True)


def relative_kl_table(rows: list[dict], column: str, label, base: dict, base_name: str) -> list[str]:
    """Markdown lines of a two-domain table: per row its ``label(row)`` in ``column``, KL on PTB and fortunes, each
    relative to ``base``'s, and the K-FAC loss (``row["kfac_loss"]``) relative to ``base``'s."""
    lines = [f"| {column} | KL PTB | KL fortunes | vs {base_name} PTB | vs {base_name} fortunes | "
             f"K-FAC loss vs {base_name} |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {label(r)} | {r['ptb']['kl']:.4f} | {r['fortunes']['kl']:.4f} | "
                     f"{r['ptb']['kl'] / base['ptb']['kl']:.3f} | {r['fortunes']['kl'] / base['fortunes']['kl']:.3f} | "
                     f"{r['kfac_loss'] / base['kfac_loss']:.3f} |")
    return lines


def metrics_with(model, modules: dict, weights: dict, scorer) -> dict:
    """``scorer.metrics(model)`` with ``weights[name]`` copied into ``modules[name].weight`` for the call, the
    original weights put back afterwards."""
    orig = {n: m.weight.detach().clone() for n, m in modules.items()}
    try:
        with torch.no_grad():
            for n, m in modules.items():
                m.weight.copy_(weights[n])
        return scorer.metrics(model)
    finally:
        with torch.no_grad():
            for n, m in modules.items():
                m.weight.copy_(orig[n])
