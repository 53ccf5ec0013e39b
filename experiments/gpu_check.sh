#!/bin/bash
# The one prepared script for a first GPU session (issue 30): at most 6 minutes on one H100, run
# unchanged; it installs nothing.
# Parts in order, each under a hard time limit in seconds (experiments/bench.py's own --budget-s
# inside it):
#   env              [10]  torch, triton, CUDA, the GPU, the commit
#   tests_16bit      [80]  tests/test_ssd_gpu.py, float16 and bfloat16: ssd_triton against float64
#                          ssd_chunked at H=16, P=N=128: forward to L=128K and batch 8, backward
#   kernel_bfloat16  [60]  bench --parts kernel at HoVLE's heads, L 1K..128K, batch 1 and 8
#   model            [135] bench --parts table2 model: HoVLE-2.6B shapes (random weights), bf16,
#                          teacher / linear / hybrid at 32K and 103K, Table 2
#   tests_float32    [40]  the float32 tests (3xTF32 dots) and the model's logits   (--no-float32
#   kernel_float32   [30]  bench --parts kernel, float32                         skips these two)
# 355 s of limits in all. A part that fails or runs out of time is recorded and the next one runs.
# Results in bench_results/<gpu>/ (or --out DIR), ready to commit: summary.json and summary.md (each
# part: limit, seconds, exit status; 124 = stopped at its limit), <part>.log (the printed
# output; pytest -s -rA prints every measured error), ssd_errors.jsonl (the tests' errors, one JSON
# line each), and per bench part <part>/bench.json (bench.partial.json if stopped), table.txt and
# plots (model).
#   bash experiments/gpu_check.sh [--out DIR] [--no-float32]
#   bash experiments/gpu_check.sh --dry-run [--out DIR]   # the same parts on the CPU: Triton's
#       interpreter, tiny shapes (tests: H=4, P=N=32; kernel: L 64, 128; model: bench's tiny --smoke
#       model), to bench_results/dry_run_cpu by default; tests/test_ssd_gpu.py runs it
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
DRY=0
FLOAT32=1
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --no-float32) FLOAT32=0 ;;
    --out) OUT=$2; shift ;;
    *) echo "error: $1: unknown argument (--dry-run, --no-float32, --out DIR)"; exit 2 ;;
  esac
  shift
done

KERNEL=(--preset hovle --parts kernel --batch 1 8 --lengths 1024 4096 16384 65536 131072)
MODEL=(--preset hovle --parts table2 model --lengths 32768 103000 --repeats 1 --timeout-s 100)
if [ $DRY = 1 ]; then             # the CPU, Triton's interpreter, tiny shapes
  export GPU_CHECK_DRY_RUN=1 TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  KERNEL=(--preset hovle --parts kernel --device cpu --batch 1 2 --lengths 64 128 --repeats 1)
  MODEL=(--preset tiny --parts table2 model --device cpu --smoke --timeout-s 100)
fi
DEVICE=$(python3 -c "import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
print(re.sub('[^a-z0-9]+', '_', name.lower()).strip('_'))")
if [ $DRY = 0 ] && [ "$DEVICE" = cpu ]; then
  echo "error: no CUDA device (--dry-run rehearses the script on the CPU)"; exit 2
fi
if [ -z "$OUT" ] && [ $DRY = 1 ]; then OUT=bench_results/dry_run_cpu; fi
if [ -z "$OUT" ]; then OUT=bench_results/$DEVICE; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/ssd_errors.jsonl"
export GPU_CHECK_ERRORS=$OUT/ssd_errors.jsonl
PARTS=""
TOTAL=0

record() {  # record NAME LIMIT SECONDS STATUS: summary.json and summary.md after every part
  PARTS="$PARTS${PARTS:+,}{\"part\": \"$1\", \"limit_s\": $2, \"seconds\": $3, \"status\": $4}"
  TOTAL=$((TOTAL + $2))
  printf '{"device": "%s", "dry_run": %s, "commit": "%s", "limit_s": %s, "parts": [%s]}\n' \
    "$DEVICE" "$([ $DRY = 1 ] && echo true || echo false)" "$(git rev-parse --short HEAD)" \
    "$TOTAL" "$PARTS" > "$OUT/summary.json"
  echo "| $1 | $2 | $3 | $4 |" >> "$OUT/summary.md"
}

part() {  # part NAME LIMIT COMMAND...: run under a hard time limit, printed output to NAME.log
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name [limit $limit s]: $*"
  timeout -k 5 "$limit" "$@" 2>&1 | tr '\r' '\n' | tee "$OUT/$name.log"
  local status=${PIPESTATUS[0]}
  record "$name" "$limit" $((SECONDS - start)) "$status"
  echo "== $name: exit status $status in $((SECONDS - start)) s"
}

{ echo "# gpu_check.sh on $DEVICE$([ $DRY = 1 ] && echo ' (dry run)'), $(date -u +%FT%TZ)"
  echo; echo "| part | limit s | seconds | exit status |"; echo "| --- | --- | --- | --- |"
} > "$OUT/summary.md"

part env 10 bash -c "python3 -c \"import platform, torch, triton
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'triton', triton.__version__)
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')\"
  git log -1 --format='commit %H %s'; if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi"
TESTS=(python3 -m pytest -q -s -rA -p no:cacheprovider tests/test_ssd_gpu.py)
part tests_16bit 80 "${TESTS[@]}" -k "(float16 or bfloat16) and not dry_run"
part kernel_bfloat16 60 python3 experiments/bench.py "${KERNEL[@]}" --dtype bfloat16 --budget-s 0 \
  --kernel-budget-s 40 --out "$OUT/kernel_bfloat16"
part model 135 python3 experiments/bench.py "${MODEL[@]}" --budget-s 120 --no-compile \
  --out "$OUT/model"
if [ $FLOAT32 = 1 ]; then
  part tests_float32 40 "${TESTS[@]}" -k "float32 and not dry_run"
  part kernel_float32 30 python3 experiments/bench.py "${KERNEL[@]}" --dtype float32 --budget-s 0 \
    --kernel-budget-s 12 --out "$OUT/kernel_float32"
fi
echo "wrote $OUT: $(ls "$OUT" | tr '\n' ' ')"
