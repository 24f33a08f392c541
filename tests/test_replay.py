"""Selection replayed on recorded curves (a fixed subset of PyTorch-StudioGAN's published logs,
tests/fixtures/studiogan_subset.json, MIT): with ganlab's default rule, runs that blow up late are
signalled within a few evaluations of the blow-up and hand over their best, runs that improve to the
end are never signalled, and no rule stops before the best on them."""

import json
from pathlib import Path

from ganlab import config, replay

RUNS = json.loads((Path(__file__).parent / "fixtures" / "studiogan_subset.json").read_text())["runs"]


def default_rule(**over):
    s = config.Config().selection
    rule = {"patience": s.patience, "collapse_factor": s.collapse_factor, "collapse_evals": s.collapse_evals, **over}
    return replay.selector(**rule)


def test_the_default_rule_signals_late_blow_ups_and_never_an_improving_run():
    booms = [r for r in RUNS if replay.blows_up_late(r["fid"]) is not None]
    improvers = [r for r in RUNS if replay.improves_to_the_end(r["fid"])]
    assert len(booms) >= 3 and len(improvers) >= 2
    for r in booms:
        o = replay.replay(r["fid"], default_rule())
        assert o.alarm is not None and o.alarm <= replay.blows_up_late(r["fid"]) + 3, r["name"]
        assert o.regret == 0.0 and o.used < 1.0, r["name"]  # stopped, with the best handed over
    for r in improvers:
        o = replay.replay(r["fid"], default_rule())
        assert o.alarm is None and o.used == 1.0 and o.regret < 0.01, r["name"]


def test_the_old_collapse_factor_caught_fewer_blow_ups_on_these_curves():
    def caught(factor):  # signalled at most 3 evaluations after the blow-up starts
        return sum(
            replay.replay(r["fid"], default_rule(collapse_factor=factor)).alarm <= replay.blows_up_late(r["fid"]) + 3
            for r in RUNS
            if replay.blows_up_late(r["fid"]) is not None
        )

    assert caught(1.5) == 5 > caught(2.0)


def test_patience_trades_quality_for_evaluations_on_a_long_run():
    """A run whose FID plateaus and then improves again: patience 5 stops on the plateau and hands
    over a worse generator; off, it trains to the best."""
    curve = [100, 50, 30, 20, 19.9, 19.95, 19.9, 19.92, 19.91, 19.93, 19.9, 15, 10]
    assert replay.replay(curve, default_rule(patience=0)).regret == 0.0
    stopped = replay.replay(curve, default_rule(patience=5))
    assert stopped.used < 1.0 and stopped.regret > 0.5
