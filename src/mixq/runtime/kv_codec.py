"""How KV-cache tokens are quantized, shared by the real cache (:mod:`.kv_cache`) and the one-forward
decode simulation (:mod:`.kv_sim`): KIVI grids, and three options on top of them.

KIVI grids (Liu et al., 2024)
    keys ``K [B, H, m, D]`` per channel in groups of ``G`` consecutive tokens, values per token in
    groups of ``G_v`` channels, asymmetric min/max int (:func:`kv_spec`); :func:`quantize_keys`,
    :func:`quantize_values`.

Token-level mixed precision (MiKV, Yang et al. 2024; ZipCache, He et al. 2024) — ``important = f``
    In every key group of ``G`` tokens (the unit in which KIVI quantizes keys), the
    ``c = ⌊f·G + ½⌋`` tokens with the largest *importance* are stored at ``important_bits`` and the
    other ``G − c`` at the layer's bits; importance is the attention probability the token has
    received so far, summed over the query heads that share its key/value head and over every
    earlier query (:func:`select_important`; ties go to the earlier token).  The ordinary tokens keep
    KIVI's grids — keys per channel over the ``G − c`` ordinary tokens of the group (a heavy hitter's
    outlying key does not stretch them), values per token.  The important tokens, keys and values
    alike, get per-token grids in groups of ``G_v`` channels at ``important_bits`` (a channel grid over
    ``c`` tokens would cost ``32/c`` bits per element in scale and offset; at 8 bits a per-token
    grid is accurate).  ``important_bits = 16`` keeps the important tokens unquantized.  Each
    quantized tensor (K and V) stores a 1-bit-per-token map (per batch row and key/value head)
    saying which tokens are important; K's and V's maps are equal, but charging each keeps the K and
    V costs of a layer additive (what the per-layer allocator needs) — sharing one map would save
    ``B·H·Tq`` bits per layer with both quantized.

Pre-RoPE keys (KVQuant, Hooper et al. 2024) — ``pre_rope``
    HF attention hands the cache keys after the rotary embedding, ``k = RoPE_t(k₀)``.  With the
    rotary tables ``(cos, sin)`` of the tokens' positions (what the model used),
    ``k₀ = k·cos − rotate_half(k)·sin`` on the rotary dims (the rest pass through), the per-channel
    grids quantize ``k₀``, and the cache holds ``k̂ = RoPE_t(Q(k₀))``: the channels the grids see are
    the model's pre-rotary channels, whose outliers sit in fixed channels (after RoPE they rotate
    with position inside each channel pair).

Rotation (QuaRot-style, for the cache) — ``rotate = "k" | "v" | "kv"``
    ``x̂ = Q(x·R)·Rᵀ`` with one fixed orthogonal ``R [D, D]``: a randomised Hadamard matrix
    ``H·diag(±1)/√D`` (seed 0; Haar-random orthogonal where no Hadamard matrix of order ``D`` is
    built by :mod:`mixq.hadamard`).  ``q·kᵀ = (q·R)(k·R)ᵀ``, so a fused kernel would keep
    ``k·R`` and rotate the query; here ``x̂`` is rotated back, which is the same up to float rounding.
    The matrix is a constant shared by all layers (not counted in the cache's bits).

Order when combined: ``k̂ = RoPE(Q(RoPE⁻¹(k)·R)·Rᵀ)``.  A 16-bit tensor is never touched.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..config import QuantSpec
from ..formats import dequantize, quantize
from ..granularity import PerToken

FP = 16
VALID_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FP)
ROTATE_CHOICES = ("", "k", "v", "kv")
ZERO_CHOICES = ("fp16", "int")  # KIVI's fp16 offset, or an integer zero point


def kv_spec(bits: int, zero: str = "fp16") -> QuantSpec | None:
    """Row spec of a KIVI grid: asymmetric int, fp16 scale, fp16 offset (``"fp16"``) or int zero; ``None`` at 16 bits."""
    if bits not in VALID_BITS:
        raise ValueError(f"KV bits must be 1..8 or 16, got {bits!r}")
    if zero not in ZERO_CHOICES:
        raise ValueError(f"KV zero must be 'fp16' (KIVI) or 'int', got {zero!r}")
    if bits == FP:
        return None
    return QuantSpec(dtype="int", bits=bits, granularity=PerToken(), symmetric=False, zero_dtype=zero)


def _quantize_rows(rows: torch.Tensor, spec: QuantSpec):
    qt = quantize(rows, spec)
    params = {k: getattr(qt.params, k) for k in ("scale", "zero", "offset") if getattr(qt.params, k) is not None}
    return qt.codes, params, dequantize(qt)


def quantize_keys(k: torch.Tensor, spec: QuantSpec, group: int):
    """Keys ``[B, H, m, D]`` (``m`` a multiple of ``group``) per channel in token groups →
    ``(codes [B,H,m,D], params {name: [B,H,m/group,D]}, dequantized [B,H,m,D] float32)``."""
    B, H, m, D = k.shape
    j = m // group
    rows = k.float().reshape(B, H, j, group, D).transpose(-1, -2).reshape(-1, group)
    codes, params, deq = _quantize_rows(rows, spec)
    back = lambda t: t.reshape(B, H, j, D, group).transpose(-1, -2).reshape(B, H, m, D)  # noqa: E731
    return back(codes), {n: p.reshape(B, H, j, D) for n, p in params.items()}, back(deq)


def quantize_values(v: torch.Tensor, spec: QuantSpec, group: int):
    """Values ``[B, H, m, D]`` per token in channel groups → codes, params ``[B,H,m,D/group]``, dequantized."""
    B, H, m, D = v.shape
    codes, params, deq = _quantize_rows(v.float().reshape(-1, group), spec)
    return codes.reshape(B, H, m, D), {n: p.reshape(B, H, m, D // group) for n, p in params.items()}, \
        deq.reshape(B, H, m, D)


# ---------------------------------------------------------------------------- important tokens
def important_count(fraction: float, group: int) -> int:
    """``c = ⌊fraction·group + ½⌋`` important tokens per group of ``group``; 0 when ``fraction`` is 0.

    Raises unless ``1 ≤ c ≤ group − 1`` for a positive fraction (a fraction that rounds to no token
    or to the whole group is a mistake, not a setting)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"KV important fraction must be in [0, 1), got {fraction!r}")
    if fraction == 0:
        return 0
    c = int(math.floor(fraction * group + 0.5))
    if not 1 <= c <= group - 1:
        raise ValueError(f"KV important fraction {fraction} of a key group of {group} tokens is {c} tokens: "
                         f"it must be 1..{group - 1} (change the fraction or the key group)")
    return c


