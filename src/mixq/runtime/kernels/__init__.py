"""Kernel registry for :class:`mixq.runtime.QuantLinear`: ``y = x Ŵᵀ + b`` from a packed weight.

A kernel is three functions (:class:`Kernel`)::

    why_not(pw, x) -> str | None   None if it can run this PackedWeight on this input, else the reason
    prepare(pw)    -> state        one-time work per layer (a kernel-layout copy, or None)
    linear(x, pw, state, bias)     x [M, in] -> y [M, out] in x.dtype (``pw`` is None if not ``needs_packed``)
    max_tokens                     under ``"auto"``, used only for ``M <= max_tokens`` (None: any M)
    codes_from_state(state)        optional: the uint8 [out, in] codes a state holds; when a state says
                                   ``holds_codes``, QuantLinear frees its packed code stream (one copy in RAM)

Kernels, in :data:`AUTO_ORDER`:

``triton``  (:mod:`.triton_gpu`) CUDA, fp16 / bf16 / fp32 activations, any M: one Triton kernel that
    unpacks b-bit codes (int32 words of floor(32/b) codes), dequantizes in registers exactly as
    :mod:`mixq.formats` decodes (int 1-8-bit sym / binary / asym int zero / asym fp16 offset, NF,
    minifloat, k-means codebooks; any group size, channel, tensor) and runs ``tl.dot`` with fp32
    accumulation.  Needs ``pip install 'mixq[gpu]'`` (triton); rejects CPU inputs, so CPU runs never see it.
``cpu-int4`` (alias ``cpu``)  bf16 CPU, int 1-8-bit grids through torch's int4 GEMM (5-8 bits as two
    int4 planes), params rounded once to bf16; ``cpu-int4-exact``: params split exactly into bf16 pieces.
``reference``  dequantize with :mod:`mixq.formats` + ``F.linear``: runs everything and defines the
    result; every other kernel is tested against it (ARCHITECTURE.md rule 8).

``"auto"`` takes the first kernel of :data:`AUTO_ORDER` that accepts the layer, the input dtype/device
and ``M`` (a decode kernel may lose to dequantize + dense GEMM on long prefills).

Adding a kernel: write ``kernels/<name>.py`` exposing ``why_not`` / ``prepare`` / ``linear``, add it
to :data:`KERNELS` and to :data:`AUTO_ORDER` before ``"reference"``, and test it against the
reference (``tests/test_qlinear.py``, ``tests/test_triton_kernel.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from ...config.registry import composite_of
from . import cpu, reference, triton_gpu


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
    "triton": Kernel("triton", triton_gpu.why_not, triton_gpu.prepare, triton_gpu.linear,
                     "CUDA: Triton unpack + dequantize in registers + tl.dot (fp32 accumulation); int 1-8-bit, "
                     "NF, minifloat, k-means; any group size", needs_packed=False,
                     codes_from_state=triton_gpu.codes_from_state),
}
ALIASES: dict[str, str] = {"cpu": "cpu-int4"}
AUTO_ORDER: tuple[str, ...] = ("triton", "cpu-int4", "reference")  # triton rejects CPU inputs


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
    activations on ``device`` — ``"cpu-int4"``, ``"triton"`` (``device`` ``"cuda"``) or ``"reference"``.
    For reports and planning.  An intra-tensor composite's family says (:mod:`mixq.config.composite_families`): the
    reference path (dequantized per call), except ``+ip`` over a plain grid, whose inner layer runs that grid's kernel
    between two transforms (``runs_as``), and VQ / TCQ bases (``vq-cpu`` / ``tcq-cpu`` on CPU when a C compiler builds
    them; ``triton`` on CUDA).  Not every such kernel is faster than fp32: ``bench/results/tcq_speed_model.json``."""
    fam = composite_of(spec)
    if fam is not None:  # its family's own layer kernel, or the plain grid whose kernels run it
        plain = fam.runs_as(spec)
        if plain is None:
            return fam.fast_kernel(spec, device)
        spec = plain
    if device == "cpu" and cpu.spec_why_not(spec, shape) is None:
        return "cpu-int4"
    if device.startswith("cuda") and triton_gpu.spec_why_not(spec, shape) is None:
        return "triton"
    return "reference"


# Decode kernels that beat the full-precision model's dense GEMV on their device, which is what ``--fast-on``
# promises.  On any CPU the int4 one does (1.8-3x fp32 tokens/s, bench/results/deploy.md); the codebook kernels
# (``vq-cpu``, ``tcq-cpu``) are native but bound by table gathers, so their speed depends on the CPU: a model of
# them decoded at 0.45-0.7x fp32 on the 2-core EPYC of earlier sessions (AVX2; bench/results/tcq_speed_model.json),
# and the default trellis plans at 1.6-1.7x fp32 on one thread of an AVX-512 Xeon, 1.4-1.5x on two
# (bench/results/deploy.md, deploy_2t.md), 1.1-1.2x on two threads of the same Xeon with the kernels capped at AVX2
# (deploy_avx2.md, deploy_avx2_full.md): not counted, since a plan does not know the CPU it will run on.
# ``triton`` is listed as designed, not as measured (no GPU yet).
FASTER_THAN_DENSE = frozenset({"cpu-int4", "triton"})
# An ``+ip`` int layer runs the int4 kernel between two native transforms (kron_cpu): SmolLM2 with every layer
# W4-g64+ip or W3-g64+ip decodes at 1.25x fp32 on two threads of the AVX-512 Xeon (bench/results/deploy_ip.md; plain
# W4-g64 1.75x) and at 1.23x with every kernel capped at AVX2 (deploy_avx2_full.md), so such layers count as faster
# than dense at any size.  (While the transforms ran in torch they cost ~70 us a call and decoded at 0.73-0.87x on
# the EPYC of earlier sessions, ip_speed.md: then only layers of 1M weights and more were admitted.)


def trellis_decodes_fast_here() -> bool:
    """Whether this CPU runs the trellis layers' AVX-512 kernels, at which the default plans decode faster than
    fp32 (not counted in :func:`decodes_faster`: a plan does not know the CPU it will run on)."""
    from . import tcq_cpu

    return tcq_cpu.available() and tcq_cpu.has_avx512()


def decodes_faster(spec, shape, device: str = "cpu") -> bool:
    """Whether a ``spec`` weight of ``shape`` decodes on ``device`` through a kernel of :data:`FASTER_THAN_DENSE`."""
    return fast_kernel_for(spec, shape, device) in FASTER_THAN_DENSE


__all__ = ["ALIASES", "AUTO_ORDER", "FASTER_THAN_DENSE", "KERNELS", "Kernel", "KernelUnsupported", "canonical_name",
           "decodes_faster", "fast_kernel_for", "trellis_decodes_fast_here",
           "get_kernel", "kernel_names", "pick_kernel", "select_kernel", "usable_kernels"]
