"""Kernel registry for :class:`mixq.runtime.QuantLinear`: ``y = x Ŵᵀ + b`` from a packed weight.

A kernel is three functions (:class:`Kernel`)::

    why_not(pw, x) -> str | None   None if it can run this PackedWeight on this input, else the reason
    prepare(pw)    -> state        one-time work per layer (a kernel-layout copy, or None)
    linear(x, pw, state, bias)     x [M, in] -> y [M, out] in x.dtype (``pw`` is None if not ``needs_packed``)
    max_tokens                     under ``"auto"``, used only for ``M <= max_tokens`` (None: any M)
    codes_from_state(state)        optional: the uint8 [out, in] codes a state holds; when a state says
                                   ``holds_codes``, QuantLinear frees its packed code stream (one copy in RAM)

Kernels: ``reference``; ``cpu-int4`` (bf16 CPU, int <= 4-bit, params rounded once to bf16, one GEMM;
alias ``cpu``); ``cpu-int4-exact`` (same, params split exactly into bf16 pieces, 1-3 GEMMs).

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
from functools import partial
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
    needs_packed: bool = True
    codes_from_state: Callable[[Any], torch.Tensor] | None = None


KERNELS: dict[str, Kernel] = {
    "reference": Kernel("reference", reference.why_not, reference.prepare, reference.linear,
                        "dequantize (mixq.formats.decode) + F.linear; any format, dtype, device"),
    "cpu-int4": Kernel("cpu-int4", partial(cpu.why_not, exact=False), partial(cpu.prepare, exact=False), cpu.linear,
                       "int<=4-bit weights, bf16 activations, CPU: torch's int4pack GEMM, params rounded to bf16",
                       max_tokens=cpu.MAX_TOKENS, needs_packed=False, codes_from_state=cpu.codes_from_state),
    "cpu-int4-exact": Kernel("cpu-int4-exact", partial(cpu.why_not, exact=True), partial(cpu.prepare, exact=True),
                             cpu.linear, "as cpu-int4 with params split exactly into 1-3 bf16 pieces (1-3 GEMMs)",
                             max_tokens=cpu.MAX_TOKENS, needs_packed=False, codes_from_state=cpu.codes_from_state),
}
ALIASES: dict[str, str] = {"cpu": "cpu-int4"}
AUTO_ORDER: tuple[str, ...] = ("cpu-int4", "reference")  # a GPU kernel goes first


def kernel_names() -> list[str]:
    """Every accepted ``kernel`` value: ``auto``, the kernels, their aliases."""
    return ["auto", *KERNELS, *ALIASES]


def canonical_name(name: str) -> str:
    """``name`` with aliases resolved (``"cpu"`` -> ``"cpu-int4"``); raises on an unknown name."""
    if name == "auto":
        return name
    name = ALIASES.get(name, name)
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}: choose 'auto' or one of {sorted(KERNELS)} (alias: cpu)")
    return name


def get_kernel(name: str) -> Kernel:
    return KERNELS[canonical_name(name)] if name != "auto" else _auto_error()


def _auto_error():
    raise ValueError("'auto' is not a kernel: use usable_kernels('auto', ...) or select_kernel")


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


def fast_kernel_for(spec, shape, device: str = "cpu") -> str:
    """The kernel ``"auto"`` uses for decode (few tokens) of a ``spec`` weight of ``shape`` with bf16
    activations on ``device`` — ``"cpu-int4"`` or ``"reference"``.  For reports and planning."""
    if device == "cpu" and cpu.spec_why_not(spec, shape) is None:
        return "cpu-int4"
    return "reference"


__all__ = ["ALIASES", "AUTO_ORDER", "KERNELS", "Kernel", "KernelUnsupported", "canonical_name", "fast_kernel_for",
           "get_kernel", "kernel_names", "pick_kernel", "select_kernel", "usable_kernels"]
