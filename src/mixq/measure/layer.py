"""One layer's measurement as a list of independent work units, so that they can be shared out.

A layer's row of the :class:`~mixq.allocate.SensitivityTable` is ``errors[k]`` for every candidate
``k`` that fits its shape.  Each value comes from *units*, every one a pure function of the layer's
weight ``W [out, in]``, its statistics and the block inputs:

* ``("err", k)`` — the metric's error of candidate ``k`` quantized with the measuring algorithm
  (RTN; GPTQ under ``gptq-exact``; composites with their own RTN / GPTQ; ``+ip`` over a plain grid
  or a VQ codebook with RTN in its transformed basis when ``algorithm="gptq"``);
* ``("gptq", k)`` — only for ``algorithm="gptq"``: the GPTQ/RTN ratio ``min(1, e_gptq / e_rtn)`` of the
  reference candidate ``k`` of one (element family, bit band, ``+ip``) group (:func:`_groups`), by which :func:`combine`
  scales the RTN errors of that group.  Both errors are the layer-wise proxy ``tr(ΔW H ΔWᵀ)`` on at most
  :data:`RATIO_ROWS` evenly spaced output rows (GPTQ treats rows independently given ``H``, so a row
  subset is a sample of the ratio, at a fraction of the cost); ``+ip`` references are run in their
  transformed basis (``W'``, ``H'``), where rows are independent again.

The transformed basis of ``+ip`` (``W' = Q_out W Q_inᵀ``, ``H' = Q_in H Q_inᵀ`` and its GPTQ factor) is
computed once per layer and shared by all its ``+ip`` units (one basis for the two-sided transform, one for
``+ip1``'s input side alone).  In the one-sided basis the rows are the layer's own, and a trellis search weights them
by the layer's output-gradient energy ``G`` (when the metric has it): both RTN and GPTQ of a ratio, so what is
measured is what the quantize walk (given the same ``G``) makes.

:func:`measure_layer` evaluates every unit in one process; :mod:`mixq.measure.distributed` shares
the units of a block over several processes and calls the same :func:`evaluate` and :func:`combine`,
so both give the same floats (the arithmetic of each unit does not depend on where it runs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..algorithms.composite.hooks import composite_weight
from ..algorithms.composite.incoherence import SEED_IN, SEED_OUT, rotate_hessian, rotate_weight, unrotate_weight
from ..algorithms.composite.tcq import quantize_tcq
from ..algorithms.composite.vq import quantize_vq
from ..algorithms.gptq import gptq_quantize, prepare_hessian
from ..algorithms.gptq import _proxy
from ..algorithms.rtn import rtn_quantize
from ..allocate import LayerEntry, candidates_for
from ..config import QuantSpec, composite_of
from ..granularity import PerTensor
from .metrics import LayerSensitivity

Unit = tuple[str, int]  # ("err" | "gptq", candidate index)
RATIO_ROWS = 256  # output rows the GPTQ/RTN ratio of a reference is measured on
RTN_SCALE_ITERS = 1  # scale passes of a trellis's RTN in the measurement (see _rtn)
_IP_SEEDS = (SEED_IN, SEED_OUT)  # what mixq.algorithms.composite.incoherence.seeds_for gives every +ip weight
#                                   (+ip1: the first alone)


@dataclass
class LayerJob:
    """What measuring one layer needs.  ``weight()`` -> float ``W [out, in]`` (read when a unit of this layer
    runs here, so a process holds only the weights it measures); ``error(W, Wq)`` -> the metric's error."""

    fqn: str
    shape: tuple[int, int]
    weight: Callable[[], torch.Tensor]
    sens: LayerSensitivity
    error: Callable[[torch.Tensor, torch.Tensor], float]


@dataclass
class _Context:
    """Per-layer values shared by its units: ``W`` and GPTQ's inverse-Hessian Cholesky factor (computed once)."""

    W: torch.Tensor
    sens: LayerSensitivity
    algorithm: str
    _hc: torch.Tensor | None = field(default=None, repr=False)

    _ip: dict = field(default_factory=dict, repr=False)

    @property
    def hc(self):
        if self._hc is None and self.algorithm.startswith("gptq"):
            self._hc = prepare_hessian(self.sens.H)
        return self._hc

    def basis(self, sides: int) -> tuple:
        """``(W, H, GPTQ factor)`` of the plain basis (``sides`` 0), or of the ``+ip`` transformed one of ``sides``
        transforms (computed once each; the two share ``H'``)."""
        if not sides:
            return self.W, self.sens.H, self.hc
        if sides not in self._ip:
            other = self._ip.get(3 - sides)
            if other is not None:
                Hp, hcp = other[1:]
            else:
                H = self.sens.H
                Hp = None if H is None else rotate_hessian(H, _IP_SEEDS[0])
                hcp = prepare_hessian(Hp) if Hp is not None and self.algorithm.startswith("gptq") else None
            self._ip[sides] = (rotate_weight(self.W.float().cpu(), _IP_SEEDS[:sides]), Hp, hcp)
        return self._ip[sides]

    def row_weight(self, sides: int) -> torch.Tensor | None:
        """The rows' weights of a trellis search in a basis: ``G`` where the rows are the layer's (plain, ``+ip1``)."""
        return None if sides == 2 else getattr(self.sens, "G", None)


