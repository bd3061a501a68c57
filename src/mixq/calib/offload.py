"""Activation buffers of the block walk kept on disk (memory-mapped) instead of in RAM.

The walk holds two ``[n, L, hidden]`` buffers (inputs and outputs of the current block): with 128
samples of 2048 tokens and hidden 8192 in float32 that is 8.6 GB each.  :func:`disk_tensor` backs
such a buffer by a file in ``offload_dir`` mapped with ``torch.from_file(..., shared=True)``: the
page cache holds what fits and the kernel writes the rest back, so the calibration set is bounded
by disk, not RAM.  Results are bit-identical to the in-RAM walk (same batches, same arithmetic).

Cost: each block reads its input buffer twice (statistics pass, then the re-run on the quantized
block) and writes its output buffer twice, so a walk moves about ``4 * n * L * hidden * 4`` bytes
per block through the page cache; once the buffers exceed free RAM that is disk bandwidth (a few
seconds per GB on an SSD), usually small next to GPTQ itself on large layers.  The files are
unlinked as soon as they are mapped (POSIX), so nothing is left behind even if the process dies.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch


def disk_tensor(directory: str | os.PathLike, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor of ``shape`` and ``dtype`` backed by a memory-mapped file in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    free = shutil.disk_usage(d).free
    if nbytes > free:
        raise ValueError(f"offload dir {d} has {free / 2**30:.2f} GiB free, an activation buffer needs "
                         f"{nbytes / 2**30:.2f} GiB (two are used): choose another --offload-dir")
    fd, name = tempfile.mkstemp(prefix="mixq-walk-", suffix=".bin", dir=d)
    try:
        os.ftruncate(fd, nbytes)  # sparse: blocks are allocated as the walk writes them
    finally:
        os.close(fd)
    try:
        t = torch.from_file(name, shared=True, size=numel, dtype=dtype).view(shape)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    try:
        os.unlink(name)  # the mapping stays valid; the space is freed when the tensor is
    except OSError:  # platforms that cannot unlink a mapped file: remove it when the tensor goes
        weakref.finalize(t, lambda p=name: Path(p).unlink(missing_ok=True))
    return t
