"""Every architecture the GGUF exporter writes, run by a real llama.cpp: its log-probabilities against mixq's.

    python bench/gguf_arch_check.py [--archs llama,qwen3,...] [--spec W8-g32] [--ctx 64] [--chunks 4]

For each architecture a tiny random model (``tests/tiny.py``'s, with a byte-level BPE of all 256 bytes so that
llama.cpp's vocabulary loads; weights scaled up so that predictions are far from uniform) is quantized with
``--spec`` (an int grid ggml holds exactly), written by ``write_gguf`` and scored by ``llama-perplexity
--kl-divergence-base``, whose file holds llama.cpp's own log-probabilities of every scored position (the second
half of each chunk, 16-bit quantized over the top 16 nats) and the tokens it read.  mixq's fake-quant model is run
on those same tokens (BOS where llama.cpp puts it) and compared position by position: the KL divergence from
mixq's distribution to llama.cpp's, the largest log-probability gap among tokens within 16 nats of the top, and
how often the two agree on the top token.  A tensor written under the wrong name, a row order llama.cpp does not
expect, a missing norm offset or an attention scale llama.cpp does not compute shows here as a KL orders of
magnitude above what llama.cpp's 8-bit activations alone give.  llama.cpp comes from ``bench/llamacpp.py``.

Writes bench/results/gguf_arch_check.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, header

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import llamacpp  # noqa: E402

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "phi3-partial", "granite", "olmo2",
         "smollm3", "qwen3_moe", "mixtral")
TEXT = ("It was the best of times, it was the worst of times; it was the age of wisdom, it was the age of "
        "foolishness. 1, 2, 3 -- said the Queen: \"Off with their heads!\"\n") * 40


def byte_bpe():
    """A byte-level BPE over all 256 bytes (GPT-2's alphabet) plus a few merges and an end token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    vocab = {b2u[b]: i for i, b in enumerate(range(256))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("a", "s"), ("i", "t")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def tiny(arch: str, vocab: int):
    """A random tiny model of ``arch`` whose vocabulary holds the tokenizer's, weights scaled by 4."""
    from test_moe import make_moe
    from tiny import _config

    if arch in ("qwen3_moe", "mixtral"):
        model = make_moe(arch, vocab_size=vocab, **({"norm_topk_prob": True} if arch == "qwen3_moe" else {}))
    elif arch == "smollm3":  # RoPE left out of every fourth layer
        import transformers as tf

        cfg = tf.SmolLM3Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                               pad_token_id=1, bos_token_id=2, eos_token_id=3)
        torch.manual_seed(0)
        model = tf.SmolLM3ForCausalLM(cfg).eval()
    else:
        cfg, cls = _config(arch.split("-")[0])
        cfg.vocab_size = vocab
        if arch == "phi3-partial":
            cfg.partial_rotary_factor = 0.5
            cfg.rope_parameters["partial_rotary_factor"] = 0.5
        if arch == "granite":  # tests/tiny.py's logits_scaling 8 flattens these random logits to near uniform
            cfg.logits_scaling = 1.5
        if arch == "gemma3":
            cfg.query_pre_attn_scalar = cfg.head_dim  # what llama.cpp scales by (the real models' value)
            cfg.layer_types = ["sliding_attention", "full_attention"]
        torch.manual_seed(0)
        model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.1).add_(0.0 if "bias" in name else 1.0)
            elif not name.endswith("mlp.gate.weight"):
                p.mul_(4.0)
    return model.eval()


