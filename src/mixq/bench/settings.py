"""The settings of a ``mixq bench`` run (:mod:`.runner`): method and budget parsing, :class:`BenchConfig`,
the directory's file names, provenance (machine, mixq version).  The runner and the report (:mod:`.report`)
both read these; neither is imported here."""
from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..api import METHODS
from ..calibset import DEFAULT_CALIB
from ..recipe import DEFAULT_RECIPE


BENCH_VERSION = 1
ALGORITHMS = METHODS  # the quantization algorithms of mixq.api, each a uniform method and a mixq-<algorithm> one
MIXED_PREFIX = "mixq-"
DEFAULT_METHODS = "rtn,gptq,awq,mixq-rtn,mixq-gptq"
ROWS = "rows"
FP_ROW = "fp"
OWN_FILES = ("bench.json", "measurement.json", "measurement.json.partial", "results.json", "results.md",
             "report.html", ROWS, "figures")


class BenchError(ValueError):
    """Bad settings or a results directory that does not match them (a user error)."""


# ---------------------------------------------------------------------------- settings
def parse_methods(text: str) -> list[str]:
    """``"rtn,mixq-gptq"`` → ``["rtn", "mixq-gptq"]``, each checked (see :func:`method_info`)."""
    out = [m.strip() for m in text.split(",") if m.strip()]
    if not out:
        raise BenchError("--methods is empty")
    for m in out:
        method_info(m)
    return list(dict.fromkeys(out))


def method_info(name: str) -> tuple[str, str, bool]:
    """``(algorithm, solver, uniform)`` of a bench method name."""
    mixed = name.startswith(MIXED_PREFIX)
    algo = name[len(MIXED_PREFIX):] if mixed else name
    if algo not in ALGORITHMS:
        choices = ", ".join([*ALGORITHMS, *(MIXED_PREFIX + a for a in ALGORITHMS)])
        raise BenchError(f"unknown method {name!r}: choose from {choices}")
    return algo, ("exact" if mixed else "uniform"), not mixed


def parse_budgets(text: str) -> list[float]:
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        if not tok:
            continue
        try:
            b = float(tok)
        except ValueError:
            raise BenchError(f"bad budget {tok!r}: give bits per weight such as 2.5,3,3.5,4") from None
        if not 0 < b < math.inf:
            raise BenchError(f"bad budget {tok!r}: must be a positive number of bits per weight")
        out.append(b)
    if not out:
        raise BenchError("--bpw is empty")
    return sorted(dict.fromkeys(out))


@dataclass
class BenchConfig:
    """What a bench measures.  ``budgets`` and ``methods`` may grow between runs of one DIR; the
    rest (:meth:`key`) fixes the numbers and must not change."""

    model: str
    budgets: list[float]
    methods: list[str]
    corpus: str | None = None  # comma-separated evaluation corpora, the first primary; None: DEFAULT_DOMAINS
    split: str = "test"
    tokens: int = 4096
    seqlen: int = 512
    calib: str = DEFAULT_CALIB
    nsamples: int = 32
    calib_seqlen: int = 512
    seed: int = 0
    metric: str = DEFAULT_RECIPE["metric"]
    algorithm: str = "rtn"
    candidates: str = "default"
    grad_samples: int = 16
    block_samples: int = 4
    resamples: int = 1000
    confidence: float = 0.95
    zeroshot: int = 0
    zeroshot_tasks: str = "lastword,choice"
    batch_size: int = 1
    bos: str = "auto"
    extra: dict = field(default_factory=dict)

    def corpora(self) -> tuple[list[str], bool]:
        """The evaluation corpora asked for and whether they are the defaults (:func:`parse_corpora`)."""
        from ..eval.domains import parse_corpora

        try:
            return parse_corpora(self.corpus)
        except ValueError as e:
            raise BenchError(str(e)) from None

    def key(self) -> dict:
        """The settings that fix the numbers (``corpus``: the corpora asked for, joined by ',')."""
        d = asdict(self)
        for k in ("budgets", "methods", "batch_size", "extra"):
            d.pop(k)
        d["corpus"] = ",".join(self.corpora()[0])
        return d

    def check(self) -> None:
        for name in ("tokens", "seqlen", "nsamples", "calib_seqlen", "grad_samples", "block_samples", "batch_size"):
            if getattr(self, name) <= 0:
                raise BenchError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.resamples < 0 or self.zeroshot < 0:
            raise BenchError("--resamples and --zeroshot must be >= 0")
        if not 0 < self.confidence < 1:
            raise BenchError(f"--confidence must be in (0, 1), got {self.confidence}")
        parse_methods(",".join(self.methods))
        names = self.corpora()[0]
        if len(set(names)) != len(names):
            raise BenchError(f"--corpus {self.corpus!r} names a corpus twice")


def row_name(method: str, budget: float) -> str:
    return f"{method}_{budget:g}bpw"


# ---------------------------------------------------------------------------- provenance
def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    acc = ""
    if torch.cuda.is_available():
        acc = f", {torch.cuda.get_device_name(0)}"
    return (f"{cpu}, {os.cpu_count()} cores{acc}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"python {sys.version.split()[0]}")


def mixq_version() -> dict:
    """mixq's version and, when it runs from a git checkout, the commit (``+dirty`` if modified)."""
    from .. import __version__

    here = Path(__file__).resolve().parent
    commit = None
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                           timeout=10)
        if r.returncode == 0:
            commit = r.stdout.strip()
            d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
            if d.returncode == 0 and d.stdout.strip():
                commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": __version__, "commit": commit}


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
