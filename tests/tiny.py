"""Tiny random Hugging Face causal LMs, one per supported family, for fast offline tests.

Every model is built from a config constructed in code (no hub access): hidden size 64,
2 decoder blocks, 4 attention heads (2 key/value heads where the family supports grouped-query
attention), MLP width 128, vocabulary 128, float32, eval mode.  Weights are random but
deterministic for a given ``seed``.

    >>> from tiny import make_tiny, FAMILIES
    >>> model = make_tiny("llama")
    >>> tokenizer = make_tiny_tokenizer()   # character level, ids < 128, works for any ASCII text
"""
from __future__ import annotations

import torch
import transformers as tf

from mixq.measure.gradients import sample_labels

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTER = 128
VOCAB = 128
MAX_POS = 64

# issue 16's further families: in FAMILIES (the table tests) and through the whole pipeline in test_families.py
MORE_FAMILIES: list[str] = ["qwen3", "gemma2", "phi3", "olmo2", "granite", "falcon"]
FAMILIES: list[str] = ["llama", "qwen2", "mistral", "gemma", "gemma3", "phi", "gpt2", "opt", "gpt_neox",
                       *MORE_FAMILIES]

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, intermediate_size=INTER, max_position_embeddings=MAX_POS)


def _config(family: str) -> tuple[tf.PretrainedConfig, type]:
    """The config and the causal-LM class of one ``family`` (:data:`FAMILIES`, :data:`MORE_FAMILIES`)."""
    gqa = dict(_COMMON, num_key_value_heads=KV_HEADS)
    if family == "llama":
        return tf.LlamaConfig(**gqa), tf.LlamaForCausalLM
    if family == "qwen2":
        return tf.Qwen2Config(**gqa), tf.Qwen2ForCausalLM
    if family == "mistral":
        return tf.MistralConfig(**gqa, sliding_window=None), tf.MistralForCausalLM
    if family == "gemma":
        return tf.GemmaConfig(**gqa, head_dim=HIDDEN // HEADS), tf.GemmaForCausalLM
    if family == "gemma3":
        cfg = tf.Gemma3TextConfig(**gqa, head_dim=HIDDEN // HEADS, sliding_window=16)
        return cfg, tf.Gemma3ForCausalLM
    if family == "phi":
        return tf.PhiConfig(**gqa), tf.PhiForCausalLM
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                            n_inner=INTER, n_positions=MAX_POS, bos_token_id=0, eos_token_id=0)
        return cfg, tf.GPT2LMHeadModel
    if family == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, ffn_dim=INTER, word_embed_proj_dim=HIDDEN,
                           max_position_embeddings=MAX_POS)
        return cfg, tf.OPTForCausalLM
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**_COMMON), tf.GPTNeoXForCausalLM
    ids = dict(pad_token_id=1, bos_token_id=2, eos_token_id=3)  # the tokenizer's; HF defaults lie outside VOCAB
    if family == "qwen3":  # per-head RMSNorm on q and k
        return tf.Qwen3Config(**gqa, head_dim=HIDDEN // HEADS), tf.Qwen3ForCausalLM
    if family == "gemma2":  # sandwich norms, attention and final logit soft-capping, sqrt(hidden) embedding scale
        cfg = tf.Gemma2Config(**gqa, head_dim=HIDDEN // HEADS, sliding_window=16, query_pre_attn_scalar=HIDDEN // HEADS)
        return cfg, tf.Gemma2ForCausalLM
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**gqa, **ids), tf.Phi3ForCausalLM
    if family == "olmo2":  # post-norms only (no norm before attention / MLP), q/k norms over all heads
        return tf.Olmo2Config(**gqa, **ids), tf.Olmo2ForCausalLM
    if family == "granite":  # scalar multipliers on embeddings, residual branches, attention and logits
        cfg = tf.GraniteConfig(**gqa, embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0,
                               attention_multiplier=1.0 / (HIDDEN // HEADS))
        return cfg, tf.GraniteForCausalLM
    if family == "falcon":  # the new decoder architecture (Falcon-40B/180B): GQA, ln_attn / ln_mlp in parallel
        cfg = tf.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              num_kv_heads=KV_HEADS, new_decoder_architecture=True, ffn_hidden_size=INTER,
                              max_position_embeddings=MAX_POS, bos_token_id=2, eos_token_id=3)
        return cfg, tf.FalconForCausalLM
    raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")


def make_tiny(family: str, seed: int = 0, layers: int | None = None) -> tf.PreTrainedModel:
    """A random tiny causal LM of ``family`` (float32, eval mode, deterministic for ``seed``);
    ``layers``: another number of decoder blocks than the family's default.

    Norm weights are randomised too (HF initialises them to 1 or 0), so that tests which fold
    scales into norms or compare layouts do not pass by accident.
    """
    cfg, cls = _config(family)
    if layers is not None:
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None):  # per-layer attention kinds (e.g. qwen2: all full attention)
            cfg.layer_types = [cfg.layer_types[0]] * layers
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.1).add_(0.0 if "bias" in name else 1.0)
    return model.eval()


def make_tiny_tokenizer():
    """A character-level fast tokenizer (printable ASCII + 4 specials = 99 ids < VOCAB), built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def layer_input(model, module, ids):
    """The input ``[tokens, features]`` that ``module`` receives when ``model`` runs on ``ids``."""
    seen = []
    hook = module.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    model(ids)
    hook.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def token_grads(model, module, ids, labels: str = "data"):
    """``(x [T, in], g [T, out])``: ``module``'s input and its output's gradient at every token of every row of
    ``ids``, one backward pass per row of the summed next-token cross-entropy (the measurement's gradient pass);
    ``labels="model"``: each label sampled from the model's own distribution by the driver's ``sample_labels``,
    generator seeded with the row's index (as :func:`mixq.measure.gradients.gradient_stats` with ``seed=0``)."""
    xs, gs = [], []

    def hook(m, a, o):
        xs.append(a[0].detach()[0])
        o.register_hook(lambda gr: gs.append(gr[0]))

    h = module.register_forward_hook(hook)
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for r in range(ids.shape[0]):
            row = ids[r : r + 1]
            emb = model.get_input_embeddings()(row).detach().requires_grad_(True)
            flat = model(inputs_embeds=emb).logits[0, :-1].float()
            if labels == "model":
                tgt = sample_labels(flat.detach(), torch.Generator().manual_seed(r))  # the driver's draws
            else:
                tgt = row[0, 1:]
            torch.nn.functional.cross_entropy(flat, tgt, reduction="sum").backward()
    finally:
        h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    return torch.cat(xs), torch.cat(gs)
