"""What a KIVI cache holds and costs: per-layer K/V widths, the model's KV dimensions, and the exact bits of a
cache at a given context and batch (every code, grid and fp token; the options of :mod:`.kv_codec` included).
:class:`~mixq.runtime.kv_cache.KIVICache`'s ``stored_bits`` is checked against :func:`kv_cache_bits` in the tests.
"""
from __future__ import annotations

from .kv_codec import important_count, kv_spec, normalize_rotate, VALID_BITS


def resolve_kv_bits(bits, n_layers: int) -> list[tuple[int, int]]:
    """``(k_bits, v_bits)`` per layer from an int, a ``(k, v)`` pair, or a dict ``{layer: int | (k, v) |
    {"k": .., "v": ..}}`` (an optional ``"default"`` entry fills the other layers)."""
    def pair(b, where):
        if isinstance(b, dict):
            if set(b) != {"k", "v"}:
                raise ValueError(f"{where}: a K/V dict needs exactly the keys 'k' and 'v', got {sorted(b)}")
            b = (b["k"], b["v"])
        kv = (b, b) if isinstance(b, int) else tuple(b) if isinstance(b, (tuple, list)) else (b,)
        if len(kv) != 2 or any(isinstance(x, bool) or x not in VALID_BITS for x in kv):
            raise ValueError(f"{where}: KV bits must be 1..8 or 16 (or a (k, v) pair of them), got {b!r}")
        return kv
    if not isinstance(bits, dict):
        return [pair(bits, "kv bits")] * n_layers
    default = bits.get("default")
    extra = [k for k in bits if k != "default" and not (isinstance(k, int) and 0 <= k < n_layers)]
    if extra:
        raise ValueError(f"kv bits keys must be layer indices 0..{n_layers - 1} or 'default', got {extra}")
    missing = [i for i in range(n_layers) if i not in bits]
    if missing and default is None:
        raise ValueError(f"kv bits give no width for layers {missing}: add them or a 'default' entry")
    return [pair(bits.get(i, default), f"layer {i}") for i in range(n_layers)]


def kv_dims(config) -> tuple[int, int, int]:
    """``(n_layers, n_kv_heads, head_dim)`` of a (text) model config."""
    c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // heads
    return int(c.num_hidden_layers), int(kv), int(hd)


def kv_cache_bits(config, bits_per_layer, context: int, batch: int = 1, *, k_group: int = 32,
                  v_group: int | None = None, residual: int = 32, zero: str = "fp16", fp_bits: int = 16,
                  important: float = 0.0, important_bits: int = 8, pre_rope: bool = False, rotate=False) -> dict:
    """Exact bits of a :class:`KIVICache` holding ``context`` tokens for ``batch`` sequences.

    Per layer with ``n = B·H`` rows of heads: keys ``Tq = G·⌊max(T−R, 0)/G⌋`` quantized tokens →
    ``n·Tq·D`` codes and ``n·(Tq/G)·D`` groups; values ``Tv = max(T−R, 0)`` → ``n·Tv·D`` codes and
    ``n·Tv·D/G_v`` groups; each group stores an fp16 scale and an fp16 offset (or a ``bits``-bit zero),
    counted by :meth:`QuantSpec.cost`; the other tokens are ``fp_bits`` each (16-bit layers: all).

    With ``important = f`` (``c = ⌊f·G + ½⌋`` tokens per key group at ``important_bits = h``), both K
    and V quantize ``Tq`` tokens (``J = Tq/G`` groups); per quantized tensor, the ordinary tokens:
    keys ``n·J·D`` channel grids of ``G − c`` tokens, values ``n·J·(G−c)·D/G_v`` token grids, at ``b``
    bits; the important tokens (keys and values): ``n·J·c·D/G_v`` token grids at ``h`` bits (``h = 16``:
    those ``n·J·c·D`` elements at ``fp_bits``, no grid); plus the importance map, ``n·Tq`` bits
    (``"index"``).
    ``pre_rope`` and ``rotate`` cost nothing (the rotation is one shared constant matrix).
    Returns ``{"codes", "scales", "zeros", "fp", "index", "total", "layers": [per-layer total]}``
    (``codes`` holds the important tokens' codes too).
    """
    L, H, D = kv_dims(config)
    gv = v_group or D
    if D % gv:
        raise ValueError(f"v_group {gv} does not divide head_dim {D}")
    c = important_count(important, k_group)
    hspec = kv_spec(important_bits, zero)
    normalize_rotate(rotate)
    n, T = batch * H, context
    parts = ("codes", "scales", "zeros", "fp", "index")
    out = {p: 0 for p in parts}
    out["layers"] = []

    def add(spec, shape):
        cost = spec.cost(shape)
        out["codes"] += cost.codes
        out["scales"] += cost.scales
        out["zeros"] += cost.zeros

    for kb, vb in resolve_kv_bits(bits_per_layer, L):
        before = sum(out[k] for k in parts)
        for bits, kind in ((kb, "k"), (vb, "v")):
            spec = kv_spec(bits, zero)
            if spec is None:
                out["fp"] += n * T * D * fp_bits
                continue
            over = max(T - residual, 0)
            tq = (over // k_group) * k_group if kind == "k" or c else over
            if not c:
                add(spec, (n * (tq // k_group) * D, k_group) if kind == "k" else (n * tq * D // gv, gv))
            else:
                j = tq // k_group
                hi = (n * j * c * D // gv, gv)  # important tokens: per token, groups of G_v channels
                lo = (n * j * D, k_group - c) if kind == "k" else (n * j * (k_group - c) * D // gv, gv)
                add(spec, lo)
                if hspec is None:
                    out["fp"] += n * j * c * D * fp_bits
                else:
                    add(hspec, hi)
                out["index"] += n * tq
            out["fp"] += n * (T - tq) * D * fp_bits
        out["layers"].append(sum(out[k] for k in parts) - before)
    out["total"] = sum(out["layers"])
    return out


def kv_cache_bytes(config, bits_per_layer, context: int, batch: int = 1, **kw) -> float:
    """``kv_cache_bits(...)["total"] / 8`` (a float: 3-bit codes need not fill whole bytes)."""
    return kv_cache_bits(config, bits_per_layer, context, batch, **kw)["total"] / 8
