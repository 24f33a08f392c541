#!/usr/bin/env bash
# The prepared GPU check, in one call on a lent machine with no network: installs what the machine
# lacks from the wheelhouse (.whl/, built here by `python scripts/gpu_wheelhouse.py build` and carried),
# uses the machine's own python3 and torch, runs scripts/gpu_check.py within a budget that counts the
# install too; OUT_DIR/gpu_check.json is rewritten after every part.
#   bash scripts/gpu_check.sh [OUT_DIR] [gpu_check.py options, e.g. --budget 330]   (OUT_DIR defaults to $OUT)
# device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl", ".gpu_data"], timeout_s=380)
set -euo pipefail
started=$(date +%s)
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out/gpu_check}}"
shift || true
mkdir -p "$out"
source scripts/gpu_env.sh
echo "install: $(( $(date +%s) - started )) s"
data=()
[ -d .gpu_data/twemoji64 ] && data=(--study-data "$PWD/.gpu_data/twemoji64")   # the study's data, when carried
$py scripts/gpu_check.py --out "$out" --started "$started" "${data[@]}" "$@" 2>&1 | tee "$out/gpu_check.log"
