"""Evaluation: perplexity, KL to a reference, top-1 agreement, each tied to its Protocol."""

from mixq.eval.kl import ReferenceCache, compare, token_kl
from mixq.eval.perplexity import perplexity, token_nll
from mixq.eval.protocol import Protocol, evaluate

__all__ = ["Protocol", "ReferenceCache", "compare", "evaluate", "perplexity", "token_kl", "token_nll"]
