"""safetensors files read and written a tensor (or a chunk) at a time, without holding the file in memory.

The format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` (padded with
spaces to a multiple of 8), then the raw little-endian bytes of every tensor, contiguous.

``safetensors.torch.save_file`` needs every tensor in memory at once and ``safe_open`` maps the whole
file privately (which counts against ``RLIMIT_DATA``); the readers and the writer here touch one
tensor's bytes at a time, so a directory bigger than RAM can be written from parts on disk, and a
memory-capped process can read a shard bigger than its cap.  Nothing is ever unpickled; headers are
validated against the file size before any offset is used.  Files written here load with the
safetensors library (tested).
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}
_HEADERS: dict[tuple, tuple[int, dict]] = {}
_CHUNK = 64 * 2**20


def header(fp: str | os.PathLike) -> tuple[int, dict]:
    """``(data start, {name: entry})`` of a safetensors file, validated against its size (cached per file state)."""
    fp = Path(fp)
    st = fp.stat()
    key = (str(fp), st.st_size, st.st_mtime_ns)
    if key not in _HEADERS:
        with open(fp, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{fp} is not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(st.st_size - 8, 100 << 20):
                raise ValueError(f"{fp}: header length {n} does not fit the file: truncated or not safetensors")
            entries = json.loads(f.read(n))
        entries.pop("__metadata__", None)
        body = st.st_size - 8 - n
        for name, e in entries.items():
            b, end = e["data_offsets"]
            dt = DTYPES.get(e["dtype"])
            numel = 1
            for d in e["shape"]:
                numel *= d
            if dt is None or not 0 <= b <= end <= body or end - b != numel * dt.itemsize:
                raise ValueError(f"{fp}: tensor {name} ({e['dtype']} {e['shape']}, bytes {b}..{end}) is "
                                 f"inconsistent with the file: truncated, tampered or an unknown dtype")
        _HEADERS[key] = (8 + n, entries)
    return _HEADERS[key]


def read_tensor(fp: str | os.PathLike, name: str) -> torch.Tensor:
    """One tensor, read with plain file I/O (only its bytes)."""
    start, entries = header(fp)
    e = entries[name]
    b, end = e["data_offsets"]
    dt = DTYPES[e["dtype"]]
    if end == b:
        return torch.empty(e["shape"], dtype=dt)
    buf = bytearray(end - b)
    with open(fp, "rb") as f:
        f.seek(start + b)
        if f.readinto(buf) != len(buf):
            raise ValueError(f"{fp}: tensor {name} is cut short: the file is truncated")
    return torch.frombuffer(buf, dtype=dt).reshape(e["shape"])


def write(path: str | os.PathLike, layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
          produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``path`` with the tensors of ``layout`` (name, dtype, shape), in that order, each obtained from
    ``produce(name)`` just before its bytes are written (so only one is in memory at a time).

    ``produce`` may return a tensor of more rows than fit one chunk: it is written 64 MB at a time.
    Raises ``ValueError`` if a produced tensor does not match its announced dtype and shape.
    """
    layout = list(layout)
    head: dict = {}
    offset = 0
    for name, dtype, shape in layout:
        if dtype not in NAMES:
            raise ValueError(f"{name}: {dtype} has no safetensors dtype")
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * dtype.itemsize
        head[name] = {"dtype": NAMES[dtype], "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        head["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(head, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, dtype, shape in layout:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(int(d) for d in shape):
                raise ValueError(f"{name}: produced {t.dtype} {tuple(t.shape)}, announced {dtype} {tuple(shape)}")
            flat = t.detach().reshape(-1)
            step = max(1, _CHUNK // max(1, dtype.itemsize))
            for a in range(0, flat.numel(), step):  # a chunk at a time, also off an accelerator
                f.write(flat[a:a + step].to("cpu").contiguous().view(torch.uint8).numpy().data)
