#!/usr/bin/env bash
# The main job on the embedded defaults: synthetic VDR pages → tiny Qwen3-VL embedder trained on a local Ray cluster.
#   bash scripts/demo.sh [overrides...]      e.g. bash scripts/demo.sh train.lr=5e-4
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec ray-vdr demo --config "${RAY_VDR_CONFIG:-configs/demo.yaml}" "$@"
