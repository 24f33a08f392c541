"""Benchmark of one run on several processes (docs/benchmarks.md): training images per second of the
same experiment in one process and with `ganlab train --nproc N`, alternating rounds.

    python scripts/bench_ddp.py --nproc 2 --steps 300 --rounds 2 --out /tmp/bench_ddp

Each contender trains `experiments/default.yaml` (the same global batch) for --steps steps with
tracking off and no evaluation in the window; its speed is the median of the img/s that the run logs
every 50 steps, the first interval (start-up) left out. On a CPU, one process uses every core and N
processes get cores / N threads each, so the ratio is what DDP's communication costs there; on a
machine with N GPUs it is the speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from ganlab import config
from ganlab.bench import machine_info
from ganlab.eval import encoder

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "default.yaml"


def img_per_s(out: Path, nproc: int, steps: int) -> float:
    sets = [
        "eval.every=0",
        "tracking.enabled=false",
        "train.log_every=50",
        f"tracking.runs_dir={out / 'runs'}",
        f"data.cache_dir={out / 'cache'}",
    ]
    cmd = [
        sys.executable,
        "-m",
        "ganlab.cli",
        "train",
        str(EXPERIMENT),
        "--quiet",
        "--stop-at",
        str(steps),
        "--nproc",
        str(nproc),
        *[a for s in sets for a in ("--set", s)],
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    run = Path(next(ln for ln in p.stdout.splitlines() if ln.startswith("run folder: "))[len("run folder: ") :])
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["img_per_s"] for r in rows[1:] if "img_per_s" in r)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_ddp"))
    a = p.parse_args(argv)
    # the run builds its evaluator (the domain encoder) before training: train it once, outside the clock
    encoder.ensure(config.load(EXPERIMENT, [f"data.cache_dir={a.out / 'cache'}"]))
    speeds = {1: [], a.nproc: []}
    for _ in range(a.rounds):
        for n in (1, a.nproc):
            speeds[n].append(img_per_s(a.out, n, a.steps))
    one, many = statistics.median(speeds[1]), statistics.median(speeds[a.nproc])
    print(
        json.dumps(
            {
                "machine": machine_info(torch.device("cpu")),
                "steps": a.steps,
                "rounds": speeds,
                "img_per_s_1": round(one, 1),
                f"img_per_s_{a.nproc}": round(many, 1),
                "ratio": round(many / one, 3),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
