"""Time the default measurement (``kfac-kv``, GPTQ references, the default candidates) on the first N blocks of
SmolLM2-135M, 64 x 512 seeded random token ids as calibration (what is timed is the arithmetic, not the text):

    OMP_NUM_THREADS=2 PYTHONPATH=<tree>/src python bench/measure_blocks_time.py 5

Prints one JSON line (seconds, the first layer's first errors: two trees that should agree can be compared).
A scratch timing for A/Bs of the measurement's code (run each tree in turn, twice), not a results file."""
from __future__ import annotations

import json
import sys
import time

import torch

from mixq.allocate.candidates import default_candidates
from mixq.measure import measure
from mixq.models import load_model


def main() -> None:
    nb = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    model, _ = load_model("smollm2-135m")
    model.model.layers = model.model.layers[:nb]
    model.config.num_hidden_layers = nb
    ids = torch.randint(0, 49000, (64, 512), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    tab = measure(model, ids, default_candidates(), metric="kfac-kv", algorithm="gptq", progress=False)
    print(json.dumps({"blocks": nb, "seconds": time.perf_counter() - t,
                      "first": [float(x) for x in tab.layers[0].errors[:6]]}))


if __name__ == "__main__":
    main()
