"""The wheelhouse a lent GPU machine needs to run ganlab with no network, built here, installed there.

The lent machine (docs/benchmarks.md, "GPU") has Python 3.12, its own CUDA torch and many common
packages, no network, and not torch-fidelity, MLflow or Optuna. Its torch is used as it is; what it
lacks travels as wheels in `.whl/` (git-ignored), pinned by constraints.txt:

    python scripts/gpu_wheelhouse.py build          # here, where PyPI is reachable: .whl/ for cp312 manylinux
    python scripts/gpu_wheelhouse.py check          # here: every wheel's requirements are in .whl/ or on the machine
    python3 scripts/gpu_wheelhouse.py install DIR   # there: pip --no-index --no-deps --target DIR (then PYTHONPATH=DIR)

`bash scripts/gpu_check.sh` runs `install` itself when `.whl/` is there.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
MACHINE_PYTHON = "3.12"
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_24_x86_64",
]
# What the lent machine's image holds already (the device tool's KINDS.md, read 2026-11-17): carried
# again, a second version would shadow or clash with it. torch and its CUDA stack are never carried.
ON_MACHINE = set(
    """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs build certifi
charset-normalizer click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython einops filelock flatbuffers fonttools frozenlist fsspec grpcio h11 h5py
hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig jinja2 joblib kiwisolver
lazy-loader lxml markdown markdown-it-py markupsafe matplotlib mdurl mpmath msgpack multidict mypy-extensions
narwhals networkx ninja numpy nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx packaging pandas pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pygments pyparsing python-dateutil pyyaml regex
requests rich safetensors scikit-learn scipy setuptools six sortedcontainers sympy tabulate threadpoolctl torch
torchaudio torchvision tqdm triton typing-extensions urllib3 werkzeug wheel wrapt yarl zipp
pytest pytest-xdist execnet pytest-timeout
""".split()
)
# the report test's browser driver: the GPU check runs the CUDA tests (the machine's pytest), not that one
DEV_ONLY = {"playwright", "pyee", "greenlet-playwright", "ruff"}  # ruff: CI's linter


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    """name -> version of every package constraints.txt pins."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[norm(name)] = version.strip()
    return out


def wanted() -> dict[str, str]:
    """What travels: the pinned closure less what the machine holds and the test-only tools."""
    return {
        n: v for n, v in pins().items() if n not in ON_MACHINE and n not in DEV_ONLY and not n.startswith("nvidia-")
    }


def build(dest: Path = WHEELS):
    dest.mkdir(exist_ok=True)
    for name, version in sorted(wanted().items()):
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            MACHINE_PYTHON,
            "--implementation",
            "cp",
            "-d",
            str(dest),
            f"{name}=={version}",
        ]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        cmd += ["--platform", "any"]
        if subprocess.run(cmd).returncode:
            sys.exit(f"gpu_wheelhouse: no cp{MACHINE_PYTHON.replace('.', '')} wheel of {name}=={version} (see above)")
    size = sum(p.stat().st_size for p in dest.glob("*.whl")) / 2**20
    print(
        f"{len(list(dest.glob('*.whl')))} wheels, {size:.1f} MiB in {dest} (the device tool carries at most 64 MiB a call)"
    )


def requirements(wheel: Path) -> list[str]:
    """The names a wheel requires on the machine (Requires-Dist without extras, markers for Linux, 3.12)."""
    from packaging.requirements import Requirement

    env = {
        "python_version": MACHINE_PYTHON,
        "python_full_version": MACHINE_PYTHON + ".3",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "extra": "",
    }
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                out.append(norm(req.name))
    return out


def wheel_name(wheel: Path) -> str:
    return norm(wheel.name.split("-")[0])


def check(folder: Path = WHEELS, on_machine: set = ON_MACHINE) -> list[str]:
    """'<wheel> needs <name>' for each requirement neither in `folder` nor on the machine ([] = complete)."""
    wheels = sorted(folder.glob("*.whl"))
    have = {wheel_name(w) for w in wheels} | {norm(n) for n in on_machine}
    return [f"{w.name} needs {r}" for w in wheels for r in requirements(w) if r not in have]


def install(target: Path, folder: Path = WHEELS, python: str = sys.executable):
    """pip --no-index --no-deps from the wheelhouse into `target` (no network; the machine's torch stays)."""
    wheels = sorted(str(w) for w in folder.glob("*.whl"))
    if not wheels:
        sys.exit(
            f"gpu_wheelhouse: no wheels in {folder}: run `python scripts/gpu_wheelhouse.py build` where PyPI is reachable"
        )
    cmd = [
        python,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(target),
        *wheels,
    ]
    subprocess.run(cmd, check=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["build", "check", "install"])
    ap.add_argument("target", nargs="?", type=Path, help="install: the folder to install into (then PYTHONPATH)")
    ap.add_argument("--wheels", type=Path, default=WHEELS)
    a = ap.parse_args(argv)
    if a.action == "build":
        build(a.wheels)
        a.action = "check"
    if a.action == "check":
        missing = check(a.wheels)
        print("\n".join(missing) or f"complete: every requirement of {a.wheels}'s wheels is carried or on the machine")
        return 1 if missing else 0
    if a.target is None:
        ap.error("install needs a target folder")
    install(a.target, a.wheels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
