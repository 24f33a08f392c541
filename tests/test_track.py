"""Real MLflow: a temporary sqlite store for most tests, a real `mlflow server` process for one."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from conftest import free_port, script_evaluations

from ganlab import cli, sweep, train
from ganlab.track import tracking_uri

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tracked(tiny_cfg, tmp_path):
    def make(*extra):
        return tiny_cfg(
            "tracking.enabled=true",
            "tracking.system_metrics=false",
            "tracking.register_model=false",
            "name=exp",
            *extra,
        )

    return make


scripted = script_evaluations


def test_run_records_params_tags_metrics_images_artifacts(tracked, tmp_path):
    cfg = tracked("tracking.system_metrics=true", "tracking.system_metrics_every=0.5", "train.steps=40")
    exp = tmp_path / "exp.yaml"
    exp.write_text("# Tiny sprites, to check the tracking.\n# Second line of the header.\nname: exp\n")
    res = train.train(cfg, quiet=True, experiment_file=str(exp))
    c = mlflow.MlflowClient(tracking_uri(cfg))
    run = c.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    p, t, m = run.data.params, run.data.tags, run.data.metrics
    assert p["train.batch_size"] == "16" and p["eval.metrics"] == "fid,isc,kid" and p["data.image_size"] == "32"
    for tag in (
        "eval.signature",
        "data.hash",
        "data.holdout_size",
        "git.commit",
        "git.dirty",
        "ganlab.device",
        "versions.torch",
        "versions.torch_fidelity",
        "versions.mlflow",
        "ganlab.experiment_file",
    ):
        assert t.get(tag), tag
    assert t["eval.random_features"] == "false"
    assert t["mlflow.source.name"] == str(exp) and t["mlflow.source.type"] == "LOCAL" and t["mlflow.user"]
    assert t["mlflow.source.git.commit"] == t["git.commit"]
    note = t["mlflow.note.content"]
    assert (
        note.startswith("Tiny sprites, to check the tracking.\nSecond line")
        and "improved" in note
        and "finished" in note
    )
    for k in (
        "loss_d",
        "loss_g",
        "d_real",
        "d_fake",
        "grad_norm_g",
        "grad_norm_d",
        "lr_g",
        "img_per_s",
        "fid",
        "fid_alpha",
        "isc",
        "kid",
        "eval_seconds",
        "selection_best_fid",
        "selection_best_step",
        "handover_fid",
        "handover_fid_se",
        "handover_fid_sd",
        "handed_over_step",
        "rollbacks",
        "stopped_early",
    ):
        assert k in m, k
    steps = [x.step for x in c.get_metric_history(res.run_id, "loss_d")]
    assert steps == list(range(4, 41, 4))
    assert m["selection_best_fid"] == res.best and m["handover_fid"] == res.handover["handover_fid"]
    assert t["ganlab.handover_signature"] == t["eval.handover_signature"] == res.handover_signature
    arts = {a.path for a in c.list_artifacts(res.run_id)}
    assert {"config.yaml", "events.jsonl", "model"} <= arts
    assert any(a.path.startswith("images/samples") for a in c.list_artifacts(res.run_id, "images"))
    contexts = {i.tags[0].value: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert contexts == {"training": t["data.hash"], "evaluation": t["data.holdout_hash"]}
    assert any(k.startswith("system/") for k in m)


def test_resume_continues_the_same_run_without_duplicates(tracked, tmp_path):
    cfg = tracked()
    half = train.train(cfg, run_dir=tmp_path / "r", stop_at=12, quiet=True)
    # simulate a kill after the checkpoint at 8 but with points up to 12 already logged
    import shutil

    shutil.copy(tmp_path / "r" / "last.pt.prev", tmp_path / "r" / "last.pt")
    res = train.train(cfg, run_dir=tmp_path / "r", resume=True, quiet=True)
    assert res.run_id == half.run_id
    c = mlflow.MlflowClient(tracking_uri(cfg))
    for key in ("loss_d", "fid"):
        steps = [x.step for x in c.get_metric_history(res.run_id, key)]
        assert steps == sorted(set(steps)), (key, steps)
    assert [x.step for x in c.get_metric_history(res.run_id, "fid")] == [8, 16, 24]
    assert c.get_run(res.run_id).info.status == "FINISHED"


def test_best_json_and_champion_alias(tracked, monkeypatch, capsys, tmp_path):
    scripted(monkeypatch, [5.0, 4.0, 4.5], handover=(4.3, 4.4, 4.5))
    a = train.train(tracked("tracking.register_model=true", "variant=worse"), quiet=True)
    scripted(monkeypatch, [3.0, 2.0, 2.5], handover=(2.1, 2.2, 2.3))
    b = train.train(tracked("tracking.register_model=true", "variant=better"), quiet=True)
    uri = tracking_uri(tracked())
    assert cli.main(["best", "--experiment", "exp", "--json", "--uri", uri]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = res["rows"]
    assert [r["run_id"] for r in rows] == [b.run_id, a.run_id] and res["signatures"] == {b.handover_signature: 2}
    assert rows[0]["score"] == pytest.approx(2.2) and rows[0]["se"] == pytest.approx(0.1 / 3**0.5)
    assert rows[0]["step"] == 16 and rows[0]["checkpoint"].endswith("generator.pt")
    assert not rows[1]["within_noise_of_first"]  # 4.4 vs 2.2, standard errors of 0.06
    c = mlflow.MlflowClient(uri)
    champ = c.get_model_version_by_alias("exp", "champion")
    assert champ.run_id == b.run_id and float(champ.tags["handover_fid"]) == pytest.approx(2.2)
    # a later run whose selection best is lower but whose hand-over score is worse does not take the alias
    scripted(monkeypatch, [9.0, 1.0, 8.5], handover=(8.1, 8.2, 8.3))
    train.train(tracked("tracking.register_model=true", "variant=later"), quiet=True)
    assert c.get_model_version_by_alias("exp", "champion").run_id == b.run_id
    # and every way of naming a generator samples
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for src in ("best", "models:/exp@champion", b.run_id, str(b.run_dir)):
        out = tmp_path / "s" / src.replace("/", "_").replace(":", "_").replace("@", "_")
        assert cli.main(["sample", src, "-n", "3", "--out", str(out), "--experiment", "exp"]) == 0
        assert len(list(out.glob("sample_*.png"))) == 3 and (out / "grid.png").exists()


def test_two_variant_sweep(tmp_path, script_extractor, capsys):
    from conftest import tiny_overrides

    base = tmp_path / "base.yaml"
    sets = dict(o.split("=", 1) for o in tiny_overrides(tmp_path, script_extractor))
    sets.update(
        {
            "tracking.enabled": "true",
            "tracking.system_metrics": "false",
            "tracking.register_model": "false",
            "train.steps": "8",
            "eval.every": "8",
        }
    )
    base.write_text("name: base\n")
    sw = tmp_path / "sweep.yaml"
    import yaml

    spec = {
        "base": "base.yaml",
        "name": "sw",
        "set": {k: yaml.safe_load(v) for k, v in sets.items()},
        "variants": {"plain": {}, "clipped": {"train.clip_norm_d": 1.0}, "broken": {"train.loss": "nope"}},
    }
    sw.write_text(yaml.safe_dump(spec, sort_keys=False))
    rows = sweep.run_sweep(sw, quiet=True)
    assert [r["variant"] for r in rows] == ["plain", "clipped", "broken"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    out = capsys.readouterr().out
    assert "| plain |" in out and "| broken |" in out
    c = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("sw")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 3
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED", "FINISHED"]
    assert {a.path for a in c.list_artifacts(parents[0].info.run_id)} >= {"sweep_summary.md", "sweep_summary.json"}
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    mlflow.set_experiment("sw")
    table = mlflow.load_table("sweep_summary.json", run_ids=[parents[0].info.run_id])  # an MLflow table
    assert list(table["variant"]) == ["plain", "clipped", "broken"] and list(table["status"]) == ["ok", "ok", "failed"]


@pytest.mark.slow
def test_real_mlflow_server_over_http(tracked, tmp_path, capfd):
    port = free_port()
    env = dict(os.environ, MLFLOW_ALLOW_FILE_STORE="true")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open("/tmp/serve.err", "w"),
        env=env,
        start_new_session=True,
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        import http.client

        deadline = time.time() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)  # loopback only
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("mlflow server did not start")
                time.sleep(1)
        res = train.train(tracked(f"tracking.uri={uri}"), quiet=True)
        where = f"{uri}/#/experiments/"
        printed = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("MLflow run: " + where)]
        assert len(printed) == 2 and printed[0].endswith(f"/runs/{res.run_id}")  # at the start and the end
        c = mlflow.MlflowClient(uri)
        run = c.get_run(res.run_id)
        assert run.data.params["train.steps"] == "24"
        assert run.data.metrics["selection_best_fid"] == res.best and "fid" in run.data.metrics
        imgs = c.list_artifacts(res.run_id, "images")
        assert imgs
        local = c.download_artifacts(res.run_id, imgs[0].path, str(tmp_path / "dl"))
        assert Path(local).exists()
        assert not (Path(res.run_dir).parent.parent.parent / "mlflow.db").exists()  # nothing went to sqlite
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.mark.slow
def test_registered_generator_serves_rgba_images(tracked, tmp_path):
    """A real `mlflow models serve --env-manager local` of the champion: one request, one response."""
    import base64
    import io
    import urllib.request

    from PIL import Image

    cfg = tracked("tracking.register_model=true", "train.steps=8")
    res = train.train(cfg, quiet=True)
    uri = tracking_uri(cfg)
    c = mlflow.MlflowClient(uri)
    champ = c.get_model_version_by_alias("exp", "champion")
    assert champ.run_id == res.run_id
    mlflow.set_tracking_uri(uri)
    models = {
        m.name: m
        for m in mlflow.search_logged_models(
            experiment_ids=[c.get_run(res.run_id).info.experiment_id], output_format="list"
        )
    }
    assert {"rgba_images", "generator"} <= set(models) and models["rgba_images"].source_run_id == res.run_id
    linked = {(m.key, m.step) for m in models["rgba_images"].metrics}  # logged at the handed-over step
    assert ("fid", res.best_step) in linked and {s for _, s in linked} == {res.best_step}
    reqs = Path(
        mlflow.artifacts.download_artifacts("models:/exp@champion/requirements.txt", tracking_uri=uri)
    ).read_text()
    from importlib.metadata import version

    assert f"torch=={version('torch')}" in reqs.splitlines()  # pinned, not bare
    port = free_port()
    # `mlflow models serve` execs uvicorn by name: this interpreter's bin folder first, activated or not
    env = dict(
        os.environ, MLFLOW_TRACKING_URI=uri, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    errors = open(tmp_path / "serve.err", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/exp@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=errors,
        env=env,
        start_new_session=True,
    )
    try:
        body = json.dumps(
            {
                "dataframe_records": [
                    {"count": 3, "seed": 7, "format": "png"},
                    {"count": 1, "seed": 7, "format": "array"},
                ]
            }
        ).encode()
        deadline, reply = time.time() + 180, None
        while reply is None:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
                )
                reply = json.loads(urllib.request.urlopen(req, timeout=30).read())  # loopback only
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    tail = (tmp_path / "serve.err").read_text().strip().splitlines()[-1:]
                    raise RuntimeError(f"mlflow models serve did not answer: {tail}")
                time.sleep(1)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=30)
    pred = reply["predictions"]
    assert len(pred) == 4 and [p["request"] for p in pred] == [0, 0, 0, 1]
    im = Image.open(io.BytesIO(base64.b64decode(pred[0]["png"])))
    assert im.mode == "RGBA" and im.size == (32, 32)
    import numpy as np

    arr = np.array(pred[3]["rgba"], dtype=np.uint8)
    assert arr.shape == (32, 32, 4)
    assert np.array_equal(arr, np.array(im))  # same seed, same first image, whichever format


def test_champion_lookup_tells_no_champion_from_an_error(tmp_path, monkeypatch):
    """A store without the alias: None. A store that cannot be reached: an error (retried, then
    raised), never "no champion", which would hand the alias to whatever registered next."""
    import mlflow

    from ganlab import track

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/reg.db")
    client.create_registered_model("m")
    assert track.champion(client, "m") is None
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(Exception):
        track.champion(mlflow.MlflowClient("http://127.0.0.1:9"), "m", delay=0.01)


def scripted_fid_kid(monkeypatch):
    """both(values, handover): the run's evaluations return these (fid, kid) pairs in order, its
    hand-over draws these."""
    from ganlab.eval import protocol

    def both(values, handover):
        it = iter(values)
        monkeypatch.setattr(
            protocol.Evaluator, "metrics_for", lambda self, fake, seed=None: dict(zip(("fid", "kid"), next(it)))
        )
        monkeypatch.setattr(
            protocol.Evaluator, "handover_draws", lambda self, g: [{"fid": f, "kid": k} for f, k in handover]
        )

    return both


def test_ranking_never_mixes_metrics(tracked, monkeypatch):
    """A run selected (and scored) on KID, ~0.01, must not outrank FID runs: rankings compare one
    metric under one signature; the other metric is named, not mixed in."""
    from ganlab import sources

    both = scripted_fid_kid(monkeypatch)
    both([(5.0, 0.5), (4.0, 0.4), (4.5, 0.45)], [(4.3, 0.43), (4.4, 0.44), (4.5, 0.45)])
    train.train(tracked("variant=fid", "eval.metrics=[fid,kid]"), quiet=True)
    both([(5.0, 0.02), (4.0, 0.01), (4.5, 0.015)], [(4.3, 0.011), (4.4, 0.012), (4.5, 0.013)])
    train.train(tracked("variant=kid", "eval.metrics=[fid,kid]", "selection.metric=kid"), quiet=True)
    uri = tracking_uri(tracked())
    newest = sources.rank_runs(experiment="exp", uri=uri)
    assert newest["metric"] == "kid" and [r["variant"] for r in newest["rows"]] == ["kid"]
    assert newest["other_metrics"] == ["fid"]
    by_fid = sources.rank_runs(experiment="exp", uri=uri, metric="fid")
    assert by_fid["metric"] == "fid" and {r["metric"] for r in by_fid["rows"]} == {"fid"}
    assert len(by_fid["rows"]) == 2  # both runs have a hand-over FID: comparable under --metric fid
    assert "selected on fid" in sources.format_ranking(newest)


def test_a_resumed_run_is_not_ranked_on_its_old_score(tracked, monkeypatch, tmp_path):
    """A finished run resumed for more steps changes generator.pt: until it is scored again (paused
    here) its old hand-over score is stale and the run is not ranked; once finished it ranks on the
    new score."""
    from ganlab import sources

    scripted(monkeypatch, [5.0, 4.0, 4.5], handover=(4.3, 4.4, 4.5))
    first = train.train(tracked(), run_dir=tmp_path / "r", quiet=True)
    uri = tracking_uri(tracked())
    assert [r["score"] for r in sources.rank_runs(experiment="exp", uri=uri)["rows"]] == [pytest.approx(4.4)]
    scripted(monkeypatch, [1.0, 1.5], handover=(1.1, 1.2, 1.3))
    longer = tracked("train.steps=40")
    train.train(longer, run_dir=tmp_path / "r", resume=True, stop_at=32, quiet=True)  # paused: best moved
    assert sources.rank_runs(experiment="exp", uri=uri)["rows"] == []
    res = train.train(longer, run_dir=tmp_path / "r", resume=True, quiet=True)
    assert res.run_id == first.run_id
    rows = sources.rank_runs(experiment="exp", uri=uri)["rows"]
    assert [r["score"] for r in rows] == [pytest.approx(1.2)]


def test_the_champion_alias_never_moves_across_metrics(tracked, monkeypatch):
    """A champion selected and scored on KID has no hand-over FID: a FID run cannot 'beat' a missing
    score (it once read as NaN and lost to anything), so the alias stays."""
    both = scripted_fid_kid(monkeypatch)
    both([(5.0, 0.02), (4.0, 0.01), (4.5, 0.015)], [(4.3, 0.011), (4.4, 0.012), (4.5, 0.013)])
    kid_run = train.train(
        tracked("tracking.register_model=true", "eval.metrics=[fid,kid]", "selection.metric=kid"), quiet=True
    )
    both([(3.0, 0.5), (2.0, 0.4), (2.5, 0.45)], [(2.1, 0.41), (2.2, 0.42), (2.3, 0.43)])
    train.train(tracked("tracking.register_model=true", "eval.metrics=[fid,kid]"), quiet=True)
    c = mlflow.MlflowClient(tracking_uri(tracked()))
    assert c.get_model_version_by_alias("exp", "champion").run_id == kid_run.run_id
