
import pytest
import torch

from ganlab import checkpoint, config, evaluate, train
from ganlab.select import Selector
from ganlab.track import read_events


def selector(*sets):
    return Selector.from_config(config.load(None, list(sets)))


def test_early_stop_after_patience():
    s = selector("selection.patience=3")
    decisions = [s.on_eval(i, {"fid": v}) for i, v in enumerate([10, 8, 9, 8.5, 8.1])]
    assert [d.improved for d in decisions] == [True, True, False, False, False]
    assert [bool(d.stop) for d in decisions] == [False, False, False, False, True]
    assert "patience 3" in decisions[-1].stop


def test_min_delta_and_max_mode():
    s = selector("selection.min_delta=0.5")
    assert s.on_eval(0, {"fid": 10}).improved and not s.on_eval(1, {"fid": 9.8}).improved
    s = selector("selection.metric=isc")
    assert s.mode == "max" and s.on_eval(0, {"isc": 1}).improved and s.on_eval(1, {"isc": 2}).improved


def test_metric_collapse_signal_and_rollback_decision():
    s = selector("selection.collapse_factor=2", "selection.collapse_evals=2")
    s.on_eval(0, {"fid": 10})
    assert not s.on_eval(1, {"fid": 25}).rollback
    d = s.on_eval(2, {"fid": 30})
    assert d.rollback and any(k == "collapse_signal" for k, _, _ in d.events)


def users_log():
    """Diagnostics shaped like the user's epoch 40: healthy, then D wins and loss_g spikes."""
    healthy = [{"loss_d": 0.3, "loss_g": 6.0 + 0.1 * i, "d_real": 0.9, "d_fake": 0.1} for i in range(10)]
    spike = [{"loss_d": 0.005, "loss_g": v, "d_real": 0.99, "d_fake": 0.003} for v in (32.6, 44.5, 45.9, 40, 24)]
    return healthy + spike


def test_discriminator_dominance_is_detected_from_the_users_log():
    s = selector("selection.dominance_window=3")
    s.on_eval(0, {"fid": 5})
    decisions = [s.on_diagnostics(i, d) for i, d in enumerate(users_log())]
    fired = [i for i, d in enumerate(decisions) if d.rollback]
    assert fired == [12]                               # the third interval of the spike
    s2 = selector("selection.dominance_window=3", "selection.on_collapse=stop")
    s2.on_eval(0, {"fid": 5})
    assert any(s2.on_diagnostics(i, d).stop for i, d in enumerate(users_log()))


def test_healthy_training_never_signals():
    s = selector()
    s.on_eval(0, {"fid": 5})
    for i in range(200):
        d = {"loss_d": 0.5, "loss_g": 2 + (i % 7) * 0.3, "d_real": 0.7, "d_fake": 0.3}
        assert not s.on_diagnostics(i, d).events


def test_non_finite_loss_stops_without_best_and_rolls_back_with_one():
    s = selector()
    assert s.on_diagnostics(0, {"loss_d": float("nan"), "loss_g": 1, "d_real": .5, "d_fake": .5}).stop
    s.on_eval(1, {"fid": 3})
    assert s.on_diagnostics(2, {"loss_d": 1, "loss_g": float("inf"), "d_real": .5, "d_fake": .5}).rollback


def test_max_rollbacks_then_stop():
    s = selector("selection.max_rollbacks=1", "selection.collapse_evals=1")
    s.on_eval(0, {"fid": 1})
    assert s.on_eval(1, {"fid": 5}).rollback
    s.rolled_back()
    assert s.on_eval(2, {"fid": 5}).stop


def scripted(monkeypatch, values):
    """Evaluation returns these FIDs in order (the selection logic, checkpoints and rollback are real)."""
    it = iter(values)
    def fake_call(self, g):
        return {"fid": next(it), "eval_seconds": 0.0}
    monkeypatch.setattr(evaluate.Evaluator, "__call__", fake_call)


