#!/usr/bin/env bash
# PGD-10 DAT throughput on one GPU: fp32, bf16, channels_last, CUDA-graphed attack, torch.compile,
# the attack/train split and the fraction of a measured bf16 GEMM peak. Writes OUT/gpu.json
# (default bench/results/gpu/) and prints a short table last. Within 8 minutes on one H100.
#   bench/gpu.sh [--batch 4096] [--steps 10] [--variants fp32,bf16,...] [--out DIR]
#   bench/gpu.sh --smoke        # tiny CPU run of every code path
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
if ! "$PY" -c "import torch, torchvision, timm" 2>/dev/null; then
  echo "bench/gpu.sh: $PY cannot import torch, torchvision and timm; run 'make venv' first" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m bench.gpu "$@"
