"""Where a plan's out-of-domain excess comes from: KL on PTB and fortunes with groups of its layers put back in fp32.

    OMP_NUM_THREADS=2 python bench/ood_attribution.py --dir DIR [--tokens 2048] [--results ood_attribution]

``DIR``: a native directory of SmolLM2 (e.g. ``mixq quantize --bpw 3.0``), loaded packed in float32 (its fake-quant
values).  For each group -- every layer of one projection type, then every layer of three consecutive blocks -- the
group's quantized layers are replaced by the fp32 model's own for one scoring of both domains (first ``--tokens``
tokens of each test split, 512-token windows, KL to fp32 as ``mixq eval`` scores it): ``gain`` is the KL that the
group's quantization costs in each domain, and ``fortunes / PTB`` its out-of-domain excess, to compare with the whole
plan's ratio.  Then, per token, the plan's KL against the fp32 model's predictive entropy there: whether the excess
sits in uncertain positions, a few tokens, or everywhere.  Written to ``bench/results/<results>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from common import RESULTS, domain_scorer, header

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENTROPY_BINS = ((0, 1), (1, 2), (2, 3), (3, 4), (4, None))


def _swapped(model, ref, names):
    """Context: ``names`` (quantized layers of ``model``) replaced by ``ref``'s modules of the same names."""
    class Swap:
        def __enter__(self):
            self.saved = {}
            for n in names:
                parent, _, leaf = n.rpartition(".")
                self.saved[n] = getattr(model.get_submodule(parent), leaf)
                setattr(model.get_submodule(parent), leaf, ref.get_submodule(n))

        def __exit__(self, *exc):
            for n, m in self.saved.items():
                parent, _, leaf = n.rpartition(".")
                setattr(model.get_submodule(parent), leaf, m)
    return Swap()


