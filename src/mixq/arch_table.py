"""The family table of :mod:`mixq.arch`: where each Hugging Face causal-LM family keeps its blocks, embeddings,
norms and head, and which block linears read the same input (:class:`InputGroup`).

Adding a family is adding one :data:`ARCH_TABLE` entry keyed by ``config.model_type``; :mod:`mixq.arch`
re-exports everything here and walks models with it.  Each dense family has a tiny random model in
``tests/tiny.py`` whose entry ``tests/test_arch.py`` checks; ``tests/test_families.py`` and ``tests/test_moe.py``
take families through the whole pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

PREV_KINDS = ("norm", "linear", "act", None)


@dataclass(frozen=True)
class InputGroup:
    """Linears of one block that read the same input, and the op producing that input.

    ``prev_kind`` says how a per-input-channel scale ``s`` (AWQ, SmoothQuant) can be folded into
    ``prev`` so that the block function is unchanged:

    ``"norm"``    ``prev`` is a norm with an elementwise weight (and bias): divide them by ``s``
                  (for norms computing ``x * (offset + w)`` see :attr:`ArchInfo.norm_offset`).
    ``"linear"``  ``prev`` is a linear whose output rows feed the input channels one to one, maybe
                  through a multiplicative or positively homogeneous op (``act(gate) * up``, ReLU):
                  divide its rows (and bias) by ``s``.  Only exact when ``prev.out_features ==
                  in_features`` of the group; a ``v_proj -> o_proj`` group under grouped-query
                  attention (fewer kv heads) needs ``s`` shared across the repeated heads.
    ``"act"``     ``prev`` is a non-homogeneous activation (GELU), or one whose output is multiplied
                  by another linear's (Phi-3's ``act(gate) * up`` out of one fused ``gate_up_proj``):
                  the scale must be applied by wrapping it (AWQ's ``ScaledActivation``).
    ``None``      nothing to fold into (``prev`` is ``None``), e.g. a fused QKV before ``o_proj``, or
                  the residual stream read without a norm (OLMo 2's q/k/v and gate/up);
                  the group still shares calibration inputs.
    Names are relative to the block.
    """

    prev: str | None
    linears: tuple[str, ...]
    prev_kind: str | None

    def __post_init__(self):
        if self.prev_kind not in PREV_KINDS:
            raise ValueError(f"InputGroup.prev_kind must be one of {PREV_KINDS}, got {self.prev_kind!r}")
        if (self.prev is None) != (self.prev_kind is None):
            raise ValueError(f"InputGroup {self.linears}: prev and prev_kind must both be set or both be None")
        if not self.linears:
            raise ValueError("InputGroup needs at least one linear")


@dataclass(frozen=True)
class ArchInfo:
    """Module paths of one family (dotted, from the top-level ``*ForCausalLM`` model).

    ``blocks``        the ``ModuleList`` of decoder blocks
    ``embeddings``    token (and learned position) embedding tables
    ``final_norm``    the norm before ``lm_head`` (``None`` if unknown)
    ``lm_head``       the output projection ``[vocab, hidden]``
    ``input_groups``  every block linear in exactly one :class:`InputGroup` (empty when discovered)
    ``norm_offset``   norms compute ``x_hat * (norm_offset + weight)`` (Gemma: 1.0, others 0.0)
    ``skip``          block-relative names of linear-like modules never quantized (e.g. MoE routers)
    ``config_checks`` ``(attr, value)`` pairs the input groups assume; if one fails,
                      :func:`arch_for` drops the groups (with a warning) rather than mislead
    ``discovered``    True when built by the default discovery, not taken from the table
    ``kv_linears``    block-relative names of the linears whose output rows are keys or values (a fused QKV
                      included): read by every later position, not only by their own (``kfac-pos``)
    """

    blocks: str
    embeddings: tuple[str, ...]
    final_norm: str | None
    lm_head: str
    input_groups: tuple[InputGroup, ...]
    norm_offset: float = 0.0
    skip: tuple[str, ...] = ()
    config_checks: tuple[tuple[str, object], ...] = ()
    discovered: bool = False
    kv_linears: tuple[str, ...] = ("self_attn.k_proj", "self_attn.v_proj")


def _llama_groups(attn_norm: str, mlp_norm: str) -> tuple[InputGroup, ...]:
    return (
        InputGroup(attn_norm, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
        InputGroup("self_attn.v_proj", ("self_attn.o_proj",), "linear"),
        InputGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "norm"),
        InputGroup("mlp.up_proj", ("mlp.down_proj",), "linear"),  # down(act(gate) * up)
    )


_LLAMA = ArchInfo("model.layers", ("model.embed_tokens",), "model.norm", "lm_head",
                  _llama_groups("input_layernorm", "post_attention_layernorm"))

_GEMMA_SANDWICH = replace(_LLAMA, norm_offset=1.0,
                          input_groups=_llama_groups("input_layernorm", "pre_feedforward_layernorm"))

ARCH_TABLE: dict[str, ArchInfo] = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,  # + per-head q_norm / k_norm inside attention: after the projections, no group reads them
    "mistral": _LLAMA,
    # Granite: scalar multipliers (embedding, residual branches, attention, logits) leave the layout Llama's
    "granite": _LLAMA,
    "gemma": replace(_LLAMA, norm_offset=1.0),
    # Gemma 2 and Gemma3ForCausalLM (text only): norms around attention and MLP ("sandwich"); the post-norms
    # (post_attention_layernorm, post_feedforward_layernorm) are read by no linear.  Gemma 3: q/k norms too
    "gemma2": _GEMMA_SANDWICH,
    "gemma3_text": _GEMMA_SANDWICH,
    # OLMo 2: no norm before attention or MLP (post-norms only): q/k/v and gate/up read the residual stream itself,
    # so they share their calibration input but have nothing to fold a scale into
    "olmo2": replace(_LLAMA, input_groups=(
        InputGroup(None, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), None),
        InputGroup("self_attn.v_proj", ("self_attn.o_proj",), "linear"),
        InputGroup(None, ("mlp.gate_proj", "mlp.up_proj"), None),
        InputGroup("mlp.up_proj", ("mlp.down_proj",), "linear"),
    )),
    # Phi-3: fused qkv_proj [q; k; v] and gate_up_proj [gate; up]; down reads up * act(gate), so a scale on its
    # input is the activation's output scaled (an "act" group: exact, since the product is linear in act(gate))
    "phi3": replace(_LLAMA, input_groups=(
        InputGroup("input_layernorm", ("self_attn.qkv_proj",), "norm"),
        InputGroup(None, ("self_attn.o_proj",), None),
        InputGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "norm"),
        InputGroup("mlp.activation_fn", ("mlp.down_proj",), "act"),
    ), kv_linears=("self_attn.qkv_proj",)),
    # phi-2: attention and MLP in parallel, both reading input_layernorm(x)
    "phi": ArchInfo("model.layers", ("model.embed_tokens",), "model.final_layernorm", "lm_head", (
        InputGroup("input_layernorm",
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"), "norm"),
        InputGroup("self_attn.v_proj", ("self_attn.dense",), "linear"),
        InputGroup("mlp.activation_fn", ("mlp.fc2",), "act"),
    )),
    # GPT-2: Conv1D layers (weight stored [in, out]), fused QKV in attn.c_attn
    "gpt2": ArchInfo("transformer.h", ("transformer.wte", "transformer.wpe"), "transformer.ln_f", "lm_head", (
        InputGroup("ln_1", ("attn.c_attn",), "norm"),
        InputGroup(None, ("attn.c_proj",), None),
        InputGroup("ln_2", ("mlp.c_fc",), "norm"),
        InputGroup("mlp.act", ("mlp.c_proj",), "act"),
    ), kv_linears=("attn.c_attn",)),
    # OPT: pre-norm only when do_layer_norm_before (not opt-350m); ReLU is positively homogeneous
    "opt": ArchInfo("model.decoder.layers", ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
                    "model.decoder.final_layer_norm", "lm_head", (
        InputGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
        InputGroup("self_attn.v_proj", ("self_attn.out_proj",), "linear"),
        InputGroup("final_layer_norm", ("fc1",), "norm"),
        InputGroup("fc1", ("fc2",), "linear"),
    ), config_checks=(("do_layer_norm_before", True),)),
    # GPT-NeoX / Pythia: fused, head-interleaved QKV; attention and MLP each with their own norm
    "gpt_neox": ArchInfo("gpt_neox.layers", ("gpt_neox.embed_in",), "gpt_neox.final_layer_norm", "lm_head", (
        InputGroup("input_layernorm", ("attention.query_key_value",), "norm"),
        InputGroup(None, ("attention.dense",), None),
        InputGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "norm"),
        InputGroup("mlp.act", ("mlp.dense_4h_to_h",), "act"),
    ), kv_linears=("attention.query_key_value",)),
    # Falcon's new decoder architecture (40B/180B, Falcon 2): grouped fused QKV; attention reads ln_attn(x) and the
    # MLP ln_mlp(x), in parallel.  Falcon-7B's layout (one input_layernorm) fails the checks and loses the groups
    "falcon": ArchInfo("transformer.h", ("transformer.word_embeddings",), "transformer.ln_f", "lm_head", (
        InputGroup("ln_attn", ("self_attention.query_key_value",), "norm"),
        InputGroup(None, ("self_attention.dense",), None),
        InputGroup("ln_mlp", ("mlp.dense_h_to_4h",), "norm"),
        InputGroup("mlp.act", ("mlp.dense_4h_to_h",), "act"),
    ), config_checks=(("new_decoder_architecture", True), ("num_ln_in_parallel_attn", 2)),
        kv_linears=("self_attention.query_key_value",)),
    # MoE (mixq.moe): stacked experts become mlp.experts.<e>.{gate,up,down}_proj linears; the router mlp.gate
    # is not a linear and stays out of the plan.  No input groups: the norm before the experts also feeds the
    # router, so AWQ/SmoothQuant/rotation (which fold scales into it) are refused rather than wrong.
    "qwen3_moe": replace(_LLAMA, input_groups=(), skip=("mlp.gate",)),
    "mixtral": replace(_LLAMA, input_groups=(), skip=("mlp.gate",)),
    "olmoe": replace(_LLAMA, input_groups=(), skip=("mlp.gate",)),
    # + a shared expert (a plain MLP, quantized like any other) behind a sigmoid gate [1, hidden], kept like a router
    "qwen2_moe": replace(_LLAMA, input_groups=(), skip=("mlp.gate", "mlp.shared_expert_gate")),
}
