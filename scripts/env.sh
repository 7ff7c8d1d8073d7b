#!/usr/bin/env bash
# Create or reuse the project virtualenv (.venv) with everything ray-vdr needs, then activate it.
# Sourced by scripts/demo.sh and scripts/test.sh. Re-installs only when pyproject.toml or this file changed.
#
#   RAY_VDR_VENV        where the venv lives (default: .venv in the repo)
#   RAY_VDR_PYTHON      interpreter to build it with (default: python3.11, else python3)
#   RAY_VDR_TORCH       torch requirement (default: torch==2.13.0 on CPU machines, torch>=2.11,<2.14 with CUDA)
#   RAY_VDR_TORCH_INDEX extra index for torch wheels (e.g. https://download.pytorch.org/whl/cpu)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RAY_VDR_VENV:-$ROOT/.venv}"
PY="${RAY_VDR_PYTHON:-$(command -v python3.11 || command -v python3)}"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  HAS_CUDA=1
  TORCH_REQ="${RAY_VDR_TORCH:-torch>=2.11,<2.14}"
else
  HAS_CUDA=0
  # a CPU build: never the default CUDA wheel (several GB of nvidia packages) and never torchvision
  TORCH_REQ="${RAY_VDR_TORCH:-torch==2.13.0}"
fi

stamp_of() { cat "$ROOT/pyproject.toml" "$ROOT/scripts/env.sh" | sha256sum | cut -c1-16; echo "cuda=$HAS_CUDA"; }
STAMP="$VENV/.ray-vdr-stamp"

# pip, without the warnings about unreachable extra index folders some machines configure
pip_install() {
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  return "${PIPESTATUS[0]}"
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating virtualenv $VENV with $PY"
  "$PY" -m venv "$VENV"
fi

if [ "$(cat "$STAMP" 2>/dev/null)" != "$(stamp_of)" ]; then
  echo "[env] installing ray-vdr and its dependencies into $VENV (about 2 minutes on a fresh machine)"
  start=$(date +%s)
  PIP=(pip_install)
  INDEX=()
  [ -n "${RAY_VDR_TORCH_INDEX:-}" ] && INDEX=(--extra-index-url "$RAY_VDR_TORCH_INDEX")
  "${PIP[@]}" --upgrade "pip>=24" "setuptools>=77" wheel
  "${PIP[@]}" "${INDEX[@]}" "$TORCH_REQ"
  TORCH_PIN="torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
  CONSTRAINTS="$VENV/constraints.txt"
  echo "$TORCH_PIN" > "$CONSTRAINTS"
  # deepspeed ships only an sdist whose build imports torch: build it against the torch just installed
  "${PIP[@]}" -c "$CONSTRAINTS" --no-build-isolation "deepspeed>=0.19.8,<0.20"
  if [ "$HAS_CUDA" = 1 ]; then
    "${PIP[@]}" -c "$CONSTRAINTS" -e "$ROOT[dev]" "sentence-transformers[image]>=6.2,<7"
    # faiss-gpu replaces faiss-cpu (both provide the `faiss` module); flash-attn is optional (sdpa otherwise)
    "${PIP[@]}" -c "$CONSTRAINTS" faiss-gpu-cu12 && "$VENV/bin/python" -m pip uninstall -y -q faiss-cpu \
      && "${PIP[@]}" --force-reinstall --no-deps faiss-gpu-cu12 || echo "[env] faiss-gpu unavailable: using faiss-cpu"
  else
    "${PIP[@]}" -c "$CONSTRAINTS" -e "$ROOT[dev]"
    if "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1 || "$VENV/bin/python" -m pip show -q torchvision >/dev/null 2>&1; then
      echo "[env] removing torchvision (no CPU build matches this torch; transformers falls back to PIL processors)"
      "$VENV/bin/python" -m pip uninstall -y -q torchvision
    fi
  fi
  stamp_of > "$STAMP"
  echo "[env] installed in $(( $(date +%s) - start ))s; venv size $(du -sh "$VENV" | cut -f1)"
fi

# shellcheck disable=SC1091
source "$VENV/bin/activate"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ray-vdr/torch_extensions}"
export RAY_USAGE_STATS_ENABLED=0

# DeepSpeed on CPU JIT-compiles a shared-memory op when a run first initialises it (about 40 s here, longer on slower
# machines, inside the first training run or test): build it once into the cache now, as DeepSpeed itself would
if [ "$HAS_CUDA" = 0 ] && ! compgen -G "$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm*/deepspeed_shm_comm*.so" >/dev/null; then
  echo "[env] building DeepSpeed's CPU shared-memory op into $TORCH_EXTENSIONS_DIR (once)"
  start=$(date +%s)
  if python -c "from deepspeed.comm.torch import build_shm_op; assert build_shm_op() is not None" >/dev/null 2>&1; then
    echo "[env] built in $(( $(date +%s) - start ))s"
  else
    echo "[env] DeepSpeed's shared-memory op did not build now: the first DeepSpeed run will build it"
  fi
fi
