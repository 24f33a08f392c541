"""A second feature space for the main job's study (issue 35): Frechet distance in pixel space, on 8x8
average-pooled straight RGBA (256 numbers an image: where the shape is, its size, its colour and its
transparency; nothing learned), between a run's handed-over generator and 4,096 fresh built-in sprites
(the data distribution itself, another seed than any run's data).

    python scripts/pixel_fd.py docs/data/mainjob.jsonl            # one pixel_fd per row, paired by seed
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ganlab.eval import stats  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_grids import real_sprites, samples  # noqa: E402


def pixel_features(u8: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(u8.float() / 255.0, 8).flatten(1).double()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", type=Path)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--json", type=Path, default=None, help="also write {arm: {seed: pixel FD}} here")
    a = ap.parse_args(argv)
    rows = [json.loads(x) for x in a.rows.read_text().splitlines() if x.strip()]
    real = pixel_features(real_sprites(a.n))
    out = {}
    for r in rows:
        fake = pixel_features(samples(Path(r["run_dir"]), a.n, seed=4242))
        out[(r["arm"], r["seed"])] = stats.fid(real, fake)
        print(f"seed {r['seed']} {r['arm']:<10} pixel FD {out[(r['arm'], r['seed'])]:.5f}", flush=True)
        if a.json:  # rewritten after every row: a cut run keeps what it measured
            by_arm = {}
            for (arm, seed), v in out.items():
                by_arm.setdefault(arm, {})[seed] = v
            a.json.write_text(json.dumps(by_arm, indent=1))
    arms = sorted({k[0] for k in out})
    base = "default" if "default" in arms else arms[0]
    for arm in arms:
        if arm == base:
            continue
        d = [math.log(out[(arm, s)] / out[(base, s)]) for (a_, s) in out if a_ == arm and (base, s) in out]
        print(
            f"{arm} vs {base}: pixel FD change {100 * math.expm1(sum(d) / len(d)):+.1f}% over {len(d)} pairs, "
            f"lower on {sum(x < 0 for x in d)} of {len(d)}"
        )


if __name__ == "__main__":
    main()
