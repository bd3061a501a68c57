"""Self-generated calibration text: what the full-precision model itself writes.

Data-free calibration (LLM-QAT, GenQ-style): the model is sampled from a fixed set of short, varied
openers — prose of many kinds, lists, letters, code, dialogue — and, for a model with a chat template,
from chat exchanges built with that template (a user turn, then the model's own answer and whatever
turns it writes after it).  The rows therefore carry the case, punctuation, formatting and chat markup
that the model meets in use, which a single corpus such as PTB (lower-cased newswire) lacks.

Sampling: from the model's whole next-token distribution (temperature 1, no top-k or nucleus truncation),
``seqlen`` tokens per row, prompt included, never stopped at end-of-turn (what a model writes after it, a new
turn or a new text, is its own distribution too).  Untruncated, the rows are about as surprising to the model
as human text is: SmolLM2-135M's perplexity on its 32 rows is 34 (26 in another draw; PTB test 67, the
fortunes 47), where ``VERSION`` 1's nucleus sampling (``top_p = 0.95`` within the 64 likeliest tokens) wrote
rows of perplexity 5.8 -- the likeliest continuations, whose activations human text leaves far behind.
Calibrated on untruncated rows, SmolLM2's plans scored 3-8 % less KL in both domains at 2.5-4.0 bpw
(bench/results/calib_sources.md).
Prompt order and sampling are seeded, so the rows are a pure function of (model, n, seqlen, seed, BOS, this module's
``VERSION`` and prompt lists); they are cached under ``mixq.models.cache_dir() / "selfgen"`` keyed by
all of these, with a sha256 of the ids checked on load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import ids_sha256

log = logging.getLogger(__name__)

VERSION = 2
BATCH = 64

# Openers of plain text.  Deliberately of many kinds and registers; none is drawn from an evaluation corpus.
PROMPTS = (
    "The history of the city begins",
    "Dear Ms. Alvarez,\n\nThank you for your letter of",
    "Breaking news:",
    "Once upon a time, in a village by the sea,",
    "How to make a simple tomato sauce\n\nIngredients:\n-",
    "def parse_config(path):\n    \"\"\"",
    "Chapter 1\n\n",
    "Q: What is the difference between weather and climate?\nA:",
    "In this paper, we propose",
    "The committee met on Tuesday to discuss",
    "Top 10 tips for",
    "import numpy as np\n\n",
    "\"Where have you been?\" she asked.",
    "Photosynthesis is the process by which",
    "SELECT name, COUNT(*)",
    "Product review: I bought this",
    "Meeting notes\nDate:",
    "The following is a transcript of",
    "My grandmother always said",
    "Installation\n============\n\nTo install the package,",
    "The patient, a 54-year-old man,",
    "It was the coldest winter anyone could remember.",
    "<!DOCTYPE html>\n<html>",
    "In 1848, revolutions spread across",
    "To whom it may concern:",
    "Here is a list of",
    "The theorem states that",
    "function fetchData(url) {",
    "Welcome to our guide on",
    "The match ended in a draw after",
    "User manual, section 3:",
    "I have never understood why people",
    "#!/bin/bash\n# ",
    "The recipe calls for",
    "Abstract\n\n",
    "Frequently asked questions\n\n1.",
    "He opened the door and",
    "The quarterly report shows that revenue",
    "A poem about the sea:\n\n",
    "Step 1:",
    "The word \"",
    "Scientists have discovered",
    "class Node:\n    def __init__(self",
    "Travel diary, day three.",
    "The court ruled that",
    "Why do cats",
    "Summary of the discussion:",
    "The most important thing to remember about",
)

# User turns for chat-formatted exchanges (instruct models with a chat template).
QUESTIONS = (
    "Can you explain how vaccines work?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Give me three ideas for a birthday party.",
    "What is the capital of Australia, and why isn't it Sydney?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How do I center a div in CSS?",
    "What are the health benefits of walking every day?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a short poem about autumn.",
    "What should I pack for a week-long hiking trip?",
    "How does compound interest work? Give an example.",
    "Why is the sky blue?",
    "Draft a polite email asking my landlord to fix the heating.",
    "What is machine learning, in simple terms?",
    "List some good habits for studying.",
    "How do I make pancakes?",
    "What caused the fall of the Roman Empire?",
    "Write a SQL query that finds the ten most recent orders.",
    "Can you help me plan a budget for a month?",
    "What's the difference between a virus and a bacterium?",
    "Tell me a joke about programmers.",
    "How do airplanes stay in the air?",
    "Give me a workout plan for beginners.",
    "Explain recursion with a simple example.",
    "What are some tips for a job interview?",
    "How do I say no to extra work without upsetting my boss?",
    "Describe the water cycle.",
    "What books would you recommend for learning history?",
    "Write a bash command that counts the lines in all .txt files.",
    "What is the meaning of the word 'serendipity'?",
    "How can I improve my sleep?",
)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_texts(tokenizer, n: int, seed: int) -> list[str]:
    """The ``n`` row openers: plain prompts, and chat exchanges (half of the rows) for a chat model."""
    rng = random.Random(seed)
    plain = list(PROMPTS)
    rng.shuffle(plain)
    if not has_chat_template(tokenizer):
        return [plain[i % len(plain)] for i in range(n)]
    chats = list(QUESTIONS)
    rng.shuffle(chats)
    out = []
    for i in range(n):
        if i % 2:
            q = chats[(i // 2) % len(chats)]
            try:
                out.append(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                         add_generation_prompt=True))
            except Exception as e:  # noqa: BLE001 - a template is the model's code: any error it raises
                log.warning("the tokenizer's chat template failed on a one-turn exchange (%s: %s): self-generated "
                            "calibration uses plain openers only", type(e).__name__, e)
                return [plain[i % len(plain)] for i in range(n)]
        else:
            out.append(plain[(i // 2) % len(plain)])
    return out


def _prompt_ids(tokenizer, text: str, bos_id: int | None) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([bos_id] if bos_id is not None and (not ids or ids[0] != bos_id) else []) + ids


def cache_key(model: nn.Module, tokenizer, n: int, seqlen: int, seed: int, bos_id: int | None) -> str:
    from .models import model_fingerprint

    blob = json.dumps({"version": VERSION, "model": model_fingerprint(model), "n": n, "seqlen": seqlen,
                       "seed": seed, "bos": bos_id, "prompts": prompt_texts(tokenizer, n, seed),
                       "vocab": len(tokenizer)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def generate_rows(model: nn.Module, tokenizer, n: int, seqlen: int, seed: int, *, bos_id: int | None = None,
                  progress: bool = True) -> torch.Tensor:
    """``[n, seqlen]`` token ids sampled from ``model`` (see the module docstring)."""
    if n < 1 or seqlen < 2:
        raise ValueError(f"need n >= 1 and seqlen >= 2, got n={n}, seqlen={seqlen}")
    prompts = [_prompt_ids(tokenizer, t, bos_id)[: seqlen // 2] for t in prompt_texts(tokenizer, n, seed)]
    device = next(model.parameters()).device
    rows = []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        bar = tqdm(total=n * seqlen, unit="tok", unit_scale=True, desc="self-generate calibration",
                   disable=None if progress else True)
        for start in range(0, n, BATCH):
            batch = prompts[start : start + BATCH]
            rows.extend(_sample_batch(model, batch, seqlen, device))
            bar.update(len(batch) * seqlen)
        bar.close()
    model.train(was_training)
    return torch.stack(rows)


def _sample_batch(model: nn.Module, prompts: list[list[int]], seqlen: int, device) -> list[torch.Tensor]:
    """Sample each prompt to ``seqlen`` tokens.  Prompts are left-aligned in a buffer; a row is fed its own
    prompt token until its prompt is used up, then its samples (no padding, so no mask is needed)."""
    b = len(prompts)
    buf = torch.zeros(b, seqlen, dtype=torch.long)
    plen = torch.tensor([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    first = int(plen.min())
    out = model(buf[:, :first].to(device), use_cache=True)
    past = out.past_key_values
    for t in range(first, seqlen):
        logits = out.logits[:, -1, :].float()
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(-1).cpu()
        keep = t < plen  # still inside its prompt: the prompt's token, not the sample
        buf[:, t] = torch.where(keep, buf[:, t], nxt)
        if t + 1 < seqlen:
            out = model(buf[:, t : t + 1].to(device), past_key_values=past, use_cache=True)
            past = out.past_key_values
    return list(buf)


def cache_root() -> Path:
    """Where :func:`self_generated` keeps its rows by default: ``mixq.models.cache_dir() / "selfgen"``."""
    from .models import cache_dir

    return cache_dir() / "selfgen"


def self_generated(model: nn.Module, tokenizer, n: int, seqlen: int, seed: int, *, bos_id: int | None = None,
                   cache: Path | None = None, progress: bool = True) -> torch.Tensor:
    """:func:`generate_rows`, cached: ``cache`` (default :func:`cache_root`) holds one safetensors file
    per key, its ids' sha256 checked on load (a damaged file is generated again)."""
    from safetensors.torch import load_file, save_file

    from .fsmode import publish

    root = Path(cache) if cache is not None else cache_root()
    key = cache_key(model, tokenizer, n, seqlen, seed, bos_id)
    path = root / f"{key}.safetensors"
    if path.exists():
        try:
            ids = load_file(str(path))["ids"]
            meta = json.loads(path.with_suffix(".json").read_text())
            if meta["sha256"] == ids_sha256(ids) and tuple(ids.shape) == (n, seqlen):
                log.info("self-generated calibration from the cache %s", path)
                return ids
        except Exception:  # noqa: BLE001 - a damaged cache entry is regenerated
            pass
        log.warning("self-generated calibration cache %s is damaged: generating again", path)
    ids = generate_rows(model, tokenizer, n, seqlen, seed, bos_id=bos_id, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"ids": ids.contiguous()}, str(tmp))
    publish(tmp)  # safetensors writes files private; the cache may be shared
    from .jsonio import write_json_atomic

    write_json_atomic(path.with_suffix(".json"), {"sha256": ids_sha256(ids), "n": n, "seqlen": seqlen, "seed": seed,
                                                  "bos_id": bos_id, "version": VERSION}, overwrite=True)
    tmp.replace(path)
    return ids
