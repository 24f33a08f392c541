import math

import pytest
import torch

from ganlab import checkpoint, device, generator, train, trainer
from ganlab.events import read_events

BASE = ["train.loss=bce", "train.channels_last=false", "train.precision=fp32"]
# Each option at a value that binds on the tiny nets (a clip of 100 would never bite).
STABILISERS = [
    ["train.loss=hinge"],
    ["train.loss=lsgan"],
    ["train.loss=wgan-gp", "model.d_norm=none"],
    ["train.clip_norm_g=0.001", "train.clip_norm_d=0.001"],
    ["train.clip_value_g=0.00001", "train.clip_value_d=0.00001"],
    ["train.instance_noise=0.1", "train.instance_noise_anneal=10"],
    ["train.label_smoothing=0.1"],
    ["train.r1_gamma=1.0", "train.r1_every=2"],
    ["train.d_steps=2"],
    ["train.lr_d=0.0004"],
    ["train.ema_halflife=100"],
    ["train.diffaug=translation,cutout,color"],
    ["train.precision=bf16"],
    ["model.spectral_norm=true", "model.d_norm=none"],
    ["model.spectral_norm_g=true"],
    ["model.init=kaiming"],
    ["train.lr_schedule=cosine", "train.lr_warmup=2"],
    ["train.beta1=0.0"],
    # issue 27's levers
    ["model.mbstd_group=4"],
    ["model.pack=2"],
    ["train.ema_halflife=100", "train.ema_rampup=0.05"],
    ["train.lecam_weight=0.3"],
    ["train.bcr_weight=10"],
    ["train.r1_gamma=auto"],
]


def two_steps(cfg):
    from ganlab import data

    tr = trainer.Trainer(cfg, data.load_images(cfg.data).train, torch.device("cpu"))
    for s in range(2):
        tr.step(s)
    return tr


def result(tr) -> list:
    """What a step leaves behind: the generator that would be sampled, and D."""
    g = tr.g_ema if tr.g_ema is not None else tr.g
    return [p.detach().clone() for p in list(g.state_dict().values()) + list(tr.d.state_dict().values())]


@pytest.mark.parametrize("sets", STABILISERS, ids=lambda s: ",".join(s))
def test_each_loss_and_stabiliser_changes_the_step(tiny_cfg, sets):
    """Every option runs, stays finite, and changes what the step computes: an option that was
    silently ignored would leave the result equal to the base recipe's."""
    if "train.precision=bf16" in sets and not device.bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16: the option falls back to fp32 (with a warning)")
    base = result(two_steps(tiny_cfg(*BASE)))
    tr = two_steps(tiny_cfg(*BASE, *sets))
    diag = tr.pop_diagnostics()
    assert all(torch.isfinite(torch.tensor(v)) for v in diag.values())
    mine = result(tr)
    assert len(mine) != len(base) or any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(mine, base))


def test_channels_last_keeps_the_math(tiny_cfg):
    a = result(two_steps(tiny_cfg(*BASE)))
    b = result(two_steps(tiny_cfg("train.loss=bce", "train.channels_last=true")))
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))


def test_diffaug_colour_never_touches_alpha():
    from ganlab.augment import diff_augment

    x = torch.rand(4, 4, 8, 8) * 2 - 1
    y = diff_augment(x, ["color"], torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 3], y[:, 3]) and not torch.equal(x[:, :3], y[:, :3])


def test_train_run_folder_and_generator(tiny_cfg):
    res = train.train(tiny_cfg(), quiet=True)
    d = res.run_dir
    for name in (
        "config.yaml",
        "start.pt",
        "last.pt",
        "best.pt",
        "generator.pt",
        "generator.safetensors",
        "events.jsonl",
    ):
        assert (d / name).exists(), name
    kinds = [e["kind"] for e in read_events(d)]
    assert kinds[0] == "start" and kinds[-1] == "finished" and "improved" in kinds
    assert res.stopped == "finished" and res.step == 24
    assert list((d / "samples").glob("step_*.png"))
    g, info = generator.load_generator(d / "generator.pt")
    g2, info2 = generator.load_generator(d / "generator.safetensors")
    z = torch.randn(2, 16)
    assert g(z).shape == (2, 4, 32, 32) and torch.equal(g(z), g2(z))
    assert info2["step"] == info["step"] and info2["metrics"] == info["metrics"]


