"""Does the ``kfac`` error predict what quantizing one layer really costs?  (the second-model diagnosis)

For every block linear, RTN ``--spec`` error under three predictions on calibration rows 0 and 16 of the default
calibration (one self-generated row, one PTB row):

* ``kfac``       ½ Σ_o E_t[g_to²] (ΔW E_t[x xᵀ] ΔWᵀ)_oo  (K-FAC: gradients independent of activations)
* ``kfac-tok``   ½ Σ_o E_t[g_to²] (ΔW H_g ΔWᵀ)_oo, H_g weighted by each token's gradient energy
* ``per-token``  ½ E_t Σ_o g_to² (ΔW x_t)_o²               (no factorisation at all)

and, for the layers of ``--layers``, the real KL to the fp32 model on the same rows with only that layer quantized.

    OMP_NUM_THREADS=1 python bench/kfac_factorization.py --out bench/results/second_model_kfac_factorization.json \\
        --layers model.layers.5.mlp.down_proj,model.layers.13.mlp.down_proj
"""
from __future__ import annotations

import argparse
import json

import torch

import mixq
from mixq.algorithms.rtn import rtn_quantize  # one layer's RTN error, layer by layer: no stage works per layer
from mixq.arch import arch_for, block_linears, get_blocks
from mixq.bos import resolve_bos
from mixq.config import parse_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--spec", default="W3-g128")
    ap.add_argument("--layers", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    ref, tok = mixq.load_model(args.model)
    ref.eval()
    bos = resolve_bos(tok, ref, "auto")
    calib = mixq.build_calibration(ref, tok, "self+ptb", nsamples=32, seqlen=512, seed=0, bos=bos, progress=False)
    ids = calib.ids[[0, 16]]
    spec = parse_spec(args.spec)
    arch = arch_for(ref)
    mods = {f"{arch.blocks}.{i}.{n}": m for i, b in enumerate(get_blocks(ref)) for n, m in block_linears(b, arch).items()}
    for p in ref.parameters():
        p.requires_grad_(False)
    X, Gr = {}, {}

    def hook(fqn):
        def h(m, a, o):
            X.setdefault(fqn, []).append(a[0].detach()[0].float())
            o.register_hook(lambda g: Gr.setdefault(fqn, []).append(g.detach()[0].float()))
        return h

    hs = [m.register_forward_hook(hook(f)) for f, m in mods.items()]
    for r in range(ids.shape[0]):
        row = ids[r : r + 1]
        x = ref.get_input_embeddings()(row).detach().requires_grad_(True)
        lg = ref(inputs_embeds=x).logits[:, :-1].float()
        torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), row[:, 1:].reshape(-1), reduction="sum").backward()
    for h in hs:
        h.remove()
    rows = {}
    for f, m in mods.items():
        x, g = torch.cat(X[f]), torch.cat(Gr[f])
        W = m.weight.detach().float()
        dW = W - rtn_quantize(W, spec)[1]
        g2 = g * g
        G, T = g2.mean(0), x.shape[0]
        w = g2.sum(1)
        kfac = 0.5 * float((G * ((dW @ (x.T @ x / T)) * dW).sum(1)).sum())
        Hg = (x * w[:, None]).T @ x / w.sum()
        tokw = 0.5 * float((G * ((dW @ Hg) * dW).sum(1)).sum())
        per_token = 0.5 * float((g2 * (x @ dW.T) ** 2).sum() / T)
        rows[f] = {"kfac": kfac, "kfac-tok": tokw, "per-token": per_token}
        print(f, json.dumps(rows[f]), flush=True)
    with torch.no_grad():
        lp0 = ref(ids).logits.float().log_softmax(-1)
        for f in [s for s in args.layers.split(",") if s]:
            m = mods[f]
            W0 = m.weight.data.clone()
            m.weight.data = rtn_quantize(W0.float(), spec)[1].to(W0.dtype)
            lp = ref(ids).logits.float().log_softmax(-1)
            m.weight.data = W0
            rows[f]["kl"] = float((lp0.exp() * (lp0 - lp)).sum(-1).mean())
            print(f, json.dumps(rows[f]), flush=True)
    json.dump({"model": args.model, "spec": args.spec, "calibration": calib.record(), "rows": [0, 16],
               "layers": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
