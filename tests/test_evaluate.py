"""Evaluation through the real torch-fidelity code path, offline: InceptionV3 with random weights
written to a temp file and passed as eval.weights (inception-v3-compat), small sample counts."""

import numpy as np
import pytest
import torch
from PIL import Image

from ganlab import config, data
from ganlab.eval import extractors, protocol


def make_cfg(tmp_path, weights, *extra):
    return config.load(
        None,
        [
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.image_size=32",
            f"eval.weights={weights}",
            "eval.feature_extractor=inception-v3-compat",
            "eval.num_samples=24",
            "eval.batch_size=12",
            "eval.kid_subset_size=12",
            "model.nz=8",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def sprites():
    return data.make_sprites(48, 32, seed=7)


def test_fid_real_vs_real_is_zero_and_grows_with_noise(tmp_path, inception_weights, sprites):
    cfg = make_cfg(tmp_path, inception_weights, "eval.metrics=[fid]", "eval.fid_alpha=false")
    real = sprites[:16]
    ev = protocol.Evaluator(cfg, real, "cpu")
    assert ev.extractor.name == "inception-v3-compat" and not ev.extractor.random
    fids = []
    g = torch.Generator().manual_seed(0)
    for sigma in (0, 20, 60, 120):
        noisy = (real.float() + sigma * torch.randn(real.shape, generator=g)).clamp(0, 255).to(torch.uint8)
        fids.append(ev.metrics_for(noisy)["fid"])
    assert abs(fids[0]) < 1e-3
    assert fids[0] < fids[1] < fids[2] < fids[3], fids


def test_in_memory_equals_folder(tmp_path, inception_weights, sprites):
    import torch_fidelity

    cfg = make_cfg(tmp_path, inception_weights)
    ev = protocol.Evaluator(cfg, sprites[:16], "cpu")
    fake = sprites[24:40]
    comp = protocol.composite(fake, cfg.eval.background)
    mem = torch_fidelity.calculate_metrics(
        input1=protocol.TensorImages(comp),
        input2=protocol.TensorImages(ev.real),
        fid=True,
        cuda=False,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=inception_weights,
        batch_size=8,
        verbose=False,
        cache=False,
        save_cpu_ram=True,
    )
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(comp):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    disk = torch_fidelity.calculate_metrics(
        input1=str(folder),
        input2=protocol.TensorImages(ev.real),
        fid=True,
        cuda=False,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=inception_weights,
        batch_size=8,
        verbose=False,
        cache=False,
        save_cpu_ram=True,
        samples_shuffle=False,
    )
    assert mem["frechet_inception_distance"] == pytest.approx(disk["frechet_inception_distance"], rel=1e-4)
    ours = ev.metrics_for(fake)["fid"]
    assert ours == pytest.approx(mem["frechet_inception_distance"], rel=1e-4)


def test_real_statistics_cache_hits_on_second_run(tmp_path, inception_weights, sprites):
    cfg = make_cfg(tmp_path, inception_weights)
    ev1 = protocol.Evaluator(cfg, sprites[:16], "cpu")
    m1 = ev1.metrics_for(sprites[24:40])
    assert ev1.real_reads == 32  # rgb and alpha computed the first time
    ev1.metrics_for(sprites[24:40])
    assert ev1.real_reads == 32  # and never again in the run
    ev2 = protocol.Evaluator(cfg, sprites[:16], "cpu")  # a new run on the same data
    m2 = ev2.metrics_for(sprites[24:40])
    assert ev2.real_reads == 0  # rgb and alpha both from the cache
    assert m1 == pytest.approx(m2)
    assert set(m1) >= {"fid", "isc", "kid", "fid_alpha"}
    assert len(ev2._nets) == 1  # one extractor, built once
    # anything that changes the real features gives another cache entry
    cfg_b = make_cfg(tmp_path, inception_weights, "eval.background=white")
    assert protocol.Evaluator(cfg_b, sprites[:16], "cpu").real_cache_name("rgb") != ev2.real_cache_name("rgb")


def test_metrics_equal_torch_fidelitys_own(tmp_path, inception_weights, sprites):
    """The whole metric set (FID, IS, KID, precision/recall) through ganlab's path equals
    torch_fidelity.calculate_metrics on the same images and settings, within 1e-4 relative."""
    import torch_fidelity

    cfg = make_cfg(tmp_path, inception_weights, "eval.metrics=[fid,isc,kid,prc]", "eval.kid_subset_size=10")
    ev = protocol.Evaluator(cfg, sprites[:16], "cpu")
    ours = ev.metrics_for(sprites[24:40])
    ref = torch_fidelity.calculate_metrics(
        input1=protocol.TensorImages(protocol.composite(sprites[24:40], cfg.eval.background)),
        input2=protocol.TensorImages(ev.real),
        fid=True,
        isc=True,
        kid=True,
        prc=True,
        cuda=False,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=inception_weights,
        batch_size=cfg.eval.batch_size,
        kid_subset_size=10,
        isc_splits=10,
        rng_seed=cfg.eval.seed,
        verbose=False,
        cache=False,
        save_cpu_ram=True,
    )
    for name, key in [
        ("fid", "frechet_inception_distance"),
        ("isc", "inception_score_mean"),
        ("precision", "precision"),
        ("recall", "recall"),
    ]:
        assert ours[name] == pytest.approx(ref[key], rel=1e-4, abs=1e-9), name
    # torch-fidelity computes KID's kernels in float32 (values ~1, rounding ~1e-7 each, and KID is a
    # difference of their means): ours, in float64, agrees to that rounding, not to 1e-4 of a KID of 3e-5
    assert ours["kid"] == pytest.approx(ref["kernel_inception_distance_mean"], abs=1e-7)


def test_random_extractor_keeps_activations_alive(tmp_path):
    """Distinct sets give distinct, nonzero FIDs in the order: same-distribution subsets < another
    distribution < heavy noise (a default-init random InceptionV3 gives 0.0 for everything)."""
    cfg = config.load(
        None,
        [
            f"data.cache_dir={tmp_path / 'cache'}",
            "eval.feature_extractor=inception-v3-random",
            "eval.metrics=[fid]",
            "eval.fid_alpha=false",
            "eval.batch_size=20",
            "data.image_size=32",
        ],
    )
    a = data.make_sprites(60, 32, seed=1)
    ev = protocol.Evaluator(cfg, a[:30], "cpu")
    assert ev.extractor.random and ev.extractor.name == "inception-v3-random"
    same = ev.metrics_for(a[30:60])["fid"]
    rng = np.random.RandomState(0)
    other = torch.from_numpy(rng.randint(0, 256, (30, 4, 32, 32)).astype(np.uint8))  # not sprites at all
    other[:, 3] = 255
    noisy = (a[:30].float() + 40 * torch.randn(a[:30].shape)).clamp(0, 255).to(torch.uint8)
    far = ev.metrics_for(other)["fid"]
    mid = ev.metrics_for(noisy)["fid"]
    assert 0 < same < mid < far, (same, mid, far)


def test_kid_subset_is_clamped(tmp_path, script_extractor, sprites):
    cfg = config.load(
        None,
        [
            f"data.cache_dir={tmp_path / 'cache'}",
            f"eval.feature_extractor={script_extractor}",
            "eval.num_samples=10",
            "eval.kid_subset_size=1000",
            "eval.batch_size=5",
        ],
    )
    ev = protocol.Evaluator(cfg, sprites[:7], "cpu")
    assert ev.kid_subset_size(10, 7) == 3  # by the images passed; never the whole set (no resampling)
    assert ev.kid_subset_size(3, 50) == 1 + 1  # at least 2
    assert ev.kid_subset_size(5000, 5000) == 1000
    m = ev.metrics_for(sprites[10:20])
    assert np.isfinite(m["kid"]) and m["kid_std"] > 0  # subsets differ, so KID has a spread


def test_torchscript_extractor_hash_joins_the_signature(tmp_path, script_extractor, sprites):
    cfg = config.load(None, [f"data.cache_dir={tmp_path / 'cache'}", f"eval.feature_extractor={script_extractor}"])
    ev = protocol.Evaluator(cfg, sprites[:8], "cpu")
    assert ev.extractor.name.startswith("torchscript-") and ev.signature["weights"] == extractors.file_hash(
        script_extractor
    )


def test_missing_weights_fail_before_training(tmp_path):
    cfg = config.load(None, [f"data.cache_dir={tmp_path}", "eval.feature_extractor=inception-v3-compat"])
    with pytest.raises(extractors.EvalError, match="weights are not available"):
        extractors.resolve(cfg)
    cfg = config.load(None, [f"eval.weights={tmp_path / 'nope.pth'}"])
    with pytest.raises(extractors.EvalError, match="is not a file"):
        extractors.resolve(cfg)


def test_composite_same_for_real_and_fake():
    u8 = torch.tensor([[[[255]], [[0]], [[0]], [[128]]]], dtype=torch.uint8)
    white = protocol.composite(u8, "white")[0, :, 0, 0].tolist()
    black = protocol.composite(u8, "black")[0, :, 0, 0].tolist()
    assert white == [255, 127, 127] and black == [128, 0, 0]
    assert protocol.alpha_as_rgb(u8)[0, :, 0, 0].tolist() == [128, 128, 128]


def test_the_evaluation_device_joins_the_signature(tmp_path, script_extractor, sprites):
    """Standing statistics and batch-mode BN are computed on the evaluation device, so the same run
    evaluated elsewhere is another protocol (meta stands in for a GPU: only the signature is built)."""
    cfg = config.load(None, [f"data.cache_dir={tmp_path / 'cache'}", f"eval.feature_extractor={script_extractor}"])
    cpu = protocol.Evaluator(cfg, sprites[:8], "cpu")
    other = protocol.Evaluator(cfg, sprites[:8], "meta")
    assert cpu.signature["device"] == "cpu" and other.signature["device"] == "meta"
    assert cpu.signature_hash != other.signature_hash


def test_torch_fid_and_kid_equal_torch_fidelitys():
    """ganlab/eval/stats.py (float64 torch, on any device) against torch-fidelity's own functions on
    the same features: within 1e-4 relative."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    from ganlab.eval import stats

    g = torch.Generator().manual_seed(0)
    a = torch.randn(600, 32, generator=g)
    b = torch.randn(500, 32, generator=g) * 1.3 + 0.2
    want = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), False)[
        "frechet_inception_distance"
    ]
    assert stats.fid(a, b) == pytest.approx(want, rel=1e-4)
    for n1, n2 in ((40, 30), (30, 40), (20, 300)):  # fewer samples than features: the thin form
        x, y = torch.randn(n1, 64, generator=g), torch.randn(n2, 64, generator=g) * 1.2 + 0.1
        want = fid_statistics_to_metric(fid_features_to_statistics(x), fid_features_to_statistics(y), False)
        assert stats.fid(x, y) == pytest.approx(want["frechet_inception_distance"], rel=1e-4), (n1, n2)
    acc = stats.FeatureStats(32)
    for part in a.split(128):  # accumulated batch by batch: the same statistics
        acc.add(part)
    mu, cov = acc.mean_cov()
    assert torch.allclose(cov, torch.from_numpy(np.cov(a.double().numpy(), rowvar=False)), atol=1e-10)
    ref = kid_features_to_metric(
        a,
        b,
        kid_subsets=20,
        kid_subset_size=100,
        rng_seed=7,
        verbose=False,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
    )
    mean, std = stats.kid(a, b, subsets=20, subset_size=100, seed=7)
    assert mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-4)
    assert std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-4)
    assert stats.fid(a, a) == pytest.approx(0.0, abs=1e-6)


def test_long_feature_passes_say_how_far_they_are(tmp_path, script_extractor, sprites, caplog):
    """The held-out side and the copy check's training split are one-off passes that take minutes
    with InceptionV3 on a CPU: each says what it is doing and how far it is."""
    import logging

    cfg = config.load(
        None,
        [
            f"data.cache_dir={tmp_path / 'cache'}",
            f"eval.feature_extractor={script_extractor}",
            "eval.batch_size=4",
            "eval.num_samples=8",
            "eval.kid_subset_size=4",
        ],
    )
    ev = protocol.Evaluator(cfg, sprites[:40], "cpu")
    with caplog.at_level(logging.INFO, logger="ganlab"):
        ev.metrics_for(sprites[40:48])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("held-out features (rgb)")]
    assert lines[0].startswith("held-out features (rgb): 0/40 images") and lines[-1].startswith(
        "held-out features (rgb): 40 images done"
    )


def test_every_eval_key_is_classified_and_the_signatures_follow_the_table(tmp_path, script_extractor, sprites):
    """protocol.EVAL_KEYS says for every eval.* key which signature it joins; a new key missing from it,
    or a signature that disagrees with it, fails here (they were three hand-kept lists)."""
    import dataclasses

    from conftest import tiny_overrides

    keys = {f.name for f in dataclasses.fields(config.EvalConfig)}
    assert keys == set(protocol.EVAL_KEYS), keys ^ set(protocol.EVAL_KEYS)
    ev = protocol.Evaluator(config.load(None, tiny_overrides(tmp_path, script_extractor)), sprites[:24], "cpu")
    for key, role in protocol.EVAL_KEYS.items():
        if role == "extractor":  # joins as the extractor's name and weights hash ("weights"), not as itself
            continue
        assert (key in ev.signature) == (role in ("both", "selection")), key
        assert (key in ev.handover) == (role in ("both", "handover")), key

    def hashes(*sets):
        e = protocol.Evaluator(
            config.load(None, tiny_overrides(tmp_path, script_extractor) + list(sets)), sprites[:24], "cpu"
        )
        return e.signature_hash, e.handover_hash

    base = hashes()
    assert hashes("eval.every=3") == base  # none: neither moves
    sel, hand = hashes("eval.seed=99")  # selection only
    assert sel != base[0] and hand == base[1]
    sel, hand = hashes("eval.background=white")  # both
    assert sel != base[0] and hand != base[1]
    sel, hand = hashes("eval.handover_draws=4")  # hand-over only
    assert sel == base[0] and hand != base[1]
