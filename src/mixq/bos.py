"""Does every input start with BOS?  The model's convention, decided once, recorded everywhere.

Models whose training always saw BOS first (Gemma, Gemma-3, Llama-2/3, Mistral, OPT, ...) behave
differently on windows without it, so calibrating, measuring or evaluating them on BOS-less windows
measures inputs they never saw.  :func:`resolve_bos` turns a policy (``--bos auto|always|never``)
into the id to prepend (or ``None``):

``never``   no BOS.
``always``  the tokenizer's ``bos_token_id`` (an error if it has none).
``auto``    what the tokenizer itself does: a short text is encoded with and without special
            tokens, and BOS is prepended iff the special-token version starts with an added
            ``bos_token_id`` (the HF post-processor decides this; the ``add_bos_token`` attribute
            is read only when encoding cannot run, since transformers 5 reports ``False`` for a
            generic tokenizer whose ``tokenizer.json`` adds BOS).  A tokenizer without a BOS
            token means no BOS.  If the tokenizer cannot tell (not an HF tokenizer), the model's
            ``config.model_type`` is looked up in :data:`FAMILY_BOS`; failing that, a warning names
            the flag and no BOS is used.

The result, :class:`BosDecision`, is JSON-recordable (``to_dict``): eval results carry its policy
and source in their protocol.  This module imports nothing from mixq (anything may import it).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

BOS_CHOICES = ("auto", "always", "never")
SOURCES = ("tokenizer", "family", "user", "undetermined")
_PROBE = "Hello world. 1 2 3"

# model_type -> does its training data start every sequence with BOS?  Used only when the tokenizer
# cannot be asked.  Only families with one convention are listed: "llama" and "mistral" are not,
# because checkpoints of those architectures disagree (Llama-2/3 and Mistral-7B add BOS, SmolLM2 -
# model_type llama - does not); their tokenizers decide, or the user does.
FAMILY_BOS: dict[str, bool] = {
    # Gemma 1/2/3: tokenizer_config.json "add_bos_token": true; the Gemma model cards and
    # lm-evaluation-harness (HFLM sets add_bos_token for "gemma" model types) require BOS.
    "gemma": True, "gemma2": True, "gemma3": True, "gemma3_text": True,
    # OPT: facebook/opt-* tokenizers prepend "</s>" (id 2, their bos_token) to every input.
    "opt": True,
    # GPT-2: documents separated by <|endoftext|>, the tokenizer adds nothing.
    "gpt2": False,
    # Pythia / GPT-NeoX-20B: GPTNeoXTokenizerFast defaults to add_bos_token=False.
    "gpt_neox": False,
    # Qwen2 / Qwen2.5 / Qwen3: tokenizer_config.json "bos_token": null.
    "qwen2": False, "qwen3": False,
    # Phi-1/1.5/2: CodeGen tokenizer, no BOS added.
    "phi": False,
}


@dataclass(frozen=True)
class BosDecision:
    """``policy`` asked for, ``bos_id`` to prepend (None: no BOS), ``source`` of the decision:
    ``"tokenizer"`` (auto, the tokenizer's convention), ``"family"`` (auto, :data:`FAMILY_BOS`),
    ``"user"`` (always / never), ``"undetermined"`` (auto, nothing could tell: no BOS)."""

    policy: str
    bos_id: int | None
    source: str

    def __post_init__(self):
        if self.policy not in BOS_CHOICES:
            raise ValueError(f"BOS policy must be one of {', '.join(BOS_CHOICES)}, got {self.policy!r}")
        if self.source not in SOURCES:
            raise ValueError(f"BOS source must be one of {', '.join(SOURCES)}, got {self.source!r}")

    @property
    def prepend(self) -> bool:
        return self.bos_id is not None

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_bos(tokenizer, model=None, policy: "str | BosDecision" = "auto") -> BosDecision:
    """The BOS to prepend to every calibration row, evaluation window and zero-shot context of
    ``model`` under ``policy`` (module docstring); ``.bos_id`` is the id or None.  A decision already made
    (a :class:`BosDecision`) is returned as it is."""
    if isinstance(policy, BosDecision):
        return policy
    if policy not in BOS_CHOICES:
        raise ValueError(f"--bos must be one of {', '.join(BOS_CHOICES)}, got {policy!r}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if policy == "never":
        return BosDecision(policy, None, "user")
    if policy == "always":
        if bos is None:
            raise ValueError("--bos always: the tokenizer has no BOS token; use --bos never (or auto)")
        return BosDecision(policy, int(bos), "user")
    if tokenizer is not None and hasattr(tokenizer, "bos_token_id"):
        if bos is None:
            return BosDecision(policy, None, "tokenizer")
        adds = _tokenizer_adds_bos(tokenizer, int(bos))
        if adds is not None:
            return BosDecision(policy, int(bos) if adds else None, "tokenizer")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILY_BOS.get(model_type)
    if family is not None:
        if not family:
            return BosDecision(policy, None, "family")
        bos = bos if bos is not None else getattr(getattr(model, "config", None), "bos_token_id", None)
        if bos is not None:
            return BosDecision(policy, int(bos), "family")
    warnings.warn(f"cannot tell whether {model_type or 'this model'} expects BOS first (the tokenizer does not say): "
                  "evaluating without BOS; pass --bos always|never to decide", UserWarning, stacklevel=2)
    return BosDecision(policy, None, "undetermined")


def _tokenizer_adds_bos(tokenizer, bos: int) -> bool | None:
    """Whether encoding with special tokens prepends ``bos`` (None: the tokenizer cannot be asked)."""
    try:
        with_sp = list(tokenizer.encode(_PROBE, add_special_tokens=True))
        plain = list(tokenizer.encode(_PROBE, add_special_tokens=False))
    except Exception:  # noqa: BLE001 - not an HF tokenizer: the attribute or the family table decides
        flag = getattr(tokenizer, "add_bos_token", None)
        return flag if isinstance(flag, bool) else None
    return len(with_sp) > len(plain) and bool(with_sp) and int(with_sp[0]) == bos


def add_bos_argument(parser) -> None:
    """``--bos auto|always|never`` on a command that builds calibration batches or evaluation windows."""
    parser.add_argument("--bos", default="auto", choices=BOS_CHOICES,
                        help="start every calibration sample, evaluation window and zero-shot context with BOS: "
                             "auto (default: as the tokenizer does, e.g. Gemma and Llama-3 yes, GPT-2 and Qwen no), "
                             "always or never")
