"""ganlab tune on Optuna (real Optuna, real MLflow, real PostgreSQL where the test says so): trials are
ordinary runs under one parent run, the pruner stops a hopeless trial and the study records where,
sweeps run on the same machinery with several workers, and a worker killed with -9 leaves a failed
trial while the study finishes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from conftest import free_port, tiny_overrides

from ganlab import cli, config, tune
from ganlab.track import tracking_uri

GOOD, BAD = 0.0002, 1e-9  # lr_g: a generator that learns, and one that stays at its initialisation


def write_base(tmp_path, script_extractor, **extra) -> str:
    sets = dict(o.split("=", 1) for o in tiny_overrides(tmp_path, script_extractor))
    sets.update(
        {
            "tracking.enabled": "true",
            "tracking.system_metrics": "false",
            "tracking.register_model": "false",
            "train.steps": "16",
            "eval.every": "4",
            "name": "tunes",
            **extra,
        }
    )
    nested = {}
    for k, v in sets.items():
        sec, _, key = k.partition(".")
        if key:
            nested.setdefault(sec, {})[key] = yaml.safe_load(v)
        else:
            nested[sec] = yaml.safe_load(v)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(nested))
    return "base.yaml"


def write_study(tmp_path, **keys):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"base": "base.yaml", **keys}, sort_keys=False))
    return tmp_path / "study.yaml"


def test_trials_are_child_runs_and_the_median_pruner_stops_the_hopeless_one(tmp_path, script_extractor, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path, script_extractor)
    study_file = write_study(
        tmp_path,
        name="prune",
        space={"train.lr_g": [GOOD, BAD], "train.lr_d": {"low": 1e-4, "high": 1e-3, "log": True}},
        sampler="random",
        pruner="median",
        trials=3,
        start_with=[
            {"train.lr_g": GOOD, "train.lr_d": 4e-4},
            {"train.lr_g": GOOD, "train.lr_d": 3e-4},
            {"train.lr_g": BAD, "train.lr_d": 4e-4},
        ],
    )
    assert cli.main(["tune", str(study_file), "--quiet"]) == 0
    cfg = config.load(tmp_path / "base.yaml")
    study = optuna.load_study(study_name="prune", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    pruned = trials[2]
    assert pruned.user_attrs["pruned_at_step"] == 4 and pruned.user_attrs["pruned_against"] == [0, 1]
    assert list(pruned.intermediate_values) == [4]  # it stopped at its first evaluation
    assert sorted(trials[0].intermediate_values) == [4, 8, 12, 16]
    client = mlflow.MlflowClient(tracking_uri(cfg))
    runs = client.search_runs([client.get_experiment_by_name("tunes").experiment_id])
    parent = [r for r in runs if r.data.tags.get("ganlab.study") == "prune"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert set(children) == {t.user_attrs["run_id"] for t in trials}
    pruned_run = children[pruned.user_attrs["run_id"]]
    assert [m.step for m in client.get_metric_history(pruned_run.info.run_id, "fid")] == [4]
    events = (tmp_path / pruned.user_attrs["run_dir"] / "events.jsonl").read_text()
    assert '"kind": "pruned"' in events
    assert study.best_trial.params["train.lr_g"] == GOOD
    assert {a.path for a in client.list_artifacts(parent[0].info.run_id)} >= {"study_summary.md", "study_trials.json"}


def test_every_ranking_shows_the_handover_score_of_the_generator_handed_over(
    tmp_path, script_extractor, monkeypatch, capsys
):
    """One trial of a study, tracked and registered, in which re-evaluation changes the winner: its
    evaluations at 4, 8, 12, 16 score 2.0, 1.0, 1.5, 3.0 (selection best: step 8, 1.0); re-evaluated,
    step 12 wins (0.9); scored on the hand-over protocol it is 1.2 +/- 0.029. That 1.2 is the number
    in the MLflow summary, `ganlab best`, the registry's version tag, the report and Optuna's value."""
    from ganlab import report
    from ganlab.eval import protocol

    monkeypatch.chdir(tmp_path)
    write_base(
        tmp_path,
        script_extractor,
        **{"tracking.register_model": "true", "selection.keep_top": "3", "selection.on_collapse": "ignore"},
    )
    values = iter([2.0, 1.0, 1.5, 3.0] + [1.3, 0.9, 1.1] + [1.15, 1.25, 1.2])
    monkeypatch.setattr(protocol.Evaluator, "metrics_for", lambda self, fake, seed=None: {"fid": next(values)})
    study_file = write_study(
        tmp_path, name="one", space={"train.lr_d": [2e-4]}, sampler="random", pruner="none", trials=1
    )
    assert cli.main(["tune", str(study_file), "--quiet"]) == 0
    trial = optuna.load_study(study_name="one", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}").trials[0]
    assert trial.value == pytest.approx(1.2) and trial.user_attrs["handed_over_step"] == 12  # Optuna's objective
    uri = tracking_uri(config.load(tmp_path / "base.yaml"))
    run = mlflow.MlflowClient(uri).get_run(trial.user_attrs["run_id"])
    assert run.data.metrics["handover_fid"] == pytest.approx(1.2) and run.data.metrics["selection_best_fid"] == 1.0
    assert run.data.metrics["handed_over_step"] == 12 and run.data.tags["ganlab.handed_over_step"] == "12"
    assert "best_fid" not in run.data.metrics  # no unnamed "best" left to be mistaken for the score
    capsys.readouterr()
    assert cli.main(["best", "--experiment", "tunes", "--json", "--uri", uri]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["score"] == pytest.approx(1.2) and row["step"] == 12
    version = mlflow.MlflowClient(uri).get_model_version_by_alias("tunes", "champion")
    assert float(version.tags["handover_fid"]) == pytest.approx(1.2) and version.tags["step"] == "12"
    page = report.write_report([Path(trial.user_attrs["run_dir"]), Path(trial.user_attrs["run_dir"])], tmp_path / "cmp")
    assert "1.2 \u00b1 0.029" in page.read_text() and "step 12" in page.read_text()
    assert "hand-over fid 1.2 +/- 0.029" in run.data.tags["mlflow.note.content"]


def test_two_random_sampler_workers_propose_different_points(tmp_path, script_extractor, monkeypatch):
    """Two workers of one study ask at the same moment with the same history: with one sampler seed
    they proposed the same point; each worker's seed now mixes in who it is."""
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path, script_extractor)
    for sampler in ("random", "tpe"):
        spec = tune.load_spec(
            write_study(
                tmp_path,
                name=f"two-{sampler}",
                sampler=sampler,
                space={"train.lr_d": {"low": 1e-4, "high": 1e-3, "log": True}},
            )
        )
        cfg = config.load(tmp_path / "base.yaml")
        points = []
        for worker in ("0", "1"):
            monkeypatch.setenv("GANLAB_WORKER", worker)
            study, _ = tune.open_study(spec, cfg, create=True)
            points.append(tune.suggest(study.ask(), spec.space)["train.lr_d"])
        assert points[0] != points[1], (sampler, points)


