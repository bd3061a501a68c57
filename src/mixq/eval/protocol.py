"""What was measured and how: every reported number carries its :class:`Protocol`.

Perplexities are only comparable under the same corpus, split, tokenizer, window length,
stride, BOS policy and token budget, so ``evaluate`` refuses a protocol that does not
describe the windows it is given and writes the protocol into every result.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import ClassVar

import torch

from mixq.bos import BOS_CHOICES, SOURCES
from mixq.data import BOS_POLICIES, EvalWindows
from mixq.eval.kl import ReferenceCache, compare
from mixq.eval.perplexity import perplexity


@dataclass(frozen=True)
class Protocol:
    """Evaluation protocol.  ``seqlen``/``stride`` in tokens (``stride == seqlen``: disjoint
    GPTQ windows); ``max_tokens`` caps the stream (None: whole split); ``bos`` is ``"none"``
    or ``"prepend"``; ``dtype`` is the model's compute dtype, e.g. ``"bfloat16"``; ``bos_policy``
    (``--bos``: auto, always, never) and ``bos_source`` (tokenizer, family, user, undetermined) say
    why (:mod:`mixq.bos`; None in results written before they were recorded)."""

    corpus: str
    split: str
    tokenizer: str
    seqlen: int
    stride: int
    bos: str
    max_tokens: int | None
    n_windows: int
    n_scored: int
    dtype: str
    bos_policy: str | None = None
    bos_source: str | None = None
    VERSION: ClassVar[int] = 1

    def __post_init__(self):
        if self.seqlen < 2 or not 1 <= self.stride <= self.seqlen:
            raise ValueError(f"need seqlen >= 2 and 1 <= stride <= seqlen, got seqlen={self.seqlen}, stride={self.stride}")
        if self.bos not in BOS_POLICIES:
            raise ValueError(f"bos must be one of {BOS_POLICIES}, got {self.bos!r}")
        if self.bos_policy not in (None, *BOS_CHOICES) or self.bos_source not in (None, *SOURCES):
            raise ValueError(f"bos_policy must be one of {BOS_CHOICES} and bos_source one of {SOURCES} (or None), "
                             f"got {self.bos_policy!r}, {self.bos_source!r}")
        if (self.bos_policy, self.bos) in (("never", "prepend"), ("always", "none")):
            raise ValueError(f"bos {self.bos!r} contradicts the BOS policy {self.bos_policy!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive or None, got {self.max_tokens}")
        if self.n_windows < 0 or self.n_scored < 0:
            raise ValueError(f"n_windows and n_scored must be >= 0, got {self.n_windows}, {self.n_scored}")

    @classmethod
    def for_windows(cls, windows: EvalWindows, *, corpus: str, split: str, tokenizer: str,
                    dtype: str | torch.dtype, bos_decision=None) -> Protocol:
        """The protocol of ``windows`` (window geometry and counts are read from them); ``bos_decision``
        (a :class:`mixq.bos.BosDecision`) records the BOS policy and what decided it."""
        dtype = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
        return cls(corpus=str(corpus), split=split, tokenizer=tokenizer, seqlen=windows.seqlen,
                   stride=windows.stride, bos=windows.bos, max_tokens=windows.max_tokens,
                   n_windows=windows.n_windows, n_scored=windows.n_scored, dtype=dtype,
                   bos_policy=getattr(bos_decision, "policy", None), bos_source=getattr(bos_decision, "source", None))

    def to_dict(self) -> dict:
        return {"version": self.VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Protocol:
        if d.get("version") != cls.VERSION:
            raise ValueError(f"protocol version {d.get('version')!r} is not supported (expected {cls.VERSION})")
        # fields with a default (bos_policy, bos_source) were added later: older JSONs lack them
        return cls(**{f.name: d[f.name] if f.default is MISSING else d.get(f.name, f.default) for f in fields(cls)})

    def check(self, windows: EvalWindows) -> None:
        """Raise ValueError if ``windows`` were not built under this protocol."""
        got = {"seqlen": windows.seqlen, "stride": windows.stride, "bos": windows.bos,
               "max_tokens": windows.max_tokens, "n_windows": windows.n_windows, "n_scored": windows.n_scored}
        diff = {k: (getattr(self, k), v) for k, v in got.items() if getattr(self, k) != v}
        if diff:
            detail = ", ".join(f"{k}: protocol {a} vs windows {b}" for k, (a, b) in diff.items())
            raise ValueError(f"protocol does not describe these windows ({detail}); build it with Protocol.for_windows")


def evaluate(model: torch.nn.Module, windows: EvalWindows, protocol: Protocol,
             reference: torch.nn.Module | ReferenceCache | None = None, *,
             batch_size: int = 1, progress: bool = True) -> dict:
    """JSON-ready evaluation of ``model`` on ``windows`` under ``protocol``.

    Returns ``{"perplexity", "nll", "kl", "kl_p99", "top1_agreement", "reference_perplexity",
    "n_scored", "seconds", "protocol": {...}}``; without ``reference`` the last four metrics
    that need one (kl, kl_p99, top1_agreement, reference_perplexity) are None.
    """
    protocol.check(windows)
    if reference is None:
        r = perplexity(model, windows, batch_size=batch_size, progress=progress)
        r.update(kl=None, kl_p99=None, top1_agreement=None, reference_perplexity=None)
    else:
        r = compare(model, reference, windows, batch_size=batch_size, progress=progress)
    keys = ("perplexity", "nll", "kl", "kl_p99", "top1_agreement", "reference_perplexity", "n_scored", "seconds")
    return {**{k: r[k] for k in keys}, "protocol": protocol.to_dict()}
