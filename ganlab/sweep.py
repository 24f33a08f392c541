"""`ganlab sweep SWEEP.yaml`: a base experiment plus a list or grid of overrides, each variant one run
under one parent MLflow run, with a summary table at the end. It runs on ganlab tune's machinery
(Optuna's grid sampler over the variants, ganlab/tune.py), so `--workers N` runs N at once.

    base: ../seed_baseline.yaml        # relative to the sweep file
    name: stabilizers                  # MLflow experiment (default: the base's name)
    set: {train.steps: 3000}           # applied to every variant
    variants:                          # label -> overrides (dotted keys)
      seed: {}
      clip_norm: {train.clip_norm_g: 1.0, train.clip_norm_d: 1.0}
      mine: {experiment: ../recommended.yaml}   # another experiment file as this variant's base
    grid: {train.lr_d: [0.0001, 0.0002]}   # or: every combination (labels made from the values)
    seeds: [0, 1, 2]                   # each variant once per seed ("label/seed1"); the table adds
                                       # each variant's mean and SD over its seeds
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import time
from pathlib import Path

from . import config as config_mod
from .errors import ConfigError
from .tune import read_file

ALLOWED = {"base", "name", "set", "variants", "grid", "seeds"}
SEED_MARK = "/seed"  # a variant's label on one seed: f"{label}{SEED_MARK}{seed}"


def load_sweep(path: str | Path) -> tuple[Path, str | None, list[tuple[str, Path, list[str]]]]:
    """-> (base experiment path, experiment name or None, [(label, its experiment file, overrides)])."""
    path = Path(path)
    raw = read_file(path, ALLOWED, "sweep")
    base = path.parent / raw["base"]
    common = _pairs(raw.get("set") or {}, path, "set") + ([f"name={raw['name']}"] if raw.get("name") else [])
    variants = []
    for label, ov in (raw.get("variants") or {}).items():
        ov = dict(ov or {})
        own = path.parent / ov.pop("experiment") if "experiment" in ov else base
        variants.append((str(label), own, common + _pairs(ov, path, f"variants.{label}")))
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: key 'grid' must map dotted keys to non-empty lists of values")
    if grid:
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, combo))
            variants.append((label, base, common + [config_mod.as_override(k, v) for k, v in zip(keys, combo)]))
    if not variants:
        raise ConfigError(f"{path}: no variants (give 'variants' or 'grid')")
    seeds = raw.get("seeds")
    if seeds is not None:
        if not (
            isinstance(seeds, list)
            and seeds
            and all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
            and len(set(seeds)) == len(seeds)
        ):
            raise ConfigError(f"{path}: key 'seeds' must be a list of distinct integers, got {seeds!r}")
        variants = [(f"{label}{SEED_MARK}{x}", exp, ov + [f"seed={x}"]) for label, exp, ov in variants for x in seeds]
    return base, raw.get("name"), variants


def _pairs(d, path, where) -> list[str]:
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: key '{where}' must be a mapping of dotted keys to values")
    return [config_mod.as_override(k, v) for k, v in d.items()]


def sweep_spec(path, extra_sets=(), only=(), name: str = "", storage: str = ""):
    """-> (the tune Spec of the variants whose config loads, [(label, error)] of those that do not).
    Every variant is validated before any runs: a typo fails now, not after hours."""
    from .tune import Spec

    base, exp_name, variants = load_sweep(path)
    if only:
        variants = [v for v in variants if v[0] in only]
    good, bad, first = {}, [], None
    for label, exp, ov in variants:
        try:
            cfg = config_mod.load(exp, ov + list(extra_sets) + [f"variant={label}"])
            good[label], first = (exp, ov), first or cfg
        except ConfigError as e:
            bad.append((label, str(e)))
    first = first or config_mod.load(base, list(extra_sets))
    spec = Spec(
        path=Path(path),
        name=name or f"sweep-{Path(path).stem}-{time.strftime('%Y%m%d-%H%M%S')}",
        space={"variant": list(good)},
        sampler="grid",
        pruner="none",
        trials=len(good),
        storage=storage,
        experiment=first.name,
        command="sweep",
        pin_signature=False,
        configure=lambda params, number, extra=(): _variant_config(good, params["variant"], extra),
    )
    return spec, bad, first, [label for label, _, _ in variants]


def _variant_config(good: dict, label: str, extra_sets=()):
    """A variant's config: its experiment file, its overrides, then the command line's."""
    exp, over = good[label]
    return config_mod.load(exp, over + list(extra_sets) + [f"variant={label}"])


def run_sweep(path, extra_sets=(), quiet=False, only=(), workers: int = 1, devices: str = "") -> list[dict]:
    from . import track, tune

    spec, bad, first, order = sweep_spec(path, extra_sets, only)
    rows = []
    study, parent = None, None
    if spec.space["variant"]:
        study, parent, _ = tune.execute(
            spec,
            workers,
            devices,
            extra_sets,
            quiet,
            worker_args=[a for o in only for a in ("--only", o)],
            parent_name=f"sweep-{Path(path).stem}",
            parent_tags={"ganlab.sweep": str(path)},
        )
        rows = [_row(t) for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("spare")]
    client = track.open_client(track.tracking_uri(first)) if first.tracking.enabled else None
    if parent is None and client is not None:  # every variant broken: still one parent that says so
        exp_id = track.ensure_experiment(client, first.name, track.tracking_uri(first), first.tracking.runs_dir)
        parent = client.create_run(
            exp_id, run_name=f"sweep-{Path(path).stem}", tags={"ganlab.sweep": str(path)}
        ).info.run_id
    with tune.ends_parent(first, parent):
        return _finish_sweep(rows, bad, order, first, client, parent)


def _finish_sweep(rows, bad, order, first, client, parent) -> list[dict]:
    """The failed variants' rows, the table on stdout and on the parent run, and the parent's end."""
    import mlflow

    from . import track

    for label, err in bad:
        rows.append(_failed_variant(label, err, client, parent))
    rows.sort(key=lambda r: order.index(r["variant"]))
    table = format_table(rows, first.selection.metric)
    print(table)
    if parent is not None:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "sweep_summary.md").write_text(table + "\n")
            client.log_artifact(parent, str(Path(d) / "sweep_summary.md"))
        # an MLflow table: the UI shows it as a grid, and mlflow.load_table reads it back
        columns = ["variant", "status", "score", "se", "step", "signature", "stopped", "run_id", "run_dir"]
        track.set_fluent_uri(track.tracking_uri(first))
        mlflow.log_table({c: [r[c] for r in rows] for c in columns}, "sweep_summary.json", run_id=parent)
        _log_comparison(client, parent, [Path(r["run_dir"]) for r in rows if r["run_dir"]])
        ok = all(r["status"] == "ok" for r in rows) and len(rows) == len(order)
        client.set_terminated(parent, "FINISHED" if ok else "FAILED")
    return rows


def _row(trial) -> dict:
    """A sweep row from its Optuna trial: the hand-over score of the generator its run handed over."""
    ok = trial.state.name == "COMPLETE"
    return {
        "variant": trial.params.get("variant", "?"),
        "status": "ok" if ok else "failed",
        "score": trial.value if ok else None,
        "se": trial.user_attrs.get("handover_se") if ok else None,
        "signature": trial.user_attrs.get("handover_signature", ""),
        "step": trial.user_attrs.get("handed_over_step"),
        "stopped": trial.user_attrs.get("stopped") or trial.user_attrs.get("error", trial.state.name)[-200:],
        "run_id": trial.user_attrs.get("run_id"),
        "run_dir": trial.user_attrs.get("run_dir", ""),
    }


def _failed_variant(label: str, err: str, client, parent: str | None) -> dict:
    """A variant whose config does not load: a failed row, and a failed child run that says why."""
    row = {
        "variant": label,
        "status": "failed",
        "score": None,
        "se": None,
        "signature": "",
        "step": None,
        "stopped": err,
        "run_id": None,
        "run_dir": "",
    }
    if parent:
        exp_id = client.get_run(parent).info.experiment_id
        r = client.create_run(
            exp_id,
            run_name=label,
            tags={"mlflow.parentRunId": parent, "ganlab.variant": label, "ganlab.error": err[:5000]},
        )
        client.set_terminated(r.info.run_id, "FAILED")
        row["run_id"] = r.info.run_id
    return row


def _log_comparison(client, run_id: str, run_dirs: list[Path]):
    """One report page comparing the variants, logged to the sweep's parent run."""
    from .report import write_report

    if not run_dirs:
        return
    try:
        with tempfile.TemporaryDirectory() as d:
            page = write_report(run_dirs, Path(d) / "report")
            client.log_artifacts(run_id, str(page.parent), "report")
    except Exception as e:  # the variants' own results are safe
        print(f"could not write the sweep report ({e})", file=sys.stderr)