def select_important(score: torch.Tensor, group: int, count: int) -> torch.Tensor:
    """``bool [B, H, m]``: in each group of ``group`` consecutive tokens of ``score [B, H, m]``, the
    ``count`` largest (a stable sort: equal scores go to the earlier token)."""
    B, H, m = score.shape
    s = score.reshape(B, H, m // group, group)
    top = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :count]
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(B, H, m)


def _split(x: torch.Tensor, mask: torch.Tensor, group: int, count: int):
    """``(important [B,H,j·c,D], other [B,H,j·(G−c),D], order)``: the tokens of each group of ``x [B,H,m,D]``,
    important ones first, each in token order."""
    B, H, m, D = x.shape
    j = m // group
    order = torch.sort((~mask).reshape(B, H, j, group).to(torch.uint8), dim=-1, stable=True).indices
    xg = x.reshape(B, H, j, group, D).gather(3, order[..., None].expand(-1, -1, -1, -1, D))
    return (xg[:, :, :, :count].reshape(B, H, j * count, D),
            xg[:, :, :, count:].reshape(B, H, j * (group - count), D), order)


def _merge(hi: torch.Tensor, lo: torch.Tensor, order: torch.Tensor, group: int, count: int) -> torch.Tensor:
    """Inverse of :func:`_split`."""
    B, H, j, _ = order.shape
    D = hi.shape[-1]
    xg = torch.cat([hi.reshape(B, H, j, count, D), lo.reshape(B, H, j, group - count, D)], 3)
    out = torch.empty_like(xg).scatter_(3, order[..., None].expand(-1, -1, -1, -1, D), xg)
    return out.reshape(B, H, j * group, D)