def layer_candidates(fqn: str, shape: tuple[int, int], candidates: list[QuantSpec]) -> list[QuantSpec]:
    return candidates_for(tuple(shape), candidates, fqn=fqn)


def units(cands: list[QuantSpec], shape: tuple[int, int], algorithm: str) -> list[Unit]:
    """Every unit of a layer with candidates ``cands``: one ``err`` per candidate, one ``gptq`` per reference."""
    out: list[Unit] = [("err", k) for k in range(len(cands))]
    if algorithm == "gptq":
        out += [("gptq", ref) for ref in _references(cands, shape).values()]
    return out


def unit_cost(unit: Unit, shape: tuple[int, int]) -> float:
    """A rough relative cost of a unit (for balancing only; results never depend on it): a quantize-and-score
    pass is ~``out·in``, a GPTQ ratio ~``min(out, RATIO_ROWS)·in·(1 + in/128)`` (the column sweep with lazy
    batch updates on the sampled rows)."""
    o, i = shape
    return float(min(o, RATIO_ROWS) * i) * (1.0 + i / 128) if unit[0] == "gptq" else float(o * i)


def evaluate(ctx: _Context, cands: list[QuantSpec], unit: Unit, err: Callable[[torch.Tensor], float]) -> float:
    """The float of one unit (see the module docstring)."""
    kind, k = unit
    c, W, algorithm = cands[k], ctx.W, ctx.algorithm
    if kind == "gptq":
        return gptq_ratio(ctx, c)
    scaled = _scaled_as(c)
    if scaled is not None and scaled[1] and algorithm == "gptq":  # +ip over a grid / codebook: RTN in its basis
        sides = scaled[1]
        Wq = unrotate_weight(_rtn(ctx.basis(sides)[0], scaled[0], ctx.row_weight(sides)), _IP_SEEDS[:sides])
    elif composite_of(c) is not None:  # intra-tensor composites: always measured with their own RTN / GPTQ
        Wq = composite_weight(W, c, ctx.sens, algorithm, ctx.hc)
    elif algorithm == "gptq-exact" and not c.is_float_keep:
        Wq = gptq_quantize(W, ctx.sens.H, c, hinv_chol=ctx.hc).weight
    else:
        _, Wq = rtn_quantize(W, c)
    return float(err(Wq.to(W.device)))  # the +ip basis is computed on the CPU


def ratio_rows(n_rows: int, spec: QuantSpec) -> torch.Tensor | slice:
    """The output rows a GPTQ/RTN ratio is measured on: all of them for a per-tensor grid or a tensor scale
    (their parameters see every row), else at most :data:`RATIO_ROWS`, evenly spaced."""
    if n_rows <= RATIO_ROWS or isinstance(spec.granularity, PerTensor) or spec.tensor_scale:
        return slice(None)
    return torch.linspace(0, n_rows - 1, RATIO_ROWS).round().long()


def gptq_ratio(ctx: _Context, c: QuantSpec) -> float:
    """``min(1, e_gptq / e_rtn)`` of candidate ``c`` (module docstring), in ``c``'s basis."""
    spec, sides = _scaled_as(c)
    W, H, hc = ctx.basis(sides)
    rows = ratio_rows(W.shape[0], spec)
    Ws, g = W[rows], ctx.row_weight(sides)
    g = None if g is None else g.reshape(-1)[rows]
    e_rtn = _proxy(Ws - _rtn(Ws, spec, g), H)
    e_gptq = _proxy(Ws - _gptq(Ws, H, spec, hc, g), H)
    return min(1.0, e_gptq / e_rtn) if e_rtn > 0 else 1.0


def evaluate_units(job: LayerJob, cands: list[QuantSpec], todo: list[Unit], algorithm: str) -> dict[Unit, float]:
    """Evaluate ``todo`` (units of one layer) in order; ``W`` is read once."""
    if not todo:
        return {}
    W = job.weight()
    ctx = _Context(W, job.sens, algorithm)
    err = lambda Wq: job.error(W, Wq)  # noqa: E731
    return {u: evaluate(ctx, cands, u, err) for u in todo}


def combine(fqn: str, shape: tuple[int, int], cands: list[QuantSpec], algorithm: str,
            values: dict[Unit, float]) -> LayerEntry:
    """The layer's table row from its units' values (the GPTQ/RTN ratio applied under ``gptq``)."""
    errs = [values[("err", k)] for k in range(len(cands))]
    if algorithm == "gptq":
        for key, ref in _references(cands, shape).items():
            ratio = values[("gptq", ref)]
            for k in _groups(cands)[key]:
                errs[k] = values[("err", k)] * ratio
    return LayerEntry(fqn=fqn, shape=tuple(shape), candidates=tuple(cands), errors=tuple(errs))


