"""The selection policy on its own (ganlab/select.py): best, patience, the noise band's promise,
collapse signals per loss, rollback decisions. How they compose in the training loop: test_loop.py."""

import pytest
import torch
from conftest import selector

from ganlab import config, losses

# --------------------------------------------------------------------------------- best, patience


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


def test_max_rollbacks_then_stop():
    s = selector("selection.max_rollbacks=1", "selection.collapse_evals=1")
    s.on_eval(0, {"fid": 1})
    assert s.on_eval(1, {"fid": 5}).rollback
    s.rolled_back()
    assert s.on_eval(2, {"fid": 5}).stop


def test_a_selection_metric_that_eval_does_not_compute_is_one_line_at_load():
    with pytest.raises(config.ConfigError, match="'selection.metric' is 'kid', which eval does not compute"):
        config.load(None, ["selection.metric=kid", "eval.metrics=fid"])
    with pytest.raises(config.ConfigError, match="did you mean fid"):
        config.load(None, ["selection.metric=fdi"])
    config.load(None, ["selection.metric=recall", "eval.metrics=fid,prc"])


# ------------------------------------------------------------------------- D dominance, per loss


def interval(loss: str, real: torch.Tensor, fake: torch.Tensor, steps: int = 1) -> dict:
    """A diagnostics interval computed the way Trainer computes it, from D's raw outputs."""
    real_won, fake_won = losses.past_margin(loss, real, fake)
    g = losses.g_loss(loss, fake)
    return {
        "loss_d": float(losses.d_loss(loss, real, fake)),
        "loss_g": float(g),
        "loss_g_max": float(g),
        "d_real": float(losses.sigmoid_probs(real).mean()),
        "d_fake": float(losses.sigmoid_probs(fake).mean()),
        "logit_real": float(real.mean()),
        "logit_fake": float(fake.mean()),
        "critic_gap": float(real.mean() - fake.mean()),
        "real_past_margin": float(real_won),
        "fake_past_margin": float(fake_won),
    }


HEALTHY = {"bce": (0.6, 1.2), "hinge": (0.4, 0.8), "lsgan": (0.55, 0.35), "wgan-gp": (0.5, 1.0)}
WON = {"bce": 5.0, "hinge": 2.0, "lsgan": None, "wgan-gp": 40.0}  # D's outputs once it has won


def healthy(loss, g):
    mu, sd = HEALTHY[loss]
    if loss == "lsgan":
        return interval(
            loss, mu + 0.3 * torch.randn(64, generator=g) + 0.2, mu + 0.3 * torch.randn(64, generator=g) - 0.3
        )
    return interval(loss, mu + sd * torch.randn(64, generator=g), -mu + sd * torch.randn(64, generator=g))


def won(loss, g):
    if loss == "lsgan":  # targets 1 / 0 reached, and G's loss (fake - 1)^2 / 2 jumps
        return interval(loss, 1 + 0.03 * torch.randn(64, generator=g), 0.02 * torch.randn(64, generator=g))
    w = WON[loss]
    return interval(loss, w + 0.2 * torch.randn(64, generator=g), -w + 0.2 * torch.randn(64, generator=g))


@pytest.mark.parametrize("loss", ["bce", "hinge", "lsgan", "wgan-gp"])
def test_dominance_fires_for_every_loss_and_never_on_healthy_intervals(loss):
    g = torch.Generator().manual_seed(0)
    s = selector(f"train.loss={loss}", "model.d_norm=none")
    s.on_eval(0, {"fid": 5})
    for i in range(200):
        assert not s.on_diagnostics(i, healthy(loss, g)).events, i
    fired = [s.on_diagnostics(200 + i, won(loss, g)) for i in range(3)]
    assert [bool(d.rollback) for d in fired] == [False, True, False]  # window 2, once an episode
    assert fired[1].events[0][2]["signal"] == "d_dominance"


def test_dominance_needs_the_margin_shares_not_only_a_loss_spike():
    """A G-loss spike alone (D's outputs still inside the margins) is not a won D."""
    g = torch.Generator().manual_seed(0)
    s = selector("train.loss=bce")
    s.on_eval(0, {"fid": 5})
    for i in range(30):
        s.on_diagnostics(i, healthy("bce", g))
    spike = dict(healthy("bce", g), loss_g=40.0, loss_g_max=40.0)
    assert spike["real_past_margin"] < 0.9
    assert not any(s.on_diagnostics(30 + i, spike).rollback for i in range(4))


def test_a_re_collapse_right_after_a_rollback_is_seen():
    """The healthy history survives the rollback: a D that wins again in the next intervals is
    signalled at once (with the history cleared, these intervals became the new baseline)."""
    g = torch.Generator().manual_seed(0)
    s = selector("train.loss=bce")
    s.on_eval(0, {"fid": 5})
    for i in range(30):
        s.on_diagnostics(i, healthy("bce", g))
    assert [bool(s.on_diagnostics(30 + i, won("bce", g)).rollback) for i in range(2)] == [False, True]
    s.rolled_back()
    assert [bool(s.on_diagnostics(40 + i, won("bce", g)).rollback) for i in range(2)] == [False, True]


def test_a_bce_d_at_its_label_smoothed_optimum_has_won():
    """With label_smoothing s the real logit that bce rewards is ln((1 - s) / s): ln 9 = 2.197 for 0.1,
    below the unsmoothed margin 2.944, so a fixed margin could never be passed."""
    real, fake = torch.full((64,), 2.19), torch.full((64,), -5.0)
    assert float(losses.past_margin("bce", real, fake)[0]) == 0.0
    assert float(losses.past_margin("bce", real, fake, 0.1)[0]) == 1.0
    assert float(losses.past_margin("bce", torch.full((64,), 1.0), fake, 0.1)[0]) == 0.0  # not near the target
    assert float(losses.past_margin("lsgan", torch.full((64,), 0.85), torch.zeros(64), 0.1)[0]) == 1.0


