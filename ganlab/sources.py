"""Where a generator comes from (a file, a run folder, a run id, `best`, a registered model) and what
`ganlab sample / eval / best` do with it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from . import config as config_mod
from . import metrics as metrics_mod
from .errors import UserError


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
        rows = rank_runs(experiment=experiment, top=1)["rows"]
        if not rows:
            raise SourceError("best: no finished run with a hand-over score in the tracking store")
        return resolve(rows[0]["checkpoint"], device=device)
    if re.fullmatch(r"[0-9a-f]{32}", source):
        try:
            run = client().get_run(source)
        except Exception:
            raise SourceError(f"{source}: no such MLflow run in the tracking store") from None
        return resolve(run.data.tags.get("ganlab.run_dir", ""), device=device)
    raise SourceError(f"{source}: expected a checkpoint file, a run folder, a run id, 'best' or models:/NAME@ALIAS")


def _registered(uri: str, device):
    """A registered `rgba_images` pyfunc (see ganlab.serve): its generator.pt is loaded as a torch module."""
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

    from .eval import protocol
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
    protocol.save_grid(imgs, out / "grid.png")
    return out


def evaluate_source(source: str, overrides: list[str], device: str = "auto") -> dict:
    """SOURCE's generator, evaluated with its run's protocol (or the overrides) on `device` (auto =
    CUDA when there is one, as training picks it)."""
    from . import data
    from .device import pick_device
    from .eval import protocol

    dev = pick_device(device)
    g, info = resolve(source, device=dev)
    cfg = info["config"]
    if overrides:
        cfg = config_mod.from_dict(config_mod.apply_overrides(config_mod.to_dict(cfg), overrides), "--set")
    config_mod.check_data_root(cfg, source)
    images = data.load_images(cfg.data, cfg.seed)
    ev = protocol.Evaluator(cfg, images.holdout, dev, images=images)
    metrics = ev(g)
    return {
        "source": source,
        "step": info["step"],
        "metrics": metrics,
        "extractor": ev.extractor.name,
        "random_features": ev.extractor.random,
        "signature": ev.signature_hash,
    }


def rank_runs(
    *,
    experiment: str | None = None,
    metric: str | None = None,
    top: int = 5,
    signature: str | None = None,
    uri: str | None = None,
) -> dict:
    """Finished runs ranked by their hand-over score, within one hand-over signature (`signature`, else
    the newest run's). Returns {"signature", "rows" (best first, each with its standard error and
    whether it is within noise of the leader), "signatures" (every signature seen -> its run count,
    so none is dropped silently), "unscored" (finished runs without a hand-over score)}."""
    from .select import rank_key, within_noise

    c = client(uri)
    if experiment:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            raise SourceError(f"--experiment {experiment!r}: no such experiment in the tracking store")
        exps = [exp]
    else:
        from .eval.encoder_store import ENCODERS

        exps = [e for e in c.search_experiments() if e.name not in ("Default", ENCODERS)]
        exps = [max(exps, key=lambda e: e.last_update_time or 0)] if exps else []
    runs = (
        c.search_runs([e.experiment_id for e in exps], filter_string="attributes.status = 'FINISHED'", max_results=5000)
        if exps
        else []
    )
    rows, unscored = [], 0
    for r in runs:
        row = _scored_row(r, metric)
        if row is None:
            unscored += not r.data.tags.get("ganlab.study") and not r.data.tags.get(
                "ganlab.sweep"
            )  # parents score nothing
            continue
        rows.append(row)
    # Like with like: a score is comparable only under one hand-over signature AND one metric (a run
    # selected on KID, ~0.01, would otherwise outrank every FID run)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["signature"]] = counts.get(r["signature"], 0) + 1
    pool = [r for r in rows if r["signature"] == signature] if signature else rows
    lead = max(pool, key=lambda r: r["start_time"]) if pool else None
    sig, m = (lead["signature"], lead["metric"]) if lead else (signature or "", metric or "")
    other_metrics = sorted({r["metric"] for r in rows if r["signature"] == sig and r["metric"] != m})
    rows = sorted(
        (r for r in rows if r["signature"] == sig and r["metric"] == m), key=lambda r: rank_key(r["mode"])(r["score"])
    )
    for r in rows:  # a tie with the leader is worth saying before anyone picks "the best"
        r["within_noise_of_first"] = within_noise(r["score"], r["se"], rows[0]["score"], rows[0]["se"])
    return {
        "signature": sig,
        "metric": m,
        "rows": rows[:top],
        "signatures": counts,
        "unscored": unscored,
        "other_metrics": other_metrics,
    }


def _scored_row(run, metric: str | None) -> dict | None:
    """One run's ranking row from its hand-over score, or None when it has none."""
    d = run.data
    m = metric or d.params.get("selection.metric", "fid")
    if d.tags.get("ganlab.study") or d.tags.get("ganlab.sweep"):
        return None  # a study's or sweep's parent: its best trial's score, not a generator of its own
    v, se = d.metrics.get(f"handover_{m}"), d.metrics.get(f"handover_{m}_se")
    if v is None or not math.isfinite(v) or d.tags.get("ganlab.handover_stale") == "true":
        return None  # no score, or one of a generator.pt that has changed since (a resume)
    ck = Path(d.tags.get("ganlab.run_dir", "")) / "generator.pt"
    # the direction is the metric's own, never a run's selection.mode: one ranking, one direction
    return {
        "run_id": run.info.run_id,
        "variant": d.tags.get("ganlab.variant", run.info.run_name),
        "metric": m,
        "mode": metrics_mod.mode_of(m, "auto"),
        "score": v,
        "se": se if se is not None and math.isfinite(se) else 0.0,
        # the signature written when the score was computed (a resume rewrites eval.handover_signature)
        "step": int(d.metrics.get("handed_over_step", -1)),
        "signature": d.tags.get("ganlab.handover_signature") or d.tags.get("eval.handover_signature", ""),
        "checkpoint": str(ck if ck.exists() else ck.parent),
        "start_time": run.info.start_time,
        "random_features": d.tags.get("eval.random_features") == "true",
    }


