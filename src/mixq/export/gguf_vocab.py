"""The tokenizer half of a GGUF file: ``tokenizer.ggml.*`` metadata from a Hugging Face fast tokenizer.

Byte-level BPE (GPT-2 style: SmolLM2, Qwen2, Llama 3) is written as ``gpt2`` with its merges and
llama.cpp's pre-tokenizer name (recognised from the HF pre-tokenizer's structure, or taken from the
GGUF an embedded model came from); SentencePiece-style BPE (byte fallback) as ``llama`` with
scores ``-id`` (merge order).  Anything else is written as ``no_vocab`` with a warning.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import gguf

_QWEN2_HINT = r"\p{N}|"
_LLAMA3_HINT = r"\p{N}{1,3}"


def _walk(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _guess_pre(pre: Any, model_type: str | None) -> tuple[str, str | None]:
    """llama.cpp's pre-tokenizer name for a byte-level BPE (from the HF pre-tokenizer's structure), and a
    warning when it had to guess."""
    nodes = list(_walk(pre))
    kinds = [n.get("type") for n in nodes]
    pattern = next((str((n.get("pattern") or {}).get("Regex", "")) for n in nodes if n.get("type") == "Split"), "")
    if pattern:
        if _QWEN2_HINT in pattern and "(?i:'s" in pattern:
            return "qwen2", None
        if _LLAMA3_HINT in pattern:
            return "llama-bpe", None
    elif kinds and set(kinds) <= {"Sequence", "ByteLevel", "Digits"} and "ByteLevel" in kinds:
        digits = [n for n in nodes if n.get("type") == "Digits"]
        if not digits:
            return "gpt-2", None
        if all(n.get("individual_digits") for n in digits):
            return "smollm", None
    if model_type == "qwen2":
        return "qwen2", f"pre-tokenizer not recognised; wrote 'qwen2' for a {model_type} model"
    return "default", f"pre-tokenizer {json.dumps(pre)[:120]} not recognised: wrote tokenizer.ggml.pre='default'"


def _tokenizer_fields(tokenizer, vocab_size: int, model_type: str | None,
                      pre_override: str | None) -> tuple[dict | None, list[str]]:
    """The ``tokenizer.ggml.*`` metadata of a fast BPE tokenizer (``None`` and a warning when not exportable)."""
    if tokenizer is None:
        return None, ["no tokenizer: wrote tokenizer.ggml.model='no_vocab' (llama.cpp then takes token ids only)"]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, [f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer: wrote 'no_vocab'"]
    doc = json.loads(backend.to_str())
    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        return None, [f"tokenizer model {model.get('type')!r} has no GGUF form here (BPE only): wrote 'no_vocab'"]
    pre, dec = doc.get("pre_tokenizer"), doc.get("decoder")
    byte_level = any(n.get("type") == "ByteLevel" for n in _walk([pre, dec]))
    spm = not byte_level and (model.get("byte_fallback") or any(
        n.get("type") in ("Metaspace", "ByteFallback") for n in _walk([pre, dec, doc.get("normalizer")])))
    if not (byte_level or spm):
        return None, ["BPE tokenizer is neither byte-level nor SentencePiece-style: wrote 'no_vocab'"]
    warnings: list[str] = []
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    for tok, i in model["vocab"].items():
        if i >= vocab_size:
            raise ValueError(f"tokenizer id {i} ({tok!r}) is outside the model's vocabulary of {vocab_size}")
        tokens[i] = tok
    for added in doc.get("added_tokens", []):
        i = added["id"]
        if i >= vocab_size:
            raise ValueError(f"added token {added['content']!r} has id {i}, "
                             f"outside the model's vocabulary of {vocab_size}")
        tokens[i] = added["content"]
        types[i] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    n_pad = 0
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i], n_pad = f"[PAD{i}]", int(gguf.TokenType.UNUSED), n_pad + 1
        elif spm and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = int(gguf.TokenType.BYTE)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    f: dict[str, Any] = {"model": "gpt2" if byte_level else "llama", "tokens": tokens, "types": types,
                         "merges": merges, "padded": n_pad}
    if byte_level:
        if pre_override:
            f["pre"] = pre_override
        else:
            f["pre"], warn = _guess_pre(pre, model_type)
            if warn:
                warnings.append(warn)
    else:
        f["pre"] = pre_override or "default"
        # llama.cpp's SentencePiece tokenizer merges the pair whose result scores highest; a BPE
        # vocabulary lists tokens in merge order, so -id reproduces the merge priority
        f["scores"] = [0.0 if types[i] != gguf.TokenType.NORMAL else -float(i) for i in range(vocab_size)]
        f["add_space_prefix"] = _prepends_space(doc)
    for key in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{key}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < vocab_size:
            f[f"{key}_id"] = tid
    try:
        with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        f["add_bos"] = len(with_sp) > len(plain) and "bos_id" in f and with_sp[0] == f["bos_id"]
        f["add_eos"] = len(with_sp) > len(plain) and "eos_id" in f and with_sp[-1] == f["eos_id"]
    except Exception as e:  # noqa: BLE001 - a tokenizer that cannot encode "a" still exports its vocabulary
        warnings.append(f"could not probe BOS/EOS insertion ({e}); wrote add_bos_token=false")
        f["add_bos"] = f["add_eos"] = False
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, str) and tmpl:
        f["chat_template"] = tmpl
    return f, warnings


def _prepends_space(doc: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts ``▁`` before the text (a ``Prepend`` normaliser, Llama 2's; or a
    ``Metaspace`` pre-tokenizer that prepends, older exports): llama.cpp's ``add_space_prefix``, which it assumes
    when the key is missing -- Gemma's tokenizer does not."""
    for n in _walk([doc.get("normalizer"), doc.get("pre_tokenizer")]):
        if n.get("type") == "Prepend" and n.get("prepend") == "\u2581":
            return True
        if n.get("type") == "Metaspace" and (n.get("prepend_scheme") in ("always", "first")
                                             or n.get("add_prefix_space") is True):
            return True
    return False


