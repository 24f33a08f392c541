#!/usr/bin/env bash
# Issue 35's screen in one call on a lent GPU (no network): the main job's arms of a study ($STUDY, else
# experiments/studies/mainjob_screen.yaml) on 5 paired seeds, $AT_ONCE (12) runs at once, then each finished
# run's pixel-space FD (scripts/pixel_fd.py), the grids (scripts/study_grids.py) and the paired analysis.
# The rows land in OUT_DIR as each run finishes, so a call cut short keeps every finished pair; grids and
# run logs come back as one archive (the device returns a few files only).
#   [STUDY=...] bash scripts/mainjob_gpu.sh [BUDGET_S]       (OUT_DIR: $OUT, else out/mainjob_gpu)
# device tool: run(command="bash scripts/mainjob_gpu.sh 490", carry=[".whl"], timeout_s=540)
set -euo pipefail
started=$(date +%s)
cd "$(dirname "$0")/.."
out="${OUT:-out/mainjob_gpu}"
budget="${1:-490}"
shift || true
mkdir -p "$out"
source scripts/gpu_env.sh
echo "install: $(( $(date +%s) - started )) s"
left=$(( budget - ($(date +%s) - started) - 100 ))  # 100 s kept for the analysis, pixel FD and grids
study="${STUDY:-experiments/studies/mainjob_screen.yaml}"
name="$(basename "$study" .yaml)"
rows="$out/$name.jsonl"
# timeout signals the study's whole process group: its runs stop with it
timeout --signal=INT "$left" $py scripts/paired_study.py run "$study" \
  --seeds 0 1 2 3 4 --at-once "${AT_ONCE:-12}" --rows "$rows" --workdir "/tmp/$name" "$@" >"$out/study.log" 2>&1 \
  || echo "study ended early (rc $?, budget): $(wc -l <"$rows" 2>/dev/null || echo 0) runs finished"
echo "study: $(( $(date +%s) - started )) s"
[ -s "$rows" ] || exit 1
$py scripts/paired_study.py analyse "$rows" --against default | tee "$out/analysis.txt"
timeout 70 $py scripts/pixel_fd.py "$rows" --json "$out/pixel_fd.json" >"$out/pixel_fd.log" 2>&1 || true
tail -n 12 "$out/pixel_fd.log"
mkdir -p "/tmp/$name-grids"
timeout 25 $py scripts/study_grids.py study "$rows" --out "/tmp/$name-grids/$name" || true
tar -czf "$out/$name-grids-logs.tar.gz" -C /tmp "$name-grids" $(cd /tmp && ls "$name"/*.log) "$out/study.log" 2>/dev/null || true
echo "done: $(( $(date +%s) - started )) s"
