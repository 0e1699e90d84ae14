#!/usr/bin/env bash
# KD loss on one CUDA GPU: Triton vs float64 reference, full-size benchmark, bandwidth.
# Needs torch + triton (megatron-core optional). Finishes in well under 5 minutes on an H100.
# Usage: bash benchmarks/gpu_kd_loss.sh [--tokens 8192 32768] [--widths 32768 65536 131072]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m pytest -q tests/gpu/test_kd_loss_gpu.py
timeout 270 python benchmarks/gpu_kd_loss.py "$@"
