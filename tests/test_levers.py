"""Issue 27's levers for diversity and D's strength, each against its reference formula."""

import pytest
import torch

from ganlab import config, losses, models, trainer


def test_minibatch_std_matches_stylegan2_ada():
    """StyleGAN2-ADA's MinibatchStdLayer (num_channels 1): sample i's group is i, i + N/G, ...; the
    new map is the mean over C, H, W of the per-feature std across the group (biased, + 1e-8)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    out = models.MinibatchStd(4)(x)
    assert out.shape == (8, 4, 4, 4) and torch.equal(out[:, :3], x)
    for i in range(8):
        group = x[i % 2 :: 2]  # N/G = 2: samples i, i+2, i+4, i+6
        std = (group.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        assert torch.allclose(out[i, 3], torch.full((4, 4), float(std)), atol=1e-6)


def test_pack_stacks_consecutive_samples_along_channels():
    """PacGAN: D with pack m judges m samples at once; its first conv takes m x 4 channels."""
    torch.manual_seed(0)
    d = models.Discriminator(width=4, image_size=16, norm="none", pack=2)
    x = torch.randn(6, 4, 16, 16)
    out = d(x)
    assert out.shape == (3,) and d.main[0].in_channels == 8
    by_hand = d.main(torch.cat([x[2:3], x[3:4]], 1)).view(-1)
    assert torch.allclose(out[1], by_hand[0])


def test_pack_must_divide_the_batch():
    with pytest.raises(config.ConfigError, match="model.pack"):
        config.load(None, ["model.pack=3", "train.batch_size=64"])


def test_ema_rampup_is_stylegan2_adas():
    """ema_nimg = min(halflife, rampup x cur_nimg); beta = 0.5 ** (batch / ema_nimg)."""
    t = config.load(None, ["train.ema_halflife=10000", "train.ema_rampup=0.05", "train.batch_size=64"]).train
    assert trainer.ema_beta(t, images_seen=0) == 0.0  # the first step copies G
    assert trainer.ema_beta(t, images_seen=64_000) == pytest.approx(0.5 ** (64 / 3200))
    assert trainer.ema_beta(t, images_seen=10**7) == pytest.approx(0.5 ** (64 / 10000))
    off = config.load(None, ["train.ema_halflife=10000"]).train
    assert trainer.ema_beta(off, images_seen=0) == pytest.approx(0.5 ** (64 / 10000))


def test_lecam_matches_the_reference_formula():
    """google/lecam-gan: mean(relu(D_real - ema_fake)^2) + mean(relu(ema_real - D_fake)^2)."""
    real, fake = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.3, -1.0, 0.9])
    a_real, a_fake = torch.tensor(0.8), torch.tensor(0.2)
    want = sum(max(r - 0.2, 0) ** 2 for r in real.tolist()) / 3 + sum(max(0.8 - f, 0) ** 2 for f in fake.tolist()) / 3
    assert float(losses.lecam(real, fake, a_real, a_fake)) == pytest.approx(want)


def test_lecam_anchors_are_emas_of_ds_mean_outputs(tiny_cfg):
    from ganlab import data

    cfg = tiny_cfg("train.lecam_weight=0.3", "train.lecam_decay=0.9", "model.d_norm=none")
    tr = trainer.Trainer(cfg, data.load_images(cfg.data).train, torch.device("cpu"))
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    tr._lecam(real, fake, first=True)
    assert torch.allclose(tr.lecam_anchors, torch.tensor([2.0, -0.5]))  # the first batch's means
    tr._lecam(real + 1, fake, first=False)
    assert torch.allclose(tr.lecam_anchors, torch.tensor([0.9 * 2.0 + 0.1 * 3.0, -0.5]))
    assert "lecam_anchors" in tr.state_dict()


def test_bcr_is_the_squared_output_difference():
    out, aug = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    assert float(losses.consistency(out, aug)) == pytest.approx((1 + 4) / 2)


def test_r1_auto_is_adas_heuristic():
    cfg = config.load(None, ["train.r1_gamma=auto", "data.image_size=64", "train.batch_size=64"])
    assert trainer.r1_gamma(cfg) == pytest.approx(0.0128)
    assert trainer.r1_gamma(config.load(None, ["train.r1_gamma=2.5"])) == 2.5


def test_minibatch_std_keeps_two_d_forwards():
    """With minibatch std a sample's output depends on its group: the lean step must not put reals
    and fakes in one batch."""
    d = models.Discriminator(width=4, image_size=16, norm="none", mbstd_group=4)
    assert models.batch_dependent(d) and not models.batch_dependent(models.Discriminator(4, 16, "none"))


def test_paired_study_analysis_is_a_paired_t_test_on_log_ratios(tmp_path):
    """scripts/paired_study.py: per-seed log ratios, a one-sided paired t-test, and the smallest effect
    that many pairs can show; checked against hand-computed values."""
    import json
    import math
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import paired_study

    res = paired_study.paired([0.0, 0.0, 0.0], [-0.1, -0.2, -0.3])
    assert res["mean"] == pytest.approx(-0.2) and res["sd"] == pytest.approx(0.1)
    assert res["t"] == pytest.approx(-0.2 / (0.1 / math.sqrt(3)))
    assert res["p_lower"] == pytest.approx(0.0371, abs=5e-4)  # t = -3.46 on 2 df (t.95 = 2.92, t.975 = 4.30)
    assert paired_study.detectable(0.1, 3) == pytest.approx((2.920 + 1.061) * 0.1 / math.sqrt(3), rel=1e-3)
    # rows out of order, and a seed with one arm only: pairs are matched by seed, the lone row left out;
    # the seeds' FIDs differ a lot and their ratios little, so a paired test is sure and an unpaired one is not
    table = [
        (3, "new", 1.4, 0.70),
        (1, "recommended", 2.0, 0.60),
        (2, "new", 2.1, 0.70),
        (9, "new", 9.0, 0.1),
        (2, "recommended", 4.0, 0.62),
        (1, "new", 1.0, 0.71),
        (3, "recommended", 3.0, 0.61),
    ]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "\n".join(
            json.dumps(
                {
                    "seed": s,
                    "arm": a,
                    "handover_fid": f,
                    "handover_fid_se": 0.01,
                    "precision": 0.9,
                    "recall": r,
                    "handed_over_step": 3000,
                }
            )
            for s, a, f, r in table
        )
    )
    logs = [math.log(n / r) for n, r in [(1.0, 2.0), (2.1, 4.0), (1.4, 3.0)]]
    want = paired_study.paired([0.0] * 3, logs)
    assert want["p_lower"] < 0.005
    line = next(ln for ln in paired_study.analyse(rows, "recommended").splitlines() if ln.startswith("new"))
    assert line.split()[:4] == ["new", "3", f"{100 * math.expm1(want['mean']):.1f}%", f"{want['p_lower']:.3f}"]
    assert line.split()[4] == f"{(0.70 + 0.70 + 0.71 - 0.60 - 0.62 - 0.61) / 3:+.3f}"


def test_r1_and_the_gradient_penalty_are_per_pack_under_pacgan():
    """Under PacGAN D judges packs: R1 is the squared gradient norm per pack (per sample it was exactly
    gamma/pack), and WGAN-GP interpolates each pack with one weight and pushes the pack's norm to 1."""
    from ganlab import losses, models

    torch.manual_seed(0)
    d = models.Discriminator(width=8, image_size=32, norm="none", pack=2)
    real, fake = torch.randn(8, 4, 32, 32), torch.randn(8, 4, 32, 32)
    packed = real.reshape(4, 8, 32, 32).requires_grad_(True)  # what D's first layer sees
    (g,) = torch.autograd.grad(d.main(packed).sum(), packed)
    want = g.pow(2).flatten(1).sum(1).mean()
    assert torch.allclose(losses.r1_penalty(d, real, pack=2), want, rtol=1e-5)
    assert torch.allclose(losses.r1_penalty(d, real, pack=1), want / 2, rtol=1e-5)  # the old, per-sample value
    gen = torch.Generator().manual_seed(3)
    eps = (
        torch.rand(4, 1, 1, 1, 1, generator=torch.Generator().manual_seed(3))
        .expand(-1, 2, -1, -1, -1)
        .reshape(8, 1, 1, 1)
    )
    x = (eps * real + (1 - eps) * fake).reshape(4, 8, 32, 32).requires_grad_(True)
    (gx,) = torch.autograd.grad(d.main(x).sum(), x)
    want_gp = ((gx.flatten(1).norm(dim=1) - 1) ** 2).mean()
    assert torch.allclose(losses.gradient_penalty(d, real, fake, gen, pack=2), want_gp, rtol=1e-5)


