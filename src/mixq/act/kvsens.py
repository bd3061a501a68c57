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
    the same quantizers as :class:`~mixq.act.kvcache.KIVILayer` (``quantize_keys``,
    ``quantize_values``).  Decoding token by token (``chunk=1``) then costs one forward per
    window instead of one per token, and is checked against the real :class:`KIVICache`
    in the tests (same logits up to float rounding).  ``engine="cache"`` runs the real cache
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
from types import SimpleNamespace

import torch
from torch import nn

from ..arch import get_blocks
from ..jsonio import read_json, write_json_atomic
from .kvcache import FP, KIVICache, kv_cache_bits, kv_dims, kv_spec, quantize_keys, quantize_values, resolve_kv_bits

log = logging.getLogger(__name__)

KV_CANDIDATE_BITS = (2, 3, 4, 8)
KV_METRICS = ("kl", "loss")
KV_ENGINES = ("simulate", "cache")
KV_TABLE_VERSION = 1
SIM_NAME = "mixq_kivi_sim"


# ---------------------------------------------------------------------------- settings and costs
@dataclass(frozen=True)
class KVSettings:
    """KIVI layout: ``k_group`` tokens per key group, ``v_group`` channels per value group (None:
    head_dim), ``residual`` fp tokens, ``zero`` ``"fp16"`` offset (KIVI) or ``"int"`` zero point."""

    k_group: int = 32
    v_group: int | None = None
    residual: int = 32
    zero: str = "fp16"

    def __post_init__(self):
        for name in ("k_group", "residual"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "k_group" else 0):
                raise ValueError(f"KV {name} must be an integer >= {1 if name == 'k_group' else 0}, got {v!r}")
        if self.v_group is not None and (isinstance(self.v_group, bool) or not isinstance(self.v_group, int)
                                         or self.v_group < 1):
            raise ValueError(f"KV v_group must be a positive integer or None, got {self.v_group!r}")
        kv_spec(4, self.zero)  # validates zero

    def kw(self) -> dict:
        """Keyword arguments of :class:`KIVICache` / :func:`kv_cache_bits` / ``eval_with_kv_quant``."""
        return {"k_group": self.k_group, "v_group": self.v_group, "residual": self.residual, "zero": self.zero}

    def to_dict(self) -> dict:
        return self.kw()

    @classmethod
    def from_dict(cls, d: dict) -> "KVSettings":
        unknown = set(d) - {"k_group", "v_group", "residual", "zero"}
        if unknown:
            raise ValueError(f"unknown KV settings {sorted(unknown)}")
        return cls(**d)


def _one_layer_config(dims: tuple[int, int, int]):
    _, h, d = dims
    return SimpleNamespace(num_hidden_layers=1, num_attention_heads=h, num_key_value_heads=h, head_dim=d,
                           hidden_size=h * d)


def kv_part_bits(dims: tuple[int, int, int], kind: str, bits: int, context: int, batch: int = 1,
                 settings: KVSettings = KVSettings(), fp_bits: int = 16) -> int:
    """Exact bits of one layer's keys (``kind="k"``) or values at ``bits`` holding ``context`` tokens
    for ``batch`` sequences; ``dims = (n_layers, n_kv_heads, head_dim)``.

    ``kv_cache_bits`` of that layer with the other tensor at 16 bits, minus the other tensor's
    ``B·H·T·D·fp_bits``: the parts of a plan add up to its ``kv_cache_bits`` exactly.
    """
    if kind not in ("k", "v"):
        raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be >= 1, got {context}, {batch}")
    _, h, d = dims
    pair = (bits, FP) if kind == "k" else (FP, bits)
    total = kv_cache_bits(_one_layer_config(dims), pair, context, batch, fp_bits=fp_bits, **settings.kw())["total"]
    return int(total - batch * h * context * d * fp_bits)


