"""The README's Python snippets run as written, and mixq's top-level API is complete and documented.

Every ```python block of README.md is executed in a fresh namespace; a snippet that raises fails its test.
To keep them fast and offline, ``mixq.load_model`` gives a tiny random llama with a character tokenizer
(``tests/tiny.py``), PTB is cut to its first 20,000 characters, ``fortunes`` reads a small generated database
(``$MIXQ_FORTUNES_DIR``), the cache and the snippets' output directories live under ``tmp_path``.
"""
from __future__ import annotations

import inspect
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mixq
from tiny import make_tiny, make_tiny_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python[^\n]*\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)
STAGES = ("load_model", "build_calibration", "measure", "plan", "quantize", "save_quantized", "load_quantized",
          "evaluate")


def _fortunes(folder: Path, n: int = 300) -> Path:
    """A fortune database of ``n`` entries separated by ``%`` lines, with the ``.dat`` index file beside it."""
    rng = random.Random(0)
    words = "the a wise fool says nothing of what he knows, and yet all of it is true; who listens learns".split()
    entries = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 20))).capitalize() + "." for _ in range(n)]
    folder.mkdir()
    (folder / "wisdom").write_text("\n%\n".join(entries) + "\n%\n", encoding="utf-8")
    (folder / "wisdom.dat").write_bytes(b"")
    return folder


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Tiny model and tiny text for the README's snippets; the working directory is ``tmp_path/work``."""
    import mixq.data

    loaded = []

    def tiny_load_model(name_or_path: str = "smollm2-135m", **kwargs):
        loaded.append(name_or_path)
        return make_tiny("llama"), make_tiny_tokenizer()

    real_load_corpus = mixq.data.load_corpus

    def short_corpus(name, split):
        text = real_load_corpus(name, split)
        return text[:20_000] if name == "ptb" else text

    monkeypatch.setattr(mixq, "load_model", tiny_load_model)
    monkeypatch.setattr(mixq.data, "load_corpus", short_corpus)
    monkeypatch.setenv("MIXQ_FORTUNES_DIR", str(_fortunes(tmp_path / "fortunes")))
    monkeypatch.setenv("MIXQ_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return loaded


def test_readme_has_python_snippets():
    assert len(BLOCKS) >= 2, "README.md should show the Python API in ```python blocks"
    assert all("import mixq" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_readme_snippet_runs(index, offline):
    code = compile(BLOCKS[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": f"readme_block_{index + 1}"})  # an exception here fails the test
    assert offline, "the snippet should load its model through mixq.load_model"


def test_all_names_resolve_with_docstrings():
    assert set(STAGES) <= set(mixq.__all__)
    assert set(mixq.__all__) <= set(dir(mixq))
    for name in mixq.__all__:
        obj = getattr(mixq, name)
        doc = inspect.getdoc(obj)
        assert doc, f"mixq.{name} has no docstring"
        assert not doc.startswith(f"{name}("), f"mixq.{name} has only the docstring dataclasses generate"
    for name in STAGES:
        assert callable(getattr(mixq, name)), name
    with pytest.raises(AttributeError, match="no attribute 'no_such_stage'"):
        mixq.no_such_stage  # noqa: B018


def test_measure_is_the_stage_and_the_subpackage():
    from mixq import pipeline
    from mixq.measure import driver

    assert inspect.signature(mixq.measure) == inspect.signature(pipeline.measure)
    assert mixq.measure.measure is driver.measure  # the subpackage's contents as before
    assert "SensitivityTable" in mixq.measure.__doc__ and inspect.getdoc(pipeline.measure) in mixq.measure.__doc__


def test_import_is_cheap_and_subpackage_first_still_callable():
    """``import mixq`` loads no torch/transformers; importing the subpackage before the stage keeps it callable."""
    code = ("import sys, mixq\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
            "assert not heavy, f'import mixq loaded {heavy}'\n"
            "import mixq.measure.driver as d\n"
            "assert callable(mixq.measure) and mixq.measure.measure is d.measure\n"
            "assert mixq.load_quantized.__module__ == 'mixq.export.native'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_stage_arguments_are_checked(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="exactly one of spec"):
        mixq.quantize(model)
    with pytest.raises(ValueError, match="needs calibration data"):
        mixq.quantize(model, "W4-g64", method="gptq")
    with pytest.raises(ValueError, match="exactly one budget"):
        mixq.plan(object())
    with pytest.raises(ValueError, match="50MB"):
        mixq.plan(object(), bytes="fifty")
