"""Selection in the real training loop (ganlab/train.py): rollback, resume, Ctrl-C, the hand-over,
keep_top and the noise band. The tests script only the metric values (Evaluator.metrics_for) or one
diagnostic interval; generation, checkpoints, rollback and the selector are the real ones."""

import copy
import json
import signal

import pytest
import torch
from conftest import kinds, script_evaluations

from ganlab import checkpoint, cli, config, generator, losses, select, train, trainer
from ganlab.eval import protocol
from ganlab.events import read_events

scripted = script_evaluations


def diagnostics_at(monkeypatch, bad_steps: set, **values):
    """The diagnostics read at these steps carry these values (e.g. a NaN loss)."""
    orig = train.Run.log_diagnostics

    def pop(self):
        d = self.trainer.pop_diagnostics()
        if self.step in bad_steps:
            d.update(values)
        self.trainer.pop_diagnostics = lambda: d
        try:
            orig(self)
        finally:
            del self.trainer.pop_diagnostics

    monkeypatch.setattr(train.Run, "log_diagnostics", pop)


def test_scripted_collapse_rolls_back_to_best_exactly(tiny_cfg, monkeypatch):
    scripted(monkeypatch, [5.0, 3.0, 20.0, 25.0, 30.0, 30.0])
    restored = []
    orig = trainer.Trainer.load_state_dict

    def spy(self, s, rng=True):
        orig(self, s, rng)
        restored.append(
            {k: v.clone() for k, v in self.g.state_dict().items()}
            | {"d." + k: v.clone() for k, v in self.d.state_dict().items()}
        )

    monkeypatch.setattr(trainer.Trainer, "load_state_dict", spy)
    used = {}  # the learning rates the optimisers actually stepped with
    orig_step = trainer.Trainer.step

    def step_spy(self, step):
        orig_step(self, step)
        used[step] = (self.opt_g.param_groups[0]["lr"], self.opt_d.param_groups[0]["lr"])

    monkeypatch.setattr(trainer.Trainer, "step", step_spy)
    restored_opt = []

    def opt_spy(self, s, rng=True):
        spy(self, s, rng)
        restored_opt.append(
            (
                copy.deepcopy(self.opt_g.state_dict()),
                {k: v.clone() for k, v in self.g_ema.state_dict().items()} if self.g_ema is not None else None,
            )
        )

    monkeypatch.setattr(trainer.Trainer, "load_state_dict", opt_spy)
    cfg = tiny_cfg(
        "train.steps=48",
        "selection.collapse_evals=2",
        "selection.collapse_factor=2",
        "selection.max_rollbacks=1",
        "selection.rollback_lr_scale=0.5",
        "train.ema_halflife=64",
    )
    res = train.train(cfg, quiet=True)
    rb = [e for e in read_events(res.run_dir) if e["kind"] == "rollback"]
    assert len(rb) == 1 and rb[0]["step"] == 32 and rb[0]["restored_step"] == 16
    best = checkpoint.load(res.run_dir / "best.pt")
    assert best["step"] == 16
    want = best["trainer"]["g"] | {"d." + k: v for k, v in best["trainer"]["d"].items()}
    assert set(restored[0]) == set(want)
    for k in want:
        assert torch.equal(restored[0][k], want[k]), k
    assert checkpoint.load(res.run_dir / "last.pt")["trainer"]["lr_scale"] == 0.5
    assert res.rollbacks == 1 and res.stopped == "early_stop"  # the second collapse exceeds max_rollbacks
    assert used[32][0] == pytest.approx(0.5 * used[31][0]) and used[32][1] == pytest.approx(0.5 * used[31][1])
    opt_g, ema = restored_opt[0]  # Adam's moments and the EMA came back too
    want_opt = best["trainer"]["opt_g"]["state"]
    assert all(torch.equal(opt_g["state"][i]["exp_avg"], want_opt[i]["exp_avg"]) for i in want_opt)
    assert all(torch.equal(ema[k], best["trainer"]["g_ema"][k]) for k in ema)


