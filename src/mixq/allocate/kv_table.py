"""The KV measurement as a document: per layer, the K and V errors at each measured width.

:class:`KVSensitivityTable` (what :func:`mixq.measure.kv.measure_kv` returns and ``mixq measure-kv`` writes)
holds one :class:`KVEntry` per layer and tensor; :meth:`KVSensitivityTable.rows` turns it into allocator rows
whose costs come from :func:`~mixq.runtime.kv_settings.kv_part_bits`.  :func:`check_doc` refuses a JSON document
of the wrong type or version (the KV plan of :mod:`mixq.allocate.joint` uses it too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..jsonio import read_json, write_json_atomic
from ..runtime.kv_codec import FP, kv_spec
from ..runtime.kv_settings import KVSettings, kv_part_bits

KV_METRICS = ("kl", "loss")
KV_TABLE_VERSION = 1


@dataclass(frozen=True)
class KVEntry:
    """One layer's keys or values: ``errors[c]`` for ``bits[c]`` (ascending; 16 = kept, error 0).
    The allocator's row for it is named :attr:`name`, its costs come from :func:`kv_part_bits`."""

    layer: int
    kind: str
    bits: tuple[int, ...]
    errors: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        object.__setattr__(self, "errors", tuple(float(e) for e in self.errors))
        if self.kind not in ("k", "v"):
            raise ValueError(f"KV entry kind must be 'k' or 'v', got {self.kind!r}")
        if not self.bits or len(self.bits) != len(self.errors) or list(self.bits) != sorted(set(self.bits)):
            raise ValueError(f"{self.name}: bits must be distinct, ascending, one error each: {self.bits}")
        for b, e in zip(self.bits, self.errors):
            kv_spec(b)
            if not math.isfinite(e) or e < 0:
                raise ValueError(f"{self.name}: error at {b} bits must be finite and >= 0, got {e}")

    @property
    def name(self) -> str:
        return f"kv.{self.layer}.{self.kind}"

    def error(self, bits: int) -> float:
        return self.errors[self.bits.index(bits)]


def check_doc(d, type_name: str, version: int, what: str, command: str, where: str = "") -> None:
    """Refuse a JSON document that is not a ``type_name`` of ``version`` with a message naming the fix."""
    if not isinstance(d, dict) or d.get("_type") != type_name:
        got = d.get("_type") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{where}not a {what} (found _type={got!r}): write one with `{command}`")
    if d.get("_version") != version:
        raise ValueError(f"{where}{what} version {d.get('_version')!r} is not supported")


@dataclass(frozen=True)
class KVSensitivityTable:
    """Measured KV errors of every layer's K and V; ``dims = (n_layers, n_kv_heads, head_dim)``.

    ``model`` is :func:`mixq.models.model_fingerprint` of the measured (fp) model; ``meta`` holds the
    calibration data, metric, engine and decode chunking.
    """

    entries: tuple[KVEntry, ...]
    dims: tuple[int, int, int]
    metric: str
    settings: KVSettings = KVSettings()
    model: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "entries", tuple(self.entries))
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        object.__setattr__(self, "meta", dict(self.meta))
        if self.metric not in KV_METRICS:
            raise ValueError(f"KV metric must be one of {KV_METRICS}, got {self.metric!r}")
        L = self.dims[0]
        want = [(i, k) for i in range(L) for k in ("k", "v")]
        got = [(e.layer, e.kind) for e in self.entries]
        if got != want:
            raise ValueError(f"a KV table needs K and V entries of layers 0..{L - 1} in order")

    def entry(self, layer: int, kind: str) -> KVEntry:
        return self.entries[2 * layer + (kind == "v")]

    @property
    def n_layers(self) -> int:
        return self.dims[0]

    @property
    def bits(self) -> tuple[int, ...]:
        """Widths every entry was measured at (incl. 16)."""
        common = set(self.entries[0].bits)
        for e in self.entries[1:]:
            common &= set(e.bits)
        return tuple(sorted(common))

    def part_bits(self, kind: str, bits: int, context: int, batch: int = 1, fp_bits: int = 16) -> int:
        return kv_part_bits(self.dims, kind, bits, context, batch, self.settings, fp_bits)

    def rows(self, context: int, batch: int = 1, *, allowed=None, fp_bits: int = 16):
        """Allocator rows ``(name, bits, costs, errors)`` for a cache of ``context`` tokens × ``batch``
        (``allowed``: restrict the widths, e.g. ``(2, 4, 16)``)."""
        cost = {}
        out = []
        for e in self.entries:
            bs = [b for b in e.bits if allowed is None or b in allowed]
            if not bs:
                raise ValueError(f"{e.name}: none of the allowed KV widths {sorted(allowed)} was measured ({e.bits})")
            cs = []
            for b in bs:
                if (e.kind, b) not in cost:
                    cost[(e.kind, b)] = self.part_bits(e.kind, b, context, batch, fp_bits)
                cs.append(cost[(e.kind, b)])
            out.append((e.name, tuple(bs), tuple(cs), tuple(e.error(b) for b in bs)))
        return out

    def check_model(self, model: nn.Module) -> None:
        from ..models import model_fingerprint  # noqa: PLC0415

        fp = model_fingerprint(model)
        if self.model and fp != self.model:
            raise ValueError(f"the KV measurement is of model {self.model}, this model is {fp}")

    def to_dict(self) -> dict:
        return {"_type": "KVSensitivityTable", "_version": KV_TABLE_VERSION, "model": self.model,
                "metric": self.metric, "dims": {"n_layers": self.dims[0], "n_kv_heads": self.dims[1],
                                                 "head_dim": self.dims[2]},
                "settings": self.settings.to_dict(), "meta": self.meta,
                "layers": [{"layer": i, "bits": list(self.entry(i, "k").bits), "k": list(self.entry(i, "k").errors),
                            "v": list(self.entry(i, "v").errors)} for i in range(self.n_layers)]}

    @classmethod
    def from_dict(cls, d: dict) -> "KVSensitivityTable":
        check_doc(d, "KVSensitivityTable", KV_TABLE_VERSION, "KV measurement", "mixq measure-kv")
        try:
            dims = (d["dims"]["n_layers"], d["dims"]["n_kv_heads"], d["dims"]["head_dim"])
            entries = []
            for row in d["layers"]:
                for kind in ("k", "v"):
                    entries.append(KVEntry(int(row["layer"]), kind, tuple(row["bits"]), tuple(row[kind])))
            return cls(tuple(entries), dims, d["metric"], KVSettings.from_dict(d.get("settings", {})),
                       d.get("model", ""), d.get("meta", {}))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed KV measurement: missing or bad field {e}") from None

    def save(self, path, *, overwrite: bool = False) -> Path:
        return write_json_atomic(path, self.to_dict(), overwrite=overwrite)

    @classmethod
    def load(cls, path) -> "KVSensitivityTable":
        try:
            return cls.from_dict(read_json(path))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def format(self) -> str:
        """A per-layer text table of the errors (one column per K/V width)."""
        bs = [b for b in self.bits if b != FP]
        head = ["layer"] + [f"K{b}" for b in bs] + [f"V{b}" for b in bs]
        lines = ["  ".join(f"{h:>9}" for h in head)]
        for i in range(self.n_layers):
            k, v = self.entry(i, "k"), self.entry(i, "v")
            lines.append("  ".join([f"{i:>9}"] + [f"{k.error(b):9.3g}" for b in bs] + [f"{v.error(b):9.3g}" for b in bs]))
        return "\n".join(lines)
