#!/usr/bin/env bash
# The GPU check: one command for a lent H100/H200 (device tool), using that machine's own
# torch/transformers and no downloads (random-init models of real sizes; no tokenizer needed).
#   device run:  bash benchmarks/gpu_check.sh        (results also land in $OUT when set)
# Record the printed tables, with the card's name, in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-results/gpu}"
mkdir -p "$out"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
for bench in attribution tracing rome; do
  echo "== benchmarks/$bench.py --device cuda --preset gpu"
  python3 "benchmarks/$bench.py" --device cuda --preset gpu 2>&1 | tee "$out/$bench.txt" || status=1
done
exit $status