def test_repeated_rollbacks_compound_the_learning_rate_cut(tiny_cfg, monkeypatch):
    scripted(monkeypatch, [1.0, 5.0, 5.0, 5.0, 5.0])  # two collapses, both back to the best of step 8
    cfg = tiny_cfg("train.steps=40", "selection.collapse_evals=1", "selection.max_rollbacks=5")
    res = train.train(cfg, quiet=True)
    rb = [e for e in read_events(res.run_dir) if e["kind"] == "rollback"]
    assert [e["restored_step"] for e in rb][:2] == [8, 8]
    assert "lr x0.5" in rb[0]["detail"] and "lr x0.25" in rb[1]["detail"]
    assert checkpoint.load(res.run_dir / "last.pt")["trainer"]["lr_scale"] == 0.5**res.rollbacks


def test_patience_starts_again_after_a_rollback(tiny_cfg, monkeypatch):
    """Patience 3 and collapse after 2 bad evaluations (an earlier default.yaml). Before the fix, the
    first evaluation after a metric rollback used up the last of the patience and ended the run."""
    scripted(monkeypatch, [1.0, 5.0, 5.0, 1.5, 1.5, 1.5, 1.5])
    cfg = tiny_cfg(
        "train.steps=56", "selection.patience=3", "selection.collapse_evals=2", "selection.collapse_factor=2"
    )
    res = train.train(cfg, quiet=True)
    assert kinds(res.run_dir, "rollback") == [(24, "rollback")]
    stops = kinds(res.run_dir, "early_stop")
    assert stops == [(48, "early_stop")]  # three evaluations after the rollback, not one
    assert res.stopped == "early_stop" and res.step == 48


def test_a_diagnostics_rollback_on_an_evaluation_step_is_not_scored(tiny_cfg, monkeypatch):
    scripted(monkeypatch, [2.0, 3.0, 3.0, 3.0])
    diagnostics_at(monkeypatch, {16}, loss_d=float("nan"))
    cfg = tiny_cfg("train.steps=32", "selection.patience=2")
    res = train.train(cfg, quiet=True)
    assert kinds(res.run_dir, "rollback") == [(16, "rollback")]
    assert [s for s, k in kinds(res.run_dir, "eval", "improved")] == [8, 24, 32]  # no score at 16
    assert res.stopped == "early_stop" and res.step == 32  # patience 2 counted from the rollback


def test_a_collapse_before_the_first_evaluation_restarts_from_the_first_state(tiny_cfg, monkeypatch):
    scripted(monkeypatch, [2.0, 1.5, 1.0])
    diagnostics_at(monkeypatch, {4}, loss_g=float("inf"))
    res = train.train(tiny_cfg(), quiet=True)
    rb = [e for e in read_events(res.run_dir) if e["kind"] == "rollback"]
    assert len(rb) == 1 and rb[0]["step"] == 4 and rb[0]["restored"] == "start.pt" and rb[0]["restored_step"] == 0
    assert res.stopped == "finished" and res.step == 24 and res.best_step == 24
    start = checkpoint.load(res.run_dir / "start.pt")
    assert start["step"] == 0 and checkpoint.load(res.run_dir / "last.pt")["trainer"]["lr_scale"] == 0.5


def test_a_failed_best_write_leaves_the_selector_on_the_best_on_disk(tiny_cfg, monkeypatch):
    scripted(monkeypatch, [3.0, 1.0, 9.0, 9.0])
    orig = checkpoint.save

    def full_at_16(path, state, keep_previous=False):
        if path.name == "best.pt" and state["step"] == 16:
            raise OSError(28, "No space left on device")
        return orig(path, state, keep_previous)

    monkeypatch.setattr(checkpoint, "save", full_at_16)
    cfg = tiny_cfg("train.steps=32", "selection.collapse_evals=2", "selection.collapse_factor=2")
    res = train.train(cfg, quiet=True)
    assert res.best == 3.0 and res.best_step == 8  # the best that is on disk
    rb = [e for e in read_events(res.run_dir) if e["kind"] == "rollback"]
    assert len(rb) == 1 and rb[0]["restored_step"] == 8 and "3" in rb[0]["detail"]
    assert checkpoint.load(res.run_dir / "best.pt")["best"]["value"] == 3.0


