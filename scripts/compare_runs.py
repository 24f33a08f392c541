"""Compare finished runs side by side: the evaluation trajectory, the best checkpoint, the generator
each run hands over (re-evaluated with the run's own protocol), mode coverage, and sample grids.

    python scripts/compare_runs.py RUN_DIR [RUN_DIR ...] --out docs/study [--samples 400]

Mode coverage, in pixel space on images composited over the checkerboard: `dup_rate` is the share of
generated images whose nearest other generated image is closer than half the median
nearest-neighbour distance among as many held-out real images (repeated sprites push it up); `diversity` is the mean pairwise
distance of generated images over that of real ones (1.0 = as varied as the real set).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ganlab import checkpoint, data, track
from ganlab.device import pick_device
from ganlab.eval import protocol
from ganlab.generator import generate, load_generator


def pairwise(x: torch.Tensor) -> torch.Tensor:
    f = x.float().flatten(1) / 255.0
    d = torch.cdist(f, f) / f.shape[1] ** 0.5
    d.fill_diagonal_(float("inf"))
    return d


def coverage(fake_rgb: torch.Tensor, real_rgb: torch.Tensor) -> dict:
    n = min(len(fake_rgb), len(real_rgb))
    df, dr = pairwise(fake_rgb[:n]), pairwise(real_rgb[:n])
    # half the typical real-to-real nearest-neighbour distance (real sets hold near-twins, e.g.
    # skin-tone variants, so their single closest pair is too strict a bar)
    threshold = 0.5 * dr.min(1).values.median().item()
    nn_fake = df.min(1).values
    mean = lambda d: d[torch.isfinite(d)].mean().item()
    return {"dup_rate": (nn_fake < threshold).float().mean().item(), "diversity": mean(df) / mean(dr), "n": n}


def study(run_dir: Path, n: int, out: Path, device: str = "auto") -> dict:
    events = track.read_events(run_dir)
    best = checkpoint.load(run_dir / "best.pt")
    dev = pick_device(device)
    g, info = load_generator(run_dir / "generator.pt", dev)
    cfg = info["config"]
    images = data.load_images(cfg.data, cfg.seed)
    ev = protocol.Evaluator(cfg, images.holdout, dev)
    handed = ev(g)  # the handed-over generator, re-measured
    z = torch.randn(n, cfg.model.nz, generator=torch.Generator().manual_seed(99))
    fake = generate(g, z, cfg.data.alpha, dev)
    cov = coverage(protocol.composite(fake, "checker"), protocol.composite(images.holdout, "checker"))
    name = run_dir.name.rsplit("-", 3)[0]
    protocol.save_grid(fake[:64], out / f"{name}_best.png")
    evals = [(e["step"], e.get(cfg.selection.metric)) for e in events if e["kind"] in ("eval", "improved")]
    signals = [e for e in events if e["kind"] in ("collapse_signal", "rollback", "early_stop")]
    return {
        "run": name,
        "run_dir": str(run_dir),
        "signature": ev.signature_hash,
        "best_step": best["step"],
        "best_value": best["best"]["value"],
        "handed_over": handed,
        "handed_step": info["step"],
        "coverage": cov,
        "evals": evals,
        "signals": [(e["step"], e["kind"], e["detail"]) for e in signals],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/study"))
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    a = p.parse_args(argv)
    rows = [study(r, a.samples, a.out, a.device) for r in a.runs]
    if len({r["signature"] for r in rows}) != 1:
        print(
            "warning: the runs have different evaluation signatures; their metrics are not comparable", file=sys.stderr
        )
    print(
        "| run | best fid (step) | handed-over fid | fid_alpha | kid | dup_rate | diversity | collapse signals / rollbacks |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        h, c = r["handed_over"], r["coverage"]
        sig = sum(1 for s in r["signals"] if s[1] == "collapse_signal")
        rb = sum(1 for s in r["signals"] if s[1] == "rollback")
        print(
            f"| {r['run']} | {r['best_value']:.4g} ({r['best_step']}) | {h['fid']:.4g} | {h.get('fid_alpha', float('nan')):.4g} "
            f"| {h.get('kid', float('nan')):.4g} | {c['dup_rate']:.3f} | {c['diversity']:.3f} | {sig} / {rb} |"
        )
    for r in rows:
        print(f"\n{r['run']} trajectory: " + ", ".join(f"{s}:{v:.3g}" for s, v in r["evals"] if v is not None))
    (a.out / "study.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
