"""The ``fortunes`` corpus: the quotations of Debian's ``fortunes`` packages, as a second kind of text.

PTB is lower-cased newswire without punctuation; the fortune databases are ordinary English with
everything PTB lacks (case, punctuation, quotation marks, dialogue, verse, attributions).  mixq
evaluates on them by default next to the calibration domain and never calibrates on them unless asked,
so they measure how a plan holds on text its calibration never saw.

Source: every fortune database (a text file with a ``.dat`` index beside it) in ``$MIXQ_FORTUNES_DIR``
or ``/usr/share/games/fortunes`` (Debian: ``apt-get install fortunes``; ``make install`` does this where
it runs as root), except ``ascii-art``.  Entries (separated by lines holding ``%``) are shuffled with a
fixed seed and dealt into splits — every 10th entry to ``test``, the next to ``valid``, the rest to
``train`` — and joined with a blank line, so each split mixes every database.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

DEFAULT_DIR = "/usr/share/games/fortunes"
EXCLUDED = frozenset({"ascii-art"})  # pictures made of characters, not text
SEED = 0


class FortunesUnavailable(ValueError):
    """No fortune databases where they were looked for."""


def fortunes_dir() -> Path:
    return Path(os.environ.get("MIXQ_FORTUNES_DIR") or DEFAULT_DIR)


def databases(root: Path | None = None) -> list[Path]:
    """The fortune databases under ``root``, sorted by name."""
    root = fortunes_dir() if root is None else root
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_file() and p.suffix == "" and p.name not in EXCLUDED and p.with_suffix(".dat").exists())


def entries(root: Path | None = None) -> list[str]:
    """Every entry of every database, stripped, in file order."""
    files = databases(root)
    if not files:
        where = fortunes_dir() if root is None else root
        raise FortunesUnavailable(
            f"corpus 'fortunes' needs Debian's fortune databases, none found in {where}: "
            "`apt-get install fortunes` (or set MIXQ_FORTUNES_DIR to a folder of fortune files), "
            "or evaluate with --corpus ptb / a .txt file")
    out: list[str] = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        out.extend(e.strip("\n") for e in text.split("\n%\n") if e.strip())
    return out


def load(split: str, root: Path | None = None) -> str:
    """The text of ``split`` (``train``, ``valid`` or ``test``)."""
    items = entries(root)
    random.Random(SEED).shuffle(items)
    slot = {"test": 0, "valid": 1}.get(split)
    if slot is None:
        chosen = [e for i, e in enumerate(items) if i % 10 not in (0, 1)]
    else:
        chosen = [e for i, e in enumerate(items) if i % 10 == slot]
    return "\n\n".join(chosen) + "\n"


def digest(split: str, root: Path | None = None) -> str:
    """sha256 of the split's text (the databases differ between package versions)."""
    return hashlib.sha256(load(split, root).encode()).hexdigest()
