#!/usr/bin/env bash
# The whole test suite, offline, on CPU:  bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ruff check .
exec python -m pytest "$@"
