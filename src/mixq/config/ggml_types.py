"""llama.cpp's own block types as mixq element formats: the K-quants (Q2_K ... Q6_K) and IQ4_NL.

Each is a fixed name (``Q4_K``, ``IQ4_NL``; only ``-mse`` could follow, and is refused: these types search
their scales already).  mixq fits, encodes and decodes them itself (:mod:`mixq.formats.kquant`,
:mod:`mixq.formats.iq4nl`), so RTN and GPTQ choose codes and scales *inside* the type, and the GGUF exporter
writes them as they are (``mixq.export.ggml_exact``).

K-quants: a 256-element super-block (``QuantSpec.granularity`` is ``PerGroup(256)``: rows must be multiples of
256) holds ``nsub`` sub-blocks; sub-block ``j`` has an integer scale ``sc_j`` (and, for the affine types, an
integer min ``m_j``) times the super-block's fp16 ``d`` (``dmin``)::

    type   sub  element value (code c)                      sc_j / m_j          bits / 256 weights   bpw
    Q6_K   16   (d * sc_j) * (c - 32)                        int8                1536 + 16 + 16*8     6.5625
    Q5_K   32   (d * sc_j) * c - dmin * m_j                  6-bit unsigned      1280 + 32 + 8*12     5.5
    Q4_K   32   (d * sc_j) * c - dmin * m_j                  6-bit unsigned      1024 + 32 + 8*12     4.5
    Q3_K   16   (d * sc_j) * (c - 4)                         6-bit, -32..31      768 + 16 + 16*6      3.4375
    Q2_K   16   (d * sc_j) * c - dmin * m_j                  4-bit unsigned      512 + 32 + 16*8      2.625

IQ4_NL: blocks of 32 with one fp16 ``d``, ``x = d * KVALUES_IQ4NL[c]`` (a fixed 16-entry non-linear table);
4.5 bpw.

What a quantized tensor stores (``QParams``, one row per super-block, ``rows_view`` order): ``scale``
``[R, 1 + nsub]`` = ``(d, sc_0 .. sc_{nsub-1})``, and for the affine types ``offset`` ``[R, 1 + nsub]`` =
``(dmin, m_0 ..)``; the stored form (``formats.bitpack``) is the fp16 ``d`` plus the sub-block integers at
their width, which is exactly what :meth:`stored` counts.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields, is_dataclass

from ..granularity import PerGroup, n_groups
from .protocol import ElementFormat, Export

KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_PLAIN_FIELDS = {"dtype", "bits", "granularity", "symmetric", "scale_dtype", "zero_dtype", "tensor_scale", "clip"}
_REFUSE_HF = Export("refused", "a llama.cpp block type: export it with --format gguf (or keep the native directory)")


@dataclass(frozen=True)
class KLayout:
    """The structure of one K-quant: element ``bits``, sub-block length ``sub``, sub-scale width ``sc_bits`` and
    range ``sc_lo..sc_hi``, and whether it is affine (stores mins) or symmetric (codes centred on ``mid``)."""

    bits: int
    sub: int
    sc_bits: int
    sc_lo: int
    sc_hi: int
    affine: bool

    @property
    def nsub(self) -> int:
        return 256 // self.sub

    @property
    def mid(self) -> int:
        return 0 if self.affine else 2 ** (self.bits - 1)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1


K_LAYOUTS: dict[str, KLayout] = {
    "q6_k": KLayout(6, 16, 8, -128, 127, False),
    "q5_k": KLayout(5, 32, 6, 0, 63, True),
    "q4_k": KLayout(4, 32, 6, 0, 63, True),
    "q3_k": KLayout(3, 16, 6, -32, 31, False),
    "q2_k": KLayout(2, 16, 4, 0, 15, True),
}


class _GgmlType(ElementFormat):
    """A fixed llama.cpp block type: the head is the ggml type name."""

    fixed = True
    scales = ("fp16",)
    importance_fit = True  # GPTQ passes diag(H) to its fit (as llama.cpp's imatrix)

    def check(self, spec):
        super().check(spec)
        if spec.clip != "minmax":
            raise ValueError(f"{self.head(spec)} searches its scales already: no -mse variant")
        # a composite over this base (CompositeSpec checks its base fields here): only +ip keeps the block structure
        ext = [f.name for f in (fields(spec) if is_dataclass(spec) else ()) if f.name not in _PLAIN_FIELDS
               and f.name != "incoherent" and f.default is not MISSING and getattr(spec, f.name) != f.default]
        if ext:
            raise ValueError(f"{self.head(spec)} is a llama.cpp block type: of the composite extensions only +ip "
                             f"applies to it (this one sets {', '.join(ext)})")

    def name(self, spec):
        return self.head(spec)

    def export(self, spec, target):
        if target == "gguf":
            return Export("exact", f"ggml's {self.head(spec)} block type")
        if target in ("compressed-tensors", "gptq"):
            return _REFUSE_HF
        return super().export(spec, target)


class KQuantFormat(_GgmlType):
    family, dtypes, heads = "K-quant", tuple(K_LAYOUTS), ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

    def parse(self, head, variant):
        dt = head.lower()
        if dt not in K_LAYOUTS:
            return None
        if variant:
            raise ValueError(f"{head} has no element variants such as {variant!r}")
        return dict(dtype=dt, bits=K_LAYOUTS[dt].bits, granularity=PerGroup(256))

    def check_bits(self, spec):
        lay = K_LAYOUTS[spec.dtype]
        if spec.bits != lay.bits or spec.granularity != PerGroup(256) or not spec.symmetric or spec.tensor_scale:
            raise ValueError(f"{spec.dtype.upper()} is {lay.bits}-bit codes in 256-element super-blocks (g256), "
                             "nothing else: write it as its name")

    def head(self, spec):
        return spec.dtype.upper()

    @staticmethod
    def layout(spec) -> KLayout:
        return K_LAYOUTS[spec.dtype]

    def stored(self, spec, shape):
        lay = K_LAYOUTS[spec.dtype]
        rows, cols = int(shape[0]), int(shape[1])
        ng = n_groups(spec.granularity, (rows, cols))  # raises unless cols is a multiple of 256
        two_level = 16 + lay.nsub * lay.sc_bits  # fp16 d + the sub-block integers, per super-block
        out = {"codes": (lay.bits, (rows, cols)), "scale": (two_level, (ng,))}
        if lay.affine:
            out["offset"] = (two_level, (ng,))
        return out


class IQ4NLFormat(_GgmlType):
    family, dtypes, heads = "IQ4_NL", ("iq4nl",), ("IQ4_NL",)

    def parse(self, head, variant):
        if head != "IQ4_NL":
            return None
        if variant:
            raise ValueError(f"{head} has no element variants such as {variant!r}")
        return dict(dtype="iq4nl", bits=4, granularity=PerGroup(32))

    def check_bits(self, spec):
        if spec.bits != 4 or spec.granularity != PerGroup(32) or not spec.symmetric or spec.tensor_scale:
            raise ValueError("IQ4_NL is 4-bit codes into its fixed table with an fp16 scale per 32: write it as IQ4_NL")

    def head(self, spec):
        return "IQ4_NL"


GGML_FAMILIES: tuple[ElementFormat, ...] = (KQuantFormat(), IQ4NLFormat())