def format_ranking(res: dict) -> str:
    """`ganlab best`'s table: each hand-over score with its standard error, ties with the leader
    marked, and the other signatures named with their run counts."""
    rows = res["rows"]
    lines = []
    if rows:
        m = rows[0]["metric"]
        lines.append(
            f"hand-over signature {res['signature']}: {res['signatures'][res['signature']]} run(s); "
            f"{m} on the hand-over protocol, +/- its standard error"
        )
        lines.append(f"{'rank':<5}{'run id':<34}{'variant':<24}{'hand-over ' + m:>22}{'step':>8}  checkpoint")
        for i, r in enumerate(rows, 1):
            tie = " ~" if i > 1 and r["within_noise_of_first"] else ""
            score = f"{r['score']:.4g} +/- {r['se']:.2g}{tie}"
            lines.append(f"{i:<5}{r['run_id']:<34}{r['variant'][:23]:<24}{score:>22}{r['step']:>8}  {r['checkpoint']}")
        ties = sum(r["within_noise_of_first"] for r in rows[1:])
        if ties:
            lines.append(
                f"~ within noise of rank 1 (difference under t(95%, Welch df) standard errors of the difference): {ties} run(s); "
                f"more hand-over draws (eval.handover_draws) or seeds would separate them"
            )
    else:
        lines.append("no finished run with a hand-over score")
    for x in res.get("other_metrics", {}):
        lines.append(
            f"also: runs under this signature selected on {x}, not ranked with {res.get('metric')} runs (--metric {x})"
        )
    others = {s: n for s, n in res["signatures"].items() if s != res["signature"]}
    for s, n in sorted(others.items(), key=lambda kv: -kv[1]):
        lines.append(f"also: hand-over signature {s}: {n} run(s), not comparable with the above (--signature {s})")
    if res["unscored"]:
        lines.append(
            f"also: {res['unscored']} finished run(s) without a hand-over score (an older ganlab, or no generator)"
        )
    return "\n".join(lines)
