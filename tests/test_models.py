import pytest
import torch

from ganlab import config, models


def seed_cfg():
    return config.load(None, ["model.nz=100", "model.g_width=64", "model.d_width=64"])


def test_parameter_counts_match_the_seed():
    g, d = models.build(seed_cfg().model, 64)
    assert models.count_params(g) == 3_577_728
    assert models.count_params(d) == 2_766_592


def test_shapes_and_logits():
    g, d = models.build(seed_cfg().model, 64)
    x = g(torch.randn(3, 100))
    assert x.shape == (3, 4, 64, 64) and x.abs().max() <= 1
    out = d(x)
    assert out.shape == (3,)
    assert not isinstance(d.main[-1], torch.nn.Sigmoid)


@pytest.mark.parametrize("size", [32, 128])
def test_other_sizes(size):
    c = config.load(None, ["model.g_width=8", "model.d_width=8"])
    g, d = models.build(c.model, size)
    assert g(torch.randn(2, 100)).shape == (2, 4, size, size)
    assert d(torch.randn(2, 4, size, size)).shape == (2,)


@pytest.mark.parametrize("init", ["normal", "xavier", "kaiming", "orthogonal"])
def test_init_schemes_differ(init):
    c = config.load(None, [f"model.init={init}"])
    g, _ = models.build(c.model, 64, seed=0)
    w = g.main[0].weight
    if init == "normal":
        assert abs(w.std().item() - 0.02) < 0.002
    else:
        assert abs(w.std().item() - 0.02) > 0.002


def test_spectral_norm_and_no_batchnorm():
    c = config.load(None, ["model.spectral_norm=true", "model.spectral_norm_g=true", "model.d_norm=none"])
    g, d = models.build(c.model, 64)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    assert any("parametrizations" in n for n, _ in d.named_parameters())
    assert any("parametrizations" in n for n, _ in g.named_parameters())
    d(g(torch.randn(2, 100)))


def test_standing_stats_match_training_mode_output():
    """Early in training, eval-mode running statistics give samples far from what training produced;
    standing statistics match training-mode (batch-statistics) output."""
    c = config.load(None, ["model.g_width=16"])
    g, _ = models.build(c.model, 32, seed=0)
    g.train()
    with torch.no_grad():
        for _ in range(3):  # a few training-mode passes
            g(torch.randn(64, 100))
        z = torch.randn(256, 100)
        train_out = g(z)
        g.eval()
        running_out = g(z)
        models.standing_stats(g, 100, "cpu", batches=8, batch_size=256)
        standing_out = g(z)

    def gap(a, b):
        return (a.mean(0) - b.mean(0)).abs().mean().item() + (a.std(0) - b.std(0)).abs().mean().item()

    assert gap(standing_out, train_out) < 0.5 * gap(running_out, train_out)
    assert not g.training
