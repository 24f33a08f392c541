#!/usr/bin/env bash
# The prepared GPU check: about 5 minutes on an H100, one JSON ($OUT/gpu_check.json).
#   bash scripts/gpu_check.sh [OUT_DIR]        (on the device machine: OUT_DIR defaults to $OUT)
# Installs ganlab into a fresh venv unless one is already there, then runs scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out/gpu_check}}"
mkdir -p "$out"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -c constraints.txt -e . >"$out/install.log" 2>&1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/nvidia-smi.csv" 2>&1 || true
.venv/bin/python scripts/gpu_check.py --out "$out" --device cuda 2>&1 | tee "$out/gpu_check.log"
