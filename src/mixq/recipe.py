"""The default recipe: what ``mixq quantize --bpw X`` runs when no other flag is given, under one name.

Every setting below is the default of its command-line flag (:mod:`mixq.cli` reads them from here), chosen from
the benchmarks in ``bench/results`` (``frontier.md``, ``generalization.md``): calibration text the model writes
itself mixed with PTB, a sensitivity measurement of every default candidate -- trellis-coded bases after
incoherence processing (TCQ2-6-channel+ip1) and the scalar grids plans still choose -- with the errors GPTQ leaves,
the exact knapsack solver, and GPTQ.  ``mixq-default-5`` has the trellis (TCQ) where ``mixq-default-4`` had the 2-D
vector codebooks (VQ): on SmolLM2 the plans' KL fell 25-29 % in domain and 22-27 % out of domain at 2.5 and 3.0
bpw (bench/results/tcq.md, generalization.md run ``tcq``).  ``mixq-default-6`` is ``-5`` made cheaper to run: two
dominated 4-bit candidates dropped (:mod:`mixq.allocate.candidates`), one scale pass in a trellis's measured RTN,
the freed heap handed back after each gradient row and block (:mod:`mixq.memtrim`), and the layers of a block
measured and quantized side by side on the CPU threads (:mod:`mixq.threadmap`).  ``mixq-default-7`` is ``-6``
followed by one epoch of end-to-end distillation of the scales and norms on the fp model's logits, codes fixed
(:mod:`mixq.distill_e2e`, ``--finetune e2e``; with GPTQ only): on the mixed 3.0-bpw plan of SmolLM2 it took KL
from 0.185 / 0.272 to 0.162 / 0.250 (PTB / fortunes), as much as the block-wise stage followed by it (0.163 /
0.254) in under half the time (bench/results/frontier/finetune.json).  ``mixq-default-8`` is ``-7`` measured with
``kfac-kv`` instead of ``kfac-pos``: the key/value projections by the unfactorised per-token form, every gradient
of labels sampled from the model.  ``kfac-pos`` rated some of gemma3-270m's key projections 20-300x above what
quantizing them costs, so its plans gave 8-bit grids to them and lost to a uniform trellis rate; with ``kfac-kv``
the mixed GPTQ plans of gemma3-270m fell from 0.240 / 0.374 to 0.202 / 0.295 at 3.0 bpw (uniform
``TCQ3-channel+ip`` at 3.02 bpw: 0.225 / 0.325) and from 0.134 / 0.205 to 0.120 / 0.169 at 3.5, and SmolLM2's
3.0-bpw plan (with the epoch) from 0.162 / 0.268 to 0.157 / 0.251 (second_model_kfackv.md, generalization.md
run ``kfackv``, metric_fidelity.md).  ``mixq-default-9`` is ``-8`` with the plan's trellis layers encoded through
``2^10`` states (``TCQ<r>L10``, :mod:`mixq.allocate.tcq_states`): the same bits, a 1024-entry table; the
measurement still prices the 8-bit trellis and the solver scales those errors by the tables' Gaussian error ratio.
On SmolLM2 the 3.0-bpw plan fell from 0.158 / 0.249 to 0.140 / 0.234 and the 2.5-bpw one to 0.267 / 0.419
(generalization.md runs ``kfackv-s33`` and ``kfackv-L10``).  ``mixq-default-10`` is ``-9`` with two more trellis
candidates, ``TCQ5-channel+ip`` and ``TCQ6-channel+ip`` (:mod:`mixq.allocate.candidates`), for the layers that need
more than 4 bits: they took the place of nearly every W5/W6/W8 grid in SmolLM2's 4.0- and 4.5-bpw plans, whose KL
fell from 0.052 / 0.082 to 0.044 / 0.075 and from 0.034 / 0.054 to 0.027 / 0.044 -- and the plan's trellis layers
stored through ``2^12`` states (``TCQ<r>L12``; their scales fitted through the 10-bit trellis): the 3.0-bpw
``mixq quantize`` output scored 0.141 / 0.221 against 0.145 / 0.233 at 10 state bits, in 505 s against 500 s
(generalization.md runs ``base-L10``, ``tcq56-L10``, ``L12-a``, ``L12-b``; quantize_cost.md, quantize_cost_L10.md).
``mixq-default-11`` is ``-10`` with the trellis candidates one-sided (``TCQ<r>-channel+ip1``: the input transform
only, :mod:`mixq.algorithms.composite.incoherence`), so that the output rows stay the model's and each trellis search
weights them by the measured output-gradient energy (``G ** 0.5``, :mod:`mixq.algorithms.composite.tcq`; the
measurement hands ``G`` to the plan, the plan to the GPTQ walk).  On SmolLM2 the plans' KL fell from 0.136 / 0.213 to
0.111 / 0.188 at 3.0 bpw and from 0.040 / 0.066 to 0.034 / 0.055 at 4.0 (generalization.md runs ``tcq56-L12``,
``L12-b``, ``ip1``), and gemma3-270m's (mixed GPTQ, no epoch) from 0.164 / 0.253 to 0.118 / 0.174 at 3.0 and from
0.048 / 0.071 to 0.032 / 0.050 at 4.0 (second_model_default10.md, second_model_default11.md).
``mixq-default-12`` is ``-11`` on 64 calibration rows instead of 32 (the measurement's Hessians, GPTQ and the
end-to-end epoch; the gradient statistics stay on 16): on SmolLM2 the plans' KL fell from 0.212 / 0.358 to
0.199 / 0.325 at 2.5 bpw, from 0.111 / 0.188 to 0.108 / 0.176 at 3.0 and from 0.034 / 0.055 to 0.032 / 0.051 at
4.0 (generalization.md runs ``ip1``, ``n64``; 128 rows: 0.101 / 0.169 at 3.0, run ``n128``, at about twice the
cost), gemma3-270m's (mixed GPTQ, no epoch) from 0.118 / 0.174 to 0.107 / 0.173 at 3.0 and from 0.032 / 0.050
to 0.030 / 0.045 at 4.0 (second_model_default12.md); the default 3.0-bpw run takes 871 s instead of ~570 s on this
2-core machine, cold (quantize_cost.md).
``mixq-default-13`` is ``-12`` with the end-to-end epoch's training forward under bf16 autocast where the device
multiplies bf16 natively (``--e2e-amp auto``, :mod:`mixq.amp`; the teacher's logits and the held-out KL stay
float32): on the 3.0-bpw GPTQ plan of SmolLM2 (64 rows), held-out KL 0.1303 -> 0.1119 against 0.1118 in float32,
in 299 s against 392 s on one thread of this machine's AMX cores with other jobs beside it (no committed script:
``pipeline.finetune(..., block=False)`` on the directory of ``mixq quantize --bpw 3.0 --finetune none``).
``--walk-amp auto`` (not in the recipe until ``-16``) puts the measurement's block walk and gradient pass and the GPTQ walk
under the same autocast, their Hessians as bf16 Gram products summed in float64: on a 2-core Intel Xeon (AMX) the
default 3.0-bpw run took 776 s against 783 s, KL 0.112 / 0.182 against 0.108 / 0.188 (quantize_cost_walk_amp.md):
no time to buy here, where GPTQ's and the trellis searches' own arithmetic dominates; a GPU may differ (not
measured).  The gradient pass draws its labels by inverse CDF since then (other draws of the same distribution,
five times faster than ``torch.multinomial`` on a 49k vocabulary).
``mixq-default-14`` is ``-13`` with GPTQ's error feedback through ``0.9 H + 0.1 diag(H)`` (``--hessian-shrink 0.1``,
:func:`mixq.algorithms.gptq.shrink_hessian`): the correlations between inputs seen in the calibration text are
trusted nine tenths, each input's own energy whole.  On the same measurement and plans (bench/results/
hessian_shrink.md, generalization.md "Hessian shrunk toward its diagonal"), SmolLM2 after GPTQ alone went from
0.124 / 0.196 to 0.118 / 0.185 (PTB / fortunes) at 3.0 bpw and from 0.032 / 0.058 to 0.031 / 0.051 at 4.0;
with the end-to-end epoch from 0.197 / 0.333 to 0.195 / 0.323 at 2.5, from 0.107 / 0.181 to 0.106 / 0.178 at
3.0 and from 0.031 / 0.057 to 0.032 / 0.052 at 4.0; gemma3-270m after GPTQ from 0.096 / 0.173 to 0.093 / 0.170 at 3.0 and from
0.026 / 0.047 to 0.025 / 0.044 at 4.0.  Larger shrinks (0.25, 0.6) gave the
fortunes no more and PTB less; GPTQ's damping, the isotropic alternative, traded PTB for the fortunes at best.
``mixq-default-15`` is ``-14`` with the self-generated calibration rows sampled from the model's whole
distribution (:mod:`mixq.selfgen` version 2) instead of its nucleus (top-p 0.95 within the 64 likeliest tokens):
rows about as surprising to the model as human text (SmolLM2's perplexity on them 26 and 34 in two draws,
against 5.8 truncated; PTB test 67, the fortunes 47).  With the same measurement and plans, GPTQ and the epoch on untruncated rows took SmolLM2
from 0.195 / 0.323 to 0.188 / 0.300 at 2.5 bpw, from 0.106 / 0.178 to 0.102 / 0.169 at 3.0 and from 0.032 / 0.052
to 0.031 / 0.048 at 4.0 (bench/results/calib_sources.md) -- lower in both domains at every budget, the fortunes
most (rows of a scratch patch that drew from the same distribution through a sorted top-k over the whole
vocabulary: other draws than the committed sampler's, whose cold 3.0-bpw run is in quantize_cost_selfgen_cold.md).
``mixq-default-16`` is ``-15`` with the measurement's block walk and gradient pass and the GPTQ walk under the same
bf16 autocast where the device multiplies bf16 natively (``--walk-amp auto``; the Hessians bf16 Gram products summed
in float64, GPTQ's own arithmetic float32).  Since GPTQ's column sweeps and the trellis searches run natively
(bench/results/gptq_sweep.md) the walks' forward passes and Gram products are most of their time: on a 2-core AMD EPYC with AVX512-BF16,
back to back on the same cached rows, the default 3.0-bpw run took 660 s against 807 s (measurement and plan
215 s against 298 s, GPTQ 161 s against 237 s; quantize_cost_amp.md, quantize_cost_fp32walk.md) and scored KL
0.0995 / 0.1562 against 0.0998 / 0.1596 (PTB / fortunes).  (Tried on ``-13``, before the native sweeps and on an Intel
Xeon, it bought nothing: GPTQ's Python column loop was most of the walks then, quantize_cost_walk_amp.md.)
``kfac-pos`` was ``kfac`` with each token's input weighted by
its own gradient energy, except on key/value projections: ``mixq-default-3`` used ``kfac``, whose plans for
gemma3-270m were 1.6x worse at 3.0 bpw (KL 0.50 / 0.76 PTB / fortunes against 0.31 / 0.46), while on SmolLM2
the two are within 2-7 % at 3.0 and 4.0 bpw (generalization.md, second_model_default.md).  ``mixq-default-2``
was ``kfac`` with 32 scalar candidates (KL 0.77 / 1.14 at 3.0 bpw on SmolLM2).  A directory's ``mixq.json``
records :func:`recipe_record`: this name, and every setting the run changed from it.
"""
from __future__ import annotations

