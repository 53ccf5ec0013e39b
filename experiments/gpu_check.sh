#!/bin/bash
# Issue 6 on a lent GPU, one part per device call (each fits a 10-minute call):
#   bash experiments/gpu_check.sh tests    # GPU tests of ssd_triton + the hovle bench smoke test
#   bash experiments/gpu_check.sh kernel   # kernel speed, L 2K..131K, with fla (carry .whl)
#   bash experiments/gpu_check.sh model    # HoVLE-shape model bench, L 4K..103K + Table 2
# Results go to $OUT (bench.partial.json keeps a killed run's points). fla-core as a wheel:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl fla-core
# Seen on 2026-11-23 (H100): kernel part 2 min 17 s for 34 timings; model points ~30 s each
# (mostly building the 2.6B model); the tests part printed nothing in 200 s with Q = 128 (now 64).
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
case "$1" in
  tests)  timeout 500 python3 -m pytest -v -s -x tests/test_ssd_gpu.py tests/test_bench.py -k "gpu" 2>&1 | tee $OUT/tests.log ;;
  kernel) timeout 500 python3 bench.py --preset hovle --skip-model --skip-table2 --lengths 2048 8192 32768 131072 \
            --out $OUT/kernel 2>&1 | tr '\r' '\n' | grep -v "^bench: .*pt/s" | tee $OUT/kernel.log ;;
  model)  timeout 540 python3 bench.py --preset hovle --skip-kernel --lengths 4096 32768 103000 --timeout 120 \
            --out $OUT/model 2>&1 | tr '\r' '\n' | grep -v "^bench: .*pt/s" | tee $OUT/model.log ;;
  *) echo "usage: $0 tests|kernel|model"; exit 2 ;;
esac
