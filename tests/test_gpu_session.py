"""The GPU session from the repo (issue 26): the offline install path from a wheelhouse, and the check's
CPU smoke form. No network: the wheels here are built by hand, as pip builds them."""

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_wheelhouse  # noqa: E402


def make_wheel(folder: Path, name: str, version: str, requires=()) -> Path:
    """A pure-Python wheel holding module `name` (VALUE = version), requiring `requires`."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"VALUE = {version!r}\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\n"
        f"Name: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
        f"{len(text.encode())}"
        for path, text in files.items()
    ]
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
    return path


def test_wheelhouse_installs_offline_into_a_target_folder(tmp_path):
    """pip --no-index --no-deps from the wheelhouse into a folder; the modules import from there."""
    house = tmp_path / "whl"
    house.mkdir()
    make_wheel(house, "alpha_pkg", "1.0", requires=["beta_pkg>=2"])
    make_wheel(house, "beta_pkg", "2.1")
    gpu_wheelhouse.install(tmp_path / "site", house)
    out = subprocess.run(
        [sys.executable, "-c", "import alpha_pkg, beta_pkg; print(alpha_pkg.VALUE, beta_pkg.VALUE)"],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
    )
    assert out.stdout.split() == ["1.0", "2.1"], out.stderr


def test_wheelhouse_check_names_what_neither_travels_nor_is_on_the_machine(tmp_path):
    house = tmp_path / "whl"
    house.mkdir()
    make_wheel(house, "alpha_pkg", "1.0", requires=["beta_pkg", "numpy>=1", "winonly; sys_platform == 'win32'"])
    assert gpu_wheelhouse.check(house, on_machine={"numpy"}) == ["alpha_pkg-1.0-py3-none-any.whl needs beta-pkg"]
    make_wheel(house, "beta_pkg", "1.0")
    assert gpu_wheelhouse.check(house, on_machine={"numpy"}) == []


def test_what_travels_is_what_the_machine_lacks():
    """torch and its CUDA stack are the machine's own; torch-fidelity, MLflow and Optuna travel."""
    w = gpu_wheelhouse.wanted()
    assert {"torch-fidelity", "mlflow", "optuna"} <= set(w)
    assert not {"torch", "numpy", "triton", "pytest"} & set(w) and not any(n.startswith("nvidia-") for n in w)
    assert w["mlflow"] == gpu_wheelhouse.pins()["mlflow"]


def test_ddp_buffer_kwarg_is_read_from_the_signature():
    """torch 2.11 (the lent machine) has no forward_sync_buffers: the name comes from DDP's signature."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    from ganlab import distributed

    assert distributed.no_buffer_sync_kwarg() in inspect.signature(DistributedDataParallel.__init__).parameters


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu(tmp_path):
    """The check's --device cpu --quick form end to end: every step ok and one summary line per contender."""
    import json

    out = tmp_path / "check"
    r = subprocess.run(
        # every part but the benches (tests/test_bench.py runs `ganlab bench` itself; at 64x64 on a CPU they
        # are minutes) and the GPU-only ones
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(out)]
        + [
            x
            for part in (
                "cuda_tests",
                "train_seed_baseline",
                "train_recommended",
                "eval_10k",
                "exact_resume_device",
                "exact_resume_host",
                "shared_card",
            )
            for x in ("--only", part)
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert all(v["ok"] for v in res.values() if isinstance(v, dict) and "ok" in v)
    assert any("run: recommended.yaml" in ln for ln in res["summary"]) and any(
        "sharing the card" in ln for ln in res["summary"]
    )
    assert res["exact_resume_device"]["bit_identical"]
