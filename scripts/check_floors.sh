#!/usr/bin/env bash
# Are pyproject's floors true? A virtualenv with every dependency at the lowest version pyproject.toml
# allows (for "name>=X", the lowest release at or above X), then the tests of the code that leans on those APIs:
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
# the lowest release at or above each floor ("nvidia-ml-py>=12" is 12.535.77: there is no 12.0)
import re, subprocess, sys, tomllib
from pip._vendor.packaging.version import Version
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    m = re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)", dep)
    if not m or m.group(1) in ("torch", "torchvision"):
        continue
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", m.group(1)], capture_output=True, text=True).stdout
    listed = re.search(r"Available versions: (.*)", out)
    ok = [Version(v) for v in (listed.group(1).split(", ") if listed else []) if Version(v) >= Version(m.group(3))]
    print(f"{m.group(1)}{m.group(2) or ''}=={min(v for v in ok if not v.is_prerelease) if ok else m.group(3)}")
EOF
grep -iE '^(torch|torchvision)==' constraints.txt >> "$venv/floors.txt"
echo "floors:"; sed 's/^/  /' "$venv/floors.txt"
pip install -q -r "$venv/floors.txt" -e ".[dev]"
pip list --format=freeze | grep -iE '^(mlflow|optuna|torch|torch-fidelity|torch_fidelity|numpy|pillow|safetensors|matplotlib|pyyaml|filelock|psutil|psycopg|nvidia-ml-py)==' | sed 's/^/installed: /'
pytest -q -p no:cacheprovider tests/test_track.py tests/test_tune.py tests/test_evaluate.py tests/test_encoder.py "$@"
