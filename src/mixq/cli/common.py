"""What the subcommands share: :class:`UserError`, argument groups (model, calibration,
evaluation windows, measurement, budgets and constraints), their parsers, and small checks.

Choices come from the registries of the stages they feed — :data:`mixq.measure.METRICS` and
:data:`~mixq.measure.ALGORITHMS`, :data:`mixq.allocate.METHODS` (solvers), :data:`mixq.data.CORPORA`,
:data:`mixq.bos.BOS_CHOICES` (through :func:`~mixq.bos.add_bos_argument`), the runtime targets of
:data:`mixq.export.ggml_exact.TARGETS` — so a new one appears in every command that takes it.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from ..allocate import METHODS as SOLVERS
from ..allocate import parse_bytes
from ..allocate.candidates import NAMED_SETS
from ..allocate.constraints import FAST_DEVICES
from ..bos import add_bos_argument
from ..calibset import DEFAULT_CALIB, SELF
from ..data import CORPORA
from ..eval.domains import DEFAULT_DOMAINS
from ..export.runtime_targets import TARGETS as RUNTIME_TARGETS, help_text as runtime_targets_help
from ..measure import ALGORITHMS, METRICS
from ..models import DEFAULT_MODEL
from ..config.composite_check import TCQ_STATE_BITS
from ..recipe import DEFAULT_RECIPE

__all__ = ["UserError", "budget_args", "calib_args", "check_full_attention", "check_out_file", "check_positive",
           "constraint_args", "constraints_from", "e2e_amp_arg", "eval_args", "eval_windows_for", "human",
           "measure_args", "model_arg", "one_line", "parse_budgets", "parse_kv_arg", "solver_arg", "walk_amp_arg"]

CALIB_SOURCES = (f"{SELF} (written by the model itself: varied openers and chat exchanges, cached), "
                 f"{', '.join(CORPORA)} (train split), a .txt/.jsonl path, or a mixture joined by '+'")


class UserError(Exception):
    """An error caused by the user's input; reported in one line, exit code 2."""


# ---------------------------------------------------------------------------- argument groups
def model_arg(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local directory or .gguf file, or embedded name (default {DEFAULT_MODEL})")


def calib_args(p, *, nsamples: int = 128, seqlen: str = "--seqlen", what: str = "calibration text",
               seed: str = "seed of the calibration sampler", bos: bool = True) -> None:
    """``--calib``, ``--nsamples``, ``seqlen`` (``--seqlen`` or ``--calib-seqlen``), ``--seed`` and ``--bos``."""
    p.add_argument("--calib", default=DEFAULT_CALIB,
                   help=f"{what}: {CALIB_SOURCES} (default {DEFAULT_CALIB}; see mixq.calibset). Add text like the "
                        f"model's real input, e.g. {DEFAULT_CALIB}+mine.txt: the plans fit what they are calibrated "
                        "on")
    p.add_argument("--nsamples", type=int, default=nsamples, help=f"calibration samples (default {nsamples})")
    p.add_argument(seqlen, type=int, default=512, help="tokens per calibration sample (default 512)")
    p.add_argument("--seed", type=int, default=0, help=seed)
    if bos:
        add_bos_argument(p)


def eval_args(p, *, tokens: int = 32768, stride: bool = True) -> None:
    """``--corpus``, ``--split``, ``--tokens``, ``--seqlen``, ``--stride`` and ``--bos`` (:func:`eval_windows_for`)."""
    domains = ",".join(DEFAULT_DOMAINS)
    p.add_argument("--corpus", default=None,
                   help=f"evaluation text: {', '.join(CORPORA)} or a .txt/.jsonl path, or several joined by ',' (the "
                        f"first is the primary; KL on the others is also given as a ratio to it) (default {domains}: "
                        f"the calibration domain and text calibration never saw; a default one that is not installed "
                        f"is skipped with a warning)")
    p.add_argument("--split", default="test", help="split to evaluate on (default test)")
    p.add_argument("--tokens", type=int, default=tokens, help=f"score the first N tokens (default {tokens})")
    p.add_argument("--seqlen", type=int, default=512, help="evaluation window length (default 512)")
    if stride:
        p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: non-overlapping)")
    add_bos_argument(p)


