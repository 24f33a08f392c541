"""A real run with a collapse forced partway through, to show that ganlab detects it, rolls back and
hands over the best generator (issue 10's end-to-end check).

    python scripts/forced_collapse.py experiments/recommended.yaml --spike-from 900 --spike-to 1000 \
        --factor 50 --set data.root=../shared/datasets/twemoji64 --set train.steps=1500

The collapse is forced through a test-only hook: the learning-rate schedule (a pure function of
the step, ganlab.trainer.lr_factor) is multiplied by FACTOR between two steps, as a mistyped LR or
a bad warm restart would. Nothing else about the run changes; the product code carries no hook.
"""

from __future__ import annotations

import argparse
import json

from ganlab import config, trainer
from ganlab.track import read_events
from ganlab.train import train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment")
    p.add_argument("--spike-from", type=int, required=True)
    p.add_argument("--spike-to", type=int, required=True)
    p.add_argument("--factor", type=float, default=50.0)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args(argv)
    cfg = config.load(a.experiment, a.set)
    base = trainer.lr_factor

    def spiked(step, cfg_train):
        f = base(step, cfg_train)
        return f * a.factor if a.spike_from <= step < a.spike_to else f

    trainer.lr_factor = spiked
    res = train(cfg, quiet=True, experiment_file=a.experiment)
    decisions = [
        e
        for e in read_events(res.run_dir)
        if e["kind"] in ("improved", "eval", "collapse_signal", "rollback", "early_stop", "finished")
    ]
    print(
        json.dumps(
            {
                "run_dir": str(res.run_dir),
                "stopped": res.stopped,
                "best": res.best,
                "best_step": res.best_step,
                "rollbacks": res.rollbacks,
                "decisions": [(e["step"], e["kind"], e["detail"]) for e in decisions],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
