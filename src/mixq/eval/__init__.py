"""Evaluation: perplexity, KL to a reference, top-1 agreement, each tied to its Protocol.

``kv``: the same with a quantized KV cache actually used (``eval_with_kv_quant``, ``kv_compare``); not imported here.
"""

from mixq.eval.kl import ReferenceCache, compare, token_kl
from mixq.eval.perplexity import perplexity, token_nll
from mixq.eval.protocol import Protocol, evaluate
from mixq.eval.stats import (bootstrap_ci, bootstrap_diff, confidence_intervals, evaluate_windows, overlap_warning,
                             wilson_interval)

__all__ = ["Protocol", "ReferenceCache", "bootstrap_ci", "bootstrap_diff", "compare", "confidence_intervals", "evaluate",
           "evaluate_windows", "overlap_warning", "perplexity", "token_kl", "token_nll", "wilson_interval"]