def test_lsgan_ada_rt_reads_lsgan_s_decision_point():
    """An lsgan D at chance outputs about 0.5 on everything: ada_rt is then about 0, not 1."""
    from ganlab import losses

    at_chance = 0.5 + 0.01 * torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert abs(losses.ada_rt("lsgan", at_chance).item()) < 0.15
    assert losses.ada_rt("lsgan", torch.full((10,), 0.9)).item() == 1.0
    assert losses.ada_rt("hinge", at_chance).item() == 1.0  # a logit of 0.5 is on the real side


def test_the_overfit_probe_leaves_a_d_in_eval_mode_in_eval_mode(tiny_cfg):
    """_sigma_held restores each spectral-norm module's own flag (it used to set train mode on exit)."""
    from ganlab import data, trainer

    cfg = tiny_cfg("model.spectral_norm=true", "model.d_norm=none")
    images = data.load_images(cfg.data)
    tr = trainer.Trainer(cfg, images.train, torch.device("cpu"), holdout_images=images.holdout)
    tr.d.eval()
    tr.overfit_probe()
    assert tr.sn_all and not any(m.training for m in tr.sn_all)
    tr.d.train()
    tr.overfit_probe()
    assert all(m.training for m in tr.sn_all)


def test_paired_study_runs_at_most_at_once_in_seed_order_and_a_failed_run_leaves_no_row(tmp_path, monkeypatch):
    """scripts/paired_study.py --at-once: never more runs at a time than asked, a seed's arms launched
    together before the next seed's, every finished run a row, a failed run none (and a line)."""
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import paired_study

    procs, most, order = [], [0], []

    def launch(study_path, study, arm, seed, extra, workdir):  # a short process instead of a training run
        order.append((seed, arm))
        code = "import time; time.sleep(0.3)" + ("; raise SystemExit(1)" if arm == "bad" else "")
        procs.append(subprocess.Popen([sys.executable, "-c", code]))
        most[0] = max(most[0], sum(p.poll() is None for p in procs))  # alive at once, this one included
        return procs[-1], open(workdir / f"{arm}-s{seed}.log", "w"), 0.0

    def result(workdir, arm, seed):
        return {"handover_fid": 1.0}

    monkeypatch.setattr(paired_study, "launch", launch)
    monkeypatch.setattr(paired_study, "result", result)
    study = {"arms": {"a": {}, "b": {}, "bad": {}}}
    rows = list(paired_study.run_all(tmp_path / "s.yaml", study, [0, 1], ["a", "b", "bad"], [], tmp_path, 2))
    assert most[0] <= 2
    assert order == [(0, "a"), (0, "b"), (0, "bad"), (1, "a"), (1, "b"), (1, "bad")]
    assert sorted((r["seed"], r["arm"]) for r in rows) == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]


def test_a_grid_enlarged_keeps_every_pixel_and_adds_no_smoothing(tmp_path):
    """protocol.save_grid(scale=2): each pixel becomes a 2 x 2 block of the same colour (nearest), so a
    docs grid shows the samples as they are, only bigger."""
    import numpy as np
    from PIL import Image

    from ganlab.eval import protocol

    img = torch.randint(0, 256, (2, 4, 8, 8), dtype=torch.uint8)
    img[:, 3] = 255  # opaque: the checkerboard does not show through
    small = np.asarray(Image.open(protocol.save_grid(img, tmp_path / "a.png", nrow=1)))
    big = np.asarray(Image.open(protocol.save_grid(img, tmp_path / "b.png", nrow=1, scale=2)))
    assert small.shape[:2] == (2 + 8 + 2 + 8 + 2, 2 + 8 + 2) and big.shape[:2] == (2 + 16 + 2 + 16 + 2, 2 + 16 + 2)
    first_small, first_big = small[2:10, 2:10], big[2:18, 2:18]  # the first image, padding off
    assert (first_big[0::2, 0::2] == first_small).all() and (first_big[1::2, 1::2] == first_small).all()
