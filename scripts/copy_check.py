"""Validate the copy check (ganlab/eval/copies.py) on real images, through the evaluator's own path:
held-out images play the generator. Half of the held-out split (A) is the reference no model saw;
the other half (B) is the "generated" set, as is, or with 5% of it replaced by exact training images
(planted copies), or by training images shifted 2 pixels (near copies). Seeds draw the halves and
the planted images. Prints mean and SD of copy_share over seeds and the separation in SDs.

    python scripts/copy_check.py --data ../shared/datasets/twemoji64 [--holdout 0.1] [--seeds 10]

With --generators RUN/generator.pt ..., the regime of a run instead: the reference is the whole
held-out split (as in a run) and the "generated" set is a trained generator's samples (2,000 fresh
latents per seed, as recommended.yaml evaluates), as is or with 5% replaced by training images.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from ganlab import config, data
from ganlab.eval import copies, protocol


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--holdout", type=float, default=0.1, help="data.holdout (the run's split: 0.1)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--plant", type=float, default=0.05)
    ap.add_argument("--json", default="")
    ap.add_argument("--generators", nargs="*", default=[], help="generator.pt files: validate on their samples")
    a = ap.parse_args()
    cfg = config.load(
        "experiments/recommended.yaml", [f"data.root={a.data}", f"data.holdout={a.holdout}", "tracking.enabled=false"]
    )
    images = data.load_images(cfg.data, cfg.seed)
    ev = protocol.Evaluator(cfg, images.holdout, "cpu", images=images)
    train = ev.copies.train
    shifted = torch.roll(images.train, shifts=(2, 2), dims=(2, 3))  # near copies: 2 px off
    kinds = {"none": None, "exact": ev.features(images.train), "shifted": ev.features(shifted)}
    held = ev.features(images.holdout)
    q = cfg.eval.copy_quantile
    if a.generators:
        return report(
            a, ev.extractor.name, q, on_samples(a, ev, kinds), {"reference": len(held), "test": cfg.eval.num_samples}
        )
    res = {k: [] for k in kinds}
    for seed in range(a.seeds):
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(held), generator=g)
        ref_idx, test_idx = perm[: len(held) // 2], perm[len(held) // 2 :]
        ref = copies.reference(train, held[ref_idx], q)
        k = int(round(a.plant * len(test_idx)))
        picks = torch.randperm(len(train), generator=g)[:k]
        for kind, feats in kinds.items():
            test = held[test_idx].clone()
            if feats is not None:
                test[:k] = feats[picks]
            res[kind].append(ref.measure(test)["copy_share"])
    report(a, ev.extractor.name, q, res, {"reference": len(held) // 2, "test": len(held) - len(held) // 2})


def on_samples(a, ev, kinds) -> dict:
    """copy_share of each generator's samples over seeds (latent draws), as is and with planted copies."""
    from ganlab.generator import generate, load_generator

    res = {k: [] for k in kinds}
    n = ev.cfg.eval.num_samples
    for path in a.generators:
        g, info = load_generator(path)
        for seed in range(a.seeds):
            z = torch.randn(n, ev.cfg.model.nz, generator=torch.Generator().manual_seed(10_000 + seed))
            fake = ev.features(generate(g, z, info["config"].data.alpha, "cpu", ev.cfg.eval.batch_size))
            k = int(round(a.plant * n))
            picks = torch.randperm(len(ev.copies.train), generator=torch.Generator().manual_seed(seed))[:k]
            for kind, feats in kinds.items():
                test = fake.clone()
                if feats is not None:
                    test[:k] = feats[picks]
                res[kind].append(ev.copies.measure(test)["copy_share"])
    return res


def report(a, extractor: str, q: float, res: dict, sizes: dict):
    out = {
        "data": a.data,
        "holdout": a.holdout,
        "n_reference": sizes["reference"],
        "n_test": sizes["test"],
        "planted": a.plant,
        "quantile": q,
        "seeds": a.seeds,
        "extractor": extractor,
        "generators": a.generators,
    }
    sd_none = statistics.stdev(res["none"])
    for kind, v in res.items():
        m, sd = statistics.fmean(v), statistics.stdev(v)
        out[kind] = {"mean": m, "sd": sd}
        # a spread of 0 (no sample ever flagged) counts as one flagged sample's worth
        sep = (m - statistics.fmean(res["none"])) / max(sd, sd_none, 1 / sizes["test"]) if kind != "none" else 0.0
        print(
            f"{kind:>8}: copy_share {m:.4f} +/- {sd:.4f} (SD over {len(v)} draws)"
            + (f"; above none by {sep:.1f} x the larger SD" if kind != "none" else "")
        )
        out[kind]["separation_sds"] = sep
    print(json.dumps(out))
    if a.json:
        open(a.json, "w").write(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