def test_a_best_write_that_fails_late_changes_no_file(tiny_cfg, monkeypatch):
    """The last of the three files (generator.safetensors) fails at step 16: best.pt, generator.pt and
    generator.safetensors all still hold step 8, as the selector and the event say."""
    scripted(monkeypatch, [3.0, 1.0])
    orig = generator._write_safetensors

    def full_at_16(path, weights, state):
        if state["step"] == 16:
            raise OSError(28, "No space left on device")
        return orig(path, weights, state)

    monkeypatch.setattr(generator, "_write_safetensors", full_at_16)
    res = train.train(tiny_cfg("train.steps=16", "selection.on_collapse=ignore"), quiet=True)
    assert res.best == 3.0 and res.best_step == 8
    assert (
        checkpoint.load(res.run_dir / "best.pt")["step"] == 8 == checkpoint.load(res.run_dir / "generator.pt")["step"]
    )
    assert generator.load_generator(res.run_dir / "generator.safetensors")[1]["step"] == 8
    err = [e for e in read_events(res.run_dir) if e["kind"] == "error"]
    assert len(err) == 1 and err[0]["step"] == 16 and "previous best is kept" in err[0]["detail"]
    assert not (res.run_dir / ".staging").exists()


# ------------------------------------------------------------------------------ resume protocol


def test_resume_refuses_a_changed_signature_or_starts_a_new_period(tiny_cfg, tmp_path, monkeypatch):
    scripted(monkeypatch, [2.0, 1.0, 5.0, 4.0])
    cfg = tiny_cfg("train.steps=32")
    half = train.train(cfg, run_dir=tmp_path / "r", quiet=True, stop_at=16)
    assert half.best == 1.0
    changed = config.load(
        None, [f"{k}={v}" for k, v in config.flatten(cfg).items() if k != "variant"] + ["eval.num_samples=24"]
    )
    with pytest.raises(config.ConfigError, match=r"signature changed \(num_samples 32 -> 24\).*--new-period"):
        train.train(changed, run_dir=tmp_path / "r", resume=True, quiet=True)
    res = train.train(changed, run_dir=tmp_path / "r", resume=True, quiet=True, new_period=True)
    assert kinds(res.run_dir, "new_period") == [(16, "new_period")]
    assert res.best == 4.0 and res.best_step == 32  # 5.0 at 24 starts the period; the old 1.0 is not compared


def test_resume_refuses_a_changed_selection_rule_and_a_new_period_keeps_the_old_best_apart(
    tiny_cfg, tmp_path, monkeypatch
):
    """--set selection.metric=kid on resume would compare a KID with the stored FID best: refused in one
    line. With --new-period the old period's best and kept generators move to period0/, and the final
    re-evaluation scores only the new period's."""
    values = iter([2.0, 1.0] + [5.0, 4.0] + [4.5, 3.9])  # period 0: 8, 16; period 1: 24, 32; re-evaluation of 32, 24
    monkeypatch.setattr(
        protocol.Evaluator, "metrics_for", lambda self, fake, seed=None: {"fid": next(values), "kid": 0.1}
    )
    monkeypatch.setattr(protocol.Evaluator, "handover_draws", lambda self, g: [{"fid": 1.0, "kid": 0.1}] * 3)
    cfg = tiny_cfg("train.steps=32", "selection.keep_top=2", "eval.metrics=fid,kid", "selection.on_collapse=ignore")
    train.train(cfg, run_dir=tmp_path / "r", quiet=True, stop_at=16)
    flat = [f"{k}={v}" for k, v in config.flatten(cfg).items() if k != "variant"]
    other = config.load(None, flat + ["selection.metric=kid"])
    with pytest.raises(config.ConfigError, match=r"selection rule changed \(selection.metric 'fid' -> 'kid'\)"):
        train.train(other, run_dir=tmp_path / "r", resume=True, quiet=True)
    assert cli.main(["train", "--resume", str(tmp_path / "r"), "--set", "selection.min_delta=0.5", "--quiet"]) == 2
    res = train.train(
        config.load(None, flat + ["selection.min_delta=0.01"]),
        run_dir=tmp_path / "r",
        resume=True,
        quiet=True,
        new_period=True,
    )
    assert checkpoint.load(res.run_dir / "period0" / "best.pt")["step"] == 16
    assert sorted(p.name for p in (res.run_dir / "period0" / "top").glob("*.pt")) == [
        "step_0000008.pt",
        "step_0000016.pt",
    ]
    assert sorted(p.name for p in (res.run_dir / "top").glob("*.pt")) == ["step_0000024.pt", "step_0000032.pt"]
    assert (
        res.handed_over_step == 24 and checkpoint.load(res.run_dir / "best.pt")["step"] == 32
    )  # re-evaluated: 24 wins


