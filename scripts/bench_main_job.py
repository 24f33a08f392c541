"""The main job, end to end, as a new user runs it: `ganlab train experiments/default.yaml` in a fresh
folder (so the first use trains the sprites' domain encoder), --runs times one after the other, nothing
else running. Prints each wall time, the median and the CPU; docs/benchmarks.md quotes it.

    python scripts/bench_main_job.py --runs 3 --out /tmp/mainjob
    python scripts/bench_main_job.py --runs 3 --out /tmp/mainjob --with-inception   # as a user with internet
    python scripts/bench_main_job.py --runs 2 --out /tmp/mainjob --against model.d_width=16 train.steps=2000

--against SETS: a candidate main job, timed in turns with the default one (default, candidate, default,
...), so both see the same machine; prints both medians and their ratio.

--with-inception: InceptionV3's weights present, as they are for a user with internet (a random-weights
file in torch-fidelity's format stands in: the same network, the same cost), through GANLAB_INCEPTION_WEIGHTS.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    try:
        return next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def one_run(work: Path, sets: list[str], env: dict) -> float:
    """The main job in a fresh folder (the first use: the encoder is trained), its wall time."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "ganlab.cli", "train", str(ROOT / "experiments" / "default.yaml"), "--quiet"]
    p = subprocess.run(cmd + sets, cwd=work, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"{work}: the run failed: {p.stderr[-2000:]}")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("mainjob-bench"))
    ap.add_argument(
        "--with-inception", action="store_true", help="InceptionV3 weights present (a random-weights stand-in)"
    )
    ap.add_argument("--against", nargs="+", default=None, metavar="KEY=VALUE", help="a candidate's overrides")
    a = ap.parse_args()
    env = dict(__import__("os").environ)
    if a.with_inception:
        from ganlab.eval.extractors import random_inception_weights

        env["GANLAB_INCEPTION_WEIGHTS"] = str(random_inception_weights(a.out.resolve() / "inception-random.pth"))
    jobs = [("default", [])] + ([("candidate", [x for kv in a.against for x in ("--set", kv)])] if a.against else [])
    walls = {name: [] for name, _ in jobs}
    for i in range(a.runs):
        for name, sets in jobs:
            walls[name].append(one_run(a.out / f"{name}{i}", sets, env))
            print(f"{name} run {i}: {walls[name][-1]:.1f} s", flush=True)
    out = {
        "with_inception_weights": a.with_inception,
        "cpu": cpu_name(),
        "cores": __import__("os").cpu_count(),
        "walls_s": walls["default"],
        "median_s": statistics.median(walls["default"]),
    }
    if a.against:
        out |= {
            "against": a.against,
            "candidate_walls_s": walls["candidate"],
            "candidate_median_s": statistics.median(walls["candidate"]),
            "ratio": statistics.median(walls["candidate"]) / statistics.median(walls["default"]),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
