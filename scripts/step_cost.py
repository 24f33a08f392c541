"""What each arm of a study costs in training steps on this machine (issue 35): every arm's step timed
side by side in one process, rounds alternating so machine noise hits them alike, on the built-in
sprites at the base experiment's size. Prints the median ms a step and each run's step time (ms a step x
its steps) as a ratio to the first arm. Evaluation, the encoder and tracking are not in it: the main
job's whole wall time is scripts/bench_main_job.py's.

    python scripts/step_cost.py experiments/studies/mainjob.yaml --arms default d16b32 d16b32s3k
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ganlab import config as config_mod  # noqa: E402
from ganlab import data  # noqa: E402
from ganlab.trainer import Trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_study import base_experiment, load_study, overrides  # noqa: E402


def timed(trainer: Trainer, start: int, steps: int) -> float:
    t0 = time.perf_counter()
    for s in range(start, start + steps):
        trainer.step(s)
    return (time.perf_counter() - t0) / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--arms", nargs="+", default=None, help="default: every arm; the first is the reference")
    ap.add_argument("--steps", type=int, default=30, help="steps per arm and round")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    study = load_study(a.study)
    base = base_experiment(a.study, study)
    arms = a.arms or list(study["arms"])
    cfgs = {arm: config_mod.load(base, overrides(study, arm, 0, []), check_paths=False) for arm in arms}
    size = cfgs[arms[0]].data.image_size
    images = data.make_sprites(2048, size, seed=0)
    trainers = {arm: Trainer(cfg, images, torch.device("cpu")) for arm, cfg in cfgs.items()}
    done = dict.fromkeys(arms, 0)
    times = {arm: [] for arm in arms}
    for r in range(a.rounds + 1):  # round 0 warms up (first-call costs) and is not counted
        for arm in arms:
            t = timed(trainers[arm], done[arm], a.steps if r else 3)
            done[arm] += a.steps if r else 3
            if r:
                times[arm].append(t)
    ref = statistics.median(times[arms[0]]) * cfgs[arms[0]].train.steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.rounds} rounds of {a.steps} steps")
    for arm in arms:
        ms = statistics.median(times[arm]) * 1000
        steps = cfgs[arm].train.steps
        print(
            f"{arm:<12} {ms:7.1f} ms/step  batch {cfgs[arm].train.batch_size:>3}  x {steps:>5} steps = "
            f"{ms * steps / 1000:6.1f} s  ({ms * steps / 1000 / ref:.2f} x {arms[0]})"
        )


if __name__ == "__main__":
    main()
