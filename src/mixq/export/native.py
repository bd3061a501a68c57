"""The native mixq directory: what ``mixq quantize`` writes, ``mixq eval`` / ``mixq generate`` read.

Layout (format v2)::

    DIR/
      mixq.json              format, format_version 2, base model, method, per-layer specs and stored
                             tensors, size accounting ("storage"), sha256 + size of every file ("files")
      quantized.safetensors  per quantized layer, its PackedWeight tensors at their accounted size:
                               <fqn>.codes         uint8 [ceil(out*in*bits/8)]  codes bit-packed row-major,
                                                   little-endian bit stream (mixq.formats.bitpack)
                               <fqn>.scale         fp16 | bf16 | fp32 [groups]; e8m0: uint8 exponents;
                                                   e4m3: float8_e4m3fn (relative to tensor_scale)
                               <fqn>.zero          asym int zero points, bit-packed at `bits` (uint8)
                               <fqn>.offset        asym fp16 zero: fp16 [groups]
                               <fqn>.codebook      kmeans: fp16 [groups, 2^bits]
                               <fqn>.tensor_scale  fp32 [1]
                             an intra-tensor composite layer (mixq.formats.composite) stores the parts of
                             mixq.algorithms.composite.families.pack_composite instead, as <fqn>.<part> (codes.b3,
                             scale, csr.values, res_codes, ...); its layer entry has "kind": "composite",
                             its spec is CompositeSpec.to_dict() ("_type": "CompositeSpec") and
                             "tensors" names every part (dtype, shape)
      rest.safetensors       every other tensor (norms, kept embeddings, biases), tied tensors once
      config.json, generation_config.json, tokenizer files

``mixq.json["storage"]``: ``bytes_quantized_on_disk`` (sum of the packed tensors' bytes) next to
``bits_quantized_spec`` / ``bytes_quantized_spec`` (sum of ``spec.cost(shape).total``); they differ only
by the padding of each tensor's last byte (``padding_bits`` < 8 per stored tensor).

Writing: :mod:`mixq.export.native_write` (:func:`~mixq.export.native_write.save_quantized`,
:func:`~mixq.export.native_write.rewrite_native`); this module holds the format and reads it.

Format v1 (mixq <= 0.x: one code per byte, every param as float32, no checksums) is still read;
``mixq export DIR --format native --out NEW`` rewrites it as v2.  Everything is loaded with
safetensors — nothing is unpickled — every file listed in ``mixq.json`` is checked against its
size and sha256 before use, and the directory is written to a temporary sibling and renamed into
place, so an interrupted write never leaves a half directory behind.

``load_quantized(path, packed=False)`` gives the fake-quant model (dequantized weights, what
``mixq eval`` scores); ``packed=True`` gives :class:`~mixq.runtime.QuantLinear` layers holding the
packed tensors (never a float weight), so RAM is the plan's size; composite layers become
:class:`~mixq.runtime.composite_linear.CompositeLinear` (parts held packed, dequantized on each call).

Composite layers are exact too: bytes on disk equal ``spec.cost(shape)`` up to the padding of each
part's last byte, the parts are checked against the spec on load, and the checksums cover them.
Other runtimes cannot hold them: the GGUF and HF exporters refuse such directories naming the layers
(:func:`composite_layers`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..algorithms.composite.storage import stored_form
from ..arch import get_weight, set_weight
from ..config import QuantSpec, composite_of, parse_spec
from ..formats import QParams, QTensor
from ..models import file_sha256
from ..runtime import PackedWeight
from ..runtime.layers import install_layers

log = logging.getLogger(__name__)

FORMAT = "mixq-native"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_PARAM_FIELDS = ("scale", "zero", "offset", "codebook", "tensor_scale")
TENSOR_FILES = ("quantized.safetensors", "rest.safetensors")
_OWN_KEYS = ("format", "format_version", "layers", "storage", "files")


def run_meta(info: dict) -> dict:
    """What a directory's ``mixq.json`` says about the run (everything but the storage entries the writer makes):
    the ``meta`` to write a derived directory with."""
    return {k: v for k, v in info.items() if k not in _OWN_KEYS}


_REDO = "re-run `mixq quantize` (or `mixq export --format native` from an intact copy)"


class CheckpointError(ValueError):
    pass


def composite_layers(info: dict) -> list[str]:
    """The layers of a directory's ``mixq.json`` whose spec is an intra-tensor composite family's (sorted)."""
    return sorted(f for f, layer in (info.get("layers") or {}).items() if _family(layer)[0] is not None)


def _family(layer):
    """``(composite family, spec)`` of a layer entry; ``(None, spec)`` for a plain one, ``(None, None)`` for a damaged
    one (:func:`read_packed` says what is wrong with it)."""
    try:
        spec = parse_spec(layer["spec"])
    except (KeyError, TypeError, ValueError):
        return None, None
    return composite_of(spec), spec


def refuse_composites(info: dict, fmt: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` (one line, naming the layers) when the directory holds composite layers that ``fmt``'s
    mapping refuses (their family's :meth:`~mixq.config.composite_protocol.CompositeFormat.export`): the exporters
    read element-format layers only."""
    bad, notes = {}, {}
    for f, layer in (info.get("layers") or {}).items():
        fam, spec = _family(layer)
        m = fam.export(spec, fmt.lower()) if fam is not None else None
        if m is not None and m.kind == "refused":
            bad[f] = spec.name
            notes.setdefault(m.note)
    if bad:
        fqns, specs = sorted(bad), sorted(set(bad.values()))
        raise error(f"cannot export to {fmt}: {len(bad)} layer(s) use intra-tensor composite specs "
                    f"({', '.join(specs[:3])}{', …' if len(specs) > 3 else ''}) that {fmt} cannot hold: "
                    f"{', '.join(fqns[:4])}{', …' if len(fqns) > 4 else ''}; {'; '.join(notes)}")


