"""scripts/gpu_check.py in its CPU form: the budget skips what would not fit, one line each, and the JSON
is rewritten after every part, so a check that is cut still holds every finished figure."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--quick"]


def test_the_budget_skips_a_part_that_would_not_fit_with_one_line(tmp_path):
    p = subprocess.run(
        CHECK
        + [
            "--out",
            str(tmp_path),
            "--budget",
            "1000",
            "--estimate-scale",
            "25",
            "--only",
            "cuda_tests",
            "--only",
            "exact_resume_host",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    skips = [x for x in p.stdout.splitlines() if x.startswith("skip ")]
    assert skips == [next(x for x in skips if x.startswith("skip cuda_tests: needs about 1125 s"))], p.stdout
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (
        "skipped" in res["cuda_tests"] and res["exact_resume_host"]["ok"] and res["exact_resume_host"]["bit_identical"]
    )
    assert any("cuda_tests | skipped" in x for x in res["summary"])


def test_a_cut_check_keeps_every_finished_part(tmp_path):
    """Killed (-9) while its second part runs: gpu_check.json holds the first part's figures."""
    proc = subprocess.Popen(
        CHECK + ["--out", str(tmp_path), "--budget", "600", "--only", "exact_resume_host", "--only", "shared_card"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # its parts' processes too, killed as one group
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            path = tmp_path / "gpu_check.json"
            if path.exists() and "exact_resume_host" in json.loads(path.read_text()):
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["exact_resume_host"]["ok"] and "shared_card" not in res


def test_the_wheelhouse_check_passes_on_what_it_builds(tmp_path):
    """pytest-xdist travels or is on the machine, and it needs pytest: the check must not call that
    missing (it did while pytest was left out as dev-only)."""
    import importlib.util
    import zipfile

    spec = importlib.util.spec_from_file_location("gpu_wheelhouse", ROOT / "scripts" / "gpu_wheelhouse.py")
    wh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wh)
    with zipfile.ZipFile(tmp_path / "pytest_xdist-3.8.0-py3-none-any.whl", "w") as z:
        z.writestr(
            "pytest_xdist-3.8.0.dist-info/METADATA",
            "Name: pytest-xdist\nRequires-Dist: execnet>=2.1\nRequires-Dist: pytest>=7.0.0\n"
            'Requires-Dist: psutil>=3.0; extra == "psutil"\n',
        )
    assert wh.check(tmp_path) == []
    assert "pytest" not in wh.wanted()  # on the machine: never carried over its own