# ---------------------------------------------------------------------------- decode simulation
def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """``layer index → attention module`` (the module with ``layer_idx == i`` inside block ``i``)."""
    out = {}
    for i, block in enumerate(get_blocks(model)):
        for m in block.modules():
            if getattr(m, "layer_idx", None) == i and type(m).__name__.endswith("Attention"):
                out[i] = m
                break
        else:
            raise NotImplementedError(f"block {i} has no attention module with layer_idx={i}")
    return out


def _chunk_start(T: int, chunk: int, prefill: int | None, device) -> torch.Tensor:
    """``n(t)`` for ``t < T``: tokens in the cache when the chunk holding ``t`` is fed (module doc)."""
    p = prefill or chunk
    t = torch.arange(T, device=device)
    return torch.where(t < p, torch.zeros_like(t), p + chunk * torch.div(t - p, chunk, rounding_mode="floor"))


@dataclass
class _LayerSim:
    """One layer's simulated KIVI attention (module doc)."""

    k_bits: int
    v_bits: int
    settings: KVSettings
    chunk: int
    prefill: int | None

    def __post_init__(self):
        self.k_spec = kv_spec(self.k_bits, self.settings.zero)
        self.v_spec = kv_spec(self.v_bits, self.settings.zero)

    def __call__(self, module, query, key, value, attention_mask, scaling, kwargs):
        B, Hq, T, D = query.shape
        if key.shape[2] != T:
            raise RuntimeError("the simulated KIVI cache needs full-window forwards (use_cache=False, no past)")
        if kwargs.get("softcap") is not None or getattr(module, "sliding_window", None) or kwargs.get("sliding_window"):
            raise NotImplementedError("the KIVI simulation supports plain full attention only (no softcap/sliding window)")
        s = self.settings
        dev = query.device
        n = _chunk_start(T, self.chunk, self.prefill, dev)
        pos = torch.arange(T, device=dev)
        g = Hq // key.shape[1]
        scale = scaling if scaling is not None else D ** -0.5
        k = key.repeat_interleave(g, 1)
        v = value.repeat_interleave(g, 1)
        scores = torch.matmul(query, k.transpose(-1, -2)) * scale
        if self.k_spec is not None:
            m = s.k_group * (T // s.k_group)
            tk = s.k_group * torch.div((n - s.residual).clamp_min(0), s.k_group, rounding_mode="floor")
            if m and int(tk.max()) > 0:
                deq = quantize_keys(key[..., :m, :], self.k_spec, s.k_group)[2].to(key.dtype)
                k_hat = torch.cat([deq, key[..., m:, :]], 2).repeat_interleave(g, 1)
                sq = torch.matmul(query, k_hat.transpose(-1, -2)) * scale
                scores = torch.where(pos[None, :] < tk[:, None], sq, scores)
        if attention_mask is None:
            scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        elif attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., :T], float("-inf"))
        else:
            scores = scores + attention_mask[..., :T]
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = None
        if self.v_spec is not None:
            tv = (n - s.residual).clamp_min(0)
            if int(tv.max()) > 0:
                vg = s.v_group or D
                if D % vg:
                    raise ValueError(f"v_group {vg} does not divide head_dim {D}")
                v_hat = quantize_values(value, self.v_spec, vg)[2].to(value.dtype).repeat_interleave(g, 1)
                old = (pos[None, :] < tv[:, None]).to(p.dtype)
                out = torch.matmul(p * old, v_hat) + torch.matmul(p * (1 - old), v)
        if out is None:
            out = torch.matmul(p, v)
        return out.transpose(1, 2).contiguous(), None


_ACTIVE: dict[int, _LayerSim] = {}


def _sim_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    sim = _ACTIVE.get(id(module))
    if sim is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return sim(module, query, key, value, attention_mask, scaling, kwargs)


def _register() -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: PLC0415
    from transformers.modeling_utils import AttentionInterface  # noqa: PLC0415

    AttentionInterface.register(SIM_NAME, _sim_attention)
    AttentionMaskInterface.register(SIM_NAME, sdpa_mask)