# --------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_stops_at_a_step_boundary_and_resumes_exactly(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg("train.steps=16", "train.checkpoint_every=100", "train.log_every=5")
    straight = train.train(cfg, run_dir=tmp_path / "a", quiet=True)
    orig, hits = losses.g_loss, []

    def ctrl_c_between_d_and_g(kind, fake):  # D has been updated in this step, G not yet
        if len(hits) == 6:
            signal.raise_signal(signal.SIGINT)
        hits.append(1)
        return orig(kind, fake)

    monkeypatch.setattr(losses, "g_loss", ctrl_c_between_d_and_g)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, run_dir=tmp_path / "b", quiet=True)
    monkeypatch.setattr(losses, "g_loss", orig)
    assert checkpoint.load(tmp_path / "b" / "last.pt")["step"] == 7  # the step in flight completed
    resumed = train.train(cfg, run_dir=tmp_path / "b", resume=True, quiet=True)
    a, b = (checkpoint.load(r.run_dir / "last.pt")["trainer"] for r in (straight, resumed))
    for net in ("g", "d"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k}"
    assert torch.equal(a["opt_d"]["state"][0]["exp_avg"], b["opt_d"]["state"][0]["exp_avg"])


def test_a_resumed_run_makes_the_same_selection_as_a_straight_one(tiny_cfg, tmp_path):
    """keep_top 3, min_delta auto and a hair-trigger collapse rule (any worse evaluation rolls back):
    stopped at step 16 and resumed, the run ends with the same best, top, noise band, rollbacks,
    decisions and hand-over as the same run straight through."""
    cfg = tiny_cfg(
        "train.steps=40",
        "selection.keep_top=3",
        "selection.min_delta=auto",
        "selection.collapse_factor=1.0",
        "selection.collapse_evals=1",
        "selection.max_rollbacks=5",
        "train.lr_g=0.02",
        "train.lr_d=0.02",
    )
    straight = train.train(cfg, run_dir=tmp_path / "a", quiet=True)
    train.train(cfg, run_dir=tmp_path / "b", quiet=True, stop_at=16)
    resumed = train.train(cfg, run_dir=tmp_path / "b", resume=True, quiet=True)
    assert kinds(resumed.run_dir, "start", "resume") == [(0, "start"), (16, "resume")]  # resumed, not restarted
    a, b = (checkpoint.load(r.run_dir / "last.pt")["selection"] for r in (straight, resumed))
    assert a == b and a["noise_band"] is not None and a["top"]
    decisions = lambda r: [
        (e["step"], e["kind"])
        for e in read_events(r.run_dir)  # noqa: E731
        if e["kind"] in ("improved", "eval", "rollback", "noise_band", "reevaluated", "handover")
    ]
    assert decisions(straight) == decisions(resumed) and any(k == "rollback" for _, k in decisions(straight))
    assert straight.handover == resumed.handover and straight.handed_over_step == resumed.handed_over_step