def test_diagnostics_are_named_and_read_once_per_interval(tiny_cfg):
    from ganlab import data

    cfg = tiny_cfg("train.loss=hinge")
    tr = trainer.Trainer(cfg, data.load_images(cfg.data).train, torch.device("cpu"))
    for s in range(3):
        tr.step(s)
    d = tr.pop_diagnostics()
    assert set(trainer.DIAGNOSTICS) <= set(d) and {"loss_g_max", "critic_gap"} <= set(d)
    assert 0 <= d["real_past_margin"] <= 1 and d["loss_g_max"] >= d["loss_g"]
    assert d["critic_gap"] == pytest.approx(d["logit_real"] - d["logit_fake"])
    assert tr.pop_diagnostics()["loss_d"] == 0.0  # popped: the next interval starts empty


def test_checkpoint_round_trip(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    from ganlab import data

    tr = trainer.Trainer(cfg, data.load_images(cfg.data).train, torch.device("cpu"))
    tr.step(0)
    state = {"step": 1, "trainer": tr.state_dict(), "global_rng": trainer.global_rng_state()}
    checkpoint.save(tmp_path / "c.pt", state)
    back = checkpoint.load(tmp_path / "c.pt")
    tr2 = trainer.Trainer(cfg, data.load_images(cfg.data).train, torch.device("cpu"))
    tr2.load_state_dict(back["trainer"])
    for a, b in zip(tr.g.state_dict().values(), tr2.g.state_dict().values()):
        assert torch.equal(a, b)
    trainer.set_global_rng_state(back["global_rng"])


def _weights(run_dir):
    return checkpoint.load(run_dir / "last.pt")["trainer"]


@pytest.mark.parametrize(
    "extra", [[], ["train.ema_halflife=200", "train.instance_noise=0.1", "train.diffaug=translation"]]
)
def test_exact_resume(tiny_cfg, tmp_path, monkeypatch, extra):
    """2N steps straight == N steps, resume, N steps: identical weights, optimiser and EMA; and the
    resume really continues (a restart from step 0 would also end identical, as training is a pure
    function of the step: so count the steps that run after the resume)."""
    cfg = tiny_cfg("train.steps=16", "train.checkpoint_every=100", *extra)
    straight = train.train(cfg, run_dir=tmp_path / "a", quiet=True)
    half = train.train(cfg, run_dir=tmp_path / "b", quiet=True, stop_at=8)
    assert half.step == 8 and half.stopped == "paused"
    ran = []
    orig = trainer.Trainer.step
    monkeypatch.setattr(trainer.Trainer, "step", lambda self, s: (ran.append(s), orig(self, s))[1])
    resumed = train.train(cfg, run_dir=tmp_path / "b", resume=True, quiet=True)
    assert ran == list(range(8, 16))
    assert [e["step"] for e in read_events(resumed.run_dir) if e["kind"] == "resume"] == [8]
    assert resumed.step == 16
    a, b = _weights(straight.run_dir), _weights(resumed.run_dir)
    for k in ("g", "d", "g_ema"):
        if a[k] is None:
            continue
        for n in a[k]:
            assert torch.equal(a[k][n], b[k][n]), f"{k}.{n}"
    assert torch.equal(a["opt_g"]["state"][0]["exp_avg"], b["opt_g"]["state"][0]["exp_avg"])
    ea = [(e["step"], e["kind"]) for e in read_events(straight.run_dir) if e["kind"] in ("improved", "eval")]
    eb = [(e["step"], e["kind"]) for e in read_events(resumed.run_dir) if e["kind"] in ("improved", "eval")]
    assert ea == eb


def test_held_out_images_never_reach_training(tiny_cfg, monkeypatch):
    """Every batch the trainer draws comes from the training split: none is a held-out image."""
    from ganlab import data

    drawn = []
    orig = data.Batches.decode  # every batch the step trains on is decoded here

    def spy(self, raw):
        batch = orig(self, raw)
        drawn.append(batch)
        return batch

    monkeypatch.setattr(data.Batches, "decode", spy)
    cfg = tiny_cfg("train.steps=20", "eval.every=0")
    images = data.load_images(cfg.data)
    held = {bytes(data.to_model_space(h[None], cfg.data.alpha).numpy().tobytes()) for h in images.holdout}
    train.train(cfg, quiet=True)
    seen = {bytes(x[None].numpy().tobytes()) for b in drawn for x in b}
    assert len(drawn) == 20 and len(seen) > 100
    assert not (seen & held)


def test_corrupt_file_in_data_does_not_stop_training(tiny_cfg, tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "imgs" / "cls"
    root.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i in range(80):
        Image.fromarray(rng.randint(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA").save(root / f"{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    res = train.train(tiny_cfg(f"data.root={tmp_path / 'imgs'}", "train.steps=4", "eval.every=0"), quiet=True)
    start = read_events(res.run_dir)[0]
    assert "1 skipped" in start["detail"] and res.step == 4


# ---- the lean step (issue 26): the same math with fewer kernels


def steps(cfg, n=3):
    from ganlab import data

    tr = trainer.Trainer(cfg, data.load_images(cfg.data).train, torch.device("cpu"))
    losses = []
    for s in range(n):
        tr.step(s)
        losses.append(tr.pop_diagnostics())
    return tr, losses


LEAN = ["model.d_norm=none", "train.loss=hinge", "train.diffaug=translation,cutout", "train.ema_halflife=100"]


def test_lean_step_is_the_reference_step_without_batchnorm(tiny_cfg):
    """One D forward on real+fake equals two forwards when D has no batch norm: losses and weights
    after three steps agree to float32 rounding (oneDNN may block a batch of 32 differently from two
    of 16, so not bitwise; 1e-5 is ~100x the rounding seen, and far below what one step changes)."""
    ref, ref_d = steps(tiny_cfg(*LEAN, "train.lean_step=false"))
    lean, lean_d = steps(tiny_cfg(*LEAN, "train.lean_step=true"))
    assert lean.lean and not ref.lean
    for a, b in zip(ref_d, lean_d):
        assert abs(a["loss_d"] - b["loss_d"]) < 1e-5 and abs(a["loss_g"] - b["loss_g"]) < 1e-5
    for x, y in zip(result(ref), result(lean)):
        assert torch.allclose(x, y, atol=1e-5, rtol=0)
    moved = max((x - y).abs().max() for x, y in zip(result(ref), result(steps(tiny_cfg(*LEAN), n=2)[0])))
    assert moved > 1e-3  # a step moves the weights far more than the tolerance


def test_lean_step_keeps_two_forwards_with_batchnorm(tiny_cfg):
    """The seed's D has batch norm: its statistics over real alone and fake alone are part of its
    math, so the lean step must not concatenate them."""
    ref, _ = steps(tiny_cfg("train.lean_step=false"), n=2)
    lean, _ = steps(tiny_cfg("train.lean_step=true"), n=2)
    assert not lean.lean
    assert all(torch.equal(x, y) for x, y in zip(result(ref), result(lean)))


def test_lean_step_runs_one_power_iteration_per_d_update(tiny_cfg):
    """Spectral norm: torch iterates on every D forward in training mode (D step, R1, G step); the
    lean step once per D update, sigma held across the update's other forwards. A deliberate change
    of the estimate: it stays within 2% of the reference step's sigma after 20 steps (the paired
    quality runs are in docs/benchmarks.md)."""
    sets = [*LEAN, "model.spectral_norm=true", "train.r1_gamma=1.0"]
    calls = {"n": 0}
    lean, _ = steps(tiny_cfg(*sets), n=1)

    def count(module, args):
        calls["n"] += module.training

    hooks = [m.register_forward_pre_hook(count) for m in lean.sn]
    lean.step(1)
    assert calls["n"] == len(lean.sn)  # one iterating forward per SN layer, not three
    for h in hooks:
        h.remove()
    ref, _ = steps(tiny_cfg(*sets, "train.lean_step=false"), n=20)
    lean, _ = steps(tiny_cfg(*sets), n=20)
    sig = lambda tr: torch.stack(
        [
            torch.linalg.matrix_norm(m.parametrizations.weight.original.flatten(1), 2)
            for m in tr.d.modules()
            if hasattr(m, "parametrizations")
        ]
    )
    assert torch.allclose(sig(ref), sig(lean), rtol=0.02)


def test_precision_auto_is_bf16_where_native(tiny_cfg):
    tr = trainer.Trainer(
        tiny_cfg("train.precision=auto"), torch.zeros(32, 4, 32, 32, dtype=torch.uint8), torch.device("cpu")
    )
    assert tr.use_bf16 == device.bf16_supported(torch.device("cpu"))
    assert config_default("train.precision") == "auto"


def test_ema_copy_matches_layout_and_buffers(tiny_cfg):
    """g_ema is copied after G goes channels_last (so the EMA lerp is one foreach kernel), and its
    batch-norm buffers follow G's."""
    tr, _ = steps(tiny_cfg("train.ema_halflife=100", "train.channels_last=true"), n=2)
    for pe, p in zip(tr.g_ema.parameters(), tr.g.parameters()):
        assert pe.stride() == p.stride()
    for be, b in zip(tr.g_ema.buffers(), tr.g.buffers()):
        assert torch.equal(be, b)


def config_default(key):
    from ganlab import config

    section, name = key.split(".")
    return getattr(getattr(config.Config(), section), name)


# ---- D's diagnostics (issue 27)

DIAG = ["data.image_size=32", "model.d_width=16", "train.batch_size=32", "model.d_norm=none", "train.loss=bce"]


def _noise_images(n, seed):
    return torch.randint(0, 256, (n, 4, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_overfit_probe_sees_a_d_that_memorised_its_training_images(tiny_cfg):
    """Reals are 64 noise images; D is trained to score them above fresh noise images of the same
    kind, which only memorising them achieves. The probe's training batch then scores above its
    held-out batch; a probe that read training reals for both would show no gap."""
    from ganlab import data

    train_u8, held_u8 = _noise_images(64, 1), _noise_images(64, 2)
    tr = trainer.Trainer(tiny_cfg(*DIAG), train_u8, torch.device("cpu"), holdout_images=held_u8)
    assert tr.overfit_probe()["d_overfit_gap"] == pytest.approx(0.0, abs=0.05)  # untrained: no gap
    opt = torch.optim.Adam(tr.d.parameters(), lr=1e-3)
    for i in range(150):
        real = tr.batches(i)
        other = data.to_model_space(_noise_images(32, 1000 + i), "premultiplied")
        loss = torch.nn.functional.softplus(-tr.d(real)).mean() + torch.nn.functional.softplus(tr.d(other)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe = tr.overfit_probe()
    assert probe["d_overfit_gap"] > 2.0, probe
    assert probe["logit_train_probe"] > probe["logit_holdout_probe"]


def test_ada_rt_and_chance_share_tell_a_winning_d_from_a_d_at_chance(tiny_cfg):
    """A D that learns against a G that cannot (lr_g ~ 0): r_t = E[sign D(real)] near 1, D separates
    real from fake, no step at chance. A D with learning rate ~0 against a G that learns: at chance
    (or fooled) on every step. Computed on the fakes instead of the reals, r_t would be near -1 for
    the winning D; an accuracy from the fakes alone would be 0.5, so at chance, for both."""

    def last_interval(*sets):
        tr, diags = steps(tiny_cfg(*DIAG, *sets), n=60)
        return diags[-1]

    # steps() pops every step: the last step's values
    win = last_interval("train.lr_g=1e-12", "train.lr_d=0.002")
    assert win["ada_rt"] > 0.9 and win["d_accuracy"] > 0.9 and win["d_chance"] == 0.0, win
    at_chance = last_interval("train.lr_d=1e-12", "train.lr_g=0.002")
    assert at_chance["d_chance"] == 1.0 and at_chance["d_accuracy"] <= trainer.CHANCE_ACCURACY, at_chance


def test_compiled_step_works_with_r1(tiny_cfg, monkeypatch):
    """train.compile with R1: AOTAutograd refuses R1's double backward through a compiled D, so the
    penalties run D eagerly. aot_eager is the compile path up to AOTAutograd without C++ codegen
    (inductor would take a minute here); it raises without the fix."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    tr, diags = steps(
        tiny_cfg("train.compile=true", "train.r1_gamma=1.0", "model.d_norm=none", "train.loss=hinge"), n=2
    )
    assert all(math.isfinite(d["loss_d"]) for d in diags)