def read_logprobs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [chunks, ctx], log-probs [chunks, ctx - 1 - ctx//2, vocab], clipped) of a ``--kl-divergence-base``
    file: llama.cpp's format (perplexity.cpp: ``_logits_``, n_ctx, n_vocab, n_chunk, the tokens, then per scored
    position two floats -- scale, minimum log-prob -- and the vocabulary's log-probs as uint16 steps above it: 0
    is the minimum itself, the lowest token's where the row spans less than 16 nats, else anything 16 nats or more
    below the top, which is written as the minimum here; ``clipped`` marks those zeros)."""
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_", path
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<iii", raw, 8)
    off = 20
    tokens = np.frombuffer(raw, np.int32, n_chunk * n_ctx, off).reshape(n_chunk, n_ctx)
    off += 4 * n_chunk * n_ctx
    nv = 2 * ((n_vocab + 1) // 2) + 4
    rows = n_ctx - 1 - n_ctx // 2
    u = np.frombuffer(raw, np.uint16, n_chunk * rows * nv, off).reshape(n_chunk, rows, nv)
    head = u[..., :4].copy().view(np.float32)  # [.., 2]: scale, min log-prob
    q = u[..., 4:4 + n_vocab].astype(np.float32)
    return tokens, head[..., 1:2] + head[..., 0:1] * q, q == 0


def check(arch: str, spec: str, tools: dict, args) -> dict:
    from mixq import api
    from mixq.export.gguf import write_gguf

    tok = byte_bpe()
    model = tiny(arch, len(tok))
    specs = api.resolve_specs(model, spec)
    qts = api.quantize_model(model, specs, progress=False).qtensors  # the model now holds mixq's weights
    out = args.work / f"{arch}.gguf"
    rep = write_gguf(model, tok, specs, out, qtensors=qts, overwrite=True, tokenizer_pre="gpt-2", name="tiny")
    text = args.work / "text.txt"
    text.write_text(TEXT)
    base = args.work / f"{arch}.kld"
    log = args.work / f"{arch}.log"
    with open(log, "w") as f:
        p = subprocess.run([str(tools["llama-perplexity"]), "-m", str(out), "-f", str(text), "-c", str(args.ctx),
                            "--chunks", str(args.chunks), "-b", str(args.ctx), "-t", str(args.threads), "-nr",
                            "--kl-divergence-base", str(base)], stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        return {"arch": arch, "gguf_arch": rep["architecture"], "error": log.read_text(errors="replace")[-400:]}
    tokens, cpp, clipped = read_logprobs(base)
    half = args.ctx // 2
    kl, gap, same, n = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for c, row in enumerate(tokens):
            ids = torch.as_tensor(row.astype(np.int64))
            lp = torch.log_softmax(model(ids[None]).logits[0].float(), -1)[half:-1].numpy()
            ref, keep = cpp[c], ~clipped[c]
            kl += float((np.exp(lp) * (lp - ref)).sum())  # clipped tokens: at most e^-16 of mixq's mass
            gap = max(gap, float(np.abs(np.where(keep, lp - ref, 0.0)).max()))
            same += int((lp.argmax(-1) == ref.argmax(-1)).sum())
            n += lp.shape[0]
    return {"arch": arch, "gguf_arch": rep["architecture"], "spec": spec, "types": rep["totals"]["types"],
            "positions": n, "kl": kl / n, "max_logprob_gap": gap, "same_top1": same / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--spec", default="W8-g32")
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf_arch_check"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tools = llamacpp.tools()
    rows = [check(a, args.spec, tools, args) for a in args.archs.split(",") if a]
    doc = {"command": " ".join(["python"] + sys.argv), "rows": rows, "ctx": args.ctx, "chunks": args.chunks,
           "llama_cpp": f"llama-cpp-python {llamacpp.VERSION} sdist, vendor/llama.cpp", "seconds": time.time() - t0}
    (RESULTS / "gguf_arch_check.json").write_text(json.dumps(doc, indent=1))
    lines = header("Every GGUF architecture mixq writes, run by llama.cpp", doc["command"]) + [
             f"- llama.cpp: {doc['llama_cpp']}; `llama-perplexity --kl-divergence-base`, {args.chunks} chunks of "
             f"{args.ctx} tokens, the second half of each scored; tiny random models (see the script's docstring)",
             "- KL: from mixq's fake-quant model's distribution to llama.cpp's, per scored position; gap: the largest "
             "|log-prob difference| among tokens llama.cpp keeps (within 16 nats of its top)", "",
             "| model | GGUF arch | types | positions | KL | max gap (nats) | same top-1 |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['gguf_arch']} | llama.cpp failed: {r['error'][-120:]!r} | | | | |")
            continue
        types = ", ".join(f"{k} {v}" for k, v in r["types"].items())
        lines.append(f"| {r['arch']} | {r['gguf_arch']} | {types} | {r['positions']} | {r['kl']:.2e} | "
                     f"{r['max_logprob_gap']:.3f} | {r['same_top1']:.3f} |")
    (RESULTS / "gguf_arch_check.md").write_text("\n".join(lines + [""]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