from .calibset import DEFAULT_CALIB

RECIPE_NAME = "mixq-default-16"
DEFAULT_RECIPE: dict[str, object] = {
    "method": "gptq",          # --method: GPTQ on the calibration rows (rtn needs none and loses much more)
    "calib": DEFAULT_CALIB,    # --calib: self-generated text + PTB
    "nsamples": 64,            # --nsamples x --seqlen calibration rows: 32 self-generated + 32 PTB (32 until
                               # mixq-default-11; 128 lowers KL further but is over the cost target here)
    "seqlen": 512,
    "metric": "kfac-kv",       # --metric of the sensitivity measurement (mixq.measure.metrics)
    "algorithm": "gptq",       # --algorithm: errors after GPTQ (per-bits GPTQ/RTN ratios)
    "candidates": "default",   # --candidates: mixq.allocate.candidates.DEFAULT_CANDIDATE_NAMES
    "solver": "exact",         # --solver
    "tcq_state_bits": 12,      # --tcq-state-bits: the plan's trellis layers (measured as TCQ<r>, L = 8) encoded
                               # through 2^12 states (TCQ<r>L12): same bits, 10-20 % less squared error than
                               # L = 8 at 2-4 bits
    "damp": 0.01,              # --damp (GPTQ)
    "hessian_shrink": 0.1,     # --hessian-shrink (GPTQ): H's off-diagonal part scaled by 1 - S in the error
                               # feedback (mixq.algorithms.gptq.shrink_hessian; 0 until mixq-default-14)
    "act_order": False,        # --act-order
    "gptq_target": "quantized",  # --gptq-target: GPTQ fits each layer on the partly quantized model's inputs to
                               # its own output (fp: to the fp model's; mixq.algorithms.gptq.fp_target)
    "rotate": False,           # --rotate (QuaRot): +ip candidates transform each layer instead
    "finetune": "e2e",         # --finetune: one epoch of end-to-end distillation of the scales and norms on the
                               # fp model's logits, codes fixed (mixq.distill_e2e); with --method gptq only
    "e2e_amp": "auto",         # --e2e-amp: that epoch's training forward under bf16 autocast where the device
                               # multiplies bf16 natively (mixq.amp); float32 elsewhere
    "walk_amp": "auto",        # --walk-amp: the measurement's and the GPTQ walk's forward passes and Gram products
                               # in bf16 too, where the device multiplies bf16 natively (mixq-default-16: since
                               # the native GPTQ sweeps they are most of the walks' time; quantize_cost_amp.md)
}


def recipe_record(args) -> dict:
    """``{"name", "deviations"}``: the recipe's name and each setting ``args`` (a parsed command line or any object
    with those attributes) changed from it (``{}`` when it ran the default recipe exactly)."""
    dev = {}
    for k, v in DEFAULT_RECIPE.items():
        have = getattr(args, k, v)
        if k == "algorithm" and have is None:
            have = "gptq" if getattr(args, "method", v) == "gptq" else "rtn"
        if k == "finetune" and have is None:  # not resolved yet: the recipe's with GPTQ, none otherwise
            have = v if getattr(args, "method", DEFAULT_RECIPE["method"]) == "gptq" else "none"
        if have != v:
            dev[k] = have
    return {"name": RECIPE_NAME, "deviations": dev}
