"""Figures of the survey's comparison, as PNG (or PDF/SVG by the file's extension).

Every figure is drawn on its own ``matplotlib.figure.Figure`` with the Agg renderer: no pyplot
state, no display, safe in threads and on servers.  Each has a title, axis labels with units, a
legend or a colour bar, so it reads without the surrounding text.

=======================  ==================================================================
:func:`pareto_plot`      quality vs bits per weight, one line per method (uniform specs
                         dashed), log y, error bars from confidence intervals, the overall
                         Pareto front in grey
:func:`allocation_heatmap`  a plan's spec per layer: rows = decoder blocks, columns = layer
                         types (q k v o gate up down …), colour = bits per weight, cells
                         labelled with the abbreviated spec
:func:`sensitivity_profile` a measurement's error of one reference candidate per layer vs depth
:func:`tradeoff_scatter` size vs quality, coloured by speed
=======================  ==================================================================
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

KIND_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")
_KINDS = {
    "q_proj": "q", "query": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v",
    "qkv_proj": "qkv", "c_attn": "qkv", "query_key_value": "qkv", "Wqkv": "qkv",
    "o_proj": "o", "out_proj": "o", "gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up",
    "gate_up_proj": "gate_up", "fc1": "up", "c_fc": "up", "dense_h_to_4h": "up",
    "down_proj": "down", "w2": "down", "fc2": "down", "dense_4h_to_h": "down",
}
_ATTN_PARENTS = ("attn", "attention", "self_attn", "self_attention", "mixer")
Y_LABELS = {
    "kl": "KL(P_full ‖ P_quantized), nats per token (log scale)",
    "perplexity": "perplexity (log scale)",
    "nll": "cross-entropy, nats per token (log scale)",
    "top1_agreement": "top-1 agreement with the full model (fraction)",
}
METRIC_UNITS = {
    "kfac": "predicted Δloss, nats", "block": "predicted Δloss, nats", "fisher": "predicted Δloss, nats",
    "kfac-tok": "predicted Δloss, nats", "kfac-pos": "predicted Δloss, nats",
    "kfac-kv": "predicted Δloss, nats",
    "hessian": "layer-output MSE", "block-rel": "relative block-output error",
}
TITLES = {
    "kl": "KL divergence to the full model vs bits per weight (lower-left is better)",
    "perplexity": "Perplexity vs bits per weight (lower-left is better)",
    "nll": "Cross-entropy vs bits per weight (lower-left is better)",
}
SPEC_KEY = ("cell labels: 4g64 = 4-bit integer, groups of 64 weights; a = asymmetric (zero point), "
            "af = fp16 offset; ch = one scale per output channel; 16 = kept in fp16")
BPW_LABEL = "bits per weight (quantized layers, metadata included)"


# ---------------------------------------------------------------------------- helpers
def layer_key(fqn: str) -> tuple[int | None, str]:
    """``(block index, layer type)`` of a linear's fqn, e.g. ``model.layers.3.self_attn.q_proj ->
    (3, "q")``, ``transformer.h.0.mlp.c_proj -> (0, "down")``, ``lm_head -> (None, "lm_head")``."""
    parts = fqn.split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    name = parts[-1]
    parent = parts[-2] if len(parts) > 1 else ""
    if name in _KINDS:
        kind = _KINDS[name]
    elif name in ("c_proj", "dense"):
        kind = "o" if parent in _ATTN_PARENTS else "down"
    else:
        kind = name
    return (int(parts[idx]) if idx is not None else None), kind


def abbreviate_spec(name: str) -> str:
    """Short cell label of a spec name: ``W4-g64-asym -> 4g64a``, ``W4-channel -> 4ch``, ``FP16 -> 16``,
    ``NF4-g64 -> NF4g64``, ``MXFP4 -> MXFP4``."""
    if name == "FP16":
        return "16"
    s = re.sub(r"^W(\d)", r"\1", name)
    for long, short in (("-asymf", "af"), ("-asym", "a"), ("-channel", "ch"), ("-tensor", "t"), ("-mse", "m")):
        s = s.replace(long, short)
    return s.replace("-", "")


def _spec_name(spec) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        from ..config import parse_spec

        return parse_spec(dict(spec)).name
    return getattr(spec, "name", str(spec))


def _rows_of(plan) -> dict[str, tuple[str, float]]:
    """``{fqn: (spec name, bpw)}`` from a :class:`~mixq.allocate.Plan`, anything with ``per_layer``
    of the same shape, or such a mapping itself."""
    rows = plan.per_layer if hasattr(plan, "per_layer") else plan
    layers = getattr(plan, "layers", None)
    out = {}
    for fqn, r in rows.items():
        spec = layers[fqn] if isinstance(layers, Mapping) and fqn in layers else r["spec"]
        out[fqn] = (_spec_name(spec), float(r["bpw"]))
    if not out:
        raise ValueError("nothing to plot: the allocation has no layers")
    return out


def _kinds(keys) -> list[str]:
    present = list(dict.fromkeys(k for _, k in keys))
    return [k for k in KIND_ORDER if k in present] + [k for k in present if k not in KIND_ORDER]


def _save(fig: Figure, out: str | Path) -> Path:
    p = Path(out)
    if p.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ValueError(f"{p}: give a .png, .pdf or .svg file name for the figure")
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120, bbox_inches="tight")
    return p


def _method_colors(methods: Sequence[str]) -> dict[str, tuple]:
    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(dict.fromkeys(methods))}


def _positive(values) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    pos = v[v > 0]
    floor = pos.min() / 10 if pos.size else 1e-12
    return np.where(v > 0, v, floor)


# ---------------------------------------------------------------------------- Pareto
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (lower x and lower y are better), by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_plot(points: Sequence[Mapping], out: str | Path, *, y: str = "kl", title: str | None = None,
                ylabel: str | None = None, reference: float | None = None, reference_label: str = "full precision",
                log_y: bool = True, front: bool = True) -> Path:
    """Quality ``y`` vs bits per weight, one line per method.

    ``points``: ``{"method": str, "bpw": float, y: float, "uniform": bool (optional: dashed line,
    one spec for every layer), "ci": [low, high] (optional error bar)}``.  ``reference``: a
    horizontal line (e.g. the unquantized model's perplexity).  ``front``: the Pareto front over
    all points as a grey step line.
    """
    pts = [p for p in points if p.get(y) is not None and p.get("bpw") is not None]
    if not pts:
        raise ValueError(f"no points with both 'bpw' and {y!r} to plot")
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.add_subplot()
    groups: dict[tuple[str, bool], list[Mapping]] = {}
    for p in pts:
        groups.setdefault((str(p.get("method", "?")), bool(p.get("uniform", False))), []).append(p)
    colors = _method_colors([m for m, _ in groups])
    markers = "osD^vP*X"
    for gi, ((method, uniform), grp) in enumerate(groups.items()):
        grp = sorted(grp, key=lambda p: p["bpw"])
        xs = [p["bpw"] for p in grp]
        ys = [p[y] for p in grp]
        label = f"{method} (uniform spec)" if uniform else method
        line_kw = dict(color=colors[method], linestyle="--" if uniform else "-", marker=markers[gi % len(markers)],
                       markersize=5, linewidth=1.6, label=label, markerfacecolor="white" if uniform else colors[method])
        ci = [p.get("ci") for p in grp]
        if all(c is not None for c in ci):
            err = np.array([[v - c[0] for v, c in zip(ys, ci)], [c[1] - v for v, c in zip(ys, ci)]])
            ax.errorbar(xs, ys, yerr=np.clip(err, 0, None), capsize=3, **line_kw)
        else:
            ax.plot(xs, ys, **line_kw)
    if front and len(pts) > 1:
        idx = pareto_front([(p["bpw"], p[y]) for p in pts])
        fx, fy = [pts[i]["bpw"] for i in idx], [pts[i][y] for i in idx]
        ax.step(fx, fy, where="post", color="0.6", linewidth=4, alpha=0.35, zorder=0, label="Pareto front (all methods)")
    if reference is not None:
        ax.axhline(reference, color="black", linestyle=":", linewidth=1.2, label=f"{reference_label} ({reference:.4g})")
    if log_y and all(p[y] > 0 for p in pts):
        ax.set_yscale("log")
    ax.set_xlabel(BPW_LABEL)
    ax.set_ylabel(ylabel or Y_LABELS.get(y, y))
    ax.set_title(title or TITLES.get(y, f"{y} vs bits per weight"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, out)


# ---------------------------------------------------------------------------- allocation heatmap
def allocation_heatmap(plan, out: str | Path, *, title: str | None = None, vmin: float | None = None,
                       vmax: float | None = None) -> Path:
    """Per-layer bit allocation: rows = decoder blocks (top = first), columns = layer types,
    colour = bits per weight, each cell labelled with its abbreviated spec (``4g64a`` = W4-g64-asym,
    ``ch`` per channel, ``16`` kept in fp16).  Layers outside the blocks get their own rows.

    ``plan``: a :class:`~mixq.allocate.Plan`, an object with the same ``per_layer``, or
    ``{fqn: {"spec": name, "bpw": float}}``.
    """
    rows = _rows_of(plan)
    keys = {fqn: layer_key(fqn) for fqn in rows}
    kinds = _kinds(keys.values())
    blocks = sorted({b for b, _ in keys.values() if b is not None})
    others = [fqn for fqn, (b, _) in keys.items() if b is None]
    row_names = [str(b) for b in blocks] + others
    grid = np.full((len(row_names), len(kinds)), np.nan)
    text = [["" for _ in kinds] for _ in row_names]
    for fqn, (spec, bpw) in rows.items():
        b, k = keys[fqn]
        r = blocks.index(b) if b is not None else len(blocks) + others.index(fqn)
        grid[r, kinds.index(k)] = bpw
        text[r][kinds.index(k)] = abbreviate_spec(spec)
    vals = grid[np.isfinite(grid)]
    norm = Normalize(vmin=math.floor(vals.min()) if vmin is None else vmin,
                     vmax=max(math.ceil(vals.max()), math.floor(vals.min()) + 1) if vmax is None else vmax)
    cmap = colormaps["viridis"].with_extremes(bad="0.9")
    fig = Figure(figsize=(1.0 * len(kinds) + 2.6, 0.3 * len(row_names) + 1.8))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    fs = 7 if len(row_names) > 12 else 8
    for r in range(len(row_names)):
        for c in range(len(kinds)):
            if text[r][c]:
                rgba = cmap(norm(grid[r, c]))
                light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.55
                ax.text(c, r, text[r][c], ha="center", va="center", fontsize=fs, color="black" if light else "white")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(len(row_names)), row_names, fontsize=fs)
    ax.set_xlabel("layer type (attention q k v o, MLP gate up down)")
    ax.set_ylabel("decoder block (depth)")
    mean = sum(bpw for _, bpw in rows.values()) / len(rows)
    overall = getattr(plan, "achieved_bpw", None)
    sub = f"{overall:.3f} bpw overall" if overall is not None else f"mean {mean:.2f} bpw per layer"
    ax.set_title(title or f"Bits per weight chosen for each layer ({sub})")
    cbar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03)
    cbar.set_label("bits per weight (codes + scales + zeros)")
    ax.annotate(SPEC_KEY, xy=(0, 0), xycoords="axes fraction", xytext=(0, -42), textcoords="offset points",
                fontsize=7, color="0.3", va="top")
    return _save(fig, out)


# ---------------------------------------------------------------------------- sensitivity profile
def reference_candidate(table, target_bpw: float = 4.0) -> str:
    """The candidate measured on every layer whose median bpw is closest to ``target_bpw``."""
    common = None
    for x in table.layers:
        names = {s.name for s in x.candidates}
        common = names if common is None else common & names
    if not common:
        raise ValueError("no candidate spec was measured on every layer; pass candidate= explicitly")
    by_name = {}
    for x in table.layers:
        for s in x.candidates:
            if s.name in common:
                by_name.setdefault(s.name, []).append(s.cost(x.shape).total / x.numel)
    return min(sorted(common), key=lambda n: abs(float(np.median(by_name[n])) - target_bpw))


def sensitivity_profile(table, out: str | Path, *, candidate: str | None = None, title: str | None = None) -> Path:
    """Error of one reference ``candidate`` (default: the one nearest 4 bpw measured everywhere)
    for every layer, against the block index, one line per layer type, log y."""
    cand = candidate or reference_candidate(table)
    series: dict[str, list[tuple[int, float]]] = {}
    extra: list[tuple[str, float]] = []
    for x in table.layers:
        names = [s.name for s in x.candidates]
        if cand not in names:
            raise ValueError(f"candidate {cand} was not measured on {x.fqn} (it has {', '.join(names)})")
        err = x.errors[names.index(cand)]
        b, k = layer_key(x.fqn)
        if b is None:
            extra.append((x.fqn, err))
        else:
            series.setdefault(k, []).append((b, err))
    if not series:
        raise ValueError("no layer inside a decoder block to plot")
    kinds = _kinds((None, k) for k in series)
    all_err = _positive([e for s in series.values() for _, e in s])
    floor = all_err.min()
    colors = _method_colors(kinds)
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    for k in kinds:
        pts = sorted(series[k])
        ax.plot([b for b, _ in pts], [max(e, floor) for _, e in pts], marker="o", markersize=3.5, linewidth=1.4,
                color=colors[k], label=k)
    for fqn, e in extra:
        ax.axhline(max(e, floor), linestyle=":", color="0.4", linewidth=1.0, label=f"{fqn} (outside the blocks)")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder block (depth, 0 = next to the embeddings)")
    unit = METRIC_UNITS.get(table.metric, table.metric)
    ax.set_ylabel(f"error of {cand} ({table.metric}: {unit}, log scale)")
    ax.set_title(title or f"Layer sensitivity to {cand} vs depth (higher = needs more bits)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="layer type", fontsize=8, ncol=2 if len(kinds) > 4 else 1)
    return _save(fig, out)


# ---------------------------------------------------------------------------- trade-off scatter
def tradeoff_scatter(points: Sequence[Mapping], out: str | Path, *, x: str = "size_mib", y: str = "kl",
                     color: str = "tokens_per_s", label: str = "label", title: str | None = None,
                     xlabel: str | None = None, ylabel: str | None = None, color_label: str | None = None,
                     log_y: bool = True) -> Path:
    """Size (``x``) vs quality (``y``), coloured by speed (``color``), each point labelled.

    ``points``: ``{"label": str, "size_mib": float, "kl": float, "tokens_per_s": float | None}``
    (other keys via the arguments).  Points without a speed are drawn hollow and grey.
    """
    pts = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    if not pts:
        raise ValueError(f"no points with both {x!r} and {y!r} to plot")
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.add_subplot()
    fast = [p for p in pts if p.get(color) is not None]
    slow = [p for p in pts if p.get(color) is None]
    if fast:
        sc = ax.scatter([p[x] for p in fast], [p[y] for p in fast], c=[p[color] for p in fast], cmap="plasma",
                        s=60, edgecolors="black", linewidths=0.6, zorder=3)
        cbar = fig.colorbar(sc, ax=ax)
        cbar.set_label(color_label or ("decode speed, tokens/s (higher is better)" if color == "tokens_per_s" else color))
    if slow:
        ax.scatter([p[x] for p in slow], [p[y] for p in slow], s=60, facecolors="none", edgecolors="0.5",
                   zorder=3, label="speed not measured" if color == "tokens_per_s" else f"{color} not measured")
        ax.legend(fontsize=8, loc="best")
    for p in pts:
        if p.get(label):
            ax.annotate(str(p[label]), (p[x], p[y]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if log_y and all(p[y] > 0 for p in pts):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or ("size of the quantized model, MiB" if x == "size_mib" else x))
    ax.set_ylabel(ylabel or Y_LABELS.get(y, y))
    ax.set_title(title or "Size, speed and quality: lower-left and bright is better")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, out)
