"""The domain encoder and the extractors beside it: trained on the training split only, picked by
`auto` when there are no InceptionV3 weights (trained on first use, cached by data hash), its hash
and recipe in the signature, its file logged with the run; DINOv2 and CLIP through torch-fidelity's
own extractors, from local random-weights files."""

import json
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import free_port, tiny_overrides

from ganlab import config, data, train
from ganlab.eval import encoder, encoder_store, extractors, protocol, validity
from ganlab.track import tracking_uri


@pytest.fixture(scope="module")
def sprites():
    return data.make_sprites(24, 32, seed=7)


@pytest.fixture
def auto_cfg(tmp_path, script_extractor):
    """A tiny config with eval.feature_extractor: auto and a 4-step encoder recipe (no weights here)."""

    def make(*extra):
        over = [o for o in tiny_overrides(tmp_path, script_extractor) if not o.startswith("eval.feature_extractor")]
        return config.load(None, over + ["eval.encoder_steps=4", "eval.encoder_batch_size=16", *extra])

    return make


def test_encoder_trains_on_the_training_split_only_and_exports_an_extractor(auto_cfg, monkeypatch, tmp_path):
    seen = []
    orig = encoder.train_encoder

    def spy(train_u8, *a, **k):
        seen.append(train_u8.clone())
        return orig(train_u8, *a, **k)

    monkeypatch.setattr(encoder, "train_encoder", spy)
    cfg = auto_cfg("eval.encoder_steps=6")
    path = encoder.build(cfg, out_dir=tmp_path / "enc")
    images = data.load_images(cfg.data, cfg.seed)
    held = {bytes(h.numpy().tobytes()) for h in images.holdout}
    assert len(seen) == 1 and not ({bytes(x.numpy().tobytes()) for x in seen[0]} & held)
    assert len(seen[0]) == len(images.train)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["split"] == "train" and card["data_hash"] == images.content_hash and card["recipe"]["steps"] == 6
    assert path.name == f"encoder-{card['sha256_16']}.pt"
    net = torch.jit.load(str(path))
    assert net(torch.zeros(3, 3, 64, 64, dtype=torch.uint8)).shape == (3, encoder.DIM)  # any size in
    ev = protocol.Evaluator(auto_cfg(f"eval.feature_extractor={path}"), images.holdout, "cpu")
    assert ev.signature["extractor"] == f"torchscript-{extractors.file_hash(path)}"
    same = ev.metrics_for(images.holdout)["fid"]
    noisy = ev.metrics_for(
        (images.holdout.float() + 60 * torch.randn(images.holdout.shape)).clamp(0, 255).to(torch.uint8)
    )["fid"]
    assert abs(same) < 1e-3 < noisy


