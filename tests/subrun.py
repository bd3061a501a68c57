"""Tests run again in a Python process of their own (fresh kernels, fresh allocator state), for the tests that must
not share this one's."""
from __future__ import annotations

import os
import subprocess
import sys


def pytest_in_subprocess(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m pytest -q -p no:cacheprovider *args`` in a new process with ``os.environ`` updated by ``env``."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
