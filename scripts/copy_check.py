"""Validate the copy check (ganlab/eval/copies.py) on real images, through the evaluator's own path:
held-out images play the generator. Half of the held-out split (A) is the reference no model saw;
the other half (B) is the "generated" set, as is, or with 5% of it replaced by exact training images
(planted copies), or by training images shifted 2 pixels (near copies). Seeds draw the halves and
the planted images. Prints mean and SD of copy_share over seeds and the separation in SDs.

    python scripts/copy_check.py --data ../shared/datasets/twemoji64 [--holdout 0.1] [--seeds 10]
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
    a = ap.parse_args()
    cfg = config.load("experiments/recommended.yaml", [f"data.root={a.data}", f"data.holdout={a.holdout}",
                                                       "tracking.enabled=false"])
    images = data.load_images(cfg.data, cfg.seed)
    ev = protocol.Evaluator(cfg, images.holdout, "cpu", images=images)
    train = ev.copies.train
    shifted = torch.roll(images.train, shifts=(2, 2), dims=(2, 3))      # near copies: 2 px off
    kinds = {"none": None, "exact": ev.features(images.train), "shifted": ev.features(shifted)}
    held = ev.features(images.holdout)
    q = cfg.eval.copy_quantile
    res = {k: [] for k in kinds}
    for seed in range(a.seeds):
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(held), generator=g)
        ref_idx, test_idx = perm[: len(held) // 2], perm[len(held) // 2:]
        ref = copies.reference(train, held[ref_idx], q)
        k = int(round(a.plant * len(test_idx)))
        picks = torch.randperm(len(train), generator=g)[:k]
        for kind, feats in kinds.items():
            test = held[test_idx].clone()
            if feats is not None:
                test[:k] = feats[picks]
            res[kind].append(ref.measure(test)["copy_share"])
    out = {"data": a.data, "holdout": a.holdout, "n_reference": len(held) // 2, "n_test": len(held) - len(held) // 2,
           "planted": a.plant, "quantile": q, "seeds": a.seeds, "extractor": ev.extractor.name}
    sd_none = statistics.stdev(res["none"])
    for kind, v in res.items():
        m, sd = statistics.fmean(v), statistics.stdev(v)
        out[kind] = {"mean": m, "sd": sd}
        sep = (m - statistics.fmean(res["none"])) / max(sd, sd_none) if kind != "none" else 0.0
        print(f"{kind:>8}: copy_share {m:.4f} +/- {sd:.4f} (SD over {a.seeds} seeds)"
              + (f"; above none by {sep:.1f} x the larger SD" if kind != "none" else ""))
        out[kind]["separation_sds"] = sep
    print(json.dumps(out))
    if a.json:
        open(a.json, "w").write(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