def test_the_same_weights_exported_twice_have_one_name(tmp_path):
    """Two processes saving the same weights write different TorchScript bytes (a random serialization
    id, renumbered classes): the encoder is named by its weights, so two caches name one encoder once."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from ganlab.eval import encoder; torch.manual_seed(0); "
        "print(encoder.export(encoder.Encoder(32).eval(), sys.argv[1], {'recipe': {}}))"
    )
    a, b = (
        Path(
            subprocess.run(
                [sys.executable, "-c", code, str(tmp_path / d)], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        for d in ("a", "b")
    )
    assert a.read_bytes() != b.read_bytes() and a.name == b.name
    torch.manual_seed(1)
    assert encoder.export(encoder.Encoder(32).eval(), tmp_path / "c", {"recipe": {}}).name != a.name


def test_auto_without_weights_trains_the_domain_encoder_once_and_signs_with_it(auto_cfg, monkeypatch):
    calls = []
    orig = encoder.train_encoder
    monkeypatch.setattr(encoder, "train_encoder", lambda *a, **k: calls.append(1) or orig(*a, **k))
    cfg = auto_cfg()
    holdout = data.load_images(cfg.data, cfg.seed).holdout
    first = protocol.Evaluator(cfg, holdout, "cpu")
    again = protocol.Evaluator(cfg, holdout, "cpu")  # a second run on the same data: cached
    assert len(calls) == 1 and not first.extractor.random
    assert first.extractor.name.startswith("domain-") and first.signature_hash == again.signature_hash
    assert first.signature["extractor_recipe"]["steps"] == 4
    assert first.signature["extractor_recipe"]["data_hash"] == data.load_images(cfg.data, cfg.seed).content_hash
    longer = protocol.Evaluator(auto_cfg("eval.encoder_steps=5"), holdout, "cpu")  # another recipe: another encoder
    assert len(calls) == 2 and longer.signature_hash != first.signature_hash
    assert longer.signature["weights"] != first.signature["weights"]
    other_split = protocol.Evaluator(auto_cfg("data.min_holdout=40"), holdout, "cpu")  # another training split
    assert len(calls) == 3 and other_split.signature["weights"] != first.signature["weights"]


def test_a_second_machine_takes_the_encoder_from_the_tracking_store(auto_cfg, monkeypatch, tmp_path):
    """Two cache folders (two machines) sharing one tracking store: the first trains and publishes, the
    second downloads the same file (by its content hash) instead of training its own feature space;
    the encoder's recipe no longer depends on the run's seed."""
    store = f"tracking.uri=sqlite:///{tmp_path / 'team.db'}"
    a = auto_cfg("tracking.enabled=true", store, f"data.cache_dir={tmp_path / 'a'}")
    path_a, _ = encoder.ensure(a)

    def no_training(*args, **kwargs):
        raise AssertionError("the second machine trained its own encoder")

    monkeypatch.setattr(encoder, "train_encoder", no_training)
    b = auto_cfg("tracking.enabled=true", store, f"data.cache_dir={tmp_path / 'b'}", "seed=7")
    path_b, card = encoder.ensure(b)
    assert path_b.name == path_a.name and path_b.read_bytes() == path_a.read_bytes() and path_b.parent != path_a.parent
    holdout = data.load_images(b.data, b.seed).holdout
    assert protocol.Evaluator(a, holdout, "cpu").handover_hash == protocol.Evaluator(b, holdout, "cpu").handover_hash
    with pytest.raises(AssertionError, match="trained its own"):  # another recipe is another encoder
        encoder.ensure(
            auto_cfg("tracking.enabled=true", store, f"data.cache_dir={tmp_path / 'b'}", "eval.encoder_seed=1")
        )


def test_random_inception_only_when_named(auto_cfg):
    cfg = auto_cfg()
    holdout = data.load_images(cfg.data, cfg.seed).holdout
    assert not protocol.Evaluator(cfg, holdout, "cpu").extractor.random
    named = protocol.Evaluator(
        auto_cfg("eval.feature_extractor=inception-v3-random", "eval.num_samples=8"), holdout, "cpu"
    )
    assert named.extractor.random and named.describe()["eval.random_features"] == "true"


def test_the_encoder_file_is_logged_with_the_run(auto_cfg, tmp_path):
    cfg = auto_cfg(
        "tracking.enabled=true",
        "tracking.system_metrics=false",
        "tracking.register_model=false",
        "train.steps=8",
        "eval.every=8",
    )
    train.train(cfg, quiet=True)
    client = mlflow.MlflowClient(tracking_uri(cfg))
    run = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])[0]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    sig = json.loads(run.data.tags["eval.signature_json"])
    h = sig["weights"]
    assert {f"evaluation/encoder-{h}.pt", f"evaluation/encoder-{h}.json"} <= logged, logged
    assert run.data.tags["eval.extractor"] == f"domain-{h}" and "extractor_recipe" in sig


def test_the_domain_encoder_ranks_degradations_on_a_small_fixture(auto_cfg):
    """docs/metrics.md's properties, small: noise, blur, eroded alpha and dropped modes each rank
    monotonically in the encoder's space (sprites: 5 shapes in many colours, 32 px), beyond the
    metric's own noise: the SD of FID over other draws of 128 undegraded images. A strict order
    between numbers closer than that noise held on one CPU and flipped on another (blur sigma 1 vs 0:
    2.4764 vs 2.4784 on an AMD EPYC with avx512_bf16)."""
    import statistics

    cfg = auto_cfg(
        "eval.encoder_steps=60",
        "eval.encoder_batch_size=32",
        "data.sprites=400",
        "data.min_holdout=100",
        "eval.num_samples=128",
        "eval.metrics=fid",
        "eval.fid_alpha=false",
    )
    images = data.load_images(cfg.data, cfg.seed)
    ev = protocol.Evaluator(cfg, images.holdout, "cpu")
    fid = lambda u8: ev.metrics_for(u8)["fid"]  # noqa: E731
    base = images.train[:128]
    draws = [
        fid(images.train[torch.randperm(len(images.train), generator=torch.Generator().manual_seed(k))[:128]])
        for k in range(4)
    ]
    noise = 2 * statistics.stdev(draws)
    curves = {
        "noise": [(s, fid(validity.gaussian_noise(base, s))) for s in (0, 24, 64)],
        "blur": [(s, fid(validity.blur(base, s))) for s in (0, 3, 6)],
        "erode": [(p, fid(validity.erode_alpha(base, p))) for p in (0, 1, 2)],
        "modes": [(f, fid(validity.mode_drop(images.train, 128, f, k=4))) for f in (1.0, 0.5, 0.25)],
    }
    bad = {k: c for k, c in curves.items() if not validity.monotone(c, noise)}
    assert not bad, (noise, bad)
    assert not validity.monotone([(0, 1.0), (1, 0.5), (2, 1.2)], 0.1)  # an inversion beyond the noise fails
    assert not validity.monotone([(0, 1.0), (1, 1.05), (2, 1.08)], 0.1)  # and so does no change beyond it


def test_augmented_views_never_change_alpha_coverage():
    """Colour jitter touches RGB only: a fully transparent image stays the background in every view."""
    clear = torch.zeros(4, 4, 32, 32, dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    v = encoder.views(clear, "gray", g)
    assert torch.allclose(v, torch.zeros_like(v), atol=2 / 127.5)  # gray background, nothing else


# ------------------------------------------------------------------------ DINOv2 and CLIP, offline


def dinov2_random_weights(path, dim=64, depth=2, grid=4):
    """A random state dict in the layout of Meta's dinov2_vit*14_pretrain.pth (a tiny one)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    sd = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, 1 + grid * grid, dim),
        "mask_token": torch.zeros(1, dim),
        "patch_embed.proj.weight": r(dim, 3, 14, 14),
        "patch_embed.proj.bias": r(dim),
        "norm.weight": torch.ones(dim),
        "norm.bias": torch.zeros(dim),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update(
            {
                b + "norm1.weight": torch.ones(dim),
                b + "norm1.bias": torch.zeros(dim),
                b + "norm2.weight": torch.ones(dim),
                b + "norm2.bias": torch.zeros(dim),
                b + "attn.qkv.weight": r(3 * dim, dim),
                b + "attn.qkv.bias": r(3 * dim),
                b + "attn.proj.weight": r(dim, dim),
                b + "attn.proj.bias": r(dim),
                b + "mlp.fc1.weight": r(4 * dim, dim),
                b + "mlp.fc1.bias": r(4 * dim),
                b + "mlp.fc2.weight": r(dim, 4 * dim),
                b + "mlp.fc2.bias": r(dim),
                b + "ls1.gamma": torch.ones(dim),
                b + "ls2.gamma": torch.ones(dim),
            }
        )
    torch.save(sd, path)
    return path


