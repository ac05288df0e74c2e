#!/usr/bin/env bash
# The core benchmark on a CUDA machine (ViT-B and ViT-H, seeded random weights: timing does not
# depend on them). Expects torch, torchvision, opencv, click, tqdm and numpy installed, and
# segment-anything importable (PYTHONPATH). Prints one JSON object per model.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for model in vit_b vit_h; do
  SAM_DEVICE=cuda python3 -m sam_backend bench --json --random-weights --model-type "$model" --repeats 10
done
