"""Where a generator comes from (a file, a run folder, a run id, `best`, a registered model) and what
`ganlab sample / eval / best` do with it."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from . import config as config_mod, metrics as metrics_mod
from .config import UserError


class SourceError(UserError):
    """SOURCE names nothing usable. One line, shown as is."""


def client(uri: str | None = None):
    from .track import open_client, tracking_uri
    return open_client(uri or tracking_uri(config_mod.Config()))


def resolve(source: str, experiment: str | None = None, device="cpu"):
    """-> (generator ready to sample, info dict with step, metrics, config)."""
    from .generator import load_generator
    if source.startswith("models:/"):
        return _registered(source, device)
    p = Path(source)
    if p.is_file():
        return load_generator(p, device)
    if p.is_dir():
        for name in ("generator.pt", "best.pt", "last.pt"):
            if (p / name).exists():
                return load_generator(p / name, device)
        raise SourceError(f"{source}: run folder without generator.pt, best.pt or last.pt")
    if source == "best":
        rows = rank_runs(experiment=experiment, top=1)
        if not rows:
            raise SourceError("best: no finished run with a best metric in the tracking store")
        return resolve(rows[0]["checkpoint"], device=device)
    if re.fullmatch(r"[0-9a-f]{32}", source):
        try:
            run = client().get_run(source)
        except Exception:
            raise SourceError(f"{source}: no such MLflow run in the tracking store") from None
        return resolve(run.data.tags.get("ganlab.run_dir", ""), device=device)
    raise SourceError(f"{source}: expected a checkpoint file, a run folder, a run id, 'best' or models:/NAME@ALIAS")


def _registered(uri: str, device):
    """A registered `images` pyfunc (see ganlab.serve): its generator.pt is loaded as a torch module."""
    import mlflow
    from .generator import load_generator
    from .track import set_fluent_uri, tracking_uri
    set_fluent_uri(tracking_uri(config_mod.Config()))
    try:
        path = mlflow.artifacts.download_artifacts(f"{uri.rstrip('/')}/artifacts/generator.pt")
    except Exception as e:
        raise SourceError(f"{uri}: cannot load the registered model ({str(e).splitlines()[0][:160]})") from None
    return load_generator(path, device)


def write_samples(source: str, n: int, out: Path, seed: int = 0, experiment=None) -> Path:
    from PIL import Image
    from . import evaluate
    from .generator import generate
    if n < 1:
        raise SourceError(f"-n must be at least 1, got {n}")
    g, info = resolve(source, experiment)
    cfg = info["config"]
    z = torch.randn(n, cfg.model.nz, generator=torch.Generator().manual_seed(seed))
    imgs = generate(g, z, cfg.data.alpha, "cpu")
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(imgs):
        Image.fromarray(im.permute(1, 2, 0).numpy(), "RGBA").save(out / f"sample_{i:05d}.png")
    evaluate.save_grid(imgs, out / "grid.png")
    return out


def evaluate_source(source: str, overrides: list[str], device: str = "auto") -> dict:
    """SOURCE's generator, evaluated with its run's protocol (or the overrides) on `device` (auto =
    CUDA when there is one, as training picks it)."""
    from . import data, evaluate
    from .trainer import pick_device
    dev = pick_device(device)
    g, info = resolve(source, device=dev)
    cfg = info["config"]
    if overrides:
        cfg = config_mod.from_dict(config_mod.apply_overrides(config_mod.to_dict(cfg), overrides), "--set")
    config_mod.check_data_root(cfg, source)
    images = data.load_images(cfg.data, cfg.seed)
    ev = evaluate.Evaluator(cfg, images.holdout, dev)
    metrics = ev(g)
    return {"source": source, "step": info["step"], "metrics": metrics, "extractor": ev.extractor["name"],
            "random_features": ev.extractor["random"], "signature": ev.signature_hash}


def rank_runs(*, experiment: str | None = None, metric: str | None = None, top: int = 5,
              signature: str | None = None, uri: str | None = None) -> list[dict]:
    """Runs ranked by best_<metric>, among runs sharing one evaluation signature."""
    c = client(uri)
    if experiment:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            raise SourceError(f"--experiment {experiment!r}: no such experiment in the tracking store")
        exps = [exp]
    else:
        exps = [e for e in c.search_experiments() if e.name != "Default"]
        if not exps:
            return []
        exps = [max(exps, key=lambda e: e.last_update_time or 0)]
    runs = c.search_runs([e.experiment_id for e in exps], filter_string="attributes.status = 'FINISHED'",
                         max_results=5000)
    rows = []
    for r in runs:
        m = metric or r.data.params.get("selection.metric", "fid")
        mode = metrics_mod.mode_of(m, r.data.params.get("selection.mode", "auto"))
        v = r.data.metrics.get(f"best_{m}")
        if v is None or not math.isfinite(v):
            continue
        run_dir = r.data.tags.get("ganlab.run_dir", "")
        ck = Path(run_dir) / "generator.pt"
        rows.append({"run_id": r.info.run_id, "variant": r.data.tags.get("ganlab.variant", r.info.run_name),
                     "metric": m, "mode": mode, "best": v, "step": int(r.data.metrics.get("best_step", -1)),
                     "signature": r.data.tags.get("eval.signature", ""), "checkpoint": str(ck if ck.exists() else run_dir),
                     "start_time": r.info.start_time, "random_features": r.data.tags.get("eval.random_features") == "true"})
    if not rows:
        return []
    sig = signature or max(rows, key=lambda r: r["start_time"])["signature"]
    rows = [r for r in rows if r["signature"] == sig]
    rows.sort(key=lambda r: r["best"] if r["mode"] == "min" else -r["best"])
    return rows[:top]
