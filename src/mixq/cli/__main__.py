"""``python -m mixq.cli``: the ``mixq`` command."""
import sys

from . import main

sys.exit(main())
