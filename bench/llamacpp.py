"""Build llama.cpp's command-line tools from the source a package registry carries; cached between runs.

    python bench/llamacpp.py [--version 0.3.36] [--jobs 2] [--cache ~/.cache/mixq]

The llama.cpp source comes from the ``llama-cpp-python`` source distribution on PyPI (it vendors
llama.cpp under ``vendor/llama.cpp``), fetched with ``pip download --no-deps --no-binary :all:``.
Only the tools the GGUF bench needs are built (``llama-quantize``, ``llama-imatrix``, ``llama-perplexity``,
``llama-completion``: the plain generation tool; this llama.cpp's ``llama-cli`` is a chat front end over its
server code; ``llama-tokenize``), Release, ``-DGGML_NATIVE=ON -DLLAMA_CURL=OFF``, into
``<cache>/llama.cpp-<version>/build/bin``. A finished build is recorded by a stamp file naming the
tools; a second call returns at once. Prints the bin directory.

Used as a module: ``tools(version) -> dict[name, Path]`` builds if needed.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

log = logging.getLogger("llamacpp")

VERSION = "0.3.36"
# llama-completion is the plain prompt -> text tool (what llama-cli was until llama.cpp moved llama-cli onto its
# server code: that one is chat-only and would compile the whole server, far too slow on 2 cores)
# llama-tokenize: llama.cpp's own token ids of a text, to check that a GGUF's vocabulary tokenizes as the HF one does
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-completion", "llama-tokenize")


def cache_root() -> Path:
    return Path(os.environ.get("MIXQ_CACHE_DIR", Path.home() / ".cache" / "mixq")).expanduser()


def _download(version: str, dest: Path) -> Path:
    """The sdist tarball of llama-cpp-python==version in ``dest`` (pip's ordinary client)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(dest)], check=True)
        found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise FileNotFoundError(f"pip download left no llama_cpp_python-{version}.tar.gz in {dest}")
    return found[0]


def _extract(sdist: Path, src: Path) -> None:
    """Unpack ``vendor/llama.cpp`` of the sdist into ``src``."""
    tmp = src.with_name(src.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        if not members:
            raise ValueError(f"{sdist} has no vendor/llama.cpp")
        tf.extractall(tmp, members=members, filter="data")
    (vendored,) = list(tmp.glob("*/vendor/llama.cpp"))
    vendored.rename(src)
    shutil.rmtree(tmp)


def commit_of(src: Path) -> str:
    """llama.cpp's build number/commit as its CMake sees them (the sdist has no .git): best effort."""
    for p in (src / "common" / "build-info.cpp", src / "build-info.cpp"):
        if p.exists():
            return p.read_text()[:200]
    return "vendored in llama-cpp-python sdist"


def build(version: str = VERSION, jobs: int = 2, root: Path | None = None) -> Path:
    """Configure and build the tools; returns ``bin`` (idempotent: a stamp marks a finished build)."""
    base = (root or cache_root()) / f"llama.cpp-{version}"
    src, bdir = base / "src", base / "build"
    stamp = base / "built.txt"
    binp = bdir / "bin"
    if stamp.exists() and all((binp / t).exists() for t in TOOLS):
        return binp
    if not (src / "CMakeLists.txt").exists():
        shutil.rmtree(src, ignore_errors=True)
        _extract(_download(version, base / "sdist"), src)
    subprocess.run(["cmake", "-S", str(src), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(bdir), "--config", "Release", "-j", str(jobs), "--target", *TOOLS],
                   check=True)
    missing = [t for t in TOOLS if not (binp / t).exists()]
    if missing:
        raise FileNotFoundError(f"build finished without {missing} in {binp}")
    stamp.write_text(f"llama-cpp-python {version} sdist, vendor/llama.cpp; tools: {' '.join(TOOLS)}\n")
    return binp


def tools(version: str = VERSION, jobs: int = 2) -> dict[str, Path]:
    binp = build(version, jobs)
    return {t: binp / t for t in TOOLS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--version", default=VERSION)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(build(a.version, a.jobs, a.cache))


if __name__ == "__main__":
    main()