def measure_args(p, *, algorithm: str | None = None) -> None:
    """The sensitivity measurement: ``--metric``, ``--algorithm``, ``--candidates``, ``--grad-samples``, ``--block-samples``."""
    p.add_argument("--metric", default=DEFAULT_RECIPE["metric"], choices=METRICS,
                   help=f"error proxy (default {DEFAULT_RECIPE['metric']}): kfac (Fisher-weighted output error), "
                        "kfac-tok (kfac with each token's input weighted by its own gradient energy), kfac-pos "
                        "(kfac-tok except on key/value projections, which keep kfac), kfac-kv (kfac-pos with key/value "
                        "projections by the unfactorised per-token form, all gradients of labels sampled from the "
                        "model), "
                        "hessian (layer output MSE), "
                        "fisher (diagonal Fisher), block (block-output error weighted by the residual gradient, "
                        "slowest and most faithful), block-rel (ExLlamaV2-style relative block-output error)")
    p.add_argument("--algorithm", default=algorithm, choices=ALGORITHMS,
                   help="algorithm whose error is measured (default: gptq when quantize's --method is gptq, "
                        "which is the default; rtn for other methods)"
                   if algorithm is None else f"algorithm whose errors are measured (default {algorithm})")
    p.add_argument("--candidates", default="default",
                   help=f"'default', a named set ({', '.join(NAMED_SETS)}) or a file listing spec names")
    p.add_argument("--grad-samples", type=int, default=16, help="calibration samples for the gradient statistics")
    p.add_argument("--block-samples", type=int, default=4,
                   help="calibration samples each candidate is run on by the block metrics")


def solver_arg(p, help: str = "allocation solver") -> None:  # noqa: A002 - argparse's name
    p.add_argument("--solver", default="exact", choices=SOLVERS, help=f"{help} (default exact)")
    p.add_argument("--tcq-state-bits", type=int, default=DEFAULT_RECIPE["tcq_state_bits"], choices=TCQ_STATE_BITS,
                   help="state bits of the trellis the plan's TCQ layers are encoded with: the measurement prices "
                        "TCQ<r> (8), the plan stores TCQ<r>L10 / TCQ<r>L12 at the same bits, a 2^10- / 2^12-entry "
                        "table and 5-13 %% / 10-20 %% less squared error, for a 4x / 16x longer Viterbi search "
                        f"(default {DEFAULT_RECIPE['tcq_state_bits']})")


def budget_args(p) -> None:
    p.add_argument("--bpw", default=None, help="budget(s) in bits per weight over the quantized layers, e.g. 2.5,3,3.5")
    p.add_argument("--bytes", default=None, help="budget(s) in bytes of the quantized layers, e.g. 40MB,50MB")
    solver_arg(p)
    constraint_args(p)


def constraint_args(p) -> None:
    p.add_argument("--keep", action="append", default=[], help="regex of layers kept in fp16 (repeatable)")
    p.add_argument("--force-spec", action="append", default=[], metavar="REGEX=SPEC", help="force a spec (repeatable)")
    p.add_argument("--tied", action="append", default=[], help="regex of layers in a block that share a spec, "
                                                               r"e.g. 'self_attn\.(q|k|v)_proj'")
    p.add_argument("--tie-experts", action="store_true",
                   help="a MoE block's experts of one projection share a spec (one stacked GGUF tensor each; "
                        "--target gguf implies it)")
    p.add_argument("--min-bits", action="append", default=[], metavar="REGEX=N", help="minimum bits for matching layers")
    p.add_argument("--max-bits", action="append", default=[], metavar="REGEX=N", help="maximum bits for matching layers")
    p.add_argument("--fast-on", default=None, choices=[d for d in FAST_DEVICES if d],
                   help="only candidates whose kernel on this device decodes faster than the fp32 model (cpu: int "
                        "grids through the int4 GEMM, about 2-2.5x fp32; no NF/FP/FP16 layers, which dequantize on "
                        "every call, nor VQ/TCQ ones, whose table-lookup kernels are not counted as faster: the "
                        "default trellis plans decode at 1.4-1.7x fp32 on an AVX-512 CPU, 1.1-1.2x with AVX2 "
                        "only); quantize measures the 'fast-cpu' candidates (int grids, some +ip) when "
                        "--candidates is 'default'")
    p.add_argument("--target", default=None, choices=RUNTIME_TARGETS,
                   help="only candidates this runtime holds exactly for each layer's shape, written as they are by "
                        "`mixq export --format TARGET` (" + runtime_targets_help() + "); the plan records it, and "
                        "quantize measures the target's specs when --candidates is 'default'")