# ---------------------------------------------------------------------------- reading
def read_info(path: str | os.PathLike) -> dict:
    p = Path(path) / "mixq.json"
    if not p.is_file():
        raise CheckpointError(f"{path} is not a mixq directory (no mixq.json): write one with `mixq quantize`")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON ({e}): the directory is damaged; quantize again") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a mixq-native directory (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    v = doc.get("format_version")
    if v not in READABLE_VERSIONS:
        newer = isinstance(v, int) and v > FORMAT_VERSION
        raise CheckpointError(f"{p}: unsupported format version {v!r} (this mixq reads {list(READABLE_VERSIONS)})"
                              + ("; upgrade mixq" if newer else ""))
    if not isinstance(doc.get("layers"), dict):
        raise CheckpointError(f"{p}: no 'layers' table; the directory is damaged: {_REDO}")
    return doc


def is_quantized_dir(path) -> bool:
    return (Path(path) / "mixq.json").is_file()


def verify_files(path: str | os.PathLike, info: dict | None = None) -> None:
    """Check every file ``mixq.json`` lists against its recorded size and sha256 (v2; v1 lists none).

    Raises :class:`CheckpointError` naming the first file that is missing, truncated or modified.
    """
    path = Path(path)
    info = read_info(path) if info is None else info
    files = info.get("files")
    if info["format_version"] >= 2 and not isinstance(files, dict):
        raise CheckpointError(f"{path / 'mixq.json'} lists no files to verify: the directory is damaged; {_REDO}")
    for name, want in (files or {}).items():
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"{p} is missing (listed in mixq.json): the directory is incomplete; {_REDO}")
        size = p.stat().st_size
        if size != want.get("size"):
            raise CheckpointError(f"{p} is truncated or damaged: {size} bytes, mixq.json records {want.get('size')}; "
                                  f"{_REDO}")
        if file_sha256(p) != want.get("sha256"):
            raise CheckpointError(f"{p} is damaged or was modified (sha256 differs from mixq.json); {_REDO}")


