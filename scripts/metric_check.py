"""Can a feature space rank generators on this data? A validity report for each extractor (issue 11).

    python scripts/metric_check.py --data ../shared/datasets/twemoji64 --other ../shared/datasets/noto64 \
        --generator RUN/generator.pt --extractor inception-v3-random --extractor ENCODER.pt --out docs/metrics.md

For every extractor, with the held-out split of --data as the reference (as in a run), it measures:
- floor: FID between a draw of training images and the held-out set (two disjoint real draws);
- noise: the SD of FID over 5 latent seeds of one fixed generator (--generator) at --samples;
- sensitivity curves on a draw of training images: Gaussian noise, blur, alpha damage (eroded and
  feathered edges), mode dropping (keep 100/75/50/25% of K k-means clusters of the training set);
- another artist: --other (noto) against the held-out twemoji set, in units of the floor.
Every extractor sees the same images; the numbers come from torch-fidelity's own FID.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ganlab import config, data, evaluate
from ganlab.generator import generate, load_generator


def blur(u8: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return u8
    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-(torch.arange(-r, r + 1).float() ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = u8.float()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, [r, r, 0, 0], mode="replicate"), k.expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(F.pad(x, [0, 0, r, r], mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x.round().clamp(0, 255).to(torch.uint8)


def gaussian_noise(u8: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rgb = u8[:, :3].float() + std * torch.randn(u8[:, :3].shape, generator=g)
    return torch.cat([rgb.round().clamp(0, 255).to(torch.uint8), u8[:, 3:]], 1)


def erode_alpha(u8: torch.Tensor, px: int) -> torch.Tensor:
    if px <= 0:
        return u8
    a = u8[:, 3:].float()
    a = -F.max_pool2d(-a, 2 * px + 1, stride=1, padding=px)
    return torch.cat([u8[:, :3], a.to(torch.uint8)], 1)


def feather_alpha(u8: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.cat([u8[:, :3], blur(u8[:, 3:], sigma)], 1)


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        lab = torch.cdist(x, centres).argmin(1)
        for j in range(k):
            if (lab == j).any():
                centres[j] = x[lab == j].mean(0)
    return torch.cdist(x, centres).argmin(1)


def mode_drop(train: torch.Tensor, n: int, keep_frac: float, k: int = 8, seed: int = 0) -> torch.Tensor:
    """n images drawn only from the first round(k * keep_frac) of k pixel-space clusters."""
    small = F.interpolate(evaluate.composite(train, "checker").float(), size=(16, 16), mode="area").flatten(1) / 255
    lab = kmeans(small, k, seed=seed)
    kept = torch.nonzero(lab < max(1, round(k * keep_frac))).flatten()
    g = torch.Generator().manual_seed(seed + 1)
    return train[kept[torch.randint(len(kept), (n,), generator=g)]]


def load_set(root: str, cfg) -> data.ImageSet:
    c = config.load(None, [f"data.root={root}", f"data.image_size={cfg.data.image_size}",
                           f"data.cache_dir={cfg.data.cache_dir}"])
    return data.load_images(c.data, c.seed)


def draw(u8: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return u8[torch.randperm(len(u8), generator=g)[:n]]


def check(extractor: str, args) -> dict:
    cfg = config.load(None, [f"data.root={args.data}", f"eval.feature_extractor={extractor}", "eval.metrics=fid",
                             "eval.fid_alpha=false", f"eval.num_samples={args.samples}", "eval.batch_size=50",
                             f"data.cache_dir={args.cache}"])
    images = data.load_images(cfg.data, cfg.seed)
    ev = evaluate.Evaluator(cfg, images.holdout, "cpu")
    fid = lambda u8: ev.metrics_for(u8)["fid"]                      # noqa: E731
    t0 = time.time()
    base = draw(images.train, args.samples, 0)
    out = {"extractor": ev.extractor["name"], "floor": fid(base)}
    if args.generator:
        g, _ = load_generator(args.generator)
        vals = [fid(generate(g, torch.randn(args.samples, g.nz, generator=torch.Generator().manual_seed(100 + s)),
                             cfg.data.alpha, "cpu")) for s in range(5)]
        out["generator_fid"], out["noise_sd"] = statistics.mean(vals), statistics.stdev(vals)
    out["noise"] = [(s, fid(gaussian_noise(base, s))) for s in (0, 8, 16, 32, 64)]
    out["blur"] = [(s, fid(blur(base, s))) for s in (0, 0.5, 1.0, 1.5, 2.0)]
    out["erode_alpha"] = [(p, fid(erode_alpha(base, p))) for p in (0, 1, 2, 3)]
    out["feather_alpha"] = [(s, fid(feather_alpha(base, s))) for s in (0, 0.75, 1.5, 3.0)]
    out["mode_drop"] = [(f, fid(mode_drop(images.train, args.samples, f))) for f in (1.0, 0.75, 0.5, 0.25)]
    if args.other:
        out["other_artist"] = fid(draw(load_set(args.other, cfg).train, args.samples, 0))
    out["seconds"] = time.time() - t0
    print(json.dumps(out), flush=True)
    return out


def monotone(curve) -> bool:
    v = [x for _, x in curve]
    return all(b > a for a, b in zip(v, v[1:]))


def table(rows: list[dict]) -> str:
    head = ("| extractor | floor | noise SD (5 seeds) | noise | blur | erode alpha | feather alpha | mode drop "
            "(100/75/50/25%) | 50% drop / noise SD | noto / floor | seconds |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    fmt = lambda c: " ".join(f"{x:.3g}" for _, x in c) + (" (monotone)" if monotone(c) else " (**not** monotone)")  # noqa: E731
    for r in rows:
        sd = r.get("noise_sd")
        drop = dict(r["mode_drop"])
        other = f"{r['other_artist'] / max(r['floor'], 1e-12):.1f}x" if "other_artist" in r else "-"
        lines.append(f"| {r['extractor']} | {r['floor']:.4g} | {'-' if sd is None else f'{sd:.3g}'} | {fmt(r['noise'])} | "
                     f"{fmt(r['blur'])} | {fmt(r['erode_alpha'])} | {fmt(r['feather_alpha'])} | {fmt(r['mode_drop'])} | "
                     f"{'-' if not sd else f'{(drop[0.5] - drop[1.0]) / sd:.1f}x'} | "
                     f"{other} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--other", help="another artist's set (noto64)")
    p.add_argument("--generator", help="a generator.pt, for the noise over latent seeds")
    p.add_argument("--extractor", action="append", required=True)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--cache", default=".ganlab_cache")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    rows = [check(e, a) for e in a.extractor]
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
