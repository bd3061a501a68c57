"""The element-format registry: every family mixq knows, built-in (:mod:`mixq.config.families`) or registered.

``register(fmt)``      add a family (an :class:`~mixq.config.protocol.ElementFormat`); its names parse, its specs
                       validate, cost, save, load and export through it from then on
``owner(dtype)``       the family that owns an element dtype (validation, the math, kernels)
``family_of(spec)``    the family that claims a spec (names, stored tensors, cost, export mappings): a scale
                       scheme such as MX or NVFP4 claims specs whose dtype another family owns
``parse_head(h, v)``   the QuantSpec fields of a name head (``W4``, ``MXFP6`` with variant ``e3m2``), and its family
``dtypes()``           every registered element dtype; ``families()`` every family
``composite_of(spec)`` the intra-tensor composite family (:class:`~mixq.config.composite_protocol.CompositeFormat`)
                       that claims a spec, None for a plain one; ``format_of(spec)`` that family, else the element
                       family (what answers ``export_to``); ``composite_families()`` every composite family
"""
from __future__ import annotations

from .composite_protocol import CompositeFormat
from .families import BUILTIN
from .protocol import ElementFormat

_FAMILIES: list[ElementFormat] = list(BUILTIN)
_COMPOSITES: list[CompositeFormat] = []  # the built-in ones are added by mixq.config.composite_families


def register(fmt: ElementFormat | CompositeFormat) -> ElementFormat | CompositeFormat:
    """Register a family, element or composite (looked up before the built-in ones, so it may claim specs they
    would); returns it."""
    if isinstance(fmt, CompositeFormat):
        if fmt in _COMPOSITES:
            raise ValueError(f"composite family {fmt.family!r} is already registered")
        _COMPOSITES.insert(0, fmt)
        return fmt
    if not isinstance(fmt, ElementFormat):
        raise TypeError(f"register an ElementFormat or a CompositeFormat, not {type(fmt).__name__}")
    taken = {d for f in _FAMILIES for d in f.dtypes} & set(fmt.dtypes)
    if taken:
        raise ValueError(f"element dtype(s) {sorted(taken)} already belong to a registered family")
    _FAMILIES.insert(0, fmt)
    return fmt


def add_builtin_composites(*fmts: CompositeFormat) -> None:
    """The built-in composite families, looked up after every registered one (:mod:`mixq.config.composite_families`)."""
    _COMPOSITES.extend(f for f in fmts if f not in _COMPOSITES)


def unregister(fmt: ElementFormat | CompositeFormat) -> None:
    (_COMPOSITES if isinstance(fmt, CompositeFormat) else _FAMILIES).remove(fmt)


def families() -> tuple[ElementFormat, ...]:
    """Every registered family, in lookup order."""
    return tuple(_FAMILIES)


def dtypes() -> tuple[str, ...]:
    return tuple(d for f in reversed(_FAMILIES) for d in f.dtypes)


def owner(dtype: str) -> ElementFormat:
    for f in _FAMILIES:
        if dtype in f.dtypes:
            return f
    raise ValueError(f"unknown element dtype {dtype!r}: choose one of {', '.join(dtypes())}")


def family_of(spec) -> ElementFormat:
    for f in _FAMILIES:
        if f.claims(spec):
            return f
    return owner(spec.dtype)


def parse_head(head: str, variant: str | None) -> tuple[ElementFormat, dict] | None:
    for f in _FAMILIES:
        kw = f.parse(head, variant)
        if kw is not None:
            return f, kw
    return None


def heads() -> list[str]:
    """Every name head, registered families first, then element families before scale schemes."""
    return [h for f in sorted(_FAMILIES, key=lambda f: not f.dtypes) for h in f.heads]


def composite_families() -> tuple[CompositeFormat, ...]:
    """Every composite family, in lookup order."""
    return tuple(_COMPOSITES)


def composite_of(spec) -> CompositeFormat | None:
    """The composite family that claims ``spec``; None for a plain spec (an element format's)."""
    for f in _COMPOSITES:
        if f.claims(spec):
            return f
    return None


def format_of(spec) -> ElementFormat | CompositeFormat:
    """What answers for ``spec`` as a whole (its export mappings): its composite family, else its element family."""
    return composite_of(spec) or family_of(spec)


def composite_by_type(spec_type) -> CompositeFormat | None:
    """The first composite family whose specs' ``to_dict()`` has ``"_type": spec_type``."""
    return next((f for f in _COMPOSITES if spec_type and f.spec_type == spec_type), None)


def parse_composite(name: str):
    """A registered composite family's spec of ``name`` (its own names), else None."""
    for f in _COMPOSITES:
        s = f.parse(name)
        if s is not None:
            return s
    return None
