#!/usr/bin/env bash
# GPU check of the inference engine (bench/gpu_check.py): CUDA checks where CUDA is, the CPU parts anywhere.
# Usage: bash bench/gpu_check.sh [--require-gpu]; OUT=dir also writes dir/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  bash .ci/install
fi
exec .venv/bin/python bench/gpu_check.py "$@"
