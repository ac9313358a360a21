#!/bin/bash
# One prepared GPU check (issue 5): mae-lab's fast step vs HF ViTMAE at ViT-B/16, 224 px, batch 256.
# Needs a CUDA GPU and `pip install -e '.[bench]'`; stops itself after 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 python benchmarks/gpu.py "$@"
