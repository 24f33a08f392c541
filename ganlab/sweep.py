"""`ganlab sweep SWEEP.yaml`: a base experiment plus a list or grid of overrides, run one after another
under one parent MLflow run, with a summary table at the end.

    base: ../seed_baseline.yaml        # relative to the sweep file
    name: stabilizers                  # MLflow experiment (default: the base's name)
    set: {train.steps: 3000}           # applied to every variant
    variants:                          # label -> overrides (dotted keys)
      seed: {}
      clip_norm: {train.clip_norm_g: 1.0, train.clip_norm_d: 1.0}
      mine: {experiment: ../recommended.yaml}   # another experiment file as this variant's base
    grid: {train.lr_d: [0.0001, 0.0002]}   # or: every combination (labels made from the values)
"""
from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

import yaml

from . import config as config_mod
from .config import ConfigError

ALLOWED = {"base", "name", "set", "variants", "grid"}


def load_sweep(path: str | Path) -> tuple[Path, str | None, list[tuple[str, Path, list[str]]]]:
    """-> (base experiment path, experiment name or None, [(label, its experiment file, overrides)])."""
    path = Path(path)
    raw = config_mod._read_yaml(path)
    unknown = set(raw) - ALLOWED
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {sorted(unknown)}; allowed: {sorted(ALLOWED)}")
    if not isinstance(raw.get("base"), str):
        raise ConfigError(f"{path}: key 'base' must name the base experiment file")
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
            variants.append((label, base, common + [f"{k}={_dump(v)}" for k, v in zip(keys, combo)]))
    if not variants:
        raise ConfigError(f"{path}: no variants (give 'variants' or 'grid')")
    return base, raw.get("name"), variants


def _pairs(d, path, where) -> list[str]:
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: key '{where}' must be a mapping of dotted keys to values")
    return [f"{k}={_dump(v)}" for k, v in d.items()]


def _dump(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def run_sweep(path, extra_sets=(), quiet=False, only=()) -> list[dict]:
    import mlflow
    from . import track
    base, name, variants = load_sweep(path)
    if only:
        variants = [v for v in variants if v[0] in only]
    # validate every variant before running any: a typo fails now, not after hours
    cfgs = []
    for label, exp, ov in variants:
        try:
            cfgs.append((label, config_mod.load(exp, ov + list(extra_sets) + [f"variant={label}"]), None))
        except ConfigError as e:
            cfgs.append((label, None, str(e)))
    first = next((c for _, c, _ in cfgs if c is not None), None) or config_mod.load(base, list(extra_sets))
    uri = track.tracking_uri(first)
    track.set_fluent_uri(uri)
    client = track.open_client(uri)
    exp_id = track.ensure_experiment(client, first.name, uri, first.tracking.runs_dir) if first.tracking.enabled else None
    rows = []
    parent = mlflow.start_run(experiment_id=exp_id, run_name=f"sweep-{Path(path).stem}",
                              tags={"ganlab.sweep": str(path)}) if exp_id else None
    try:
        for label, cfg, err in cfgs:
            print(f"=== variant {label}", file=sys.stderr, flush=True)
            if cfg is None:
                rows.append(_failed_variant(label, err, client, exp_id, parent))
            else:
                rows.append(_run_variant(label, cfg, quiet=quiet, sweep_file=path))
        table = format_table(rows, first.selection.metric)
        print(table)
        if parent is not None:
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "sweep_summary.md").write_text(table + "\n")
                client.log_artifact(parent.info.run_id, str(Path(d) / "sweep_summary.md"))
            # an MLflow table: the UI shows it as a grid, and mlflow.load_table reads it back
            columns = ["variant", "status", "best", "step", "stopped", "run_id", "run_dir"]
            mlflow.log_table({c: [r[c] for r in rows] for c in columns}, "sweep_summary.json", run_id=parent.info.run_id)
            _log_comparison(client, parent.info.run_id, [Path(r["run_dir"]) for r in rows if r["run_dir"]])
    finally:
        if parent is not None:
            mlflow.end_run("FINISHED" if all(r["status"] == "ok" for r in rows) and len(rows) == len(cfgs) else "FAILED")
    return rows


def _failed_variant(label: str, err: str, client, exp_id, parent) -> dict:
    """A variant whose config does not load: a failed row, and a failed child run that says why."""
    row = {"variant": label, "status": "failed", "best": None, "step": None, "stopped": err, "run_id": None, "run_dir": ""}
    if exp_id:
        r = client.create_run(exp_id, run_name=label, tags={"mlflow.parentRunId": parent.info.run_id,
                                                           "ganlab.variant": label, "ganlab.error": err[:5000]})
        client.set_terminated(r.info.run_id, "FAILED")
        row["run_id"] = r.info.run_id
    return row


def _run_variant(label: str, cfg, quiet: bool, sweep_file) -> dict:
    from . import train
    row = {"variant": label, "status": "failed", "best": None, "step": None, "stopped": "", "run_id": None, "run_dir": ""}
    try:
        res = train.train(cfg, quiet=quiet, experiment_file=str(sweep_file))
        row.update(status="ok", best=res.best, step=res.best_step, stopped=res.stopped, run_id=res.run_id,
                   run_dir=str(res.run_dir))
    except Exception as e:              # one failed variant never stops the others
        row["stopped"] = f"{e.__class__.__name__}: {e}"
        print(f"variant {label} failed: {row['stopped']}", file=sys.stderr)
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
    except Exception as e:              # the variants' own results are safe
        print(f"could not write the sweep report ({e})", file=sys.stderr)


def format_table(rows, metric) -> str:
    head = f"| variant | best {metric} | step | stopped | run id |\n|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        best = "-" if r["best"] is None else f"{r['best']:.4g}"
        lines.append(f"| {r['variant']} | {best} | {r['step'] if r['step'] is not None else '-'} | "
                     f"{(r['stopped'] or '')[:80]} | {r['run_id'] or '-'} |")
    return "\n".join(lines)
