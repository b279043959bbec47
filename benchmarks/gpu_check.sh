#!/usr/bin/env bash
# The GPU check: one command for a lent H100/H200 (device tool), using that machine's own
# torch/transformers and no downloads (random-init models of real sizes).
#
# Here, once:   make gpu-prep          (tokenizer + covariance corpora into .gpu_carry/, git-ignored)
# Device run:   command "bash benchmarks/gpu_check.sh", carry [".gpu_carry"]
# Record the printed tables, with the card's name, in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export KN_UTILS_CACHE="${KN_UTILS_CACHE:-/tmp/kn_utils_cache}"
out="${OUT:-results/gpu}"
mkdir -p "$out"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
run() {
  echo "== $*" | tee -a "$out/benchmarks.txt"
  "$@" 2>&1 | tee -a "$out/benchmarks.txt" || status=1
}
# float32 is the exact comparison; bfloat16 (both paths) is how such models are usually run on a GPU
run python3 benchmarks/attribution.py --device cuda --preset gpu
run python3 benchmarks/attribution.py --device cuda --preset gpu --dtype bfloat16
if [ -d .gpu_carry ]; then
  export KN_BENCH_TOKENIZER=.gpu_carry/tokenizer KN_DATA_DIR=.gpu_carry/data
  run python3 benchmarks/tracing.py --device cuda --preset gpu
  run python3 benchmarks/tracing.py --device cuda --preset gpu --dtype bfloat16
  run python3 benchmarks/rome.py --device cuda --preset gpu --random-gpt2-xl
else
  echo "no .gpu_carry/: skipping tracing and ROME (run 'make gpu-prep' here and carry .gpu_carry)"
  status=1
fi
exit $status
