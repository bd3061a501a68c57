"""Shared set-up of the bench scripts: the embedded model, PTB windows, reference cache, machine facts."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from mixq import data
from mixq.bench.settings import machine as _machine
from mixq.eval import Protocol, ReferenceCache, evaluate
from mixq.models import load_model

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    """CPU model, cores, accelerator, torch version and threads (the same line `mixq bench` writes)."""
    return _machine().rsplit(", python", 1)[0]


def git_rev() -> str:
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
        self.ref, self.tok = load_model("smollm2-135m")
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
            train = data.tokenize(data.load_corpus("ptb", "train"), self.tok, progress=False)
            self._calib = data.calibration_batch(train, self.nsamples, self.seqlen, seed=0)
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
