"""The ``mixq`` command line.  Each subcommand is a file-to-file stage; see ``mixq --help``.

One module per subcommand (``quantize``, ``measure``, ``plan``, ``finetune``, ``eval`` with its ``--act``/``--kv``
path in :mod:`.eval_act`, ``specs``, ``demo``, ``export``, ``generate``, ``measure_kv``, ``inspect``,
``zeroshot``, ``bench``), each with ``register(sub)`` and its ``cmd_*`` driver; what they share
(:class:`~.common.UserError`, argument groups) is in :mod:`.common`.  Nothing
outside this package imports it.

Errors a user can fix (bad spec, unknown model, missing corpus, existing output, and every ``OSError``: a full
disk, an unwritable folder) print one line ``mixq: error: ...`` and exit with status 2; set ``MIXQ_DEBUG=1`` for
the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ..data import CorpusUnavailableError
from ..atomic import release_outputs
from ..export.native import CheckpointError
from ..models import ModelNotFoundError
from . import bench, demo, export, finetune, generate, inspect, measure, measure_kv, plan, quantize, specs, zeroshot
from . import eval as eval_
from .common import UserError, os_error_line

__all__ = ["COMMANDS", "UserError", "build_parser", "main"]

COMMANDS = (quantize, measure, plan, finetune, eval_, specs, demo, export, generate, measure_kv, inspect, zeroshot,
            bench)
# OSError: a full disk, a read-only or foreign folder, a file where a folder goes (FileExistsError and
# FileNotFoundError are the ones mixq raises with its own message)
USER_ERRORS = (UserError, ValueError, OSError, CheckpointError, ModelNotFoundError, CorpusUnavailableError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    previous = _terminate_as_exception()
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("mixq: interrupted", file=sys.stderr)
        return 130
    except Terminated as t:
        print(f"mixq: terminated by {signal.Signals(t.signum).name}: temporary outputs removed, resumable state "
              "kept (run the same command again to resume)", file=sys.stderr)
        return 128 + t.signum
    except Exception as e:  # noqa: BLE001 - classified below
        if os.environ.get("MIXQ_DEBUG") or not isinstance(e, USER_ERRORS):
            raise
        if isinstance(e, OSError):
            msg = os_error_line(e)
        else:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"mixq: error: {msg}", file=sys.stderr)
        return 2
    finally:
        release_outputs()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Terminated(BaseException):
    """SIGTERM (timeout, Slurm, ``docker stop``) or SIGHUP, raised where the program is, so that every ``finally`` and
    ``except BaseException`` on the way out runs: atomic writers delete their temporaries, checkpoints stay whole."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


def _terminate_as_exception() -> dict:
    """Install :func:`_raise_terminated` for SIGTERM and SIGHUP; returns the previous handlers (to restore)."""
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, _raise_terminated)
        except (ValueError, OSError):  # not the main thread (mixq.cli.main called from a worker): leave them
            pass
    return previous


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixq", description="Mixed-precision quantization of language models.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug)")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return p

