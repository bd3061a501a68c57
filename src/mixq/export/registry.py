"""The export targets: one table, target name -> the function that writes it, with one line of help.

``mixq export --format`` offers exactly the names of :data:`EXPORTERS` and calls the entry's function as
``fn(src_dir, out, overwrite=..., **options)``, which returns the report (a dict) that the CLI writes to
:func:`report_path`.  Element formats say how they map to a target by its name
(:meth:`mixq.config.ElementFormat.export`; a target a family does not name refuses it, with the reason).

Adding a target is one module, ``export/<target>.py``, with that function, plus its line here (or a call to
:func:`register` from your own module before the CLI parses).  The module is imported only when its target
is asked for, so a target whose dependencies are missing (``gguf``, ``compressed-tensors``) costs nothing
until then, and then fails with one line that names what to install.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

REPORT_FILE = "export_report.json"  # an export directory's report; an exported file's is <file>.report.json


@dataclass(frozen=True)
class Exporter:
    """Where a target's exporter lives (imported on first use) and what ``mixq export --help`` says of it.

    ``options``: the keyword options beyond ``overwrite`` that the function takes from the CLI (e.g.
    ``rest_dtype``: ``--rest-dtype``); ``in_place``: it may write over its own source directory (with
    ``overwrite``)."""

    module: str
    function: str
    help: str
    options: tuple[str, ...] = ()
    in_place: bool = False

    def load(self):
        """The exporter function; ``ImportError`` naming the module and the reason if it cannot be had."""
        try:
            mod = importlib.import_module(self.module)
        except ImportError as e:
            raise ImportError(f"cannot import {self.module} ({e})") from None
        fn = getattr(mod, self.function, None)
        if fn is None:
            raise ImportError(f"{self.module} has no {self.function}()")
        return fn


EXPORTERS: dict[str, Exporter] = {
    "native": Exporter("mixq.export.native_write", "rewrite_native",
                       "re-write it in the current native format (e.g. upgrade a v1 directory)", ("rest_dtype",),
                       in_place=True),
    "gguf": Exporter("mixq.export.gguf", "export_gguf", "one .gguf file for llama.cpp"),
    "compressed-tensors": Exporter("mixq.export.hf", "export_compressed_tensors",
                                   "a Hugging Face compressed-tensors directory for transformers / vLLM"),
    "gptq": Exporter("mixq.export.hf", "export_gptq", "a Hugging Face GPTQ directory for GPTQModel / vLLM"),
}


def register(name: str, exporter: Exporter) -> None:
    """Add an export target (``mixq export --format NAME`` from then on)."""
    if name in EXPORTERS:
        raise ValueError(f"export target {name!r} is already registered ({EXPORTERS[name].module}): pick another name")
    EXPORTERS[name] = exporter


def targets() -> tuple[str, ...]:
    """The registered target names, in table order."""
    return tuple(EXPORTERS)


def report_path(out: Path) -> Path:
    """Where the export report goes: inside an output directory, next to an output file."""
    return out / REPORT_FILE if out.is_dir() else out.with_name(out.name + ".report.json")
