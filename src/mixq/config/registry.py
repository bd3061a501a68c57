"""The element-format registry: every family mixq knows, built-in (:mod:`mixq.config.families`) or registered.

``register(fmt)``      add a family (an :class:`~mixq.config.protocol.ElementFormat`); its names parse, its specs
                       validate, cost, save, load and export through it from then on
``owner(dtype)``       the family that owns an element dtype (validation, the math, kernels)
``family_of(spec)``    the family that claims a spec (names, stored tensors, cost, export mappings): a scale
                       scheme such as MX or NVFP4 claims specs whose dtype another family owns
``parse_head(h, v)``   the QuantSpec fields of a name head (``W4``, ``MXFP6`` with variant ``e3m2``), and its family
``dtypes()``           every registered element dtype; ``families()`` every family
"""
from __future__ import annotations

from .families import BUILTIN
from .protocol import ElementFormat

_FAMILIES: list[ElementFormat] = list(BUILTIN)


def register(fmt: ElementFormat) -> ElementFormat:
    """Register a family (looked up before the built-in ones, so it may claim specs they would); returns it."""
    if not isinstance(fmt, ElementFormat):
        raise TypeError(f"register an ElementFormat, not {type(fmt).__name__}")
    taken = {d for f in _FAMILIES for d in f.dtypes} & set(fmt.dtypes)
    if taken:
        raise ValueError(f"element dtype(s) {sorted(taken)} already belong to a registered family")
    _FAMILIES.insert(0, fmt)
    return fmt


def unregister(fmt: ElementFormat) -> None:
    _FAMILIES.remove(fmt)


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