def _add_tokenizer(w: gguf.GGUFWriter, f: dict | None) -> dict:
    if f is None:
        w.add_tokenizer_model("no_vocab")
        return {"model": "no_vocab"}
    w.add_tokenizer_model(f["model"])
    w.add_tokenizer_pre(f["pre"])
    w.add_token_list(f["tokens"])
    w.add_token_types(f["types"])
    if f["model"] == "llama":
        w.add_token_scores(f["scores"])
        w.add_add_space_prefix(bool(f["add_space_prefix"]))
    if f["merges"]:
        w.add_token_merges(f["merges"])
    for key, add in (("bos_id", w.add_bos_token_id), ("eos_id", w.add_eos_token_id),
                     ("unk_id", w.add_unk_token_id), ("pad_id", w.add_pad_token_id)):
        if key in f:
            add(f[key])
    w.add_add_bos_token(bool(f["add_bos"]))
    w.add_add_eos_token(bool(f["add_eos"]))
    if "chat_template" in f:
        w.add_chat_template(f["chat_template"])
    return {"model": f["model"], "pre": f["pre"], "tokens": len(f["tokens"]), "merges": len(f["merges"]),
            "padded_tokens": f["padded"], "add_bos": bool(f["add_bos"]),
            **({"add_space_prefix": f["add_space_prefix"]} if "add_space_prefix" in f else {}),
            **{k: f[k] for k in ("bos_id", "eos_id", "unk_id", "pad_id") if k in f}}


def _embedded_pre(base_model: str | None) -> str | None:
    """The pre-tokenizer named in the GGUF an embedded model was converted from (e.g. SmolLM2: ``smollm``).

    transformers rebuilds such a tokenizer with the plain GPT-2 split, which would otherwise be
    what gets written; the original file knows better.
    """
    from ..models import EMBEDDED, embedded_gguf_path

    if base_model not in EMBEDDED:
        return None
    try:
        field = gguf.GGUFReader(embedded_gguf_path(base_model)).fields.get("tokenizer.ggml.pre")
        return field.contents() if field is not None else None
    except Exception:  # noqa: BLE001 - only a better guess; the detected name is used otherwise
        return None
