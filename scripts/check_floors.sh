#!/usr/bin/env bash
# Are pyproject's floors true? A virtualenv with every dependency at the lowest version pyproject.toml
# allows ("name>=X" installed as "name==X"), then the tests of the code that leans on those APIs:
# MLflow (tracking, the registry, serving), Optuna (RDB storage, heartbeats), torch-fidelity (the
# metrics and the extractor registry). Needs the package index; not part of .ci/run (each install of
# old MLflow pulls its own dependency tree: minutes). docs/tracking.md says when it last passed.
#
#   bash scripts/check_floors.sh [VENV [PYTEST ARGS]]    (default .venv-floors, git-ignored)
#
# torch and torchvision stay at constraints.txt's versions: this machine's pip index holds those only
# (their floors, 2.4 / 0.19, are the first with torch.export's pt2 format, which MLflow's pt2 needs).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-floors}
shift || true                                # the rest goes to pytest
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python - > "$venv/floors.txt" <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for d in deps:
    m = re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)", d)
    if m and m.group(1) not in ("torch", "torchvision"):
        print(f"{m.group(1)}{m.group(2) or ''}=={m.group(3)}")
EOF
grep -iE '^(torch|torchvision)==' constraints.txt >> "$venv/floors.txt"
echo "floors:"; sed 's/^/  /' "$venv/floors.txt"
pip install -q -r "$venv/floors.txt" -e ".[dev]"
pip list --format=freeze | grep -iE '^(mlflow|optuna|torch|torch-fidelity|torch_fidelity|numpy|pillow|safetensors|matplotlib|pyyaml|filelock|psutil|psycopg)==' | sed 's/^/installed: /'
pytest -q -p no:cacheprovider tests/test_track.py tests/test_tune.py tests/test_evaluate.py tests/test_encoder.py "$@"
