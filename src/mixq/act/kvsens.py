"""KV-cache sensitivity per layer and per K/V, an exact decode simulation, and KV evaluation with KL.

Sensitivity (:func:`measure_kv`)
    For every attention layer ``i``, each of ``K`` and ``V``, and each width ``b`` in ``bits``
    (default 2, 3, 4, 8), only that tensor of that layer goes through the KIVI cache at ``b`` bits
    (every other layer and the other tensor stay at 16) and the calibration windows are scored::

        e_kl(i, K, b)   = mean_t KL(P_fp(· | x_<t) ‖ P_q(· | x_<t))              (default, nats/token)
        e_loss(i, K, b) = max(0, mean_t NLL_q(t) − mean_t NLL_fp(t))              (``metric="loss"``)

    over every predicted position of every calibration window.  Both are per-token loss increases
    in nats — the unit of mixq's ``kfac`` weight errors (``½ E_t[ΔyᵀG Δy]``, a second-order
    per-token loss increase) — so weight and KV errors add in one knapsack
    (:mod:`mixq.act.joint`).  16 bits costs nothing and has error 0 (no measurement).
    The KV errors are measured at the calibration window length; costs are counted at whatever
    context the plan states, so a plan for a much longer context extrapolates the per-token error.

Decode semantics
    KIVI quantizes a token's key/value when it leaves the fp residual window, in token groups of
    ``k_group`` (keys, per channel) or per token (values); decoding ``chunk`` tokens per forward
    (:func:`mixq.act.kveval.eval_with_kv_quant`) means a token at position ``t`` in a chunk that
    starts at ``n`` sees the cache as it was after ``n`` tokens::

        n(t)  = 0                                  t < P          (prefill P, default chunk)
              = P + c·⌊(t − P)/c⌋                  otherwise
        keys   s < Tk(n) = G·⌊max(n − R, 0)/G⌋     dequantized, the rest (window, chunk) fp
        values s < Tv(n) = max(n − R, 0)           dequantized

    ``engine="simulate"`` (:func:`simulate_kivi`) applies exactly this inside one full forward:
    an attention function registered with transformers computes, for each quantized layer,
    ``S = where(s < Tk(n(t)), q·k̂ₛ, q·kₛ)`` and ``out = Σ_s p_ts (v̂ₛ if s < Tv(n(t)) else vₛ)`` with
    the same quantizers as :class:`~mixq.act.kvcache.KIVILayer` (:class:`~mixq.act.kvcodec.KVCodec`:
    KIVI grids, pre-RoPE keys, rotation).  Decoding token by token (``chunk=1``) then costs one
    forward per window instead of one per token, and is checked against the real :class:`KIVICache`
    in the tests (same logits up to float rounding).

    Important tokens (``settings.important``, MiKV): K and V are both quantized up to
    ``Tq(n) = G·⌊max(n − R, 0)/G⌋`` and which tokens of group ``j`` are important depends on the
    attention paid by the queries before the group was flushed, which in turn saw the earlier
    groups' decisions.  So the queries are processed in blocks of equal ``J(t) = Tq(n(t))/G`` in
    order: before a block, the groups it newly sees are decided from the importance accumulated so
    far (``a_s = Σ_{u < block} Σ_{heads of the KV head} p_us``, the probabilities as computed with the
    quantized cache) and quantized; the block's probabilities are then added.  A query's output
    depends only on queries before it (causal), and the real cache does the same with the eager
    attention probabilities (:func:`~mixq.act.kvcache.kv_cache_feed`).  Pre-RoPE keys take the
    rotary tables from the attention module's ``position_embeddings`` (a forward pre-hook).  ``engine="cache"`` runs the real cache
    chunk by chunk.  In the measurement, the blocks before layer ``i`` are unaffected by
    quantizing layer ``i``'s cache, so with the simulation their fp outputs are replayed from one
    fp pass instead of recomputed (about half of the block compute saved).

Costs
    :func:`kv_part_bits` is the exact bit count of one layer's K (or V) at ``context`` tokens for
    ``batch`` sequences, derived from :func:`mixq.act.kvcache.kv_cache_bits` (so a per-layer plan's
    K + V parts add up to ``kv_cache_bits`` of that plan exactly).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..arch import get_blocks
from ..jsonio import read_json, write_json_atomic
from .kvcache import FP, KIVICache, kv_dims, kv_spec
from .kvsim import (  # noqa: F401  (re-exported: part of this module's API)
    _check_full_attention,
    attention_modules,
    decode_logits,
    kv_compare,
    KV_ENGINES,
    kv_part_bits,
    KVSettings,
    SIM_NAME,
    simulate_kivi,
)

log = logging.getLogger(__name__)

KV_CANDIDATE_BITS = (2, 3, 4, 8)
KV_METRICS = ("kl", "loss")
KV_TABLE_VERSION = 1


# ---------------------------------------------------------------------------- the table
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


# ---------------------------------------------------------------------------- measurement
def measurement_key(model: nn.Module, calib_ids: torch.Tensor, bits, metric: str, settings: KVSettings,
                    engine: str, chunk: int, prefill: int | None) -> dict:
    from ..measure.driver import calibration_hash  # noqa: PLC0415
    from ..models import model_fingerprint  # noqa: PLC0415

    return {"model": model_fingerprint(model),
            "calibration": calibration_hash(calib_ids),
            "calibration_shape": list(calib_ids.shape), "bits": [int(b) for b in bits], "metric": metric,
            "settings": settings.to_dict(), "engine": engine, "chunk": chunk, "prefill": prefill or chunk}


def _score(logits: torch.Tensor, ids: torch.Tensor, ref_logits: torch.Tensor):
    """``(Σ_t KL(P_ref ‖ P_q), Σ_t NLL_q)`` over the predicted positions of ``logits [B, T, V]``, against the
    fp ``ref_logits [B, T-1, V]`` — in float64 by row chunks, so identical logits give 0 and float32
    rounding leaves no noise floor in the small errors of 8-bit caches."""
    from ..eval.perplexity import row_chunks  # noqa: PLC0415

    V = logits.shape[-1]
    z = logits[:, :-1].reshape(-1, V)
    r = ref_logits.reshape(-1, V)
    y = ids[:, 1:].reshape(-1).to(z.device)
    kl = nll = 0.0
    for sl in row_chunks(z.shape[0], V):
        q = torch.log_softmax(z[sl].double(), -1)
        p = torch.log_softmax(r[sl].to(q.device).double(), -1)
        kl += float((p.exp() * (p - q)).sum(-1).clamp_min(0).sum())
        nll += float(-q.gather(-1, y[sl, None]).sum())
    return kl, nll


@torch.no_grad()
def measure_kv(model: nn.Module, calib_ids: torch.Tensor, *, bits=KV_CANDIDATE_BITS, metric: str = "kl",
               settings: KVSettings = KVSettings(), engine: str = "simulate", chunk: int = 1,
               prefill: int | None = None, batch_size: int = 2, out=None, progress: bool = False) -> KVSensitivityTable:
    """Measure every layer's K and V error at each width in ``bits`` (module doc); 16 is added at 0.

    ``calib_ids [n, L]``: calibration windows (all positions are scored).  ``out``: the JSON path,
    also used to resume (``out + ".partial"`` is written after every layer).
    """
    if metric not in KV_METRICS:
        raise ValueError(f"unknown KV metric {metric!r}: choose one of {', '.join(KV_METRICS)}")
    if engine not in KV_ENGINES:
        raise ValueError(f"unknown KV engine {engine!r}: choose one of {', '.join(KV_ENGINES)}")
    bits = tuple(sorted({int(b) for b in bits} - {FP}))
    for b in bits:
        kv_spec(b)
    if not bits:
        raise ValueError("measure at least one KV width below 16 bits")
    if calib_ids.dim() != 2 or calib_ids.shape[1] < 2:
        raise ValueError(f"calibration ids must be [n, L >= 2], got {tuple(calib_ids.shape)}")
    _check_full_attention(model.config)
    t0 = time.perf_counter()
    key = measurement_key(model, calib_ids, bits, metric, settings, engine, chunk, prefill)
    dims = kv_dims(model.config)
    L = dims[0]
    partial = Path(str(out) + ".partial") if out else None
    done = _load_partial(partial, key)
    was = model.training
    model.eval()
    blocks = get_blocks(model)
    batches = [calib_ids[i: i + batch_size] for i in range(0, calib_ids.shape[0], batch_size)]
    n_tok = calib_ids.shape[0] * (calib_ids.shape[1] - 1)
    try:
        # fp pass: reference log-probs and (simulate engine) every block's output, for replay
        outs: list[list] = [[] for _ in blocks]
        hooks = [blk.register_forward_hook(lambda m, a, o, i=i: outs[i].append(o)) for i, blk in enumerate(blocks)] \
            if engine == "simulate" else []
        ref_lp, fp_nll = [], 0.0
        try:
            with simulate_kivi(model, FP, settings=settings):
                for ids in batches:
                    logits = model(ids, use_cache=False).logits
                    ref_lp.append(logits[:, :-1].float())
                    fp_nll += _score(logits, ids, ref_lp[-1])[1]
        finally:
            for h in hooks:
                h.remove()
        fp_nll /= n_tok
        results = dict(done)
        for i in range(L):
            if i in results:
                continue
            row = {}
            for kind in ("k", "v"):
                errs = []
                for b in bits:
                    pair = (b, FP) if kind == "k" else (FP, b)
                    kl_sum = nll_sum = 0.0
                    for bi, ids in enumerate(batches):
                        if engine == "simulate":
                            with _replay(blocks[:i], [o[bi] for o in outs[:i]]), \
                                    simulate_kivi(model, {i: pair, "default": FP}, settings=settings, chunk=chunk,
                                                  prefill=prefill):
                                logits = model(ids, use_cache=False).logits
                        else:
                            cache = KIVICache(model.config, {i: pair, "default": FP}, **settings.kw())
                            logits = torch.cat([lg for _, _, lg in decode_logits(model, ids, cache, chunk=chunk,
                                                                                 prefill=prefill)], 1)
                        k_, n_ = _score(logits, ids, ref_lp[bi])
                        kl_sum, nll_sum = kl_sum + k_, nll_sum + n_
                    errs.append(kl_sum / n_tok if metric == "kl" else max(0.0, nll_sum / n_tok - fp_nll))
                row[kind] = errs
            results[i] = row
            if progress:
                log.warning("KV layer %d/%d: K %s  V %s", i + 1, L, _fmt(row["k"]), _fmt(row["v"]))
            if partial is not None:
                write_json_atomic(partial, {"key": key, "layers": {str(k): v for k, v in results.items()}},
                                  overwrite=True)
    finally:
        model.train(was)
    entries = []
    for i in range(L):
        for kind in ("k", "v"):
            entries.append(KVEntry(i, kind, (*bits, FP), (*results[i][kind], 0.0)))
    meta = {**key, "fp_nll": fp_nll, "seconds": time.perf_counter() - t0, "resumed_layers": len(done),
            "unit": "nats per token (mean over every predicted calibration position)"}
    table = KVSensitivityTable(tuple(entries), dims, metric, settings, key["model"], meta)
    if out:
        table.save(out, overwrite=True)
        partial.unlink(missing_ok=True)
    return table


def _fmt(xs) -> str:
    return " ".join(f"{x:.3g}" for x in xs)


@contextlib.contextmanager
def _replay(blocks, outputs):
    """Blocks ``blocks`` return their recorded fp ``outputs`` instead of computing (their inputs are
    unaffected by what is measured downstream)."""
    saved = []
    try:
        for blk, o in zip(blocks, outputs):
            saved.append((blk, blk.__dict__.get("forward")))
            blk.forward = (lambda *a, _o=o, **k: _o)
        yield
    finally:
        for blk, f in saved:
            if f is None:
                del blk.forward
            else:
                blk.forward = f


def _load_partial(path: Path | None, key: dict) -> dict[int, dict]:
    if path is None or not path.exists():
        return {}
    try:
        doc = read_json(path)
    except ValueError:
        log.warning("ignoring unreadable partial KV measurement %s", path)
        return {}
    if doc.get("key") != key:
        log.warning("partial KV measurement %s belongs to another model/calibration/setting; starting over", path)
        return {}
    return {int(k): v for k, v in doc.get("layers", {}).items()}


__all__ = ["KV_CANDIDATE_BITS", "KV_ENGINES", "KV_METRICS", "KVEntry", "KVSensitivityTable", "KVSettings",
           "attention_modules", "decode_logits", "kv_compare", "kv_part_bits", "measure_kv", "simulate_kivi"]
