"""Kernel registry for :class:`mixq.runtime.QuantLinear`: ``y = x Ŵᵀ + b`` from a packed weight.

A kernel is three functions (:class:`Kernel`)::

    why_not(pw, x) -> str | None   None if it can run this PackedWeight on this input, else the reason
    prepare(pw)    -> state        one-time work per layer (a kernel-layout copy, or None)
    linear(x, pw, state, bias)     x [M, in] -> y [M, out] in x.dtype
    max_tokens                     under ``"auto"``, used only for ``M <= max_tokens`` (None: any M)

``reference`` (dequantize with :mod:`mixq.formats` + ``F.linear``) runs everything and defines
the result; every other kernel is tested against it (ARCHITECTURE.md rule 8).  ``"auto"`` takes
the first kernel of :data:`AUTO_ORDER` that accepts the layer, the input dtype/device and ``M``
(a decode kernel may lose to dequantize + dense GEMM on long prefills).

Adding a kernel (e.g. a Triton GPU one): write ``kernels/<name>.py`` exposing a ``KERNEL``,
add it to :data:`KERNELS` and to :data:`AUTO_ORDER` before ``"reference"``, and add its
equality test against the reference to ``tests/test_qlinear.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import cpu, reference


class KernelUnsupported(ValueError):
    """A kernel cannot run a layer (format, shape, dtype or device)."""


@dataclass(frozen=True)
class Kernel:
    name: str
    why_not: Callable[[Any, torch.Tensor], str | None]
    prepare: Callable[[Any], Any]
    linear: Callable[..., torch.Tensor]
    doc: str = ""
    max_tokens: int | None = None


KERNELS: dict[str, Kernel] = {
    "reference": Kernel("reference", reference.why_not, reference.prepare, reference.linear,
                        "dequantize (mixq.formats.decode) + F.linear; any format, dtype, device"),
    "cpu": Kernel("cpu", cpu.why_not, cpu.prepare, cpu.linear,
                  "int<=4-bit group-wise weights, bf16 activations, CPU: torch's int4pack GEMM",
                  max_tokens=cpu.MAX_TOKENS),
}
AUTO_ORDER: tuple[str, ...] = ("cpu", "reference")  # a GPU kernel goes first


def get_kernel(name: str) -> Kernel:
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}: choose 'auto' or one of {sorted(KERNELS)}")
    return KERNELS[name]


def usable_kernels(name: str, pw, x: torch.Tensor) -> list[Kernel]:
    """Kernels that can run packed weight ``pw`` on inputs like ``x`` (dtype, device), best first.

    ``name="auto"``: those of :data:`AUTO_ORDER` (ends with ``reference``, which runs everything);
    otherwise ``[KERNELS[name]]``, or :class:`KernelUnsupported` if it cannot run this case.
    """
    if name == "auto":
        return [KERNELS[k] for k in AUTO_ORDER if KERNELS[k].why_not(pw, x) is None]
    kernel = get_kernel(name)
    reason = kernel.why_not(pw, x)
    if reason is not None:
        raise KernelUnsupported(f"kernel {name!r} cannot run {pw.spec.name} {pw.shape} on {x.dtype} "
                                f"{x.device.type}: {reason}; use kernel='auto' or 'reference'")
    return [kernel]


def pick_kernel(kernels: list[Kernel], n_tokens: int, auto: bool) -> Kernel:
    """First of ``kernels`` whose ``max_tokens`` admits ``n_tokens`` rows (an explicit choice always runs)."""
    if not auto:
        return kernels[0]
    return next(k for k in kernels if k.max_tokens is None or n_tokens <= k.max_tokens)


def select_kernel(name: str, pw, x: torch.Tensor) -> Kernel:
    """The kernel used for ``x [M, in]``: :func:`usable_kernels` then :func:`pick_kernel`."""
    return pick_kernel(usable_kernels(name, pw, x), x.shape[0], name == "auto")


__all__ = ["AUTO_ORDER", "KERNELS", "Kernel", "KernelUnsupported", "get_kernel", "pick_kernel", "select_kernel",
           "usable_kernels"]
