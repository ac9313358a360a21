#!/bin/bash
# The GPU benchmark alone: mae-lab's step vs HF ViTMAE at ViT-B/16, 224 px, batch 256, offline; stops after 8 minutes.
# On a lent GPU run benchmarks/gpu_check.sh instead: a preflight and the CUDA tests first, everything under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 python benchmarks/gpu.py "$@"