def read_packed(path: str | os.PathLike, *, verify: bool = True):
    """``(info, {fqn: PackedWeight | PackedComposite}, rest tensors)`` of a native directory (v1 or v2),
    checksums verified; each layer in its spec's stored form (:func:`mixq.algorithms.composite.storage.stored_form`:
    an intra-tensor composite's is a :class:`~mixq.algorithms.composite.storage.PackedComposite`), checked against
    its spec."""
    path = Path(path)
    info = read_info(path)
    if verify:
        verify_files(path, info)
    try:
        qt = load_file(path / "quantized.safetensors")
        rest = load_file(path / "rest.safetensors")
    except Exception as e:  # safetensors raises its own error types for truncated headers/data
        raise CheckpointError(f"cannot read tensors in {path}: {e}; the file is truncated or damaged: {_REDO}") from None
    packed = {}
    used = set()
    read = _read_v1 if info["format_version"] == 1 else _read_v2
    for fqn, layer in info["layers"].items():
        packed[fqn], names = read(path, fqn, layer, qt)
        used.update(f"{fqn}.{n}" for n in names)
    stray = sorted(set(qt) - used)
    if stray:
        raise CheckpointError(f"{path}: quantized.safetensors holds tensors no layer in mixq.json names: {stray[:3]}")
    return info, packed, rest