def measure_layer(fqn, W, sens, candidates, algorithm, err) -> LayerEntry:
    """Every unit of one layer, here; ``err(Wq) -> float``: the metric's error of one quantized weight."""
    shape = tuple(W.shape)
    cands = layer_candidates(fqn, shape, candidates)
    job = LayerJob(fqn, shape, lambda: W, sens, lambda _W, Wq: err(Wq))
    return combine(fqn, shape, cands, algorithm, evaluate_units(job, cands, units(cands, shape, algorithm), algorithm))


def _rtn(W: torch.Tensor, spec: QuantSpec, row_weight=None) -> torch.Tensor:
    """RTN ``Ŵ`` of a plain grid or a codebook base (VQ, TCQ; a trellis's search weighting rows by ``row_weight``).
    A trellis's scales get one pass here (:data:`RTN_SCALE_ITERS`): the RTN error of a TCQ candidate is only ever
    used times its group's GPTQ/RTN ratio, whose RTN is this same one, so a second pass (0.3-0.9 % less error, twice
    the search) buys nothing."""
    q = _codebook_quantizer(spec)
    if q is quantize_tcq:
        return q(W, spec, scale_iters=RTN_SCALE_ITERS, row_weight=row_weight)[1]
    return q(W, spec)[1] if q else rtn_quantize(W, spec)[1]


def _gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, hc, row_weight=None) -> torch.Tensor:
    """GPTQ ``Ŵ`` (vector feedback for a VQ codebook, the column's Viterbi search for a trellis, its rows weighted by
    ``row_weight``)."""
    q = _codebook_quantizer(spec)
    if q is quantize_tcq:
        return q(W, spec, H, "gptq", hinv_chol=hc, row_weight=row_weight)[1]
    if q:
        return q(W, spec, H, "gptq", hinv_chol=hc)[1]
    return gptq_quantize(W, H, spec, hinv_chol=hc).weight


def _codebook_quantizer(spec):
    if getattr(spec, "vq_dim", 0):
        return quantize_vq
    if getattr(spec, "trellis", 0):
        return quantize_tcq
    return None


def _scaled_as(c) -> tuple[QuantSpec, int] | None:
    """``(spec, the +ip basis's transforms: 0 plain, 1 +ip1, 2 +ip)`` whose RTN error, scaled by a measured GPTQ/RTN ratio, stands for candidate ``c``:
    a plain grid itself; a composite what its family says (``measured_as``: ``+ip`` over a plain grid or a codebook
    base, whose GPTQ is a column sweep like scalar GPTQ's, rows independent given ``H``); None: measured exactly."""
    fam = composite_of(c)
    if fam is None:
        return c, 0
    inner = fam.measured_as(c)
    return None if inner is None else (inner, c.ip_sides)


def _family(c) -> tuple[str, int]:
    if getattr(c, "vq_dim", 0):
        return f"vq{c.vq_dim}", min(4, c.vq_bits // c.vq_dim)
    if getattr(c, "trellis", 0):
        return "tcq", min(4, c.trellis // 2)
    return c.dtype, min(4, c.bits)


def _groups(cands) -> dict[tuple[str, int, int], list[int]]:
    """Scaled candidates by (element family, bit band, ``+ip`` transforms), each group sharing one measured GPTQ/RTN ratio.

    An NF grid gains a different share of its error from GPTQ than an int grid of the same bits, ``+ip``
    candidates another again, and VQ codebooks (by vector length) and trellises are families of their own.  The band is the
    bit width below 4 bits and ``4`` from there up (for VQ: the whole bits of its rate, so VQ2 and VQ2.5 share a
    ratio): measured on SmolLM2's real layers, a layer's ratio moves by up to 2x between 2 and 3 bits but by
    about 15 % between 4 and 8 bits or across one VQ band, and the errors those ratios scale are small.  The
    trellis rates keep their bands (2, 3, 4): one ratio for all five rates (their ratios were a median 3.6 % and at
    most 28 % off TCQ3's on 21 SmolLM2 layers) saved ~35 s of a 3.0-bpw quantize but its plans scored 3-5 % worse
    KL in domain at 2.5 and 3.0 bpw (generalization.md runs ``default6``, ``default6-bands``)."""
    out: dict[tuple[str, int, int], list[int]] = {}
    for k, c in enumerate(cands):
        if not c.is_float_keep and _scaled_as(c) is not None:
            out.setdefault((*_family(c), _scaled_as(c)[1]), []).append(k)
    return out


def _references(cands, shape) -> dict[tuple[str, int, int], int]:
    """Each group's reference: the candidate of median bit cost."""
    return {key: sorted(ks, key=lambda k: cands[k].cost(tuple(shape)).total)[len(ks) // 2]
            for key, ks in _groups(cands).items()}