# ---------------------------------------------------------------------------- transforms
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's rotary pairing: ``[x₁, x₂] → [−x₂, x₁]`` over the two halves of the last dim."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    r = cos.shape[-1]
    c, s = cos.float()[:, None], sin.float()[:, None]
    xr = x[..., :r]
    out = xr * c + sign * rotate_half(xr) * s
    return out if r == x.shape[-1] else torch.cat([out, x[..., r:]], -1)


def unrope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pre-rotary keys ``k·cos − rotate_half(k)·sin`` of ``k [B,H,m,D]`` with tables ``[B|1, m, r]``
    (``r ≤ D`` rotary dims first, as in Llama/Qwen/Mistral/Gemma, Phi/GPT-NeoX partial rotary)."""
    return _rope(k.float(), cos, sin, -1.0)


def rerope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``k·cos + rotate_half(k)·sin`` (HF ``apply_rotary_pos_emb`` on keys), float32."""
    return _rope(k.float(), cos, sin, 1.0)


def check_rope_convention(module) -> None:
    """Refuse attention modules whose family does not rotate with HF's ``rotate_half`` (pre-RoPE keys
    invert that rotation): the family's ``rotate_half`` must exist and agree with ours on a probe."""
    mod = sys.modules.get(type(module).__module__)
    theirs = getattr(mod, "rotate_half", None)
    if theirs is None:
        raise NotImplementedError(f"pre-RoPE keys: {type(module).__name__} has no rotary embedding of the "
                                  "rotate_half kind (no rotate_half in its modeling file)")
    probe = torch.arange(1.0, 9.0).reshape(1, 8)
    try:
        same = torch.equal(theirs(probe), rotate_half(probe))
    except Exception:  # noqa: BLE001  (an unexpected signature is a mismatch too)
        same = False
    if not same:
        raise NotImplementedError(f"pre-RoPE keys: {type(module).__name__}'s rotate_half pairs channels "
                                  "differently from HF's Llama convention; not supported")


@lru_cache(maxsize=None)
def _rotation64(d: int) -> torch.Tensor:
    from ..hadamard import dense, random_orthogonal_factors  # noqa: PLC0415

    factors, signs, _ = random_orthogonal_factors(d, seed=0)
    return dense(factors, signs)


def kv_rotation(d: int, device=None) -> torch.Tensor:
    """The cache's orthogonal ``R [d, d]`` (float64): randomised Hadamard, seed 0 (module doc)."""
    return _rotation64(d).to(device=device)