# ---------------------------------------------------------------------------- parsing what they give
def parse_budgets(args) -> list:
    from ..allocate import Budget

    if bool(args.bpw) == bool(args.bytes):
        raise UserError("give exactly one of --bpw (e.g. 3.5) or --bytes (e.g. 50MB)")
    out = []
    for tok in (args.bpw or args.bytes).split(","):
        tok = tok.strip()
        try:
            out.append(Budget(bpw=float(tok)) if args.bpw else Budget(bytes=parse_bytes(tok)))
        except ValueError as e:
            raise UserError(f"bad budget {tok!r}: {e}") from None
    return out


def constraints_from(args):
    from ..allocate import Constraints

    def pairs(items, conv, flag):
        out = []
        for it in items:
            if "=" not in it:
                raise UserError(f"{flag} {it!r}: expected REGEX=VALUE")
            k, v = it.rsplit("=", 1)
            try:
                out.append((k, conv(v)))
            except ValueError:
                raise UserError(f"{flag} {it!r}: bad value {v!r}") from None
        return out

    return Constraints(keep=tuple(args.keep), force=tuple(pairs(args.force_spec, str, "--force-spec")),
                       min_bits=dict(pairs(args.min_bits, int, "--min-bits")),
                       max_bits=dict(pairs(args.max_bits, int, "--max-bits")), tied=tuple(args.tied),
                       fast_on=getattr(args, "fast_on", None), target=getattr(args, "target", None),
                       tie_experts=bool(getattr(args, "tie_experts", False)))


def parse_kv_arg(text: str):
    """``(bits, KVSettings)`` of ``--kv`` / ``--kv-uniform`` (:func:`mixq.runtime.kv_settings.parse_kv_preset`)."""
    from ..runtime.kv_settings import parse_kv_preset

    try:
        return parse_kv_preset(text)
    except ValueError as e:
        raise UserError(f"--kv {text!r}: {one_line(e)}") from None


def eval_windows_for(args, tok, model=None) -> list:
    """``[(corpus, windows, protocol)]`` for each domain of ``args.corpus`` (split, tokens, seqlen, stride, bos)."""
    from ..eval.scorer import evaluation_windows

    return evaluation_windows(tok, model, corpus=args.corpus, split=args.split, tokens=args.tokens,
                              seqlen=args.seqlen, stride=args.stride, bos=getattr(args, "bos", "auto"), progress=True)


# ---------------------------------------------------------------------------- checks and formatting
def check_positive(**kw) -> None:
    for k, v in kw.items():
        if v is not None and v <= 0:
            raise UserError(f"--{k.replace('_', '-')} must be positive, got {v}")


def check_out_file(out: str | None, force: bool, *, suffixes: tuple[str, ...] | None = None,
                   example: str = "results.json") -> None:
    """``--out`` names a file that may be written: not a directory, the right suffix, new unless ``force``."""
    if not out:
        return
    p = Path(out)
    if p.is_dir():
        raise UserError(f"--out {out} is a directory: give a file name such as {example}")
    if suffixes and p.suffix.lower() not in suffixes:
        raise UserError(f"--out {out}: the figure's file name must end in {', '.join(suffixes)}")
    if p.exists() and not force:
        raise FileExistsError(f"{out} already exists: choose another --out or pass --force")


