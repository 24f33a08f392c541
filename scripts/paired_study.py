"""A paired study of recipes (issue 27): every arm trained on the same seeds (one seed drives init and
data order; the evaluation latents are the protocol's, the same for all), the analysis on per-seed
differences of log(hand-over FID), recall tested the same paired way.

    python scripts/paired_study.py run experiments/studies/levers64.yaml --seeds 1 2 3 \\
        --set data.root=../shared/datasets/twemoji64           # both arms of a seed at once, one core each
    python scripts/paired_study.py analyse docs/data/levers64.jsonl [--against recommended]
    python scripts/paired_study.py run STUDY.yaml --seeds 0 1 2 3 4 --at-once 12 --rows OUT.jsonl   # a GPU

`run` appends one row per finished run (seed, arm, hand-over FID and its SE, precision, recall, the
handed-over step, wall time) to the study's `rows` file as it lands, so a study cut short keeps its
pairs. `analyse` prints, for each arm against the reference: the paired mean of log(FID ratio) as a
percentage, its one-sided paired t-test (the arm lower), recall's paired difference and test, and
the smallest FID change that many pairs can show (one-sided 5%, power 80%, at the observed spread).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def load_study(path: Path) -> dict:
    study = yaml.safe_load(path.read_text())
    for key in ("base", "arms", "rows"):
        if key not in study:
            sys.exit(
                f"{path}: missing key '{key}' (base: EXPERIMENT.yaml, arms: {{name: {{key: value}}}}, rows: FILE.jsonl)"
            )
    return study


def overrides(study: dict, arm: str, seed: int, extra: list[str]) -> list[str]:
    from ganlab.config import as_override

    sets = {**study.get("set", {}), **(study["arms"][arm] or {})}
    return [as_override(k, v) for k, v in sets.items()] + [f"seed={seed}", f"variant={arm}-s{seed}"] + extra


def base_experiment(study_path: Path, study: dict) -> Path:
    return (study_path.parent / study["base"]).resolve()


def launch(study_path: Path, study: dict, arm: str, seed: int, extra: list[str], workdir: Path):
    """One run of the study as its own process on one core."""
    cmd = [sys.executable, "-m", "ganlab.cli", "train", str(base_experiment(study_path, study)), "--quiet"]
    for s in overrides(study, arm, seed, extra):
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(workdir / f"{arm}-s{seed}.log", "w")
    return subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.time()


def run_all(study_path: Path, study: dict, seeds, arms, extra: list[str], workdir: Path, at_once: int):
    """Every (seed, arm) run, `at_once` at a time in seed order (so a seed's arms run side by side and
    see the same machine load); yields each finished run's row as it lands."""
    queue = [(seed, arm) for seed in seeds for arm in arms]
    running = {}
    while queue or running:
        while queue and len(running) < at_once:
            seed, arm = queue.pop(0)
            running[(seed, arm)] = launch(study_path, study, arm, seed, extra, workdir)
        time.sleep(0.5)
        for (seed, arm), (p, log, t0) in list(running.items()):
            if p.poll() is None:
                continue
            log.close()
            del running[(seed, arm)]
            if p.returncode:
                print(f"seed {seed} arm {arm} failed: see {workdir / f'{arm}-s{seed}.log'}", file=sys.stderr)
                continue
            yield {"seed": seed, "arm": arm, "wall_s": round(time.time() - t0, 1), **result(workdir, arm, seed)}


def result(workdir: Path, arm: str, seed: int) -> dict:
    """The run's hand-over score from its event log (the newest run folder of that variant)."""
    runs = sorted(workdir.glob(f"mlruns/runs/*/{arm}-s{seed}-*"), key=lambda p: p.stat().st_mtime)
    events = [json.loads(x) for x in (runs[-1] / "events.jsonl").read_text().splitlines()]
    h = next(e for e in reversed(events) if e["kind"] == "handover")
    return {
        "handover_fid": h["handover_fid"],
        "handover_fid_se": h["handover_fid_se"],
        "precision": h.get("handover_precision"),
        "recall": h.get("handover_recall"),
        "handed_over_step": h["handed_over_step"],
        "signature": h["signature"],
        "run_dir": str(runs[-1]),
    }