def _read_v2(path: Path, fqn: str, layer: dict, qt: dict):
    """One layer of a v2 directory and its tensor names: the tensors its entry lists (dtype and shape checked), in
    its spec's stored form, checked against the spec (and against its ``kind``, the stored form's)."""
    try:
        spec = parse_spec(layer["spec"])
        shape = tuple(int(d) for d in layer["shape"])
        form = stored_form(spec)
        if layer.get("kind") != getattr(form, "kind", None):
            raise ValueError("kind and spec disagree about the layer's stored form")
        listed = layer["tensors"]
        if not isinstance(listed, dict) or not listed:
            raise ValueError("no tensors listed")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: layer {fqn} has a bad entry in mixq.json ({e}); {_REDO}") from None
    missing = [n for n in listed if f"{fqn}.{n}" not in qt]
    if missing:
        raise CheckpointError(f"{path}: layer {fqn} listed in mixq.json is missing tensors {missing[:3]} "
                              f"from the tensors; {_REDO}")
    tensors = {n: qt[f"{fqn}.{n}"] for n in listed}
    try:
        for n, t in tensors.items():
            want = listed[n]
            if str(t.dtype).removeprefix("torch.") != want.get("dtype") or list(t.shape) != list(want.get("shape")):
                raise ValueError(f"{n} is {t.dtype} {tuple(t.shape)}, mixq.json records {want}")
        return form.from_stored(tensors, spec, shape), list(listed)
    except (ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: layer {fqn} does not match its spec in mixq.json ({e}); {_REDO}") from None


def _read_v1(path: Path, fqn: str, layer: dict, qt: dict):
    """One layer of a v1 directory (plain grids only: one code per byte, float32 params), packed now (exactly),
    and its tensor names."""
    try:
        spec = QuantSpec.from_dict(layer["spec"])
        shape = tuple(int(d) for d in layer["shape"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: layer {fqn} has a bad spec or shape in mixq.json ({e}); {_REDO}") from None
    if f"{fqn}.codes" not in qt:
        raise CheckpointError(f"{path}: layer {fqn} listed in mixq.json is missing from the tensors; {_REDO}")
    names = ["codes", *(f for f in _PARAM_FIELDS if f"{fqn}.{f}" in qt)]
    tensors = {n: qt[f"{fqn}.{n}"] for n in names}
    try:
        params = QParams(**{f: tensors.get(f) for f in _PARAM_FIELDS})
        if params.tensor_scale is not None:
            params.tensor_scale = params.tensor_scale.reshape(())
        pw = PackedWeight.from_qtensor(QTensor(codes=tensors["codes"], params=params, spec=spec, shape=shape))
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: layer {fqn} does not match its spec in mixq.json ({e}); {_REDO}") from None
    return pw, names


def read_qtensors(path: str | os.PathLike, *, verify: bool = True):
    """``(info, {fqn: QTensor}, rest tensors)`` of a native directory, any version.

    Each QTensor has unpacked codes ``[out, in]`` (uint8; int16 / int32 for kept floats) and float32
    :class:`~mixq.formats.QParams` (row fields ``[R, 1]``, codebook ``[R, 2^bits]``, tensor_scale ``[]``)
    — what exporters and :func:`mixq.formats.dequantize` take.  Composite layers come back as their
    stored parts (:class:`~mixq.formats.composite.qtensor.CompositeQTensor` and siblings; ``.dequantize()``).
    Checksums are verified first.
    """
    info, packed, rest = read_packed(path, verify=verify)
    return info, {fqn: pw.to_qtensor() for fqn, pw in packed.items()}, rest


@contextlib.contextmanager
def _no_weight_init():
    """Build a model without initializing its weights (they are loaded or replaced right after):
    untouched pages cost no RAM, and a packed load never fills a float copy of a quantized weight."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext
    with no_init_weights():
        yield


@torch.no_grad()
def load_quantized(path: str | os.PathLike, *, dtype=torch.float32, packed: bool = False, kernel: str = "auto",
                   verify: bool = True):
    """Load a native directory.  Returns ``(model, tokenizer, info)``.

    ``packed=False``: the fake-quant model (each quantized weight dequantized to ``dtype``; ``mixq eval``).
    ``packed=True``: each quantized linear becomes a :class:`~mixq.runtime.QuantLinear` holding its packed
    tensors (run through ``kernel``: ``"auto"``, ``"reference"``, ``"cpu-int4"``, ...); an intra-tensor composite
    one a :class:`~mixq.runtime.composite_linear.CompositeLinear` (dequantized on each call, whatever ``kernel``); no float copy of
    a quantized weight is ever filled.  For fast CPU decode use ``dtype=torch.bfloat16`` (the int4 kernel
    needs bf16 activations; the full-precision linears left, the head among them, then run their one-token
    products through :mod:`mixq.runtime.dense_gemv`).  A quantized weight that is not a linear (an embedding) is
    dequantized.
    ``verify``: check every file's size and sha256 against ``mixq.json`` first.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    from ..moe.experts import expose_experts
    from ..runtime import canonical_name
    from ..runtime.dense_gemv import use_gemv

    if packed:
        canonical_name(kernel)  # a typo fails before any loading
    path = Path(path)
    info, weights, rest = read_packed(path, verify=verify)
    config = AutoConfig.from_pretrained(path)
    with _no_weight_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expose_experts(model)  # MoE: the directory holds one tensor per expert projection (mixq.moe)
    missing, unexpected = model.load_state_dict(rest, strict=False)
    del rest
    if unexpected:
        raise CheckpointError(f"{path}: tensors {unexpected[:3]} do not belong to a {config.model_type} model")
    model.tie_weights()
    mods = dict(model.named_modules())
    layers = {}
    for fqn, pw in weights.items():
        if fqn not in mods:
            raise CheckpointError(f"{path}: layer {fqn} listed in mixq.json is missing from the model")
        if tuple(get_weight(mods[fqn]).shape) != tuple(pw.shape):
            raise CheckpointError(f"{path}: {fqn} has shape {tuple(pw.shape)} in the checkpoint but the model expects "
                                  f"{tuple(get_weight(mods[fqn]).shape)}")
        if packed and isinstance(mods[fqn], (nn.Linear, Conv1D)):
            layers[fqn] = pw
        else:
            set_weight(mods[fqn], pw.dequantize().to(dtype))
    unresolved = [m for m in missing if m.rsplit(".", 1)[0] not in info["layers"]]
    tied = {n for n in unresolved if n.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(unresolved) - tied:
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {sorted(set(unresolved) - tied)[:3]}")
    install_layers(model, layers, kernel)  # each its spec's layer (mixq.runtime.layers.make_layer)
    if packed:
        use_gemv(model)  # the head and kept layers: one-token bf16 products through torch.mv (the same bits)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model, tok, info