def format_table(rows, metric) -> str:
    """The sweep's table: each variant's hand-over score +/- its standard error and the step it handed
    over; ~ marks a score within noise of the best one under the same hand-over signature."""
    from .metrics import mode_of
    from .select import rank_key, within_noise

    scored = [r for r in rows if r["score"] is not None]
    lead = {}
    for r in sorted(scored, key=lambda r: rank_key(mode_of(metric, "auto"))(r["score"])):
        lead.setdefault(r["signature"], r)
    lines = [
        f"| variant | hand-over {metric} +/- se | handed-over step | stopped | hand-over signature | run id |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        score = "-"
        if r["score"] is not None:
            first = lead[r["signature"]]
            tie = (
                " ~"
                if first is not r and within_noise(r["score"], r["se"] or 0, first["score"], first["se"] or 0)
                else ""
            )
            score = f"{r['score']:.4g} +/- {r['se'] or 0:.2g}{tie}"
        lines.append(
            f"| {r['variant']} | {score} | {r['step'] if r['step'] is not None else '-'} | "
            f"{(r['stopped'] or '')[:80]} | {r['signature'] or '-'} | {r['run_id'] or '-'} |"
        )
    if any(" ~ |" in ln for ln in lines):
        lines.append(
            "\n~ within noise of the best variant (difference under t(95%, Welch df) standard errors of the difference)"
        )
    return "\n".join(lines + seed_table(rows, metric))


def seed_table(rows, metric) -> list[str]:
    """Variants run on several seeds: each one's mean hand-over score and its SD over seeds (the
    spread that says whether one recipe beats another; a run's own +/- se does not)."""
    import statistics

    groups = {}
    for r in rows:
        if SEED_MARK in r["variant"]:
            groups.setdefault(r["variant"].rsplit(SEED_MARK, 1)[0], []).append(r)
    if not groups:
        return []
    lines = [
        "",
        f"| variant | seeds scored | mean hand-over {metric} | SD over seeds | hand-over signature |",
        "|---|---|---|---|---|",
    ]
    for label, rs in groups.items():
        scores = [r["score"] for r in rs if r["score"] is not None]
        sigs = sorted({r["signature"] for r in rs if r["score"] is not None}) or ["-"]
        mean = f"{statistics.fmean(scores):.4g}" if scores else "-"
        sd = f"{statistics.stdev(scores):.2g}" if len(scores) > 1 else "-"
        lines.append(f"| {label} | {len(scores)} of {len(rs)} | {mean} | {sd} | {', '.join(sigs)} |")
    return lines
