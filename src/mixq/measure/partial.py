"""A measurement's ``OUT.partial`` file: what an interrupted run finished, tied to the key of what it measures.

Both measurements resume through it — the weight sensitivity walk (:mod:`.driver`, a partial
``SensitivityTable``) and the KV-cache one (:mod:`.kv`, the finished layers' K/V errors).  The file is
``{"key": key, ...body}``, written atomically after each unit of work; a file that does not parse or that
belongs to another key (model, calibration, candidates or settings) is ignored with a warning, and the run
starts over.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..jsonio import write_json_atomic

log = logging.getLogger(__name__)


def partial_file(out) -> Path | None:
    """``OUT.partial`` beside the measurement's output (``None`` without an output: nothing is resumed)."""
    return Path(str(out) + ".partial") if out else None


def load_partial(path: Path | None, key: dict, what: str, differs: str) -> dict | None:
    """The partial document at ``path`` if it parses and was written for ``key``, else ``None``.

    ``what`` names the measurement and ``differs`` what a foreign key may differ in, for the warnings.
    An unreadable file (``OSError``) is an error, not a reason to start over."""
    if path is None or not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except ValueError:  # not JSON (or not text)
        log.warning("ignoring unreadable partial %s %s", what, path)
        return None
    if not isinstance(doc, dict) or doc.get("key") != key:
        log.warning("partial %s %s belongs to another %s; starting over", what, path, differs)
        return None
    return doc


def save_partial(path: Path, key: dict, **body) -> None:
    """Write ``{"key": key, **body}`` to ``path`` atomically (replacing the previous partial file)."""
    write_json_atomic(path, {"key": key, **body}, overwrite=True)
