#!/usr/bin/env bash
# The scale targets on one GPU: the LLaMA-7B shape (all kinds) and the DeepSeek-V3 shape (attention forms), with
# `rankscope analyze --device cuda`, and each figure's ratio to the CPU figures measured on the 2-core machine
# (benchmarks/scale_cpu.json, written by `benchmarks/scale.py --save`).
#
#   bash benchmarks/gpu_scale.sh
#
# Making the synthetic checkpoints (benchmarks/scale.py) writes ~40 GB and is not timed; the analyses are meant to
# take 5 minutes in all on one H200.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_scale.sh: no NVIDIA GPU here (nvidia-smi not found); this benchmark needs one" >&2
    exit 2
fi
[ -x .venv/bin/python ] || ./dev setup
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
.venv/bin/python benchmarks/scale.py --device cuda --jobs 1 --against benchmarks/scale_cpu.json "$@"
echo "gpu_scale.sh: $(( $(date +%s) - start )) s wall in all (checkpoint making included where it ran)"
