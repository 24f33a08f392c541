"""Issue 22's recipe study on one machine, end to end, inside a wall-clock budget; everything it
learns lands under OUT as it goes (a crash or the budget's end keeps what was done).

    python scripts/recipe_study.py --data DIR --out OUT --device cuda --budget 540 --workers 10
    python scripts/recipe_study.py --data builtin:sprites --out /tmp/rs --device cpu --quick   # smoke test

1. smoke: a short recommended.yaml run on the device (s/step alone; the domain encoder is trained and
   published once, so every later run shares it); stops here if that fails;
2. search: `ganlab tune experiments/tunes/recipe64.yaml --workers N --timeout T` (3,000 steps a trial);
   workers start no trial after T, and what still runs at the search's deadline is stopped;
3. confirmation: `ganlab sweep` of recommended.yaml and the study's best two trials on seeds 1-3, all at
   once (so their time per step is measured side by side), with precision/recall;
4. OUT/summary.json (trials, confirmation runs: hand-over scores, precision/recall, s/step, copy
   share), OUT/results.tar.gz (the study and sweep tables, each confirmation run's curves and last grid).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T0 = time.time()


def log(out: Path, msg: str):
    line = f"[{time.time() - T0:6.0f} s] {msg}"
    print(line, flush=True)
    with open(out / "log.txt", "a") as f:
        f.write(line + "\n")


def ganlab(args: list[str], deadline: float, out: Path, name: str) -> int:
    """`python -m ganlab.cli ARGS` in its own process group, stopped (with its workers) at the deadline."""
    with open(out / f"{name}.log", "w") as f:
        p = subprocess.Popen(
            [sys.executable, "-m", "ganlab.cli", *args],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while p.poll() is None:
            if time.time() > deadline:
                os.killpg(p.pid, signal.SIGTERM)
                time.sleep(5)
                os.killpg(p.pid, signal.SIGKILL)
                log(out, f"{name}: stopped at its deadline")
                return -1
            time.sleep(2)
    return p.returncode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", type=float, default=540, help="seconds for everything")
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--confirm-share", type=float, default=0.45, help="share of the budget kept for the confirmation")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of this script")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("RECIPE_WORK", "/tmp/recipe_study")).resolve()
    common = [
        f"data.root={a.data}",
        f"train.device={a.device}",
        f"tracking.runs_dir={work / 'mlruns'}",
        f"data.cache_dir={work / 'cache'}",
    ]
    if a.device == "cuda":
        common += ["train.precision=bf16"]  # every contender alike
    if a.quick:
        common += [
            "data.image_size=32",
            "data.sprites=400",
            "model.g_width=8",
            "model.d_width=8",
            "train.steps=40",
            "eval.every=20",
            "eval.num_samples=64",
            "eval.encoder_steps=20",
            "eval.batch_size=32",
        ]
    sets = [x for s in common for x in ("--set", s)]
    summary = {"argv": sys.argv, "device": device_name(a.device), "phases": {}}
    save = lambda: (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    # 1. smoke ------------------------------------------------------------------------------------------
    steps = 40 if a.quick else 200
    t = time.time()
    rc = ganlab(
        [
            "train",
            "experiments/recommended.yaml",
            *sets,
            "--set",
            f"train.steps={steps}",
            "--set",
            f"eval.every={steps // 2}",
            "--set",
            "name=smoke",
            "--set",
            "tracking.register_model=false",
            "--quiet",
        ],
        T0 + 0.25 * a.budget,
        out,
        "smoke",
    )
    summary["phases"]["smoke"] = {"rc": rc, "seconds": time.time() - t, "steps": steps}
    save()
    log(out, f"smoke rc {rc} in {time.time() - t:.0f} s")
    if rc != 0:
        print((out / "smoke.log").read_text()[-6000:])
        pack(out, work)
        sys.exit(1)

    # 2. the search -------------------------------------------------------------------------------------
    search_end = T0 + (1 - a.confirm_share) * a.budget
    trial_s = 3 * (time.time() - t)  # a 3,000-step trial among the others, guessed from the smoke run
    timeout = max(10, int(search_end - time.time() - trial_s))
    t = time.time()
    rc = ganlab(
        [
            "tune",
            "experiments/tunes/recipe64.yaml",
            "--workers",
            str(a.workers),
            "--timeout",
            str(timeout),
            *sets,
            "--quiet",
        ],
        search_end,
        out,
        "study",
    )
    trials = study_trials(work)
    summary["phases"]["study"] = {"rc": rc, "seconds": time.time() - t, "timeout": timeout, "trials": trials}
    save()
    done = sorted((x for x in trials if x["state"] == "COMPLETE"), key=lambda x: x["value"])
    log(
        out,
        f"study rc {rc}: {len(trials)} trials, {len(done)} complete; best {[round(x['value'], 3) for x in done[:3]]}",
    )

    # 3. confirmation on seeds --------------------------------------------------------------------------
    picks = [x for x in done if not same_as_recommended(x)][:2]
    sweep = write_confirmation(picks, work)
    t = time.time()
    rc = ganlab(
        ["sweep", str(sweep), "--workers", str(3 * (1 + len(picks))), *sets, "--quiet"],
        T0 + a.budget - 15,
        out,
        "confirm",
    )
    summary["phases"]["confirm"] = {
        "rc": rc,
        "seconds": time.time() - t,
        "candidates": picks,
        "runs": confirmation_runs(work),
    }
    save()
    log(out, f"confirmation rc {rc} in {time.time() - t:.0f} s")
    pack(out, work)


def device_name(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    import platform

    return f"{platform.processor() or platform.machine()} cpu, torch {torch.__version__}"


def study_trials(work: Path) -> list[dict]:
    import optuna

    try:
        study = optuna.load_study(study_name="recipe64", storage=f"sqlite:///{work / 'mlruns' / 'optuna.db'}")
    except Exception as e:
        return [{"error": str(e)}]
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": t.params,
            "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None,
            **{
                k: t.user_attrs.get(k)
                for k in (
                    "handover_se",
                    "handed_over_step",
                    "selection_best",
                    "stopped",
                    "pruned_at_step",
                    "error",
                    "run_dir",
                )
            },
        }
        for t in study.get_trials(deepcopy=False)
    ]


def overrides(params: dict) -> dict:
    """A trial's params (Optuna's labels) as config keys and values, bundles expanded."""
    from ganlab import tune

    spec = tune.load_spec(ROOT / "experiments/tunes/recipe64.yaml")
    out = {}
    for key, label in params.items():
        dom = spec.space[key]
        value = dom[[tune.choice_label(c) for c in dom].index(label)] if isinstance(dom, list) else label
        out.update(value if isinstance(value, dict) else {key: value})
    return out


def same_as_recommended(trial: dict) -> bool:
    from ganlab import config

    rec = config.load(ROOT / "experiments/recommended.yaml")
    mine = config.load(
        ROOT / "experiments/recommended.yaml", [config.as_override(k, v) for k, v in overrides(trial["params"]).items()]
    )
    return config.to_yaml(rec) == config.to_yaml(mine)


def write_confirmation(picks: list[dict], work: Path) -> Path:
    import yaml

    variants = {"recommended": {}}
    for x in picks:
        variants[f"trial{x['number']}"] = overrides(x["params"])
    sweep = {
        "base": str(ROOT / "experiments/recommended.yaml"),
        "name": "confirm64",
        "set": {
            "eval.every": 500,
            "eval.metrics": ["fid", "kid", "prc"],
            "tracking.register_model": False,
            "tracking.system_metrics": False,
        },
        "variants": variants,
        "seeds": [1, 2, 3],
    }
    path = work / "confirm64.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def confirmation_runs(work: Path) -> list[dict]:
    import mlflow

    c = mlflow.MlflowClient(f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("confirm64")
    if exp is None:
        return []
    rows = []
    for r in c.search_runs([exp.experiment_id]):
        if "mlflow.parentRunId" not in r.data.tags:
            continue
        m = r.data.metrics
        steps = m.get("handed_over_step")
        dur = ((r.info.end_time or 0) - r.info.start_time) / 1000 if r.info.end_time else None
        ips = [x.value for x in c.get_metric_history(r.info.run_id, "img_per_s")]
        copy = {x.step: x.value for x in c.get_metric_history(r.info.run_id, "copy_share")}
        rows.append(
            {
                "variant": r.data.tags.get("ganlab.variant"),
                "status": r.info.status,
                "run_dir": r.data.tags.get("ganlab.run_dir"),
                "seconds": dur,
                "img_per_s_median": sorted(ips)[len(ips) // 2] if ips else None,
                "copy_share": copy,
                "handed_over_step": steps,
                **{
                    k: v
                    for k, v in m.items()
                    if k.startswith(("handover_", "selection_best", "fid", "precision", "recall"))
                },
            }
        )
    return rows


def pack(out: Path, work: Path):
    """The study's and sweep's logs, each confirmation run's curves, events and last grid: one archive."""
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for f in sorted(out.glob("*.log")):
            tar.add(f, arcname=f"logs/{f.name}")
        runs = work / "mlruns" / "runs"
        for run in sorted(runs.glob("*/*")) if runs.exists() else []:
            if not run.is_dir():
                continue
            for name in ("metrics.jsonl", "events.jsonl", "config.yaml"):
                if (run / name).exists():
                    tar.add(run / name, arcname=f"runs/{run.parent.name}/{run.name}/{name}")
            grids = sorted((run / "samples").glob("step_*.png"))
            if grids and run.parent.name == "confirm64":
                tar.add(grids[-1], arcname=f"runs/{run.parent.name}/{run.name}/{grids[-1].name}")
        if (work / "confirm64.yaml").exists():
            tar.add(work / "confirm64.yaml", arcname="confirm64.yaml")


if __name__ == "__main__":
    main()