def _rotated(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``x·R`` in float64, back to float32: the same float32 result however many tokens are rotated at
    once (the cache rotates a flush, the simulation the whole window)."""
    return (x.double() @ R).float()


# ---------------------------------------------------------------------------- the codec
@dataclass(frozen=True)
class KVCodec:
    """One layer's K/V quantizer with every option (module doc).  ``important``: tokens per key
    group kept at ``important_bits`` (0: off).  ``encode_*`` return ``(stored, dequantized float32)``
    with ``stored = {name: (tensor, bits per element)}``, tensors ``[B, H, tokens or groups, ...]``."""

    k_bits: int
    v_bits: int
    k_group: int
    v_group: int
    zero: str = "fp16"
    important: int = 0
    important_bits: int = 8
    rotate: str = ""
    pre_rope: bool = False

    def __post_init__(self):
        object.__setattr__(self, "k_spec", kv_spec(self.k_bits, self.zero))
        object.__setattr__(self, "v_spec", kv_spec(self.v_bits, self.zero))
        object.__setattr__(self, "hi_spec", kv_spec(self.important_bits, self.zero))
        if self.rotate not in ROTATE_CHOICES:
            raise ValueError(f"KV rotate must be one of {ROTATE_CHOICES[1:]} or off, got {self.rotate!r}")
        if self.important and not 1 <= self.important < self.k_group:
            raise ValueError(f"important tokens per group must be 1..{self.k_group - 1}, got {self.important}")

    @property
    def mixed(self) -> bool:
        """Token-level mixed precision on a layer that quantizes K or V."""
        return bool(self.important) and (self.k_spec is not None or self.v_spec is not None)

    @property
    def needs_rope(self) -> bool:
        return self.pre_rope and self.k_spec is not None

    def _params(self, prefix: str, params: dict, spec: QuantSpec) -> dict:
        width = {"scale": 16, "offset": 16, "zero": spec.bits}
        return {prefix + n: (p, width[n]) for n, p in params.items()}

    def _encode(self, x, spec, lo_fn, mask, fp_bits, orig):
        """Quantize ``x`` (already transformed) → (stored, dequantized in the transformed space);
        ``lo_fn(t, spec, group)`` quantizes the ordinary tokens (``group``: tokens per key group)."""
        if mask is None:
            codes, params, deq = lo_fn(x, spec, self.k_group)
            return {"codes": (codes, spec.bits), **self._params("", params, spec)}, deq
        c, G = self.important, self.k_group
        hi, lo, order = _split(x, mask, G, c)
        codes, params, deq_lo = lo_fn(lo, spec, G - c)
        stored = {"codes": (codes, spec.bits), **self._params("", params, spec),
                  "map": (mask.to(torch.uint8), 1)}
        if self.hi_spec is None:  # important tokens kept as they are (restored after the inverse transforms)
            stored["hi.fp"] = (_split(orig, mask, G, c)[0], fp_bits)
            deq_hi = hi
        else:  # per token, in groups of v_group channels (keys too: c tokens are too few for channel grids)
            hc, hp, deq_hi = quantize_values(hi, self.hi_spec, self.v_group)
            stored.update({"hi.codes": (hc, self.hi_spec.bits), **self._params("hi.", hp, self.hi_spec)})
        return stored, _merge(deq_hi, deq_lo, order, G, c)

    def encode_keys(self, k: torch.Tensor, *, rope=None, mask: torch.Tensor | None = None, fp_bits: int = 16):
        """Keys ``[B, H, m, D]`` (``m`` a multiple of ``k_group``); ``rope = (cos, sin)`` of these tokens
        (needed with ``pre_rope``); ``mask [B, H, m]``: the important tokens (mixed precision)."""
        if self.k_spec is None:
            raise ValueError("16-bit keys are not quantized")
        x = k.float()
        if self.pre_rope:
            if rope is None:
                raise ValueError("pre-RoPE keys need the rotary tables (cos, sin) of the tokens")
            x = unrope(x, *rope)
        R = kv_rotation(x.shape[-1], x.device) if "k" in self.rotate else None
        if R is not None:
            x = _rotated(x, R)
        stored, deq = self._encode(x, self.k_spec, quantize_keys, mask, fp_bits, k)
        if R is not None:
            deq = _rotated(deq, R.T)
        if self.pre_rope:
            deq = rerope(deq, *rope)
        if mask is not None and self.hi_spec is None:
            deq = torch.where(mask[..., None], k.float(), deq)
        return stored, deq

    def encode_values(self, v: torch.Tensor, *, mask: torch.Tensor | None = None, fp_bits: int = 16):
        """Values ``[B, H, m, D]`` per token (``m`` a multiple of ``k_group`` with a ``mask``)."""
        if self.v_spec is None:
            raise ValueError("16-bit values are not quantized")
        x = v.float()
        R = kv_rotation(x.shape[-1], x.device) if "v" in self.rotate else None
        if R is not None:
            x = _rotated(x, R)
        stored, deq = self._encode(x, self.v_spec, lambda t, spec, g: quantize_values(t, spec, self.v_group),
                                   mask, fp_bits, v)
        if R is not None:
            deq = _rotated(deq, R.T)
        if mask is not None and self.hi_spec is None:
            deq = torch.where(mask[..., None], v.float(), deq)
        return stored, deq


def normalize_rotate(rotate) -> str:
    """``True → "kv"``, ``False/None/"" → ""``, else one of ``"k"``, ``"v"``, ``"kv"``."""
    if rotate is True:
        return "kv"
    if rotate is False or rotate is None:
        return ""
    if isinstance(rotate, str) and rotate.lower() in ROTATE_CHOICES:
        return rotate.lower()
    raise ValueError(f"KV rotate must be True/False or one of 'k', 'v', 'kv', got {rotate!r}")
