"""The ``mixq`` command line.  Each subcommand is a file-to-file stage; see ``mixq --help``.

Errors a user can fix (bad spec, unknown model, missing corpus, existing output) print one line
``mixq: error: ...`` and exit with status 2; set ``MIXQ_DEBUG=1`` for the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .jsonio import write_json_atomic  # noqa: E402,F401  (used by the subcommands)

DEFAULT_MODEL = "smollm2-135m"


class UserError(Exception):
    """An error caused by the user's input; reported in one line, exit code 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import CorpusUnavailableError
    from .export.native import CheckpointError
    from .models import ModelNotFoundError

    return (UserError, ValueError, FileExistsError, FileNotFoundError, CheckpointError, ModelNotFoundError,
            CorpusUnavailableError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("mixq: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - classified below
        if os.environ.get("MIXQ_DEBUG") or not isinstance(e, _user_errors()):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"mixq: error: {msg}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    p = argparse.ArgumentParser(prog="mixq", description="Mixed-precision quantization of language models.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug)")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    commands.register(sub)
    return p


if __name__ == "__main__":
    sys.exit(main())