def check_writable(out: str | os.PathLike, flag: str = "--out") -> None:
    """Pre-flight, before any work: the folder ``out`` will be written in exists (or can be made) and takes a file.

    One line naming ``flag`` when a part of the path is a regular file or the folder is read-only or not ours.
    Temporaries of ``out`` that a killed run left are removed here, at the start of the next one.
    """
    from ..atomic import remove_stale

    p = Path(out).absolute()
    folder = p.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{flag} {out}: {folder} is a file, not a directory; choose an {flag} in a directory")
    try:
        with tempfile.TemporaryFile(dir=folder):  # the one test root, ACLs and read-only mounts agree on
            pass
    except OSError as e:
        raise UserError(f"{flag} {out}: cannot write in {folder} ({e.strerror or e}); choose another {flag} or "
                        "make the folder writable") from None
    remove_stale(p)


def claim_output(out: str | os.PathLike, force: bool, flag: str = "--out") -> None:
    """Pre-flight of a command that writes ``out``: :func:`check_writable`, then the output's lock
    (:func:`mixq.atomic.lock_output`, held until the command ends), so that two runs never write one output
    or share its resumable state; the second fails at once naming the first."""
    from ..atomic import lock_output

    check_writable(out, flag)
    lock_output(Path(out))
    if not force and Path(out).exists():  # finished by another run while this one was starting
        raise FileExistsError(f"{out} already exists: choose another {flag} or pass --force")


def check_free_space(out: str | os.PathLike, need: int, flag: str = "--out") -> None:
    """Pre-flight: refuse at once when the file system ``out`` goes to has less than ``need`` bytes free (an
    estimate of what the command will write), instead of failing with a full disk at the end of the work."""
    import shutil

    folder = Path(out).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need:
        raise UserError(f"{flag} {out}: this run writes about {human(need)} but {folder} has {human(free)} free: "
                        f"free some space or choose another {flag}")


def os_error_line(e: OSError) -> str:
    """One line for an ``OSError`` the CLI did not foresee (full disk, permissions, a file where a folder goes)."""
    if e.errno is None or not e.strerror:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where = f"{e.filename}: " if e.filename else ""
    hint = {errno.ENOSPC: "free some space or write elsewhere (--out)",
            errno.EDQUOT: "free some space or write elsewhere (--out)",
            errno.EACCES: "choose another --out or fix the permissions",
            errno.EPERM: "choose another --out or fix the permissions",
            errno.EROFS: "the file system is read-only: choose another --out",
            errno.ENOTDIR: "a part of the path is a file, not a directory"}.get(e.errno)
    return f"{where}{e.strerror}" + (f"; {hint}" if hint else "")


def check_full_attention(model) -> None:
    """KV-cache quantization needs every layer to attend to the full context."""
    from ..runtime import kv_sim

    try:
        kv_sim.check_full_attention(model.config)
    except NotImplementedError as e:
        raise UserError(f"KV-cache quantization: {one_line(e)}") from None


def one_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} GB"


def e2e_amp_arg(p) -> None:
    """``--e2e-amp``: bf16 autocast of the end-to-end stage's training forward (:mod:`mixq.amp`)."""
    from ..amp import AMP_MODES

    p.add_argument("--e2e-amp", choices=AMP_MODES, default=DEFAULT_RECIPE["e2e_amp"],
                   help="the end-to-end stage's training forward under bf16 autocast: auto (default: where the "
                        "device multiplies bf16 natively -- AMX / AVX512-BF16 CPUs, bf16 GPUs), bf16, off (float32; "
                        "the teacher's logits and the held-out KL are float32 either way)")


def walk_amp_arg(p, what: str) -> None:
    """``--walk-amp``: bf16 autocast of the calibration walks' forward passes in ``what`` (:mod:`mixq.amp`)."""
    from ..amp import AMP_MODES

    default = DEFAULT_RECIPE["walk_amp"]
    p.add_argument("--walk-amp", choices=AMP_MODES, default=default,
                   help=f"{what} under bf16 autocast, their Hessians as bf16 Gram products summed in float64: "
                        f"auto (where the device multiplies bf16 natively), bf16, off (float32); default {default} "
                        "(on a 2-core AVX512-BF16 CPU the default 3.0-bpw run took 660 s instead of 807 s at the same KL, "
                        "bench/results/quantize_cost_amp.md)")
