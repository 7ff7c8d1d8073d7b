#!/usr/bin/env bash
# One prepared GPU run: every figure docs/bench/notes/gpu.md lists as not yet measured on GPU, in at most 8 minutes
# on one GPU (bench/gpu.py holds the steps and their time limits; this sets up the machine and bounds the whole run).
#
#   bash bench/gpu.sh                 # on the GPU machine; figures as JSON in $OUT (else a temporary folder)
#   bash bench/gpu.sh --dry-run       # the same steps on the CPU with the tiny shape (also RAY_VDR_GPU_DRY_RUN=1)
#   bash bench/gpu.sh --json docs/bench/results/gpu-gpu.json   # also record the figures for bench/report.py
#
# Needs no Ray, DeepSpeed or FAISS. Python packages the GPU image lacks travel as wheels in .whl/ (or
# $RAY_VDR_WHEELS): they are installed into a temporary folder first (docs/bench/notes/gpu.md lists them).
# Python: $PYTHON, else .venv/bin/python where there is one, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."

args=("$@")
if [[ "${RAY_VDR_GPU_DRY_RUN:-0}" == 1 ]]; then
  args+=(--dry-run)
fi
python=${PYTHON:-}
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

wheels=${RAY_VDR_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  site=$(mktemp -d -t ray-vdr-gpu-site-XXXXXX)
  trap 'rm -rf "$site"' EXIT
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed $(ls "$wheels"/*.whl | wc -l) wheels from $wheels"
fi

if [[ " ${args[*]} " != *" --dry-run "* ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

# transformers >= 5.25 loads models with hub kernels by default (use_kernels=None -> True): that needs the `kernels`
# package and the hub, which the GPU machine lacks; the figures are SDPA's, as the docs state
export HF_HUB_OFFLINE=1 USE_HUB_KERNELS=0 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# bench/gpu.py keeps its steps inside --budget (460 s by default); this only stops a run that hangs outside them
timeout --kill-after=10 480 "$python" -m bench.gpu "${args[@]}"
