"""`ganlab report RUN [RUN ...]`: one self-contained HTML page (PNGs embedded, and written beside it).

One run: training curves (losses, D's outputs and margin shares, gradient norms) with collapse
signals, rollbacks and the early stop marked; the selection metric at each evaluation with the best
marked and the min_delta band shaded; the sample grid of every evaluation (alpha over a
checkerboard); the config's difference from the experiment it extends. Several runs (a sweep, a
study): their metric curves overlaid, a table of their bests, and each one's best grid.

Everything comes from the run folders (metrics.jsonl, events.jsonl, config.yaml, samples/), so a
report needs no tracking server. Plots are matplotlib (Agg backend): already installed with MLflow,
static PNGs that need no JavaScript, so the page works offline and from an e-mail attachment.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from . import config as config_mod
from .events import read_events

MARKS = {
    "collapse_signal": ("tab:orange", "--"),
    "rollback": ("tab:red", "-"),
    "early_stop": ("black", ":"),
    "new_period": ("tab:purple", "-."),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, path: Path) -> str:
    """Save the figure beside the page and return it as a data URI for the page itself."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    path.write_bytes(buf.getvalue())
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def _mark_events(ax, events: list[dict]):
    seen = set()
    for e in events:
        if e["kind"] in MARKS:
            color, style = MARKS[e["kind"]]
            ax.axvline(
                e["step"], color=color, linestyle=style, linewidth=1, label=e["kind"] if e["kind"] not in seen else None
            )
            seen.add(e["kind"])


def curves_figure(rows, events, out: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(4, 1, figsize=(9, 10.5), sharex=True)
    # D's health (docs/selection.md, "Reading D"): r_t and accuracy near 1 = D wins or memorises;
    # d_chance near 1 = D at chance; d_overfit_gap (in logits) above 0 = D scores its training
    # images above held-out ones
    panels = [
        (("loss_d", "loss_g", "loss_g_max"), "loss"),
        (("d_real", "d_fake", "real_past_margin", "fake_past_margin"), "D's outputs / share past margin"),
        (("grad_norm_g", "grad_norm_d"), "gradient norm"),
        (("ada_rt", "d_accuracy", "d_chance", "d_overfit_gap"), "D's health"),
    ]
    for ax, (keys, label) in zip(axes, panels):
        for k in keys:
            xs, ys = _series(rows, k)
            if xs:
                ax.plot(xs, ys, label=k, linewidth=1, alpha=0.5 if k == "loss_g_max" else 1)
        _mark_events(ax, events)
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="upper right")
    axes[2].set_yscale("log")
    axes[3].set_xlabel("step")
    return _png(fig, out / "curves.png")


def noise_band(events: list[dict], min_delta) -> float:
    """The band around the best: the measured noise band (min_delta: auto), else min_delta."""
    measured = [e["band"] for e in events if e["kind"] == "noise_band"]
    return measured[-1] if measured else (min_delta if isinstance(min_delta, (int, float)) else 0.0)