def _check_full_attention(config) -> None:
    from transformers.cache_utils import get_layer_types_and_kwargs  # noqa: PLC0415

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types, _ = get_layer_types_and_kwargs(text)
    other = sorted(set(types) - {"full_attention"})
    if other:
        raise NotImplementedError(f"KIVI supports full-attention layers only, this model has {other}")


@contextlib.contextmanager
def simulate_kivi(model: nn.Module, bits, *, settings: KVSettings = KVSettings(), chunk: int = 1,
                  prefill: int | None = None):
    """Within the block, every full forward of ``model`` attends as if decoded ``chunk`` tokens at a
    time through a :class:`KIVICache` of ``bits`` (int, ``(k, v)`` or per-layer dict) — module doc.

    Layers at 16/16 run the model's usual SDPA attention.  Forwards with a cache are refused.
    """
    if chunk < 1 or (prefill is not None and prefill < 1):
        raise ValueError(f"chunk and prefill must be >= 1, got chunk={chunk}, prefill={prefill}")
    _check_full_attention(model.config)
    per_layer = resolve_kv_bits(bits, kv_dims(model.config)[0])
    mods = attention_modules(model)
    _register()
    cfg = model.config
    old = cfg._attn_implementation
    mine = {}
    for i, (kb, vb) in enumerate(per_layer):
        if (kb, vb) != (FP, FP):
            mine[id(mods[i])] = _LayerSim(kb, vb, settings, chunk, prefill)
    clash = set(mine) & set(_ACTIVE)
    if clash:
        raise RuntimeError("simulate_kivi is already active on this model")
    _ACTIVE.update(mine)
    cfg._attn_implementation = SIM_NAME
    try:
        yield
    finally:
        cfg._attn_implementation = old
        for k in mine:
            _ACTIVE.pop(k, None)


# ---------------------------------------------------------------------------- chunked decode (cache engine)
@torch.no_grad()
def decode_logits(model: nn.Module, ids: torch.Tensor, cache, *, chunk: int, prefill: int | None = None):
    """Yield ``(s, e, logits [B, e − s, V])`` feeding ``ids [B, T]`` chunk by chunk through ``cache``
    (prefill ``P`` tokens first, then ``chunk`` at a time), as :func:`eval_with_kv_quant` does."""
    T = ids.shape[1]
    p = min(prefill or chunk, T)
    bounds = [0, *range(p, T, chunk), T]
    for s, e in zip(bounds[:-1], bounds[1:]):
        yield s, e, model(ids[:, s:e], past_key_values=cache, use_cache=True).logits


