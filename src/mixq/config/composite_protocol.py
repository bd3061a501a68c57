"""The intra-tensor composite protocol: what one family of composites (several precisions inside one weight: a base
grid plus sparse outliers, fp16 columns, ...; ``+ip``; the VQ and TCQ codebook bases; BIN; ``+h`` rows) knows about
itself, so the rest of mixq asks the family instead of branching on the spec's parts.

A family is a :class:`CompositeFormat` registered with :func:`mixq.config.registry.register` (the call that registers
an element format; :func:`~mixq.config.registry.composite_of` finds a spec's family).  It answers:

``claims(spec)``           whether ``spec`` is one of its own (the built-in families claim a
                           :class:`~mixq.config.CompositeSpec` by its parts: :mod:`mixq.config.composite_families`)
``parse(name)``            its spec of a name the one grammar does not know (a registered family's own names;
                           :func:`mixq.config.parse_spec` asks it first), else None
``spec_type`` /            the ``"_type"`` of its specs' ``to_dict()`` and the spec back from that dict (what the
``from_dict(d)``           native directory's ``mixq.json``, plans and tables hold)
``spec.cost(shape)``       the exact bits of a ``[R, C]`` weight: the spec class's (every term of the stored form)
``stored tensors``         what a weight of a shape stores (names, dtypes, shapes) follows from its ``pack``:
                           :func:`mixq.algorithms.composite.hooks.stored_tensors` (``mixq specs SPEC``), any spec
``kernels``                the kernels its layer runs, by name (``fast_kernel(spec, device)``: the one ``"auto"``
                           decodes a few tokens with); ``runs_as(spec)``: the plain grid whose own kernels run it
                           (``+ip`` over a plain grid), else None; ``transforms``: it adds transforms to every call
``measured_as(spec)``      the spec whose RTN error, in the ``+ip`` basis, the measurement scales by a measured
                           GPTQ/RTN ratio (``+ip`` over a grid or a codebook base), else None: measured exactly
``export(spec, target)``   how an export target maps it (:class:`~mixq.config.Export`; only ``native`` by default)
``quantize`` / ``pack`` /  the implementation (optional: the built-in families' lives in
                           :mod:`mixq.algorithms.composite.families` and :mod:`mixq.runtime.layers`):
``unpack`` / ``layer``     ``quantize(W, spec, H, method, quantize_layer=..., **kw) -> (parts, Ŵ)`` (``parts`` has
                           ``spec``, ``shape``, ``dequantize()``, ``stored_bits()`` and may carry ``proxy_loss``;
                           ``quantize_layer`` quantizes a piece with any other spec), ``pack(parts) -> {name:
                           tensor}`` (the stored tensors, exactly ``spec.cost(shape)`` bits up to each tensor's byte
                           padding), ``unpack(tensors, spec, shape) -> parts``, ``layer(packed, bias, kernel)`` (the
                           module that runs a :class:`~mixq.algorithms.composite.storage.PackedComposite`;
                           :func:`~mixq.runtime.layers.make_layer` builds an inner spec's)
"""
from __future__ import annotations

from .protocol import Export

REFERENCE_KERNEL = "composite-reference"  # dequantize the stored parts on every call (mixq.runtime.composite_linear)


class CompositeFormat:
    """One family of intra-tensor composites.  Defaults: the reference layer only, native export only."""

    family = ""
    spec_type = ""                       # the "_type" of its specs' to_dict() ("": they have no dict form of their own)
    kernels: tuple[str, ...] = (REFERENCE_KERNEL,)
    transforms = False                   # adds transforms around its inner layer on every call (+ip)
    exports: dict[str, Export] = {"native": Export("exact")}

    def claims(self, spec) -> bool:
        return False

    def parse(self, name: str):
        return None

    def from_dict(self, d: dict):
        raise ValueError(f"{self.family} composites have no dict form")

    def fast_kernel(self, spec, device: str) -> str:
        """The kernel ``"auto"`` decodes with on ``device`` (``"cpu"``, ``"cuda"``), when :meth:`runs_as` is None."""
        return "reference"

    def runs_as(self, spec):
        """The plain grid whose own kernels run this spec's matmul, or None."""
        return None

    def measured_as(self, spec):
        return None

    def export(self, spec, target: str) -> Export:
        if target in self.exports:
            return self.exports[target]
        how = ("`mixq quantize --bpw X --target gguf` plans only specs it holds" if target == "gguf" else
               "`--candidates FILE` naming plain specs, or one plain `--spec`")
        return Export("refused", f"intra-tensor composite specs have no {target} type: quantize with plain specs "
                                 f"to export ({how})")