# ------------------------------------------------------------------------------- hand-over


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
    g, info = generator.load_generator(res.run_dir / "generator.pt")
    assert info["step"] == 8


def test_the_ema_generator_is_what_is_evaluated_and_handed_over(tiny_cfg, monkeypatch):
    seen = []
    orig = protocol.Evaluator.__call__

    def spy(self, g):
        seen.append({k: v.clone() for k, v in g.state_dict().items()})
        return orig(self, g)

    monkeypatch.setattr(protocol.Evaluator, "__call__", spy)
    script_evaluations(monkeypatch, [3.0, 1.0, 2.0], handover=(1.0, 1.1, 1.2))
    monkeypatch.setattr(protocol.Evaluator, "with_fresh_latents", lambda self, g, seed, num_samples=None: {"fid": 1.0})
    res = train.train(tiny_cfg("train.ema_halflife=64", "train.steps=24", "selection.keep_top=3"), quiet=True)
    best = checkpoint.load(res.run_dir / "best.pt")["trainer"]
    start = checkpoint.load(res.run_dir / "start.pt")["trainer"]
    gen = checkpoint.load(res.run_dir / "generator.pt")["state_dict"]
    weights = [k for k in best["g"] if "running" not in k and "num_batches" not in k]
    for k in weights:
        assert torch.equal(seen[1][k], best["g_ema"][k]) and torch.equal(gen[k], best["g_ema"][k]), k
    assert not all(torch.equal(gen[k], best["g"][k]) for k in weights)  # not the raw G ...
    assert not all(torch.equal(gen[k], start["g_ema"][k]) for k in weights)  # ... and an EMA that moved
    for i, step in enumerate((8, 16, 24)):  # keep_top keeps the EMA too
        kept = checkpoint.load(res.run_dir / "top" / f"step_{step:07d}.pt")["state_dict"]
        assert all(torch.equal(kept[k], seen[i][k]) for k in weights), step


def test_early_stop_ends_the_run(tiny_cfg, monkeypatch):
    scripted(monkeypatch, [3.0, 4.0, 4.0, 4.0])
    res = train.train(tiny_cfg("selection.patience=2", "train.steps=200"), quiet=True)
    assert res.stopped == "early_stop" and res.step == 24
    assert [e["kind"] for e in read_events(res.run_dir)].count("early_stop") == 1


