#!/usr/bin/env bash
# The GPU check: one command for a lent H100/H200 (device tool), using that machine's own
# torch/transformers and no downloads (random-init models of real sizes).
#
# Here, once:   make gpu-prep          (copies the default tokenizer into .gpu_tokenizer/, git-ignored)
# Device run:   command "bash benchmarks/gpu_check.sh", carry [".gpu_tokenizer"]
# Record the printed tables, with the card's name, in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-results/gpu}"
mkdir -p "$out"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
run() {
  echo "== $*"
  "$@" 2>&1 | tee -a "$out/benchmarks.txt" || status=1
}
run python3 benchmarks/attribution.py --device cuda --preset gpu
run python3 benchmarks/tracing.py --device cuda --preset gpu
if [ -d .gpu_tokenizer ]; then
  run python3 benchmarks/rome.py --device cuda --preset gpu --random-gpt2-xl .gpu_tokenizer
else
  echo "no .gpu_tokenizer/: skipping the ROME timing (run 'make gpu-prep' here and carry it)"
fi
exit $status