def clip_random_weights(path):
    """A TorchScript archive like OpenAI's CLIP .pt files (a tiny ViT), random weights: torch-fidelity
    reads the architecture from its state dict."""
    from torch_fidelity.feature_extractor_clip import CLIPVisual

    torch.manual_seed(0)

    class Clip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = CLIPVisual(32, 64, 1, 64, 32).visual
            self.text_projection = torch.nn.Parameter(torch.randn(16, 32))

        def forward(self, x):
            return self.visual(x)

    torch.jit.trace(Clip().eval(), torch.zeros(1, 3, 64, 64)).save(str(path))
    return path


@pytest.mark.parametrize(
    "name,make", [("dinov2-vit-s-14", dinov2_random_weights), ("clip-vit-b-32", clip_random_weights)]
)
def test_dinov2_and_clip_run_offline_from_a_local_weights_file(auto_cfg, tmp_path, name, make, sprites):
    weights = make(tmp_path / f"{name}.pth")
    cfg = auto_cfg(
        f"eval.feature_extractor={name}", f"eval.weights={weights}", "eval.metrics=fid", "eval.fid_alpha=false"
    )
    ev = protocol.Evaluator(cfg, sprites[:16], "cpu")
    assert ev.signature["weights"] == extractors.file_hash(weights) and not ev.extractor.random
    same = ev.metrics_for(sprites[:16])["fid"]
    noisy = ev.metrics_for((sprites[:16].float() + 80 * torch.randn(sprites[:16].shape)).clamp(0, 255).to(torch.uint8))[
        "fid"
    ]
    assert abs(same) < 1e-2 < noisy, (same, noisy)


