"""The built-in intra-tensor composite families (:class:`~mixq.config.composite_protocol.CompositeFormat`): each claims
the :class:`~mixq.config.CompositeSpec` values whose parts are its own, and says which kernels run them.

=============  ================================================  ==========================================
family         claims                                            layer (mixq.runtime) and kernels
=============  ================================================  ==========================================
``+ip``        ``incoherent`` (any spec inside, plain or not)    IncoherentLinear around the inner's layer
``+h``         ``hi_rows`` (MixLLM rows)                         CompositeLinear (composite-reference)
``BIN``        ``binary`` (BiLLM / PB-LLM)                       CompositeLinear (composite-reference)
``VQ``         ``vq_dim`` (vector codebook bases)                VQLinear (vq-*, triton)
``TCQ``        ``trellis`` (trellis-coded bases)                 TCQLinear (tcq-*, triton)
``grid``       every other CompositeSpec: a grid plus outliers,  CompositeLinear (composite-reference)
               fp16 columns, SpQR scales, SLIM, dialects
=============  ================================================  ==========================================

Their quantizers and stored forms are :mod:`mixq.algorithms.composite.families`' table, their layers
:mod:`mixq.runtime.layers`'.  The grammar and exact cost of these specs stay with
:class:`~mixq.config.CompositeSpec` (:mod:`mixq.config.composite`, :mod:`mixq.config.grammar`).
"""
from __future__ import annotations

from .composite import CompositeSpec
from .composite_protocol import CompositeFormat
from .registry import add_builtin_composites, composite_of

VQ_KERNELS = ("vq-reference", "vq-cpu", "vq-lut", "vq-dense", "triton")    # mixq.runtime.vq_linear
TCQ_KERNELS = ("tcq-reference", "tcq-cpu", "tcq-dense", "triton")          # mixq.runtime.tcq_linear


class _Builtin(CompositeFormat):
    part = ""  # the CompositeSpec field that makes a spec this family's
    spec_type = "CompositeSpec"

    def claims(self, spec) -> bool:
        return isinstance(spec, CompositeSpec) and bool(getattr(spec, self.part))

    def from_dict(self, d: dict) -> CompositeSpec:
        return CompositeSpec.from_dict(d)


class Incoherent(_Builtin):
    """``+ip``: the rest of the spec applied to ``Q_out W Q_inᵀ``; its inner spec's kernels between two transforms."""

    family, part, transforms = "+ip", "incoherent", True
    kernels = ()  # its inner layer's (a plain grid's, or the inner composite family's)

    def runs_as(self, spec):
        inner = composite_of(spec.inner)
        return spec.inner if inner is None else inner.runs_as(spec.inner)

    def fast_kernel(self, spec, device: str) -> str:
        return composite_of(spec.inner).fast_kernel(spec.inner, device)

    def measured_as(self, spec):
        inner = composite_of(spec.inner)
        return spec.inner if inner is None or isinstance(inner, _Codebook) else None


class RowSplit(_Builtin):
    family, part = "+h", "hi_rows"


class Binary(_Builtin):
    family, part = "BIN", "binary"


class _Codebook(_Builtin):
    """A codebook base (under +ip measured like a grid: RTN times a GPTQ/RTN ratio); its own layer and kernels."""

    cpu_kernel = ""

    def fast_kernel(self, spec, device: str) -> str:
        return "triton" if device.startswith("cuda") else self.cpu_kernel


class VQ(_Codebook):
    family, part, kernels, cpu_kernel = "VQ", "vq_dim", VQ_KERNELS, "vq-cpu"


class TCQ(_Codebook):
    family, part, kernels, cpu_kernel = "TCQ", "trellis", TCQ_KERNELS, "tcq-cpu"


class Grid(_Builtin):
    """A grid plus any of outliers (+o), fp16 columns (+c), SpQR scales (+sq), SLIM bits, dialects (+d)."""

    family = "grid"

    def claims(self, spec) -> bool:
        return isinstance(spec, CompositeSpec)


BUILTIN = (Incoherent(), RowSplit(), Binary(), VQ(), TCQ(), Grid())  # in lookup order: +ip wraps the others
add_builtin_composites(*BUILTIN)
