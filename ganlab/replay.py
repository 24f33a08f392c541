"""Selection replayed on recorded training curves: a metric trajectory fed to a `Selector` as the
loop feeds it, evaluation by evaluation, with no training behind it. What a rule would have handed
over, when it would have stopped, and when it would have raised a collapse signal. Used by
scripts/selection_replay.py on PyTorch-StudioGAN's published logs (docs/selection.md).

A replay cannot train past a rollback, so a collapse signal ends the replayed run (as
`on_collapse: stop` does) and hands over the best so far. `noise_rel` stands in for the measured
noise band of `min_delta: auto`: the metric's latent-noise SD as a share of its value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import config as config_mod
from . import select


@dataclass
class Outcome:
    handed_over: int  # index of the evaluation handed over
    stop: int  # index of the last evaluation the rule asked for
    alarm: int | None  # index of the first collapse signal, if any
    regret: float  # the handed-over value over the curve's best, minus 1 (min metrics)
    used: float  # share of the curve's evaluations the rule needed


def selector(patience: int, collapse_factor: float, collapse_evals: int, metric: str = "fid") -> select.Selector:
    cfg = config_mod.load(
        None,
        [
            f"selection.metric={metric}",
            f"selection.patience={patience}",
            f"selection.collapse_factor={collapse_factor}",
            f"selection.collapse_evals={collapse_evals}",
            "selection.on_collapse=stop",
            "selection.min_delta=auto",
            "selection.keep_top=1",
        ],
        check_paths=False,
    )
    return select.Selector.from_config(cfg)


def replay(values: list[float], sel: select.Selector, noise_rel: float = 0.0) -> Outcome:
    """Feed `values` (one per evaluation, a min metric) to `sel` until it stops."""
    alarm, stop = None, len(values) - 1
    for i, v in enumerate(values):
        if sel.best is not None:  # the band min_delta auto would measure around the current best
            sel.state.noise_band, sel.state.noise_band_at = select.NOISE_BAND_PER_SD * noise_rel * sel.best, sel.best
        dec = sel.on_eval(i, {sel.config.metric: v})
        if alarm is None and any(kind == "collapse_signal" for kind, _, _ in dec.events):
            alarm = i
        if dec.stop:
            stop = i
            break
    best = min(v for v in values if math.isfinite(v))
    handed = sel.best_step if sel.best_step >= 0 else 0
    return Outcome(handed, stop, alarm, values[handed] / best - 1.0, (stop + 1) / len(values))


def blows_up_late(values: list[float], factor: float = 1.5) -> int | None:
    """Index where a curve that had improved first exceeds `factor` x its best so far, after at least a
    fifth of the run (its late blow-up); None when it never does."""
    best = math.inf
    for i, v in enumerate(values):
        if i >= len(values) // 5 and v > factor * best:
            return i
        best = min(best, v)
    return None


def improves_to_the_end(values: list[float]) -> bool:
    """The curve's best lies in its last tenth: any stop or alarm before the end costs quality."""
    i_best = min(range(len(values)), key=values.__getitem__)
    return i_best >= len(values) - max(1, len(values) // 10)