# ---------------------------------------------------------------------------- evaluation with KL
def kv_compare(model: nn.Module, windows, kv_bits, reference=None, *, settings: KVSettings = KVSettings(),
               engine: str = "cache", chunk: int = 16, prefill: int | None = None, batch_size: int = 8,
               progress: bool = False) -> dict:
    """Perplexity (and KL / top-1 against ``reference``: a model or :class:`~mixq.eval.ReferenceCache`)
    of ``model`` with a KIVI cache of ``kv_bits`` on ``windows``.

    ``engine="cache"``: the real :class:`KIVICache`, prefill then ``chunk`` tokens per forward (the
    loop of :func:`~mixq.act.kveval.eval_with_kv_quant`; same NLL).  ``engine="simulate"``: one full
    forward per batch under :func:`simulate_kivi` (the same decode semantics, any ``chunk`` incl. 1).
    Returns :func:`mixq.eval.kl.compare`'s keys (KL ones ``None`` without a reference) plus ``"kv"``.
    """
    from ..eval.kl import ReferenceCache, compare  # noqa: PLC0415
    from ..eval.perplexity import batches, eval_mode, model_device, perplexity, summarize_nll, token_nll  # noqa: PLC0415
    from ..eval.kl import token_kl  # noqa: PLC0415

    if engine not in KV_ENGINES:
        raise ValueError(f"KV engine must be one of {KV_ENGINES}, got {engine!r}")
    if chunk < 1 or (prefill is not None and prefill < 1):
        raise ValueError(f"chunk and prefill must be >= 1, got chunk={chunk}, prefill={prefill}")
    L = kv_dims(model.config)[0]
    info = {"bits": [list(b) for b in resolve_kv_bits(kv_bits, L)], **settings.kw(), "engine": engine,
            "chunk": chunk, "prefill": prefill or chunk}
    ref = reference
    if ref is not None and not isinstance(ref, ReferenceCache):  # a model: run it per batch, store nothing
        ref = ReferenceCache(ref, windows, batch_size=batch_size, progress=progress, max_bytes=0)
    if engine == "simulate":
        with simulate_kivi(model, kv_bits, settings=settings, chunk=chunk, prefill=prefill):
            if ref is None:
                r = perplexity(model, windows, batch_size=batch_size, progress=progress)
                r.update(kl=None, kl_p99=None, top1_agreement=None, reference_perplexity=None, reference_nll=None)
            else:
                r = compare(model, ref, windows, batch_size=batch_size, progress=progress)
        return {**r, "kv": info}
    t0 = time.perf_counter()
    device = model_device(model)
    mask_all = windows.score_mask.clone()
    mask_all[:, 0] = False
    n = int(mask_all.sum())
    nll = torch.empty(n, dtype=torch.float32)
    kl = torch.empty(n, dtype=torch.float32) if ref is not None else None
    agree = torch.empty(n, dtype=torch.bool) if ref is not None else None
    ref_nll = torch.empty(n, dtype=torch.float32) if ref is not None else None
    offset = 0
    with eval_mode(model):
        if ref is not None:
            ref.build()
        for i, j in batches(windows, batch_size, progress=progress, desc="kv-compare"):
            ids = windows.input_ids[i:j].to(device)
            mask = mask_all[i:j]
            idx = torch.full(mask.shape, -1, dtype=torch.long)
            idx[mask] = torch.arange(int(mask.sum()))
            rows = r_nll = r_arg = None
            if ref is not None:
                rows, r_nll, r_arg = ref.batch(i, j)
            cache = KIVICache(model.config, kv_bits, **settings.kw())
            T = ids.shape[1]
            for s, e, logits in decode_logits(model, ids, cache, chunk=chunk, prefill=prefill):
                e2 = min(e, T - 1)
                if e2 <= s:
                    continue
                tgt = idx[:, s + 1: e2 + 1]
                sel = tgt >= 0
                if not bool(sel.any()):
                    continue
                z = logits[:, : e2 - s][sel.to(logits.device)]
                y = ids[:, s + 1: e2 + 1][sel.to(ids.device)]
                where = tgt[sel]
                nll[offset + where] = token_nll(z, y).cpu()
                if ref is not None:
                    rr = rows[where.to(rows.device)]
                    kl[offset + where] = token_kl(z, rr).cpu()
                    agree[offset + where] = z.argmax(-1).cpu() == r_arg[where].cpu()
                    ref_nll[offset + where] = r_nll[where].cpu()
            offset += int(mask.sum())
    mean, ppl = summarize_nll(nll)
    out = {"perplexity": ppl, "nll": mean, "n_scored": n, "seconds": time.perf_counter() - t0, "kv": info,
           "kl": None, "kl_p99": None, "top1_agreement": None, "reference_perplexity": None, "reference_nll": None}
    if ref is not None:
        k = kl.double()
        rm, rp = summarize_nll(ref_nll)
        out.update(kl=float(k.mean()), kl_p99=float(torch.quantile(k, 0.99)) if n else float("nan"),
                   top1_agreement=float(agree.double().mean()), reference_perplexity=rp, reference_nll=rm)
    return out


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