def test_a_won_hinge_d_is_invisible_to_sigmoid_thresholds():
    """The old detector's premise: D(x) > 0.95 and D(G(z)) < 0.05. A hinge D that has won sits at
    its margin, where the sigmoid says 0.88 / 0.12; the margin shares say 100%."""
    d = won("hinge", torch.Generator().manual_seed(0))
    assert d["d_real"] < 0.95 and d["d_fake"] > 0.05
    assert d["real_past_margin"] == 1.0 and d["fake_past_margin"] == 1.0


def test_users_log_is_detected():
    """The user's epoch 40 (bce): D(x) 0.99, D(G(z)) 0.003, loss_g from ~6.5 to 32-46."""
    s = selector("selection.dominance_window=3")
    s.on_eval(0, {"fid": 5})
    base = {"loss_d": 0.3, "d_real": 0.9, "d_fake": 0.1, "real_past_margin": 0.4, "fake_past_margin": 0.5}
    log = [dict(base, loss_g=6.0 + 0.1 * i) for i in range(10)]
    log += [
        {
            "loss_d": 0.005,
            "loss_g": v,
            "d_real": 0.99,
            "d_fake": 0.003,
            "real_past_margin": 0.99,
            "fake_past_margin": 1.0,
        }
        for v in (32.6, 44.5, 45.9, 40, 24)
    ]
    fired = [i for i, d in enumerate(log) if s.on_diagnostics(i, d).rollback]
    assert fired == [12]  # the third interval of the spike


def test_spike_inside_an_interval_is_seen_through_its_worst_step():
    s = selector()
    s.on_eval(0, {"fid": 5})
    common = {"d_real": 0.99, "d_fake": 0.004, "real_past_margin": 0.97, "fake_past_margin": 0.98}
    calm = [dict(common, loss_d=0.05, loss_g=6 + 0.2 * i, loss_g_max=9 + 0.1 * (i % 3)) for i in range(8)]
    spikes = [dict(common, loss_d=0.01, loss_g=12, loss_g_max=m) for m in (32.6, 45.9)]
    assert not any(s.on_diagnostics(i, d).events for i, d in enumerate(calm))
    fired = [s.on_diagnostics(10 + i, d) for i, d in enumerate(spikes)]
    assert not fired[0].rollback and fired[1].rollback and "up to 45.9" in fired[1].events[0][1]


def test_non_finite_loss_rolls_back_even_without_a_best():
    s = selector()
    assert s.on_diagnostics(0, {"loss_d": float("nan"), "loss_g": 1}).rollback  # to the first state
    assert selector("selection.on_collapse=stop").on_diagnostics(0, {"loss_d": float("nan"), "loss_g": 1}).stop


def test_the_noise_band_statistic_admits_about_one_false_improvement_in_20():
    """What the band promises, on pure noise (Python's own RNG: the same on every CPU): a second
    evaluation of an equal generator beats the first by more than the band about 5% of the time."""
    import random

    rng = random.Random(0)
    false, trials = 0, 4000
    s = selector("selection.min_delta=auto")
    s.on_eval(0, {"fid": 10.0})
    for _ in range(trials):
        s.set_noise_band([rng.gauss(10.0, 1.0) for _ in range(8)])
        a, b = rng.gauss(10.0, 1.0), rng.gauss(10.0, 1.0)
        s.state.best = a
        false += s.better(b, a)
    assert 0.03 < false / trials < 0.08, false / trials


def test_an_evaluation_over_max_copy_share_is_neither_best_nor_kept():
    """A better score that comes with copied samples is refused (an event says so); with the limit
    off (0, the default) the same evaluation is the best."""
    evals = [(2.0, 0.0), (1.0, 0.2), (1.5, 0.01)]
    on = selector("selection.max_copy_share=0.05", "selection.keep_top=3")
    decs = [on.on_eval(step, {"fid": v, "copy_share": c}) for step, (v, c) in zip((10, 20, 30), evals)]
    assert [d.improved for d in decs] == [True, False, True] and (on.best, on.best_step) == (1.5, 30)
    assert not decs[1].keep and [e[0] for e in decs[1].events] == ["copy_refused", "eval"]
    assert sorted(s for _, s in on.state.top) == [10, 30]
    off = selector("selection.keep_top=3")
    assert [off.on_eval(step, {"fid": v, "copy_share": c}).improved for step, (v, c) in zip((10, 20, 30), evals)] == [
        True,
        True,
        False,
    ]
    assert (off.best, off.best_step) == (1.0, 20)


def test_refusing_the_first_evaluation_for_copies_does_not_crash():
    """selection.max_copy_share refusing a run's first evaluation: there is no best to name yet."""
    sel = selector("selection.max_copy_share=0.05")
    dec = sel.on_eval(10, {"fid": 5.0, "copy_share": 0.5})
    assert not dec.improved and sel.best is None
    assert any("no best yet" in detail for _, detail, _ in dec.events)
    assert sel.on_eval(20, {"fid": 6.0, "copy_share": 0.0}).improved


def test_ties_use_students_t_for_three_draws():
    """Standard errors from 3 draws each: Welch df 4, t 2.78, not z 1.96. A difference of 2.5
    standard errors of the difference is a tie; 3 is not."""
    from ganlab.select import within_noise

    se = 1 / 2**0.5  # the difference's standard error is 1
    assert within_noise(10.0, se, 12.5, se) and not within_noise(10.0, se, 13.0, se)
    assert not within_noise(10.0, se, 12.5, se, draws=100)  # many draws: close to z
