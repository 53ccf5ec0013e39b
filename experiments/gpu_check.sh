#!/bin/bash
# The one prepared script for a GPU session (issue 19): about 8 minutes of GPU time in all, in parts
# that also run on their own (each part's budget in brackets; `timeout` stops a bench run 30 s after it):
#   bash experiments/gpu_check.sh tests    # [150 s] GPU tests: ssd_triton at H=16, P=N=128 against float64
#                                          #   ssd_chunked (tests/test_ssd_gpu.py) + bench --smoke on CUDA
#   bash experiments/gpu_check.sh kernel   # [90 + 50 s] SSD kernels at HoVLE's heads (H=16, Hkv=8, P=N=128),
#                                          #   bf16 then fp32, L 1K..128K, batch 1 and 8: ssd_triton,
#                                          #   ssd_chunked, ssd_naive (L <= 1K), fla chunk_simple_gla (if
#                                          #   carried), causal SDPA; ms, GB/s, copy-bandwidth floor
#   bash experiments/gpu_check.sh model    # [180 s] HoVLE-2.6B shapes (random weights, bf16): Table 2 and
#                                          #   teacher (one pass + segments), linear, hybrid at 32K and 103K
#   bash experiments/gpu_check.sh all      # the three in that order: one device call (~8 min), timeout_s 600
# Results under $OUT (copied back by the device tool; at most 8 files): tests.log, kernel.log, model.log
# (the printed tables) and kernel_bfloat16.json, kernel_float32.json, model.json (bench.json, or
# bench.partial.json, with kernel_rows / model_points, when a part was stopped); tables and plots of a
# bench.json are rebuilt here with
#   python -c "import bench,json; r=json.load(open('model.json')); print(*bench.table_lines(r),sep='\n'); bench.make_plots(r,'.')"
# flash-linear-attention is optional: fetch the wheels here, then carry ".whl" in the device call:
#   pip download --no-deps --only-binary=:all: -d .whl fla-core einops
# Trying the flow on a CPU first (bench arguments appended by EXTRA; the model part is HoVLE-sized, GPU only):
#   OUT=/tmp/gc EXTRA="--device cpu --lengths 256 512 --batch 1" bash experiments/gpu_check.sh kernel
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check_out}
WORK=/tmp/gpu_check_work
mkdir -p "$OUT" "$WORK"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
              torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"

bench() {  # bench NAME BUDGET_S ARGS...: one bench.py run to $WORK/NAME, its JSON to $OUT/NAME.json
  local name=$1 budget=$2; shift 2
  timeout $((budget + 30)) python3 bench.py --budget-s "$budget" --out "$WORK/$name" "$@" $EXTRA 2>&1 | tr '\r' '\n'
  local rc=$?
  for f in bench.json bench.partial.json; do
    [ -f "$WORK/$name/$f" ] && cp "$WORK/$name/$f" "$OUT/$name.json" && break
  done
  return $rc
}

part_tests() {
  timeout 150 python3 -m pytest -q -m gpu tests/test_ssd_gpu.py tests/test_bench.py 2>&1 | tee "$OUT/tests.log"
}

part_kernel() {
  local common=(--preset hovle --parts kernel --batch 1 8 --lengths 1024 4096 16384 65536 131072)
  { bench kernel_bfloat16 90 "${common[@]}" --dtype bfloat16 --kernel-budget-s 90
    bench kernel_float32 50 "${common[@]}" --dtype float32 --kernel-budget-s 50; } | tee "$OUT/kernel.log"
}

part_model() {
  bench model 180 --preset hovle --parts table2 model --lengths 32768 103000 --repeats 1 --timeout-s 150 --no-compile | tee "$OUT/model.log"
}

case "$1" in
  tests) part_tests ;;
  kernel) part_kernel ;;
  model) part_model ;;
  all) part_tests; part_kernel; part_model ;;
  *) echo "usage: $0 tests|kernel|model|all"; exit 2 ;;
esac