def test_eval_command_reports_the_run_protocol(tiny_cfg, capsys):
    import json

    from ganlab import cli

    res = train.train(tiny_cfg("train.steps=8"), quiet=True)
    assert cli.main(["eval", str(res.run_dir), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 8 and out["signature"] and {"fid", "fid_alpha", "isc", "kid"} <= set(out["metrics"])
    assert out["metrics"]["fid"] == pytest.approx(res.best, rel=1e-5)  # same protocol, same generator


# ------------------------------------------------------------------- selection that knows its noise


def test_keep_top_hands_over_the_winner_of_the_re_evaluation(tiny_cfg, monkeypatch):
    """Evaluations at 8, 16, 24 score 2.0, 1.0, 1.5: step 16 is the best by the run's own latents.
    Re-evaluated on fresh latents with twice the samples, step 24 wins: it is what is handed over,
    and it alone is then scored on the hand-over protocol (three more draws of its own latents)."""
    calls, images = [], []
    values = iter([2.0, 1.0, 1.5] + [1.3, 0.9, 1.1] + [1.15, 1.25, 1.2])  # evals, re-evaluation (16, 24, 8), hand-over

    def scripted(self, fake, seed=None):
        calls.append(len(fake))
        images.append(fake.clone())
        return {"fid": next(values)}

    monkeypatch.setattr(protocol.Evaluator, "metrics_for", scripted)
    res = train.train(tiny_cfg("selection.keep_top=3", "selection.on_collapse=ignore"), quiet=True)
    assert res.best_step == 16 and res.handed_over_step == 24
    assert calls == [32, 32, 32, 64, 64, 64, 64, 64, 64]  # twice the samples ...
    assert not torch.equal(images[4][:32], images[2])  # ... on fresh latents (step 24's own images differ)
    handover = images[6:]  # step 24's generator on the hand-over latents: other
    assert not any(torch.equal(h, images[4]) for h in handover) and not torch.equal(handover[0], handover[1])
    assert not any(torch.equal(h[:32], images[2]) for h in handover)  # ... than the run's own fixed latents
    gen = checkpoint.load(res.run_dir / "generator.pt")
    assert gen["step"] == 24 and gen["metrics"]["reeval_fid"] == 0.9
    assert gen["metrics"]["handover_fid"] == pytest.approx(1.2) == res.handover["handover_fid"]
    assert (
        res.handover["handover_fid_se"] == pytest.approx(0.05 / 3**0.5)
        and gen["handover_signature"] == res.handover_signature
    )
    kept = checkpoint.load(res.run_dir / "top" / "step_0000024.pt")["state_dict"]
    assert all(torch.equal(gen["state_dict"][k], kept[k]) for k in kept)
    ev = [e for e in read_events(res.run_dir) if e["kind"] == "reevaluated"]
    assert len(ev) == 1 and ev[0]["winner_step"] == 24
    assert checkpoint.load(res.run_dir / "best.pt")["step"] == 16  # rollback still targets the best by the run's metric


def test_a_run_without_keep_top_is_scored_on_the_handover_protocol_too(tiny_cfg, monkeypatch):
    """keep_top 1: no re-evaluation, but generator.pt (the selection best) still gets an unbiased score
    from latents of its own, which selection never saw."""
    calls = []
    values = iter([2.0, 1.0, 1.5] + [1.3, 1.5, 1.4])
    monkeypatch.setattr(
        protocol.Evaluator,
        "metrics_for",
        lambda self, fake, seed=None: calls.append(len(fake)) or {"fid": next(values)},
    )
    res = train.train(tiny_cfg("selection.keep_top=1", "eval.handover_samples=48"), quiet=True)
    assert res.handed_over_step == 16 and calls == [32, 32, 32, 48, 48, 48]
    assert res.handover["handover_fid"] == pytest.approx(1.4) and res.handover["handover_fid_sd"] == pytest.approx(0.1)
    ho = [e for e in read_events(res.run_dir) if e["kind"] == "handover"]
    assert len(ho) == 1 and ho[0]["handed_over_step"] == 16


def test_the_handover_protocol_is_its_own_signature():
    """Runs are comparable on their hand-over scores when the hand-over protocol matches, whatever
    latents their selection used; a hand-over seed that selection uses is refused at load."""
    from ganlab import data

    def ev(*over):
        cfg = config.load(
            None,
            [
                "data.root=builtin:sprites",
                "data.image_size=32",
                "data.sprites=64",
                "data.min_holdout=16",
                "eval.feature_extractor=inception-v3-random",
                "model.nz=16",
                *over,
            ],
        )
        return protocol.Evaluator(cfg, data.load_images(cfg.data, cfg.seed).holdout, "cpu")

    base = ev("eval.num_samples=32")
    other_latents = ev("eval.num_samples=32", "eval.seed=7")
    assert other_latents.handover_hash == base.handover_hash and other_latents.signature_hash != base.signature_hash
    assert ev("eval.num_samples=32", "eval.handover_draws=4").handover_hash != base.handover_hash
    assert ev("eval.num_samples=16", "eval.handover_samples=64").handover_hash == base.handover_hash
    with pytest.raises(config.ConfigError, match="eval.handover_seed"):
        config.load(None, ["eval.seed=5", "eval.handover_seed=4", "eval.handover_draws=3"])


def test_keep_top_drops_checkpoints_that_leave_the_top(tiny_cfg, monkeypatch):
    script_evaluations(monkeypatch, [3.0, 2.0, 1.0, 2.5, 0.5] + [1.0, 1.0])
    res = train.train(tiny_cfg("selection.keep_top=2", "train.steps=40", "selection.on_collapse=ignore"), quiet=True)
    assert sorted(p.name for p in (res.run_dir / "top").glob("*.pt")) == ["step_0000024.pt", "step_0000040.pt"]


def test_min_delta_auto_is_measured_on_the_best_and_is_about_2_sd_of_its_noise(tiny_cfg):
    """The band comes from the run's best generator (generator.pt at that point) over fresh latents:
    an SD measured independently by the test on other latents of that generator puts the band within
    1x-5x of it (a band of 500 SDs, or an SD computed as a range of the draws, falls outside)."""
    import statistics

    from ganlab import data

    res = train.train(tiny_cfg("selection.min_delta=auto", "train.steps=8"), quiet=True)
    band_ev = [e for e in read_events(res.run_dir) if e["kind"] == "noise_band"]
    assert len(band_ev) == 1 and band_ev[0]["step"] == 8 == res.best_step
    cfg = config.load(res.run_dir / "config.yaml")
    g, _ = generator.load_generator(res.run_dir / "generator.pt")
    ev = protocol.Evaluator(cfg, data.load_images(cfg.data, cfg.seed).holdout, "cpu")
    indep = [ev.with_fresh_latents(g, seed=5000 + k)["fid"] for k in range(20)]
    sd = statistics.stdev(indep)
    assert 0.8 * sd < band_ev[0]["band"] < 5 * sd, (band_ev[0]["band"], sd)
    drawn = json.loads(band_ev[0]["values"])  # the draws were of this generator (the best), exactly
    again = [
        ev.with_fresh_latents(g, seed=cfg.eval.seed + select.NOISE_SEED_OFFSET + k)["fid"] for k in range(len(drawn))
    ]
    assert drawn == pytest.approx(again, rel=1e-4)


def test_a_steady_improvement_late_in_a_run_still_counts(tiny_cfg, monkeypatch):
    """FID falls by 30% an evaluation, 100 -> 1.2, its noise proportional to its value (2% SD). The
    band is measured again as the best halves, so the late, small improvements still count and
    patience never stops the run (a band measured once at FID 100 is wider than every step after
    the first few: the run stopped early on patience)."""
    import random

    rng = random.Random(1)
    path = [100 * 0.7**k for k in range(13)]
    fixed = iter(v * (1 + 0.005 * rng.gauss(0, 1)) for v in path)
    last = {}

    def evaluation(self, fake, seed=None):
        last["v"] = next(fixed)
        return {"fid": last["v"]}

    monkeypatch.setattr(protocol.Evaluator, "metrics_for", evaluation)
    monkeypatch.setattr(
        protocol.Evaluator,
        "with_fresh_latents",
        lambda self, g, seed, num_samples=None: {"fid": last["v"] * (1 + 0.02 * rng.gauss(0, 1))},
    )
    res = train.train(
        tiny_cfg("selection.min_delta=auto", "selection.patience=2", "train.steps=104", "selection.on_collapse=ignore"),
        quiet=True,
    )
    assert res.stopped == "finished" and res.best_step == 104
    bands = [e for e in read_events(res.run_dir) if e["kind"] == "noise_band"]
    assert len(bands) >= 5 and bands[-1]["band"] < bands[0]["band"] / 10


def test_a_collapse_before_a_new_periods_first_best_rolls_back_to_the_periods_start(tiny_cfg, tmp_path, monkeypatch):
    """After --new-period the old best is archived; a collapse before the period's first best must go
    back to where the period started (step 16), not to the run's untrained weights (start.pt of step 0)."""
    from ganlab.events import read_events

    scripted(monkeypatch, [2.0, 1.0, float("nan"), 3.0])
    cfg = tiny_cfg("train.steps=32")
    train.train(cfg, run_dir=tmp_path / "r", quiet=True, stop_at=16)
    changed = config.load(
        None, [f"{k}={v}" for k, v in config.flatten(cfg).items() if k != "variant"] + ["eval.num_samples=24"]
    )
    res = train.train(changed, run_dir=tmp_path / "r", resume=True, quiet=True, new_period=True)
    rollbacks = [e for e in read_events(res.run_dir) if e["kind"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["restored_step"] == 16 and rollbacks[0]["restored"] == "start.pt"


def test_a_second_new_period_before_the_first_last_pt_keeps_both_archives(tiny_cfg, tmp_path, monkeypatch):
    """A new period that fails after its first best but before its first last.pt restores the old
    period again: a second --new-period must not overwrite period0/ with the abandoned attempt's files."""
    scripted(monkeypatch, [2.0, 1.0, 3.0, 2.5, 2.4])
    cfg = tiny_cfg("train.steps=32", "train.checkpoint_every=100")
    train.train(cfg, run_dir=tmp_path / "r", quiet=True, stop_at=16)
    changed = config.load(
        None, [f"{k}={v}" for k, v in config.flatten(cfg).items() if k != "variant"] + ["eval.num_samples=24"]
    )

    def crash(step, metrics, last):
        raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError, match="went away"):
        train.train(changed, run_dir=tmp_path / "r", resume=True, quiet=True, new_period=True, on_eval=crash)
    assert checkpoint.load(tmp_path / "r" / "best.pt")["step"] == 24  # the abandoned attempt's best
    res = train.train(changed, run_dir=tmp_path / "r", resume=True, quiet=True, new_period=True)
    assert checkpoint.load(res.run_dir / "period0" / "best.pt")["step"] == 16  # period 0's, not overwritten
    assert checkpoint.load(res.run_dir / "period0.2" / "best.pt")["step"] == 24
    assert res.stopped == "finished"


def test_a_crash_after_an_evaluation_keeps_every_top_generator_the_restored_state_lists(
    tiny_cfg, tmp_path, monkeypatch
):
    """Step 24's evaluation pushes step 8 out of the top 2; the run dies before the next last.pt. The
    restored state (step 16) still lists step 8, so its file must still be there for the final
    re-evaluation: deleted only once no checkpoint lists it."""
    scripted(monkeypatch, [3.0, 2.0, 1.0] + [5.0, 5.0] + [3.1, 2.1])
    cfg = tiny_cfg(
        "train.steps=32", "train.checkpoint_every=16", "selection.keep_top=2", "selection.on_collapse=ignore"
    )

    def crash_at_24(step, metrics, last):
        if step == 24:
            raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError, match="went away"):
        train.train(cfg, run_dir=tmp_path / "r", quiet=True, on_eval=crash_at_24)
    res = train.train(cfg, run_dir=tmp_path / "r", resume=True, quiet=True)
    warnings = [e["detail"] for e in read_events(res.run_dir) if e["kind"] == "warning"]
    assert not [w for w in warnings if "left out of the re-evaluation" in w], warnings
    assert sorted(p.name for p in (res.run_dir / "top").glob("*.pt")) == ["step_0000008.pt", "step_0000016.pt"]


def test_eval_max_share_skips_evaluations_over_budget_and_says_so(tiny_cfg, tmp_path, monkeypatch):
    """With evaluation far over its share of the wall time, the periodic evaluations after the first
    are skipped, each with an event; the last step's is never skipped. Off (0), every one runs."""
    import time as time_mod

    from ganlab.eval import protocol as protocol_mod

    values = iter([3.0, 2.0, 1.0])

    def slow(self, fake, seed=None):
        time_mod.sleep(0.3)  # an evaluation that costs far more than 8 tiny steps
        return {"fid": next(values)}

    monkeypatch.setattr(protocol_mod.Evaluator, "metrics_for", slow)
    monkeypatch.setattr(protocol_mod.Evaluator, "handover_draws", lambda self, g: [{"fid": 1.0}] * 3)
    res = train.train(tiny_cfg("eval.max_share=0.1"), run_dir=tmp_path / "r", quiet=True)
    assert kinds(res.run_dir, "eval_skipped") == [(16, "eval_skipped")]
    assert [s for s, _ in kinds(res.run_dir, "improved", "eval")] == [8, 24]