def per_token(model, ref, scorer) -> dict:
    """Per domain: the plan's KL at each scored position (``mixq eval``'s positions and :func:`token_kl`) binned by
    the fp32 model's entropy there, and the share of the KL in the worst 1 / 5 / 20 % of tokens."""
    from mixq.eval.kl import token_kl
    from mixq.eval.perplexity import scored_logits

    out = {}
    with torch.no_grad():
        for dom, windows, _ in scorer.windows:
            kls, ents = [], []
            for i in range(windows.input_ids.shape[0]):
                ids, mask = windows.input_ids[i:i + 1], windows.score_mask[i:i + 1]
                ref_logits, _ = scored_logits(ref, ids, mask)
                lp = F.log_softmax(ref_logits.float(), -1)
                kls.append(token_kl(scored_logits(model, ids, mask)[0], lp))
                ents.append(-(lp.exp() * lp).sum(-1))
            kl, ent = torch.cat(kls), torch.cat(ents)
            top = kl.sort(descending=True).values
            bins = []
            for lo, hi in ENTROPY_BINS:
                m = (ent >= lo) & (ent < (hi if hi is not None else float("inf")))
                bins.append({"lo": lo, "hi": hi, "share": float(m.float().mean()),
                             "kl": float(kl[m].mean()) if m.any() else None})
            share = {str(p): float(top[: max(1, kl.numel() * p // 100)].sum() / top.sum()) for p in (1, 5, 20)}
            out[dom] = {"kl": float(kl.mean()), "entropy": float(ent.mean()), "bins": bins, "top_share": share}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", required=True, help="a native directory of a SmolLM2 plan")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of each test split (default 2048)")
    ap.add_argument("--blocks-per-group", type=int, default=3)
    ap.add_argument("--results", default="ood_attribution")
    args = ap.parse_args()
    import mixq
    from mixq.export.native import load_quantized
    from mixq.jsonio import write_json_atomic

    t0 = time.perf_counter()
    ref, tok = mixq.load_model("smollm2-135m")
    model, _, info = load_quantized(args.dir, dtype=torch.float32, packed=True)
    scorer = domain_scorer(ref, tok, "smollm2-135m", args.tokens)
    quantized = [n for n, m in model.named_modules() if getattr(m, "packed_layer", False)]
    base = scorer.metrics(model)
    kl = lambda r: (r["ptb"]["kl"], r["fortunes"]["kl"])  # noqa: E731
    b_ptb, b_fort = kl(base)
    print(f"plan: KL PTB {b_ptb:.4f} fortunes {b_fort:.4f}", flush=True)
    nblocks = len(model.model.layers)
    groups = [(t, [n for n in quantized if n.endswith("." + t)]) for t in TYPES]
    g = args.blocks_per_group
    groups += [(f"blocks {b}-{min(b + g, nblocks) - 1}",
                [n for n in quantized if any(f"layers.{k}." in n for k in range(b, min(b + g, nblocks)))])
               for b in range(0, nblocks, g)]
    rows = []
    for label, names in groups:
        if not names:
            continue
        with _swapped(model, ref, names):
            p, f = kl(scorer.metrics(model))
        rows.append({"group": label, "layers": len(names), "gain_ptb": b_ptb - p, "gain_fortunes": b_fort - f})
        print(f"{label:<14} gain PTB {b_ptb - p:.4f} fortunes {b_fort - f:.4f}", flush=True)
    tokens = per_token(model, ref, scorer)
    doc = {"command": f"python bench/ood_attribution.py --dir {args.dir} --tokens {args.tokens}",
           "dir": str(args.dir), "recipe": info.get("recipe") if isinstance(info, dict) else None,
           "base": {"ptb": b_ptb, "fortunes": b_fort}, "groups": rows, "per_token": tokens,
           "seconds": time.perf_counter() - t0}
    write_json_atomic(RESULTS / f"{args.results}.json", doc, overwrite=True)
    lines = header("Where the out-of-domain excess comes from: layers put back in fp32, and per-token KL",
                   f"OMP_NUM_THREADS={torch.get_num_threads()} python bench/ood_attribution.py --dir {args.dir} "
                   f"--tokens {args.tokens}")
    lines += [f"Plan `{args.dir}`: KL PTB {b_ptb:.4f}, fortunes {b_fort:.4f} (ratio {b_fort / b_ptb:.2f}); first "
              f"{args.tokens} tokens of each test split, 512-token windows.  `gain`: the KL the group's quantization "
              "costs (plan minus the plan with the group in fp32); the gains of groups do not add up exactly "
              "(the layers' errors interact).", "",
              "| group | layers | gain PTB | % of plan | gain fortunes | % of plan | fortunes / PTB |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["gain_fortunes"] / r["gain_ptb"] if r["gain_ptb"] > 0 else float("nan")
        lines.append(f"| {r['group']} | {r['layers']} | {r['gain_ptb']:.4f} | {100 * r['gain_ptb'] / b_ptb:.1f} | "
                     f"{r['gain_fortunes']:.4f} | {100 * r['gain_fortunes'] / b_fort:.1f} | {ratio:.2f} |")
    lines += ["", "Per token (the plan's KL at each scored position, binned by the fp32 model's entropy there, nats):",
              "", "| domain | mean KL | mean entropy | KL share of worst 1 % / 5 % / 20 % tokens | "
              + " | ".join(f"KL at H in [{lo}, {hi if hi is not None else 'inf'}) (share)" for lo, hi in ENTROPY_BINS)
              + " |", "|---|---:|---:|---|" + "---:|" * len(ENTROPY_BINS)]
    for dom, t in tokens.items():
        shares = " / ".join(f"{t['top_share'][p]:.2f}" for p in ("1", "5", "20"))
        lines.append(f"| {dom} | {t['kl']:.4f} | {t['entropy']:.2f} | {shares} | " + " | ".join(
            f"{b['kl']:.4f} ({b['share']:.2f})" if b["kl"] is not None else "—" for b in t["bins"]) + " |")
    (RESULTS / f"{args.results}.md").write_text("\n".join(lines) + "\n")
    print(f"done in {doc['seconds']:.0f} s: {RESULTS / (args.results + '.md')}")


if __name__ == "__main__":
    main()