def paired(a: list[float], b: list[float]) -> dict:
    """Paired differences b - a: mean, SD, n, one-sided p (b lower than a) and two-sided p."""
    from scipy import stats

    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
    if n < 2 or sd == 0:
        return {"n": n, "mean": mean, "sd": sd, "p_lower": float("nan"), "p_two_sided": float("nan")}
    t = mean / (sd / math.sqrt(n))
    return {
        "n": n,
        "mean": mean,
        "sd": sd,
        "t": t,
        "p_lower": float(stats.t.cdf(t, n - 1)),
        "p_two_sided": float(2 * stats.t.sf(abs(t), n - 1)),
    }


def detectable(sd: float, n: int) -> float:
    """The smallest paired mean a one-sided 5% test finds with 80% power at this SD and n pairs."""
    from scipy import stats

    if n < 2 or not math.isfinite(sd):
        return float("nan")
    return (stats.t.ppf(0.95, n - 1) + stats.t.ppf(0.80, n - 1)) * sd / math.sqrt(n)


def analyse(rows_path: Path, against: str) -> str:
    rows = [json.loads(x) for x in rows_path.read_text().splitlines() if x.strip()]
    by = {(r["arm"], r["seed"]): r for r in rows}
    arms = sorted({r["arm"] for r in rows} - {against})
    lines = [f"paired against {against} ({rows_path}); FID change = exp(mean log ratio) - 1"]
    lines.append(
        f"{'arm':<16}{'pairs':>6}{'FID change':>12}{'p (lower)':>11}{'recall diff':>13}{'p (2-sided)':>13}"
        f"{'detectable':>12}"
    )
    for arm in arms:
        seeds = sorted(s for (a, s) in by if a == arm and (against, s) in by)
        if not seeds:
            continue
        ref = [by[(against, s)] for s in seeds]
        new = [by[(arm, s)] for s in seeds]
        fid = paired([math.log(r["handover_fid"]) for r in ref], [math.log(r["handover_fid"]) for r in new])
        rec = paired([r["recall"] or 0.0 for r in ref], [r["recall"] or 0.0 for r in new])
        det = detectable(fid["sd"], fid["n"])
        lines.append(
            f"{arm:<16}{fid['n']:>6}{100 * math.expm1(fid['mean']):>11.1f}%{fid['p_lower']:>11.3f}"
            f"{rec['mean']:>+13.3f}{rec['p_two_sided']:>13.3f}{100 * -math.expm1(-det) if math.isfinite(det) else float('nan'):>11.0f}%"
        )
    lines.append(
        "detectable: the FID reduction a one-sided 5% paired test finds with 80% power at the observed SD of "
        "log ratios and this many pairs"
    )
    for r in sorted(rows, key=lambda r: (r["seed"], r["arm"])):
        lines.append(
            f"  seed {r['seed']:>2} {r['arm']:<14} FID {r['handover_fid']:.3f} +/- {r['handover_fid_se']:.3f}  "
            f"precision {r['precision'] if r['precision'] is not None else float('nan'):.3f}  "
            f"recall {r['recall'] if r['recall'] is not None else float('nan'):.3f}  step {r['handed_over_step']}"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("study", type=Path)
    r.add_argument("--seeds", type=int, nargs="+", required=True)
    r.add_argument("--set", action="append", default=[])
    r.add_argument("--workdir", type=Path, default=Path("study-runs"))
    r.add_argument("--arms", nargs="+", default=None, help="run only these arms (rows pair with earlier ones)")
    r.add_argument("--at-once", type=int, default=0, help="runs at a time (default: the arms of one seed)")
    r.add_argument("--rows", type=Path, default=None, help="append rows here instead of the study's rows file")
    a = sub.add_parser("analyse")
    a.add_argument("rows", type=Path)
    a.add_argument("--against", default="recommended")
    args = ap.parse_args(argv)
    if args.cmd == "analyse":
        print(analyse(args.rows, args.against))
        return 0
    study = load_study(args.study)
    rows_path = args.rows or ROOT / study["rows"]  # an absolute rows path stays as it is
    args.workdir.mkdir(parents=True, exist_ok=True)
    arms = args.arms or list(study["arms"])
    unknown = sorted(set(arms) - set(study["arms"]))
    if unknown:
        sys.exit(f"{args.study}: no arm {', '.join(unknown)} (arms: {', '.join(study['arms'])})")
    at_once = args.at_once or len(arms)
    for row in run_all(args.study, study, args.seeds, arms, args.set, args.workdir.resolve(), at_once):
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(analyse(rows_path, "recommended" if "recommended" in study["arms"] else next(iter(study["arms"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
