"""Benchmark of the domain encoder's budget (docs/benchmarks.md): how long it takes to train on a
dataset's training split, and how many images a second each extractor scores in an evaluation.

    python scripts/bench_encoder.py --data ../shared/datasets/twemoji64 --images 1000

Training runs in a fresh cache folder (nothing reused), with the shipped recipe. Throughput is the
median over --rounds of `Evaluator.metrics_for` on --images generated-size images with the real
side cached (FID only, no alpha pass): what one evaluation costs beyond generating the images, for
the domain encoder and for InceptionV3 with random weights (the same architecture and cost as
standard InceptionV3), one after the other in this process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from ganlab import config, data
from ganlab.bench import machine_info
from ganlab.eval import encoder, protocol


def throughput(cfg, images: data.ImageSet, n: int, rounds: int) -> float:
    ev = protocol.Evaluator(cfg, images.holdout, "cpu")
    fake = images.train[torch.randperm(len(images.train), generator=torch.Generator().manual_seed(0))[:n]]
    ev.metrics_for(fake[:8])  # the real side's statistics, once
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ev.metrics_for(fake)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--random-images", type=int, default=200, help="images for the (slow) random InceptionV3")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        sets = [
            f"data.root={a.data}",
            f"data.image_size={a.size}",
            f"data.cache_dir={cache}",
            "eval.metrics=fid",
            "eval.fid_alpha=false",
            "eval.batch_size=100",
        ]
        cfg = config.load(None, sets + ["eval.feature_extractor=domain"])
        images = data.load_images(cfg.data, cfg.seed)
        t0 = time.time()
        path, card = encoder.ensure(cfg)
        out = {
            "machine": machine_info(torch.device("cpu")),
            "train_split": len(images.train),
            "encoder_train_s": round(time.time() - t0, 1),
            "recipe": card["recipe"],
            "domain_images_per_s": round(throughput(cfg, images, a.images, a.rounds), 1),
        }
        rnd = config.load(None, sets + ["eval.feature_extractor=inception-v3-random"])
        out["random_inception_images_per_s"] = round(throughput(rnd, images, a.random_images, 1), 1)
        out["ratio"] = round(out["domain_images_per_s"] / out["random_inception_images_per_s"], 1)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
