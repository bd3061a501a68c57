"""Independent per-layer work shared out over this process's CPU threads.

Much of mixq's per-layer work runs on one thread however many torch has: GPTQ's column sweep, and under it the
trellis's Viterbi search of one column at a time.  The layers of one block are independent of each other (in the
sensitivity measurement, and in the GPTQ walk, where every layer of a block is fitted on the same inputs), so
:func:`thread_map` runs them side by side: with ``n = torch.get_num_threads() > 1`` the items go to ``n`` Python
threads, largest first; torch's own ops run single-threaded meanwhile (so the threads do not oversubscribe the
cores) and the thread count is restored afterwards.  torch and the native kernels release the GIL.  An item's
result does not depend on which thread ran it; with ``n == 1``, one item, or ``parallel=False`` (a GPU), the items
run in order on the calling thread.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def thread_map(fn: Callable[[T], R], items: Sequence[T], *, size: Callable[[T], float] = lambda _: 1.0,
               parallel: bool = True) -> list[R]:
    """``[fn(item) for item in items]``, computed on up to ``torch.get_num_threads()`` threads (``size``: an item's
    relative cost; the largest start first)."""
    before = torch.get_num_threads()
    n = min(before, len(items)) if parallel else 1
    if n <= 1:
        return [fn(x) for x in items]
    order = sorted(range(len(items)), key=lambda k: -size(items[k]))
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(n, thread_name_prefix="mixq-layer") as pool:
            futures = {k: pool.submit(fn, items[k]) for k in order}
            return [futures[k].result() for k in range(len(items))]
    finally:
        torch.set_num_threads(before)