def test_dinov2_without_weights_offline_is_one_line(auto_cfg, tmp_path):
    with pytest.raises(extractors.EvalError, match="needs eval.weights"):
        extractors.resolve(auto_cfg("eval.feature_extractor=dinov2-vit-s-14"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(extractors.EvalError, match="not a DINOv2"):
        extractors.resolve(auto_cfg("eval.feature_extractor=dinov2-vit-s-14", f"eval.weights={tmp_path / 'junk.pth'}"))


def test_standard_fid_is_reported_beside_another_extractor_when_inception_weights_exist(
    auto_cfg, inception_weights, script_extractor, sprites
):
    """eval.standard_fid: auto adds fid_standard (InceptionV3, torch-fidelity's compat path) beside the
    primary extractor when the weights are present; its weights join the signature."""
    base = [
        f"eval.feature_extractor={script_extractor}",
        "eval.metrics=fid",
        "eval.fid_alpha=false",
        "eval.num_samples=8",
    ]
    ev = protocol.Evaluator(
        auto_cfg(*base, f"eval.weights={inception_weights}", "eval.standard_fid=always"), sprites[:12], "cpu"
    )
    noisy = (sprites[:12].float() + 80 * torch.randn(sprites[:12].shape)).clamp(0, 255).to(torch.uint8)
    m = ev.metrics_for(noisy)
    assert set(m) == {"fid", "fid_standard"} and m["fid"] != m["fid_standard"] and m["fid_standard"] > 0
    # whether this machine has InceptionV3's weights must not split identical runs into two signatures:
    # fid_standard is never selected on, so its weights are a tag, not part of the signature
    assert "standard_weights" not in ev.signature and ev.describe()["eval.standard_weights"] == extractors.file_hash(
        inception_weights
    )
    no_weights = protocol.Evaluator(auto_cfg(*base), sprites[:12], "cpu")
    assert no_weights.signature_hash == ev.signature_hash
    # auto: on a CPU never (InceptionV3 would cost more than the run), on a GPU when the weights are here
    on_cpu = protocol.Evaluator(auto_cfg(*base, f"eval.weights={inception_weights}"), sprites[:12], "cpu")
    assert on_cpu.standard is None
    assert (
        extractors.standard(auto_cfg(*base, f"eval.weights={inception_weights}"), on_cpu.extractor, "cuda") is not None
    )
    off = protocol.Evaluator(
        auto_cfg(*base, f"eval.weights={inception_weights}", "eval.standard_fid=never"), sprites[:12], "cpu"
    )
    assert set(off.metrics_for(noisy)) == {"fid"} and "standard_weights" not in off.signature
    with pytest.raises(extractors.EvalError, match="standard_fid is always"):
        protocol.Evaluator(auto_cfg(*base, "eval.standard_fid=always"), sprites[:12], "cpu")


def test_a_damaged_cached_encoder_is_trained_again_not_used(auto_cfg, caplog):
    """A truncated encoder file in the cache (a full disk, a killed copy) is checked against the hash
    in its name, said in one warning, and replaced; it is never used."""
    import logging

    cfg = auto_cfg()
    path, _ = encoder.ensure(cfg)
    assert encoder.damaged(path) == ""
    path.write_bytes(path.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="ganlab"):
        again, _ = encoder.ensure(cfg)
    assert encoder.damaged(again) == "" and any("unreadable" in r.getMessage() for r in caplog.records)


def test_a_failed_encoder_upload_leaves_a_failed_run_not_a_running_one(auto_cfg, tmp_path):
    import mlflow

    from ganlab import track

    cfg = auto_cfg("tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path / 'team.db'}")
    path = encoder.build(cfg, out_dir=tmp_path / "enc")
    client = mlflow.MlflowClient(track.tracking_uri(cfg))
    (tmp_path / "not_a_folder").write_text("x")  # artifacts cannot be written under a file
    exp_id = client.create_experiment(
        encoder_store.ENCODERS, artifact_location=str(tmp_path / "not_a_folder" / "artifacts")
    )
    with pytest.raises(Exception):
        encoder_store.upload(client, exp_id, "somekey", path)
    runs = client.search_runs([exp_id])
    assert [r.info.status for r in runs] == ["FAILED"] and "upload failed" in runs[0].data.tags["ganlab.end_reason"]


# ------------------------------------------------------------------- one encoder for the whole team


def other_cpu(monkeypatch, when=lambda: True):
    """Encoders trained while `when()` come out slightly different, as on another CPU (other float
    rounding): same key, another file."""
    orig = encoder.train_encoder

    def train(*a, **k):
        enc = orig(*a, **k)
        if when():
            with torch.no_grad():
                next(enc.parameters()).add_(1e-3)
        return enc

    monkeypatch.setattr(encoder, "train_encoder", train)


def team(auto_cfg, tmp_path, machine, *extra):
    return auto_cfg(
        "tracking.enabled=true",
        f"tracking.uri=sqlite:///{tmp_path / 'team.db'}",
        f"data.cache_dir={tmp_path / machine}",
        *extra,
    )


def test_two_machines_publishing_at_once_adopt_one_encoder(auto_cfg, tmp_path, monkeypatch):
    """Machine A's upload is still in flight when machine B trains, uploads and publishes its own (another
    CPU, another file). Both must end on one encoder: B's, which claimed first, and A's upload is
    marked as not adopted. (By upload start time, A would have taken its own and B kept B's.)"""
    import threading

    import mlflow

    other_cpu(monkeypatch, when=lambda: threading.current_thread().name != "A")
    a_uploading, b_done = threading.Event(), threading.Event()
    orig_log = mlflow.MlflowClient.log_artifact

    def log_artifact(self, *args, **kwargs):
        if threading.current_thread().name == "A" and not b_done.is_set():
            a_uploading.set()
            assert b_done.wait(120)
        return orig_log(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", log_artifact)
    got = {}
    a = threading.Thread(target=lambda: got.setdefault("A", encoder.ensure(team(auto_cfg, tmp_path, "a"))[0]), name="A")
    a.start()
    assert a_uploading.wait(120)
    try:
        got["B"] = encoder.ensure(team(auto_cfg, tmp_path, "b"))[0]
    finally:
        b_done.set()
        a.join(120)
    assert got["A"].name == got["B"].name and got["A"].parent != got["B"].parent
    assert got["A"].read_bytes() == got["B"].read_bytes()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'team.db'}")
    runs = client.search_runs([client.get_experiment_by_name(encoder_store.ENCODERS).experiment_id])
    files = {r.data.tags["ganlab.encoder_file"]: r.data.tags.get("ganlab.encoder_adopted", "") for r in runs}
    assert len(files) == 2 and files[got["B"].name] == "" and [v for v in files.values() if v.startswith("false")]
    again, _ = encoder.ensure(team(auto_cfg, tmp_path, "a"))  # A's local cache names the team's now
    assert again.name == got["B"].name


def test_a_machine_whose_cache_holds_another_encoder_switches_to_the_teams(auto_cfg, tmp_path, monkeypatch, caplog):
    """A machine that trained its own encoder with tracking off keeps it in its cache; once it joins the
    team's store, where another encoder is published for the same data and recipe, it uses the team's,
    and says so."""
    import logging

    team_path, _ = encoder.ensure(team(auto_cfg, tmp_path, "b"))
    other_cpu(monkeypatch)
    own, _ = encoder.ensure(auto_cfg(f"data.cache_dir={tmp_path / 'a'}"))
    assert own.name != team_path.name
    with caplog.at_level(logging.WARNING, logger="ganlab"):
        path, _ = encoder.ensure(team(auto_cfg, tmp_path, "a"))
    assert path.name == team_path.name and any("switching" in r.getMessage() for r in caplog.records)
    # `ganlab features --register` with tracking off in the experiment does the same for a third cache
    from ganlab import cli

    own_c, _ = encoder.ensure(auto_cfg(f"data.cache_dir={tmp_path / 'c'}"))
    assert own_c.name != team_path.name
    cfg_c = team(auto_cfg, tmp_path, "c", "tracking.enabled=false")
    sets = [x for k, v in config.flatten(cfg_c).items() if k != "variant" for x in ("--set", f"{k}={v}")]
    (tmp_path / "exp.yaml").write_text("name: register\n")
    assert cli.main(["features", str(tmp_path / "exp.yaml"), *sets, "--register"]) == 0
    index = next(iter((tmp_path / "c" / "encoders" / "index").glob("*.json")))
    assert json.loads(index.read_text())["file"] == team_path.name


def test_a_damaged_published_encoder_is_marked_and_replaced_not_a_block(auto_cfg, tmp_path, monkeypatch):
    """The team's published file does not match its name (a broken upload). The next machine marks the
    claim damaged and publishes its own under the next claim; a third machine takes that one."""
    import mlflow

    first, _ = encoder.ensure(team(auto_cfg, tmp_path, "a"))
    stored = list((tmp_path / "mlruns").rglob(first.name)) + list(tmp_path.rglob(f"artifacts/**/{first.name}"))
    assert stored, "the uploaded file was not found in the store's artifact folder"
    for f in stored:
        f.write_bytes(f.read_bytes()[:2000])
    other_cpu(monkeypatch)
    second, _ = encoder.ensure(team(auto_cfg, tmp_path, "b"))
    assert second.name != first.name and encoder.damaged(second) == ""

    def no_training(*args, **kwargs):
        raise AssertionError("the third machine trained its own encoder")

    monkeypatch.setattr(encoder, "train_encoder", no_training)
    third, _ = encoder.ensure(team(auto_cfg, tmp_path, "c"))
    assert third.name == second.name
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'team.db'}")
    key = next(iter((tmp_path / "c" / "encoders" / "index").glob("*.json"))).stem
    assert encoder_store.DAMAGED in client.get_registered_model(encoder_store.claim_name(key, 1)).tags
    assert client.get_registered_model(encoder_store.claim_name(key, 2)).tags["ganlab.encoder_file"] == second.name


def test_an_unreachable_store_on_first_use_is_one_line(auto_cfg, tmp_path, monkeypatch, capsys):
    """Nothing answers at the tracking URI: `ganlab features` says so in one line naming the store (exit
    2). With the encoder in the local cache, it is used, with a warning."""
    from ganlab import cli

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = free_port()  # nothing listens there: refused at once
    cfg = auto_cfg("tracking.enabled=true", f"tracking.uri=http://127.0.0.1:{port}")
    flat = [f"{k}={v}" for k, v in config.flatten(cfg).items() if k != "variant"]
    sets = [x for kv in flat for x in ("--set", kv)]
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: unreachable\n")
    assert cli.main(["features", str(exp), *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"tracking store http://127.0.0.1:{port}" in err and "Traceback" not in err
    encoder.ensure(auto_cfg(f"data.cache_dir={cfg.data.cache_dir}"))  # cached here with tracking off
    path, _ = encoder.ensure(cfg)
    assert encoder.damaged(path) == ""


def test_an_encoder_published_before_claims_is_adopted(auto_cfg, tmp_path, monkeypatch):
    """A store from the previous release holds an upload run and no claim: it becomes the claim."""
    from ganlab import track

    cfg = team(auto_cfg, tmp_path, "a")
    old = encoder.build(cfg, out_dir=tmp_path / "old")
    client = track.open_client(track.tracking_uri(cfg))
    exp_id = track.ensure_experiment(client, encoder_store.ENCODERS, track.tracking_uri(cfg), cfg.tracking.runs_dir)
    images = data.load_images(cfg.data, cfg.seed)
    encoder_store.upload(client, exp_id, encoder.cache_key(images, encoder.recipe(cfg)), old)
    other_cpu(monkeypatch)
    path, _ = encoder.ensure(cfg)
    assert path.name == old.name


def test_claims_on_a_file_store_at_once_have_one_winner(tmp_path, monkeypatch):
    """MLflow's file store creates registered models without a lock: 6 claimants at once for each of 4
    keys (threads, each with its own client) all end on one claim per key, and none fails. Without the
    lock beside the store, some got "Yaml file exists" (reported as an unreachable store) or both won."""
    import threading

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x refuses file stores without it
    uri = (tmp_path / "store").as_uri()
    keys, n = [f"k{i}" for i in range(4)], 6
    got, errors = {k: [] for k in keys}, []
    barrier = threading.Barrier(n)

    def claimant(i):
        client = mlflow.MlflowClient(uri)
        for key in keys:
            barrier.wait()
            try:
                got[key].append(encoder_store.claim(client, key, 1, f"run{i}", f"file{i}", uri)["ganlab.encoder_run"])
            except Exception as e:  # noqa: BLE001
                errors.append(f"{e.__class__.__name__}: {e}")

    threads = [threading.Thread(target=claimant, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert all(len(got[k]) == n and len(set(got[k])) == 1 for k in keys), got
    assert (tmp_path / "store" / ".ganlab-claims.lock").exists()


def test_auto_is_decided_for_the_device(auto_cfg, inception_weights, monkeypatch):
    """With InceptionV3's weights present, auto picks the domain encoder on a CPU (and says why on the
    start line) and InceptionV3 on a GPU (decided without touching the GPU)."""
    monkeypatch.setenv("GANLAB_INCEPTION_WEIGHTS", inception_weights)
    cfg = auto_cfg("eval.feature_extractor=auto")
    cpu = extractors.resolve(cfg, "cpu")
    assert cpu.name.startswith("domain") and "auto on a CPU" in cpu.why and "inception-v3-compat" in cpu.why
    gpu = extractors.resolve(cfg, "cuda")
    assert gpu.name == extractors.COMPAT and gpu.weights == inception_weights and "GPU" in gpu.why
