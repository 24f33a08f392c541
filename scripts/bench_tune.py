"""Benchmark of ganlab tune (docs/benchmarks.md): trials per hour with 1 and with 2 workers on this
machine, and what Optuna's reporting and pruning cost at each evaluation.

    python scripts/bench_tune.py --trials 4 --steps 600 --out /tmp/bench_tune

Both studies run the same trials (the grid sampler over --trials learning rates of
experiments/default.yaml at --steps steps, tracking on, pruning off so every trial runs to the end),
one after the other in fresh folders, nothing else running, the domain encoder trained beforehand;
each worker gets cores / workers threads (OMP_NUM_THREADS, as ganlab tune sets it). The reporting cost is the median time of
`trial.report(value, step)` + `trial.should_prune()` against the same sqlite storage a study uses,
with a median pruner and a study holding --history finished trials of 10 reports each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from ganlab import config
from ganlab.bench import machine_info
from ganlab.eval import encoder

ROOT = Path(__file__).resolve().parent.parent


def study_file(folder: Path, trials: int, steps: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lrs = [round(1e-4 * (1 + i), 6) for i in range(trials)]
    spec = {
        "base": str(ROOT / "experiments" / "default.yaml"),
        "name": "bench",
        "sampler": "grid",
        "pruner": "none",
        "set": {
            "train.steps": steps,
            "eval.every": max(1, steps // 3),
            "tracking.system_metrics": False,
            "tracking.register_model": False,
            "data.cache_dir": str(folder.parent / "cache"),
        },
        "space": {"train.lr_d": lrs},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trials_per_hour(folder: Path, workers: int, trials: int, steps: int) -> dict:
    path = study_file(folder, trials, steps)
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "-m", "ganlab.cli", "tune", str(path), "--quiet", "--workers", str(workers)],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    return {
        "workers": workers,
        "trials": trials,
        "steps": steps,
        "wall_s": round(wall, 1),
        "trials_per_hour": round(3600 * trials / wall, 1),
    }


def reporting_cost(folder: Path, history: int, reps: int = 200) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}", heartbeat_interval=10, grace_period=30)
    study = optuna.create_study(storage=storage, study_name="cost", pruner=optuna.pruners.MedianPruner())
    for k in range(history):
        t = study.ask()
        for s in range(10):
            t.report(1.0 + k + s, s * 100)
        study.tell(t, 1.0 + k)
    t = study.ask()
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        t.report(5.0, (i % 10) * 100 + 1000 * (i // 10 + 1))
        t.should_prune()
        times.append(time.perf_counter() - t0)
    return {
        "history_trials": history,
        "median_ms": round(1000 * statistics.median(times), 2),
        "p90_ms": round(1000 * sorted(times)[int(0.9 * len(times))], 2),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_tune"))
    a = p.parse_args(argv)
    os.environ.setdefault("GANLAB_OFFLINE", "1")
    out = {"machine": machine_info(torch.device("cpu")), "reporting": reporting_cost(a.out / "cost", a.history)}
    # the domain encoder is trained on first use and cached: train it now, so that neither study pays it
    encoder.ensure(config.load(ROOT / "experiments" / "default.yaml", [f"data.cache_dir={a.out / 'cache'}"]))
    out["one_worker"] = trials_per_hour(a.out / "w1", 1, a.trials, a.steps)
    out["two_workers"] = trials_per_hour(a.out / "w2", 2, a.trials, a.steps)
    out["speedup"] = round(out["two_workers"]["trials_per_hour"] / out["one_worker"]["trials_per_hour"], 2)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
