"""Greedy decoding with a KV cache, timed: what ``mixq generate`` and ``bench/deploy.py`` run.

One prefill forward over the prompt, then one forward per new token (batch 1).  Timings separate
the prefill (prompt processing, first token) from the decode steps, so ``decode_tokens_per_s`` is
the steady per-token speed a chat user sees.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# the dtypes a packed model decodes in, by name: bf16 (what the CPU int4 kernel needs) or fp32 (the reference)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class GenerateResult:
    ids: torch.Tensor          # [1, prompt + new] all token ids
    new_ids: list[int]         # the generated ids
    prefill_s: float           # prompt forward (incl. the first token)
    decode_s: float            # the remaining len(new_ids) - 1 steps
    prompt_tokens: int
    engine: str = "transformers"  # what ran the blocks (resolve_engine)

    @property
    def decode_tokens_per_s(self) -> float | None:
        n = len(self.new_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None

    @property
    def tokens_per_s(self) -> float | None:
        """New tokens over prefill + decode time."""
        t = self.prefill_s + self.decode_s
        return len(self.new_ids) / t if self.new_ids and t > 0 else None

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": len(self.new_ids), "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "decode_tokens_per_s": self.decode_tokens_per_s,
                "tokens_per_s": self.tokens_per_s, "engine": self.engine}


def max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


ENGINES = ("auto", "lean", "transformers")


def _transformers_steps(model):
    """``step(ids [1, T]) -> next-token logits [1, vocab]`` through the model's own forward and cache."""
    past = None

    def step(ids):
        nonlocal past
        out = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        return out.logits[:, -1]
    return step


def resolve_engine(model, engine: str = "auto") -> str:
    """``lean`` (:mod:`mixq.runtime.lean_decode`) where it can run ``model``, else ``transformers``; ``lean``
    asked for where it cannot is an error naming why."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "transformers":
        return engine
    from .lean_decode import unsupported
    why = unsupported(model)
    if why is None:
        return "lean"
    if engine == "lean":
        raise ValueError(f"the lean decoder cannot run this model ({why}); use engine 'transformers'")
    return "transformers"


@torch.inference_mode()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id=None,
                    stop_at_eos: bool = True, engine: str = "auto") -> GenerateResult:
    """Greedy decode ``max_new_tokens`` after ``input_ids [1, T]`` (stops early at ``eos_token_id``
    when ``stop_at_eos``).  Deterministic for a given model and prompt.  ``engine``: ``lean`` runs the blocks
    through :class:`~mixq.runtime.lean_decode.LeanDecoder` (the same modules and arithmetic, a third less time a
    step on small models), ``transformers`` through the model's own forward, ``auto`` the first that can run it."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy_generate takes one prompt [1, T], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    eos = set()
    if eos_token_id is not None and stop_at_eos:
        eos = set(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else {int(eos_token_id)}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = input_ids.to(device)
    engine = resolve_engine(model, engine)
    if engine == "lean":
        from .lean_decode import LeanDecoder
        lean = LeanDecoder(model)
        step = lambda x: lean.forward(x, last=True)  # noqa: E731
    else:
        step = _transformers_steps(model)
    t0 = time.perf_counter()
    nxt = step(ids).argmax(-1)
    new = [int(nxt)]
    t1 = time.perf_counter()
    while len(new) < max_new_tokens and new[-1] not in eos:
        nxt = step(nxt[:, None]).argmax(-1)
        new.append(int(nxt))
    t2 = time.perf_counter()
    all_ids = torch.cat([ids, torch.tensor([new], dtype=ids.dtype, device=device)], 1)
    return GenerateResult(all_ids, new, t1 - t0, t2 - t1, ids.shape[1], engine)
