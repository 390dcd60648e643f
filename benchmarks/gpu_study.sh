#!/usr/bin/env bash
# The study at the paper's shape on one GPU: every variant, one seed, within about 8 minutes on one H200.
#
#   bash benchmarks/gpu_study.sh [OUT]        (default OUT: studies/gpu)
#
# --preset paper is GPT-2-small's shape (12 layers, d = 768, 12 heads of 64, context 128) on code (the standard
# library's Python source), with bf16 autocast and fused attention (scaled_dot_product_attention) on CUDA. The
# paper's run length does not fit 8 minutes, so this script shortens it: STEPS (default 1200) steps of 64
# sequences per variant, monitored densely for the first 10 steps, then log-spaced, then every 200 steps, per
# head at five offsets. One seed gives no verdict (the report says "inconclusive"); the point is the spectra at
# scale and the time. The summary and figures it writes are what docs/results/gpu/ is meant to hold.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-studies/gpu}"
STEPS="${STEPS:-1200}"
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_study.sh: no NVIDIA GPU here (nvidia-smi not found); this benchmark needs one" >&2
    exit 2
fi
./dev setup >/dev/null 2>&1 || true
start=$(date +%s)
.venv/bin/rankscope study --preset paper --seeds 1 --jobs 1 --out "$OUT" \
    --set steps="$STEPS" --set warmup_steps=100 --set eval_every=200 --set ckpt_every=600 \
    --set monitor_every=200 --set monitor_early=10 --set repr_every=0 --set monitor_weights=false
echo "gpu_study.sh: $(( $(date +%s) - start )) s wall for every variant, one seed, $STEPS steps each"
mkdir -p docs/results/gpu
cp "$OUT/summary.json" docs/results/gpu/summary.json
cp "$OUT"/figures/base/*.png docs/results/gpu/
echo "gpu_study.sh: summary and figures copied to docs/results/gpu/"