def test_scripted_collapse_rolls_back_to_best_exactly(tiny_cfg, monkeypatch):
    scripted(monkeypatch, [5.0, 3.0, 20.0, 25.0, 30.0, 30.0])
    restored = []
    orig = train.Trainer.load_state_dict
    def spy(self, s, rng=True):
        orig(self, s, rng)
        restored.append({k: v.clone() for k, v in self.g.state_dict().items()} |
                        {"d." + k: v.clone() for k, v in self.d.state_dict().items()})
    monkeypatch.setattr(train.Trainer, "load_state_dict", spy)
    cfg = tiny_cfg("train.steps=48", "selection.collapse_evals=2", "selection.collapse_factor=2",
                   "selection.max_rollbacks=1", "selection.rollback_lr_scale=0.5")
    res = train.train(cfg, quiet=True)
    ev = read_events(res.run_dir)
    rb = [e for e in ev if e["kind"] == "rollback"]
    assert len(rb) == 1 and rb[0]["step"] == 32 and rb[0]["restored_step"] == 16
    best = checkpoint.load(res.run_dir / "best.pt")
    assert best["step"] == 16
    want = best["trainer"]["g"] | {"d." + k: v for k, v in best["trainer"]["d"].items()}
    assert set(restored[0]) == set(want)
    for k in want:
        assert torch.equal(restored[0][k], want[k]), k
    last = checkpoint.load(res.run_dir / "last.pt")
    assert last["trainer"]["lr_scale"] == 0.5
    assert res.rollbacks == 1 and res.stopped == "early_stop"     # the second collapse exceeds max_rollbacks


def test_exported_generator_is_best_not_last(tiny_cfg, monkeypatch):
    scripted(monkeypatch, [1.0, 5.0, 6.0])
    res = train.train(tiny_cfg("selection.on_collapse=ignore"), quiet=True)
    assert res.best_step == 8
    gen = checkpoint.load(res.run_dir / "generator.pt")
    best = checkpoint.load(res.run_dir / "best.pt")["trainer"]["g"]
    last = checkpoint.load(res.run_dir / "last.pt")["trainer"]["g"]
    assert gen["step"] == 8
    weights = [k for k in best if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(gen["state_dict"][k], best[k]) for k in weights)
    assert not all(torch.equal(gen["state_dict"][k], last[k]) for k in weights)
    g, info = train.load_generator(res.run_dir / "generator.pt")
    assert info["step"] == 8


def test_early_stop_ends_the_run(tiny_cfg, monkeypatch):
    scripted(monkeypatch, [3.0, 4.0, 4.0, 4.0])
    res = train.train(tiny_cfg("selection.patience=2", "train.steps=200"), quiet=True)
    assert res.stopped == "early_stop" and res.step == 24
    assert [e["kind"] for e in read_events(res.run_dir)].count("early_stop") == 1


def test_spike_inside_an_interval_is_seen_through_its_worst_step():
    """Averaged over an interval the user's spike is mild (mean ~12); its worst step (46) is not."""
    s = selector()                                    # defaults: window 2, ratio 3
    s.on_eval(0, {"fid": 5})
    healthy = [{"loss_d": 0.05, "loss_g": 6 + 0.2 * i, "loss_g_max": 9, "d_real": 0.97, "d_fake": 0.03} for i in range(8)]
    epoch40 = [{"loss_d": 0.01, "loss_g": 12, "loss_g_max": m, "d_real": 0.99, "d_fake": 0.004} for m in (32.6, 45.9)]
    assert not any(s.on_diagnostics(i, d).events for i, d in enumerate(healthy))
    fired = [s.on_diagnostics(10 + i, d) for i, d in enumerate(epoch40)]
    assert not fired[0].rollback and fired[1].rollback
    assert "up to 45.9" in fired[1].events[0][1]


def test_eval_command_reports_the_run_protocol(tiny_cfg, capsys):
    import json
    from ganlab import cli
    res = train.train(tiny_cfg("train.steps=8"), quiet=True)
    assert cli.main(["eval", str(res.run_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 8 and out["signature"] and {"fid", "fid_alpha", "isc", "kid"} <= set(out["metrics"])
    assert out["metrics"]["fid"] == pytest.approx(res.best, rel=1e-5)       # same protocol, same generator


def test_a_long_dominance_episode_signals_once_when_ignored():
    s = selector("selection.on_collapse=ignore")
    s.on_eval(0, {"fid": 5})
    for i in range(5):
        s.on_diagnostics(i, {"loss_d": 0.3, "loss_g": 8, "loss_g_max": 10, "d_real": 0.9, "d_fake": 0.1})
    bad = {"loss_d": 0.01, "loss_g": 12, "loss_g_max": 30, "d_real": 0.99, "d_fake": 0.01}
    signals = sum(len(s.on_diagnostics(10 + i, bad).events) for i in range(10))
    assert signals == 1