def test_a_fully_trained_trial_completes_and_a_pruned_one_hands_over_nothing(tmp_path, script_extractor, monkeypatch):
    """Trials 0 and 1 score 1.0 at every evaluation. Trial 2 is worse only at its last evaluation
    (step 16): it trained fully, so it completes (the median pruner said prune). Trial 3 is worse at
    its first: pruned at step 4, with no hand-over score, report or registered model."""
    from ganlab.eval import protocol

    monkeypatch.chdir(tmp_path)
    write_base(tmp_path, script_extractor, **{"tracking.register_model": "true"})
    ones = [1.0] * 4 + [1.0] * 3  # four evaluations, then three hand-over draws
    values = iter(ones + ones + [1.0, 1.0, 1.0, 9.0] + [1.0] * 3 + [9.0])
    monkeypatch.setattr(protocol.Evaluator, "metrics_for", lambda self, fake, seed=None: {"fid": next(values)})
    lrs = [1e-4, 2e-4, 3e-4, 4e-4]
    study_file = write_study(
        tmp_path,
        name="last",
        space={"train.lr_d": lrs},
        sampler="random",
        pruner="median",
        trials=4,
        start_with=[{"train.lr_d": v} for v in lrs],
    )
    assert cli.main(["tune", str(study_file), "--quiet"]) == 0
    trials = optuna.load_study(study_name="last", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    assert trials[2].value == pytest.approx(1.0) and "pruned_at_step" not in trials[2].user_attrs
    assert trials[3].user_attrs["pruned_at_step"] == 4 and trials[3].user_attrs["pruned_against"] == [0, 1, 2]
    client = mlflow.MlflowClient(tracking_uri(config.load(tmp_path / "base.yaml")))
    pruned = client.get_run(trials[3].user_attrs["run_id"])
    assert pruned.data.tags["ganlab.stopped"] == "pruned" and "handover_fid" not in pruned.data.metrics
    assert not client.search_model_versions(f"run_id = '{pruned.info.run_id}'")
    assert not (Path(trials[3].user_attrs["run_dir"]) / "report").exists()
    assert client.search_model_versions(f"run_id = '{trials[2].user_attrs['run_id']}'")


def test_a_worker_with_another_evaluation_does_not_join_the_study(tmp_path, script_extractor, capsys, monkeypatch):
    """The first worker pins the study's hand-over protocol; a worker whose extractor differs refuses in
    one line naming what differs, and a second launcher makes no second parent run."""
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path, script_extractor, **{"train.steps": "4"})
    study_file = write_study(tmp_path, name="pinned", space={"train.lr_d": [1e-4, 2e-4]}, sampler="random", trials=1)
    assert cli.main(["tune", str(study_file), "--quiet"]) == 0
    study = optuna.load_study(study_name="pinned", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    assert study.trials[0].user_attrs["handover_signature"] == study.user_attrs["handover_signature"]
    other = tmp_path / "other.pt"
    import torch
    from conftest import TinyFeatures

    net = TinyFeatures()
    net.conv1.weight.data.mul_(2)  # another feature space
    torch.jit.script(net).save(str(other))
    capsys.readouterr()
    assert cli.main(["tune", str(study_file), "--quiet", "--set", f"eval.feature_extractor={other}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not join" in err[0] and "extractor" in err[0], err
    client = mlflow.MlflowClient(tracking_uri(config.load(tmp_path / "base.yaml")))
    runs = client.search_runs([client.get_experiment_by_name("tunes").experiment_id])
    assert sum(r.data.tags.get("ganlab.study") == "pinned" for r in runs) == 1


@pytest.mark.parametrize(
    "keys,message",
    [
        ({"space": {"train.lr_d": [1e-4]}, "sampler": "bayes"}, "sampler 'bayes' is not one of"),
        ({"space": {"train.lr_d": {"low": 1e-4, "high": 1e-3}}, "sampler": "grid"}, "grid sampler takes lists"),
        ({"space": {"train.nope": [1, 2]}}, "does not give a valid config"),
        ({"space": {"train.lr_d": {"low": 1e-3, "high": 1e-4}}}, "low < high"),
        ({"space": {"train.lr_d": [1e-4]}, "trails": 3}, "unknown study key"),
    ],
)
def test_study_file_mistakes_are_one_line(tmp_path, script_extractor, keys, message, capsys):
    write_base(tmp_path, script_extractor)
    assert cli.main(["tune", str(write_study(tmp_path, **keys))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "study.yaml" in err[0]


@pytest.mark.slow
def test_a_sweep_runs_its_variants_on_two_workers(tmp_path, script_extractor):
    write_base(tmp_path, script_extractor)
    (tmp_path / "sw.yaml").write_text(
        "base: base.yaml\nname: two\nvariants:\n  x: {}\n  y: {train.lr_d: 0.0004}\n  z: {train.lr_d: 0.0001}\n"
    )
    p = subprocess.run(
        [sys.executable, "-m", "ganlab.cli", "sweep", "sw.yaml", "--quiet", "--workers", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert all(f"| {v} |" in p.stdout for v in "xyz")
    c = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("two").experiment_id])
    parent = [r for r in runs if "ganlab.sweep" in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and sorted(r.data.tags["ganlab.variant"] for r in children) == ["x", "y", "z"]
    assert all(r.info.status == "FINISHED" for r in children + parent)
    workers = {r.data.tags.get("ganlab.worker") for r in children}
    assert len(workers) == 2, workers  # both workers took variants


# ------------------------------------------------------------------- the team setup, on PostgreSQL


def test_a_grid_point_runs_once_and_a_late_worker_only_leaves_a_spare(tmp_path, script_extractor, monkeypatch):
    """Grid points are queued, so two workers asking at once get different ones (with Optuna's
    GridSampler and one seed they got the same point); a worker that arrives when every point is
    taken runs nothing: its trial is a pruned spare, out of the summary, with no run."""
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path, script_extractor, **{"train.steps": "4"})
    study_file = write_study(tmp_path, name="grid", space={"train.lr_d": [1e-4, 2e-4]}, sampler="grid", pruner="none")
    spec = tune.load_spec(study_file)
    study, parent, _ = tune.execute(spec, quiet=True)
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert sorted(t.params["train.lr_d"] for t in done) == [1e-4, 2e-4]
    assert tune.work(spec) == 0  # nothing queued: a late worker does not start
    late = tune.objective(spec, parent)  # a worker that asked just after the last pop
    study.optimize(late, n_trials=1)
    spare = study.get_trials()[-1]
    assert spare.state.name == "PRUNED" and spare.user_attrs["spare"] and not spare.params
    assert [r["trial"] for r in tune.summarise(study)] == [t.number for t in done]
    client = mlflow.MlflowClient(tracking_uri(config.load(tmp_path / "base.yaml")))
    children = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert len(children) == 2  # the spare made no run


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server URL whose role may create databases ($GANLAB_TEST_POSTGRES; .ci/run starts the
    machine's PostgreSQL and sets it). Without it the test is skipped, except where
    $GANLAB_REQUIRE_POSTGRES says it must run (CI)."""
    url = os.environ.get("GANLAB_TEST_POSTGRES")
    if not url:
        if os.environ.get("GANLAB_REQUIRE_POSTGRES"):
            pytest.fail("GANLAB_REQUIRE_POSTGRES is set but GANLAB_TEST_POSTGRES is not")
        pytest.skip("no PostgreSQL: set GANLAB_TEST_POSTGRES=postgresql://user:pw@host:port/postgres")
    return url


def fresh_database(server_url: str) -> str:
    import psycopg

    name = f"ganlab_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def team_server(postgres, tmp_path):
    """`mlflow server` on a PostgreSQL backend store with served artifacts: the README's team setup."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            fresh_database(postgres),
            "--serve-artifacts",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            mlflow.MlflowClient(url).search_experiments()
            break
        except Exception:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_workers_share_a_postgres_study_and_a_team_server_and_survive_a_kill(
    tmp_path, script_extractor, postgres, team_server
):
    write_base(tmp_path, script_extractor, **{"train.steps": "48", "eval.every": "8", "tracking.uri": team_server})
    storage = fresh_database(postgres)
    study_file = write_study(
        tmp_path,
        name="team",
        space={"train.lr_d": [1e-4, 2e-4, 3e-4, 4e-4, 5e-4]},
        sampler="grid",
        pruner="none",
        storage=storage,
        heartbeat=1,
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "ganlab.cli", "tune", str(study_file), "--quiet", "--workers", "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = None
    deadline = time.time() + 300
    db = optuna.storages.RDBStorage(storage)  # one connection pool for all the polling
    while victim is None and time.time() < deadline:  # a trial that has started its run
        time.sleep(0.3)
        try:
            study = optuna.load_study(study_name="team", storage=db)
        except KeyError:
            continue
        for t in study.get_trials(deepcopy=False):
            if t.state.name == "RUNNING" and "worker" in t.user_attrs and t.user_attrs.get("run_id"):
                victim = t
                break
    assert victim is not None, "no trial started"
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    out, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name="team", storage=db).get_trials()
    states = {t.number: t.state.name for t in trials}
    assert states[victim.number] == "FAIL", states
    others = [t for t in trials if t.number != victim.number]
    assert others and all(t.state.name == "COMPLETE" for t in others), states
    assert len(trials) == 6  # the grid, once, and the killed point again
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].params == victim.params, states
    client = mlflow.MlflowClient(team_server)
    killed = client.get_run(victim.user_attrs["run_id"])
    assert killed.info.status == "FAILED" and "died" in killed.data.tags["ganlab.failed"]
    for t in others:
        run = client.get_run(t.user_attrs["run_id"])
        assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert [m.step for m in client.get_metric_history(run.info.run_id, "fid")] == [8, 16, 24, 32, 40, 48]
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "events.jsonl"}


def test_the_shipped_study_loads():
    from pathlib import Path

    spec = tune.load_spec(Path(__file__).resolve().parent.parent / "experiments" / "tunes" / "recommended_lr.yaml")
    assert spec.sampler == "tpe" and spec.pruner == "median" and set(spec.start_with[0]) <= set(spec.space)


@pytest.mark.slow
def test_two_machines_share_one_encoder_and_one_study(
    tmp_path, script_extractor, postgres, team_server, monkeypatch, capsys
):
    """Machine A (its own cache folder) trains the domain encoder on first use and publishes it to the
    team's tracking server; machine B (another cache folder) joins the PostgreSQL study, downloads
    that encoder instead of training one, and scores its trial under the study's pinned hand-over
    signature. A third worker forced onto another extractor refuses to join."""
    from ganlab.eval import encoder

    monkeypatch.chdir(tmp_path)
    write_base(
        tmp_path,
        script_extractor,
        **{
            "tracking.uri": team_server,
            "eval.feature_extractor": "domain",
            "eval.encoder_steps": "4",
            "eval.encoder_batch_size": "16",
            "data.cache_dir": str(tmp_path / "machine-a"),
            "train.steps": "8",
        },
    )
    storage = fresh_database(postgres)
    common = dict(
        name="team-enc",
        space={"train.lr_d": {"low": 1e-4, "high": 1e-3}},
        sampler="random",
        pruner="none",
        storage=storage,
    )
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"base": "base.yaml", **common, "trials": 1}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base": "base.yaml", **common, "trials": 2}))
    assert cli.main(["tune", "a.yaml", "--quiet"]) == 0

    def no_training(*args, **kwargs):
        raise AssertionError("machine B trained its own encoder")

    monkeypatch.setattr(encoder, "train_encoder", no_training)
    assert cli.main(["tune", "b.yaml", "--quiet", "--set", f"data.cache_dir={tmp_path / 'machine-b'}"]) == 0
    enc_a = sorted(p.name for p in (tmp_path / "machine-a" / "encoders").glob("encoder-*.pt"))
    enc_b = sorted(p.name for p in (tmp_path / "machine-b" / "encoders").glob("encoder-*.pt"))
    assert enc_a == enc_b and len(enc_a) == 1
    study = optuna.load_study(study_name="team-enc", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert {t.user_attrs["handover_signature"] for t in study.trials} == {study.user_attrs["handover_signature"]}
    capsys.readouterr()
    assert cli.main(["tune", "b.yaml", "--quiet", "--set", f"eval.feature_extractor={script_extractor}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not join" in err[0], err


def test_list_and_bundle_choices_reach_the_trial_config_and_start_with(tmp_path, script_extractor, monkeypatch):
    """Optuna's categorical choices are scalars: a list (a DiffAugment set) or a bundle of keys set
    together (G/D widths at one budget) is stored as its YAML text and handed back as the value."""
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path, script_extractor)
    widths = [{"model.g_width": 8, "model.d_width": 8}, {"model.g_width": 12, "model.d_width": 4}]
    spec = tune.load_spec(
        write_study(
            tmp_path,
            name="bundles",
            sampler="random",
            space={"train.diffaug": [[], ["color", "translation", "cutout"]], "widths": widths},
            start_with=[{"train.diffaug": ["color", "translation", "cutout"], "widths": widths[1]}],
        )
    )
    cfg = config.load(tmp_path / "base.yaml")
    study, _ = tune.open_study(spec, cfg, create=True)
    study.enqueue_trial({k: tune.choice_label(v) for k, v in spec.start_with[0].items()})
    params = tune.suggest(study.ask(), spec.space)
    assert params == spec.start_with[0]
    c = spec.trial_config(params, 0)
    assert c.train.diffaug == ["color", "translation", "cutout"] and (c.model.g_width, c.model.d_width) == (12, 4)
    seen = {str(tune.suggest(study.ask(), spec.space)["train.diffaug"]) for _ in range(12)}
    assert len(seen) == 2  # both lists are sampled


def test_a_worker_starts_no_trial_after_the_timeout(tmp_path, script_extractor, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path, script_extractor, **{"train.steps": "24"})  # 6 evaluations: a trial takes over 1 s
    spec = tune.load_spec(
        write_study(
            tmp_path,
            name="timed",
            sampler="random",
            pruner="none",
            trials=5,
            timeout=1,
            space={"train.lr_d": {"low": 1e-4, "high": 1e-3}},
        )
    )
    tune.execute(spec, quiet=True)
    study = optuna.load_study(study_name="timed", storage=tune.storage_url(spec, config.load(tmp_path / "base.yaml")))
    assert len(study.get_trials()) == 1  # its one trial took longer than the 1 s budget


def test_a_sweep_over_seeds_runs_each_variant_per_seed_and_tables_the_spread(tmp_path):
    from ganlab import sweep

    (tmp_path / "base.yaml").write_text("name: s\n")
    (tmp_path / "sw.yaml").write_text("base: base.yaml\nvariants: {a: {}, b: {train.lr_d: 0.001}}\nseeds: [0, 3]\n")
    _, _, variants = sweep.load_sweep(tmp_path / "sw.yaml")
    assert [(label, ov[-1]) for label, _, ov in variants] == [
        ("a/seed0", "seed=0"),
        ("a/seed3", "seed=3"),
        ("b/seed0", "seed=0"),
        ("b/seed3", "seed=3"),
    ]
    rows = [
        {
            "variant": v,
            "status": "ok",
            "score": s,
            "se": 0.1,
            "signature": "x",
            "step": 10,
            "stopped": "",
            "run_id": "r",
            "run_dir": "",
        }
        for v, s in (("a/seed0", 2.0), ("a/seed3", 4.0), ("b/seed0", 1.0), ("b/seed3", None))
    ]
    table = sweep.format_table(rows, "fid")
    assert "| a | 2 of 2 | 3 | 1.4 | x |" in table and "| b | 1 of 2 | 1 | - | x |" in table
    (tmp_path / "bad.yaml").write_text("base: base.yaml\nvariants: {a: {}}\nseeds: [0, 0]\n")
    with pytest.raises(config.ConfigError, match="seeds"):
        sweep.load_sweep(tmp_path / "bad.yaml")


def test_workers_of_a_sqlite_study_take_turns_asking(tmp_path, script_extractor, monkeypatch):
    """sqlite ignores Optuna's row lock, so two workers popping queued points at once could both get
    one (a sweep point ran twice with 9 workers). While another worker holds the turn, none is popped."""
    import threading

    monkeypatch.chdir(tmp_path)
    write_base(tmp_path, script_extractor, **{"train.steps": "4"})
    spec = tune.load_spec(
        write_study(tmp_path, name="turns", space={"train.lr_d": [1e-4, 2e-4]}, sampler="grid", pruner="none")
    )
    url = tune.storage_url(spec, config.load(tmp_path / "base.yaml"))
    worker = threading.Thread(target=tune.execute, args=(spec,), kwargs={"quiet": True})
    with tune.AskTurn(url):  # another worker is asking
        worker.start()
        time.sleep(4)
        states = [t.state.name for t in optuna.load_study(study_name="turns", storage=url).get_trials()]
        assert states == ["WAITING", "WAITING"]
    worker.join(120)
    assert [t.state.name for t in optuna.load_study(study_name="turns", storage=url).get_trials()] == ["COMPLETE"] * 2


def test_the_timeout_flag_reaches_spawned_workers(tmp_path, script_extractor, monkeypatch):
    """`ganlab tune --timeout 1 --workers 2`: each spawned worker runs the trial it started and no other."""
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path, script_extractor, **{"train.steps": "24"})  # 6 evaluations: a trial takes over 1 s
    study_file = write_study(
        tmp_path,
        name="timed-cli",
        sampler="random",
        pruner="none",
        trials=8,
        space={"train.lr_d": {"low": 1e-4, "high": 1e-3}},
    )
    assert cli.main(["tune", str(study_file), "--quiet", "--workers", "2", "--timeout", "1"]) == 0
    study = optuna.load_study(
        study_name="timed-cli",
        storage=tune.storage_url(tune.load_spec(study_file), config.load(tmp_path / "base.yaml")),
    )
    assert len(study.get_trials()) == 2


def test_the_summary_shows_no_hand_over_score_for_a_pruned_trial():
    """Optuna keeps a pruned trial's last evaluation as its value: it belongs in the pruned column,
    not under the hand-over score (found in a real study: pruned trials looked scored)."""
    rows = [
        {
            "trial": 0,
            "state": "COMPLETE",
            "value": 6.69,
            "se": 0.05,
            "params": {},
            "pruned_at_step": None,
            "pruned_against": None,
            "run_id": "a",
        },
        {
            "trial": 1,
            "state": "PRUNED",
            "value": 85.6,
            "se": None,
            "params": {},
            "pruned_at_step": 200,
            "pruned_against": [0],
            "run_id": "b",
        },
    ]
    table = tune.format_rows(rows, "fid").splitlines()
    assert "| 6.69 +/- 0.05 |" in table[2]
    assert "| PRUNED | - |" in table[3] and "200: fid 85.6 against trials [0]" in table[3]


def test_a_stale_trial_is_queued_again_even_when_mlflow_errs(tmp_path, script_extractor, monkeypatch):
    """The stale-trial callback requeues the point first, then marks the MLflow run: a tracking store
    that cannot be reached loses no point and does not crash the worker."""
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path, script_extractor)
    spec = tune.load_spec(write_study(tmp_path, name="stale", sampler="random", space={"train.lr_d": [1e-4, 2e-4]}))
    (tmp_path / "a_file").write_text("x")  # a tracking store that cannot be opened (a folder under a file)
    cfg = config.load(
        tmp_path / "base.yaml", ["tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path / 'a_file' / 'm.db'}"]
    )
    study, _ = tune.open_study(spec, cfg, create=True)
    trial = study.ask()
    trial.suggest_categorical("train.lr_d", [1e-4, 2e-4])
    trial.set_user_attr("run_id", "0" * 32)
    frozen = study._storage.get_trial(trial._trial_id)
    study._storage.get_heartbeat_stale_trial_callback()(study, frozen)  # as Optuna calls it
    waiting = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].params == frozen.params


def test_two_workers_pinning_at_once_agree_on_one_signature(tmp_path):
    """Workers starting together each claim the study's signature pin: exactly one value wins, and
    every worker reads that one (a read-then-set would let each pin its own)."""
    import threading

    storage = f"sqlite:///{tmp_path / 'pin.db'}"
    optuna.create_study(study_name="race", storage=storage)
    barrier, got = threading.Barrier(4), {}

    def worker(k):
        study = optuna.load_study(study_name="race", storage=storage)
        barrier.wait()
        got[k] = tune.claim_pin(study, f"sig{k}", "{}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got.values())) == 1 and got[0] in {f"sig{k}" for k in range(4)}
    assert optuna.load_study(study_name="race", storage=storage).user_attrs[tune.PINNED] == got[0]


def test_sqlite_storage_is_refused_for_a_study_tracked_to_a_team_server(
    tmp_path, script_extractor, monkeypatch, capsys
):
    """A team tracking server means workers on several machines; a sqlite study file is one machine's,
    so a worker elsewhere would silently start another study: refused in one line naming PostgreSQL."""
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path, script_extractor, **{"tracking.uri": "http://127.0.0.1:9"})
    study_file = write_study(tmp_path, name="team", sampler="random", space={"train.lr_d": [1e-4, 2e-4]})
    assert cli.main(["tune", str(study_file), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "postgresql://" in err[0] and "sqlite" in err[0], err


def test_a_study_whose_workers_fail_ends_its_parent_run_failed(tmp_path, script_extractor, monkeypatch):
    """The launcher's parent run must not stay RUNNING when the work under it fails."""
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path, script_extractor)
    spec = tune.load_spec(write_study(tmp_path, name="broken", sampler="random", space={"train.lr_d": [1e-4, 2e-4]}))

    def crash(*a, **k):
        raise RuntimeError("the worker machine caught fire")

    monkeypatch.setattr(tune, "work", crash)
    with pytest.raises(RuntimeError):
        tune.run_study(spec, quiet=True)
    cfg = config.load(tmp_path / "base.yaml")
    client = mlflow.MlflowClient(tracking_uri(cfg))
    parents = [
        r
        for r in client.search_runs([client.get_experiment_by_name("tunes").experiment_id])
        if r.data.tags.get("ganlab.study") == "broken"
    ]
    assert [p.info.status for p in parents] == ["FAILED"] and "caught fire" in parents[0].data.tags["ganlab.end_reason"]


def test_per_device_puts_n_workers_on_each_gpu():
    """--per-device N: N workers on every GPU named (or visible), spread round robin, at least --workers."""
    assert tune.worker_slots(1, "0,1", 2) == (4, "0,1,0,1")
    assert tune.worker_slots(1, "", 4, gpus=1) == (4, "0,0,0,0")
    assert tune.worker_slots(6, "3", 2) == (6, "3,3")  # 6 workers share GPU 3 (i % 2 slots)
    assert tune.worker_slots(2, "", 3, gpus=0) == (3, "")  # no GPU: N workers share the CPU
    assert tune.worker_slots(2, "0", 1) == (2, "0")  # the default changes nothing


def test_the_per_device_flag_reaches_the_workers(tmp_path, monkeypatch):
    """`ganlab sweep FILE --per-device 2 --devices 5`: two workers started, both on GPU 5."""
    from ganlab import cli, sweep

    seen = {}
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: seen.update(k))
    cli.main(["sweep", "x.yaml", "--per-device", "2", "--devices", "5"])
    assert seen["workers"] == 2 and seen["devices"] == "5,5"


def test_hyperband_s_smallest_resource_is_the_run_s_evaluation_interval():
    """eval.every_images (with every: 0) sets the run's interval; the pruner reads the same function."""
    from ganlab import config

    cfg = config.load(None, ["eval.every=0", "eval.every_images=6400", "train.batch_size=64", "train.steps=2000"])
    assert config.eval_interval(cfg) == 100
    assert tune.make_pruner("hyperband", cfg)._min_resource == 100
    cfg = config.load(None, ["eval.every=0", "train.steps=2000"])
    assert tune.make_pruner("hyperband", cfg)._min_resource == 2000  # only at the end: one rung, the whole run
