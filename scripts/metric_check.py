"""Can a feature space rank generators on this data? The validity report behind docs/metrics.md (issue 11).

    python scripts/metric_check.py --data ../shared/datasets/twemoji64 --other ../shared/datasets/noto64 \
        --generator RUN/generator.pt --checkpoints RUN/top --extractor auto --extractor inception-v3-random \
        --out docs/metrics.md

For every extractor, with the held-out split of --data as the reference (as in a run), it measures:
- floor: FID between a draw of training images and the held-out set (two disjoint real draws);
- noise: the SD of FID over --seeds latent seeds of one fixed generator (--generator) at --samples;
- sensitivity curves on a draw of training images: Gaussian noise, blur, alpha damage (eroded and
  feathered edges), mode dropping (keep 100/75/50/25% of K k-means clusters of the training set);
- another artist: --other (noto) against the held-out twemoji set, in units of the floor;
- ranking: every checkpoint in --checkpoints (a run's top/ folder, or files) on the same latents, and
  the Spearman correlation of each extractor's ranking with the others'.
Every extractor sees the same images; the numbers come from torch-fidelity's own FID. The first
--extractor is held to the targets: every curve monotone, a 50% mode drop at least 10x the noise SD,
the other artist at least 5x the floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ganlab import config, data
from ganlab.eval import protocol
from ganlab.eval.validity import blur, erode_alpha, feather_alpha, gaussian_noise, mode_drop, monotone, spearman
from ganlab.generator import generate, load_generator


def load_set(root: str, cfg) -> data.ImageSet:
    c = config.load(
        None, [f"data.root={root}", f"data.image_size={cfg.data.image_size}", f"data.cache_dir={cfg.data.cache_dir}"]
    )
    return data.load_images(c.data, c.seed)


def draw(u8: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return u8[torch.randperm(len(u8), generator=g)[:n]]


def checkpoints(spec: list[str]) -> list[Path]:
    files = []
    for item in spec or []:
        p = Path(item)
        files += sorted(p.glob("*.pt")) if p.is_dir() else [p]
    return files


def check(extractor: str, args) -> dict:
    cfg = config.load(
        None,
        [
            f"data.root={args.data}",
            f"eval.feature_extractor={extractor}",
            "eval.metrics=fid",
            "eval.fid_alpha=false",
            f"eval.num_samples={args.samples}",
            "eval.batch_size=50",
            f"data.cache_dir={args.cache}",
            f"data.image_size={args.size}",
        ],
    )
    images = data.load_images(cfg.data, cfg.seed)
    t0 = time.time()
    ev = protocol.Evaluator(cfg, images.holdout, "cpu")  # the domain encoder trains here on first use
    setup = time.time() - t0
    fid = lambda u8: ev.metrics_for(u8)["fid"]  # noqa: E731
    base = draw(images.train, args.samples, 0)
    out = {"extractor": ev.extractor.name, "asked": extractor, "setup_seconds": setup, "floor": fid(base)}
    t1 = time.time()
    fid(base)
    out["images_per_second"] = args.samples / (time.time() - t1)  # real side cached: the fake side only
    if args.generator:
        g, _ = load_generator(args.generator)
        vals = [
            fid(
                generate(
                    g,
                    torch.randn(args.samples, g.nz, generator=torch.Generator().manual_seed(100 + s)),
                    cfg.data.alpha,
                    "cpu",
                )
            )
            for s in range(args.seeds)
        ]
        out["generator_fid"], out["noise_sd"] = statistics.mean(vals), statistics.stdev(vals)
    out["noise"] = [(s, fid(gaussian_noise(base, s))) for s in (0, 8, 16, 32, 64)]
    out["blur"] = [(s, fid(blur(base, s))) for s in (0, 0.5, 1.0, 1.5, 2.0)]
    out["erode_alpha"] = [(p, fid(erode_alpha(base, p))) for p in (0, 1, 2, 3)]
    out["feather_alpha"] = [(s, fid(feather_alpha(base, s))) for s in (0, 0.75, 1.5, 3.0)]
    out["mode_drop"] = [(f, fid(mode_drop(images.train, args.samples, f))) for f in (1.0, 0.75, 0.5, 0.25)]
    if args.other:
        out["other_artist"] = fid(draw(load_set(args.other, cfg).train, args.samples, 0))
    z = None
    out["ranking"] = []
    for path in checkpoints(args.checkpoints):
        g, info = load_generator(path)
        z = (
            z
            if z is not None
            else torch.randn(args.samples, g.nz, generator=torch.Generator().manual_seed(cfg.eval.seed))
        )
        out["ranking"].append((info["step"], fid(generate(g, z, cfg.data.alpha, "cpu"))))
    out["seconds"] = time.time() - t0
    print(json.dumps(out), flush=True)
    return out


CURVES = (
    ("noise", "Gaussian noise (SD, 0-255)"),
    ("blur", "blur (sigma, px)"),
    ("erode_alpha", "erode alpha (px)"),
    ("feather_alpha", "feather alpha (sigma, px)"),
    ("mode_drop", "modes kept (share of 8 clusters)"),
)


def targets(r: dict) -> list[tuple[str, bool, str]]:
    drop = dict(r["mode_drop"])
    rise = drop[0.5] - drop[1.0]
    out = [(f"{title}: monotone", monotone(r[key]), " < ".join(f"{x:.4g}" for _, x in r[key])) for key, title in CURVES]
    if r.get("noise_sd"):
        out.append(
            (
                "50% mode drop >= 10x the noise SD",
                rise >= 10 * r["noise_sd"],
                f"{rise:.4g} = {rise / r['noise_sd']:.1f}x SD {r['noise_sd']:.3g}",
            )
        )
    if "other_artist" in r:
        out.append(
            (
                "other artist >= 5x the floor",
                r["other_artist"] >= 5 * r["floor"],
                f"{r['other_artist']:.4g} = {r['other_artist'] / r['floor']:.1f}x floor {r['floor']:.4g}",
            )
        )
    return out


def report(rows: list[dict], args) -> str:
    lines = [
        "| extractor | floor | noise SD | 50% drop / noise SD | other artist / floor | eval images/s | setup s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        drop = dict(r["mode_drop"])
        sd = r.get("noise_sd")
        lines.append(
            f"| {r['asked']} (`{r['extractor']}`) | {r['floor']:.4g} | {'-' if sd is None else f'{sd:.3g}'} | "
            f"{'-' if not sd else f'{(drop[0.5] - drop[1.0]) / sd:.1f}x'} | "
            f"{r['other_artist'] / r['floor']:.1f}x | {r['images_per_second']:.0f} | {r['setup_seconds']:.0f} |"
            if "other_artist" in r
            else f"| {r['asked']} | {r['floor']:.4g} | - | - | - | - | - |"
        )
    lines += ["", "Sensitivity curves (FID against the held-out set; each column one level, left to right):", ""]
    for key, title in CURVES:
        levels = " / ".join(f"{x:g}" for x, _ in rows[0][key])
        lines += [
            f"**{title}**, levels {levels}",
            "",
            "| extractor | FID at each level | in units of the floor | monotone |",
            "|---|---|---|---|",
        ]
        for r in rows:
            raw = " / ".join(f"{v:.4g}" for _, v in r[key])
            rel = " / ".join(f"{v / r['floor']:.2f}" for _, v in r[key])
            lines.append(f"| {r['asked']} | {raw} | {rel} | {'yes' if monotone(r[key]) else '**no**'} |")
        lines.append("")
    if rows[0]["ranking"]:
        steps = [s for s, _ in rows[0]["ranking"]]
        lines += [
            "Checkpoint ranking (one run's checkpoints on the same latents; rank 1 = best):",
            "",
            "| step | " + " | ".join(r["asked"] for r in rows) + " |",
            "|---" * (len(rows) + 1) + "|",
        ]
        for i, s in enumerate(steps):
            cells = []
            for r in rows:
                v = [x for _, x in r["ranking"]]
                cells.append(f"{v[i]:.4g} (#{sorted(v).index(v[i]) + 1})")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Spearman correlation between the extractors' rankings, and with training step order (later = better "
            "expected before any collapse):",
            "",
            "| | " + " | ".join(r["asked"] for r in rows) + " | -step |",
            "|---" * (len(rows) + 2) + "|",
        ]
        for a in rows:
            va = [x for _, x in a["ranking"]]
            lines.append(
                f"| {a['asked']} | "
                + " | ".join(f"{spearman(va, [x for _, x in b['ranking']]):.2f}" for b in rows)
                + f" | {spearman(va, [-s for s in steps]):.2f} |"
            )
        lines.append("")
    lines += [f"Targets for `{rows[0]['asked']}`:", "", "| target | met | figures |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if ok else '**no**'} | {fig} |" for name, ok, fig in targets(rows[0])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--other", help="another artist's set (noto64)")
    p.add_argument("--generator", help="a generator.pt, for the noise over latent seeds")
    p.add_argument("--checkpoints", action="append", help="a run's top/ folder or checkpoint files, to rank")
    p.add_argument("--extractor", action="append", required=True, help="the first one is held to the targets")
    p.add_argument("--samples", type=int, default=500, help="images per FID (the run protocol's eval.num_samples)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--cache", default=".ganlab_cache")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    p.add_argument("--out", type=Path, help="write the markdown report here (else print it)")
    a = p.parse_args(argv)
    rows = [check(e, a) for e in a.extractor]
    text = report(rows, a)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    if a.out:
        a.out.write_text(text)
    print(text)
    return 0 if all(ok for _, ok, _ in targets(rows[0])) else 1


if __name__ == "__main__":
    sys.exit(main())
