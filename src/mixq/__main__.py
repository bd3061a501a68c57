"""``python -m mixq``: the ``mixq`` command (the entry point, not a stage: the one module outside the CLI that may
import it)."""
import sys

from .cli import main

sys.exit(main())