def metric_figure(runs: list[tuple[str, list, list]], metric: str, min_delta, out: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for name, rows, events in runs:
        xs, ys = _series(rows, metric)
        if not xs:
            continue
        (line,) = ax.plot(xs, ys, marker="o", label=name)
        best = next((e for e in reversed(events) if e["kind"] == "improved"), None)
        if len(runs) > 1:  # several runs: mark what each hands over, not its selection best
            step = handed_over_step(events)
            if step is not None and step in xs:
                ax.plot(
                    [step],
                    [ys[xs.index(step)]],
                    marker="*",
                    markersize=16,
                    color=line.get_color(),
                    label=f"{name}: handed over step {step}",
                )
            continue
        if best is not None:
            ax.plot(
                [best["step"]],
                [best[metric]],
                marker="*",
                markersize=16,
                color=line.get_color(),
                label=f"{name}: best {best[metric]:.4g} at step {best['step']}",
            )
            band = noise_band(events, min_delta)
            if band:
                ax.axhspan(
                    best[metric] - band,
                    best[metric] + band,
                    color=line.get_color(),
                    alpha=0.15,
                    label=f"{name}: +-{band:.3g} (noise band / min_delta)",
                )
        if len(runs) == 1:
            _mark_events(ax, events)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    return _png(fig, out / "metric.png")


def config_diff(run_dir: Path, events: list[dict]) -> list[tuple[str, str, str]]:
    """(key, base value, this run's value) where the run differs from what its experiment extends
    (ganlab's defaults when it extends nothing)."""
    cfg = config_mod.load(run_dir / "config.yaml", check_paths=False)
    exp = next((e.get("experiment_file") for e in events if e["kind"] == "start"), "")
    base, base_name = config_mod.Config(), "ganlab defaults"
    if exp and Path(exp).exists():
        parent = config_mod.parse_yaml(Path(exp).read_text()).get("extends")
        if parent:
            base, base_name = config_mod.load(Path(exp).parent / parent, check_paths=False), parent
    a, b = config_mod.flatten(base), config_mod.flatten(cfg)
    return [(base_name, "", "")] + [(k, str(a.get(k)), str(b[k])) for k in b if a.get(k) != b[k] and k != "variant"]


def _img_tag(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1200px}} figure{{display:inline-block;margin:.4em}}
img{{max-width:100%}} .grids img{{width:260px;image-rendering:pixelated}} table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:.2em .5em}}</style></head><body>{body}</body></html>
"""


def handed_over_step(events: list[dict]) -> int | None:
    """The step of the generator the run handed over (its hand-over event), else its last best."""
    ho = next((e for e in reversed(events) if e["kind"] == "handover"), None)
    if ho is not None:
        return int(ho["handed_over_step"])
    return next((e["step"] for e in reversed(events) if e["kind"] == "improved"), None)


def _handover_event(events: list[dict]) -> dict | None:
    return next((e for e in reversed(events) if e["kind"] == "handover"), None)


def _handover_signature(events: list[dict]) -> str:
    ho = _handover_event(events)
    return ho.get("signature", "") if ho else ""


def _handover_text(events: list[dict], metric: str) -> str:
    ho = _handover_event(events)
    if ho is None or f"handover_{metric}" not in ho:
        return "-"
    return html.escape(f"{ho[f'handover_{metric}']:.4g} \u00b1 {ho[f'handover_{metric}_se']:.2g}")


def _run_summary(events: list[dict]) -> str:
    fin = next((e for e in reversed(events) if e["kind"] == "finished"), None)
    return html.escape(fin["detail"] if fin else "(not finished)")


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    run_dirs = [Path(r) for r in run_dirs]
    for r in run_dirs:
        if not (r / "config.yaml").exists():
            raise config_mod.UserError(f"{r}: not a run folder (no config.yaml)")
    out = Path(out) if out else (run_dirs[0] / "report" if len(run_dirs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    runs = [(r.name, read_events(r, "metrics.jsonl"), read_events(r)) for r in run_dirs]
    cfg = config_mod.load(run_dirs[0] / "config.yaml", check_paths=False)
    metric = cfg.selection.metric
    body = [f"<h1>ganlab report: {html.escape(', '.join(r.name for r in run_dirs))}</h1>"]
    if len(run_dirs) == 1:
        name, rows, events = runs[0]
        body += [
            f"<p>{_run_summary(events)}</p>",
            "<h2>Training curves</h2>",
            f'<img src="{curves_figure(rows, events, out)}" alt="training curves">',
        ]
    body += [
        f"<h2>{html.escape(metric)} at each evaluation</h2>",
        f'<img src="{metric_figure(runs, metric, cfg.selection.min_delta, out)}" alt="metric">',
    ]
    if len(run_dirs) == 1:
        grids = sorted((run_dirs[0] / "samples").glob("step_*.png"))
        body += ["<h2>Samples at each evaluation (alpha over a checkerboard)</h2><div class='grids'>"]
        body += [_img_tag(p, f"step {int(p.stem.split('_')[1])}") for p in grids] + ["</div>"]
        diff = config_diff(run_dirs[0], runs[0][2])
        body += [
            f"<h2>Config: difference from {html.escape(diff[0][0])}</h2><table><tr><th>key</th><th>"
            f"{html.escape(diff[0][0])}</th><th>this run</th></tr>"
        ]
        body += [
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>"
            for k, a, b in diff[1:]
        ]
        body += ["</table>"]
    else:
        sigs = [_handover_signature(ev) for _, _, ev in runs]
        body += [
            f"<h2>Runs</h2><table><tr><th>run</th><th>hand-over {html.escape(metric)} &plusmn; se</th>"
            f"<th>hand-over signature</th><th>outcome</th></tr>"
        ]
        body += [
            f"<tr><td>{html.escape(r.name)}</td><td>{_handover_text(ev, metric)}</td><td>{html.escape(sig or '-')}</td>"
            f"<td>{_run_summary(ev)}</td></tr>"
            for r, (_, _, ev), sig in zip(run_dirs, runs, sigs)
        ]
        if len({s for s in sigs if s}) > 1:
            body += [
                "<p><b>These runs were scored under different hand-over signatures: their scores are not "
                "comparable with each other</b> (docs/selection.md).</p>"
            ]
        body += ["</table><h2>The generator each run hands over</h2><div class='grids'>"]
        for r, (_, _, ev) in zip(run_dirs, runs):
            step = handed_over_step(ev)
            grid = r / "samples" / f"step_{step:07d}.png" if step is not None else None
            if grid is not None and grid.exists():
                body.append(_img_tag(grid, f"{r.name}: step {step}, hand-over {metric} {_handover_text(ev, metric)}"))
        body += ["</div>"]
    page = out / "report.html"
    page.write_text(PAGE.format(title="ganlab report", body="\n".join(body)))
    return page
