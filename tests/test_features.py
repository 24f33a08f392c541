"""The domain encoder (ganlab features): trained on the training split only, exported as a
TorchScript extractor that evaluation accepts, and its hash joins the evaluation signature."""
import json

import torch

from ganlab import config, data, evaluate, features


def test_encoder_trains_on_the_training_split_only_and_exports_an_extractor(tiny_cfg, monkeypatch, tmp_path):
    seen = []
    orig = features.train_encoder
    def spy(train_u8, *a, **k):
        seen.append(train_u8.clone())
        return orig(train_u8, *a, **k)
    monkeypatch.setattr(features, "train_encoder", spy)
    cfg = tiny_cfg()
    path = features.build(cfg, steps=6, batch_size=16, out_dir=tmp_path / "enc")
    images = data.load_images(cfg.data, cfg.seed)
    held = {bytes(h.numpy().tobytes()) for h in images.holdout}
    assert len(seen) == 1 and not ({bytes(x.numpy().tobytes()) for x in seen[0]} & held)
    assert len(seen[0]) == len(images.train)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["split"] == "train" and card["data_hash"] == images.content_hash and card["steps"] == 6
    assert path.name == f"encoder-{card['sha256_16']}.pt"
    net = torch.jit.load(str(path))
    assert net(torch.zeros(3, 3, 32, 32, dtype=torch.uint8)).shape == (3, features.DIM)
    ev_cfg = config.load(None, [f"{k}={v}" for k, v in config.flatten(cfg).items() if k != "variant"]
                         + [f"eval.feature_extractor={path}"])
    ev = evaluate.Evaluator(ev_cfg, images.holdout, "cpu")
    assert ev.signature["extractor"] == f"torchscript-{evaluate.file_hash(path)}"
    same = ev.metrics_for(images.holdout)["fid"]
    noisy = ev.metrics_for((images.holdout.float() + 60 * torch.randn(images.holdout.shape)).clamp(0, 255).to(torch.uint8))["fid"]
    assert abs(same) < 1e-3 < noisy


def test_augmented_views_never_change_alpha_coverage():
    """Colour jitter touches RGB only: a fully transparent image stays the background in every view."""
    clear = torch.zeros(4, 4, 32, 32, dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    v = features.views(clear, "gray", g)
    assert torch.allclose(v, torch.zeros_like(v), atol=2 / 127.5)        # gray background, nothing else
