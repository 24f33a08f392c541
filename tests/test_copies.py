"""The copy check (ganlab/eval/copies.py) through the real evaluator and torch-fidelity's extractor
path: a generator that replays held-out images is not flagged, one that replays training images is,
by the share it replays; every evaluation of a run logs it to MLflow."""

import mlflow
import pytest
import torch

from ganlab import config, data, train
from ganlab.eval import copies, protocol
from ganlab.track import tracking_uri


class Replay(torch.nn.Module):
    """A 'generator' that returns stored images: the evaluator's k-th fixed latent -> image k."""

    def __init__(self, images_u8: torch.Tensor, alpha: str, latents: torch.Tensor):
        super().__init__()
        self.register_buffer("images", data.to_model_space(images_u8, alpha))
        self.register_buffer("latents", latents)

    def forward(self, z):  # called batch by batch: find each latent's row
        idx = (z[:, None, :] == self.latents[None]).all(-1).float().argmax(1)
        return self.images[idx]


@pytest.fixture
def setting(tiny_cfg):
    cfg = tiny_cfg("data.sprites=600", "data.holdout=0.3", "eval.num_samples=180")
    images = data.load_images(cfg.data, cfg.seed)
    return cfg, images, protocol.Evaluator(cfg, images.holdout, "cpu", images=images)


def replayed(images, share_train: float, n: int, seed: int = 0) -> torch.Tensor:
    """n images: `share_train` of them training images, the rest held-out ones, shuffled."""
    g = torch.Generator().manual_seed(seed)
    k = int(round(share_train * n))
    picks = torch.cat(
        [
            images.train[torch.randperm(len(images.train), generator=g)[:k]],
            images.holdout[torch.randperm(len(images.holdout), generator=g)[: n - k]],
        ]
    )
    return picks[torch.randperm(n, generator=g)]


def test_replayed_training_images_are_flagged_by_the_share_replayed(setting):
    cfg, images, ev = setting
    n = cfg.eval.num_samples
    held = ev(Replay(replayed(images, 0.0, n), cfg.data.alpha, ev.latents))
    half = ev(Replay(replayed(images, 0.5, n), cfg.data.alpha, ev.latents))
    assert held["copy_share"] <= 0.05  # unseen images: about the quantile (0.01)
    assert 0.45 <= half["copy_share"] <= 0.6  # every replayed training image, plus the quantile
    assert half["copy_nn_ratio"] < 0.5 * held["copy_nn_ratio"]


def test_the_reference_is_the_held_out_images_distances_and_the_training_features_are_cached(setting, tmp_path):
    cfg, images, ev = setting
    ref = ev.copies
    assert len(ref.train) == len(images.train) and len(ref.holdout_nn) == len(images.holdout)
    # held-out images measured against the reference: the quantile's share of them, by construction
    assert ref.measure(ev.features(images.holdout))["copy_share"] == pytest.approx(cfg.eval.copy_quantile, abs=0.01)
    cached = list((tmp_path / "cache" / "fidelity").glob("copycheck-*.pt"))
    assert len(cached) == 1 and torch.equal(torch.load(cached[0]), ref.train)
    torch.save(torch.zeros_like(ref.train), cached[0])  # a later run reads the cache, not the images
    again = protocol.Evaluator(cfg, images.holdout, "cpu", images=images)
    assert torch.equal(again.copies.train, torch.zeros_like(ref.train))


def test_nearest_distances_are_to_the_nearest_row():
    ref = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    q = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])
    assert copies.nearest_distances(q, ref, chunk=2).tolist() == [0.0, 1.0, 5.0]


def test_every_evaluation_of_a_run_logs_the_copy_check(tiny_cfg):
    cfg = tiny_cfg("tracking.enabled=true", "tracking.system_metrics=false", "tracking.register_model=false")
    res = train.train(cfg, quiet=True)
    c = mlflow.MlflowClient(tracking_uri(cfg))
    evals = [m.step for m in c.get_metric_history(res.run_id, "fid")]
    assert evals == [8, 16, 24]
    for name in ("copy_share", "copy_nn_ratio"):
        hist = c.get_metric_history(res.run_id, name)
        assert [m.step for m in hist] == evals and all(m.value >= 0 for m in hist)


def test_copy_quantile_zero_turns_it_off_and_a_bad_value_is_one_line(tiny_cfg, tmp_path):
    cfg = tiny_cfg("eval.copy_quantile=0")
    images = data.load_images(cfg.data, cfg.seed)
    assert protocol.Evaluator(cfg, images.holdout, "cpu", images=images).copies is None
    with pytest.raises(config.ConfigError, match="copy_quantile"):
        tiny_cfg("eval.copy_quantile=0.9")


def test_the_check_reuses_fids_features_of_the_samples_and_leaves_no_file(setting, monkeypatch):
    """No second extractor pass over the samples (it would double an InceptionV3 evaluation on a CPU):
    the features torch-fidelity computed for FID are read back, then their files removed."""
    cfg, images, ev = setting
    g = Replay(replayed(images, 0.5, cfg.eval.num_samples), cfg.data.alpha, ev.latents)
    expected = ev.copies.measure(ev.features(ev._generate(g, ev.latents)))
    monkeypatch.setattr(protocol.Evaluator, "features", lambda self, x: pytest.fail("a second extractor pass"))
    m = ev(g)
    assert m["copy_share"] == pytest.approx(expected["copy_share"]) and m["copy_nn_ratio"] == pytest.approx(
        expected["copy_nn_ratio"], rel=1e-4
    )
    assert not list(ev.cache_root.glob("ganlab-fake-*"))


def test_copy_check_says_when_its_threshold_is_degenerate():
    from ganlab.eval import copies

    torch.manual_seed(0)
    train = torch.randn(200, 8)
    ok = copies.reference(train, torch.randn(300, 8), 0.01)
    assert ok.degenerate() == ""
    twins = copies.reference(train, torch.cat([train[:10], torch.randn(290, 8)]), 0.01)  # 10 exact twins
    assert "about 0" in twins.degenerate()
    few = copies.reference(train, torch.randn(20, 8), 0.01)
    assert "too few" in few.degenerate()
