"""What survives what: kill -9, damaged checkpoints, hostile pickles, full disks, parallel writers."""

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import script_evaluations, tiny_overrides

from ganlab import checkpoint, cli, config, train, trainer
from ganlab.checkpoint import CheckpointError
from ganlab.events import read_events
from ganlab.track import tracking_uri

# ------------------------------------------------------------------------------------ checkpoints


def test_truncated_or_corrupt_last_falls_back_to_previous(tmp_path):
    p = tmp_path / "last.pt"
    checkpoint.save(p, {"step": 1, "w": torch.ones(3)}, keep_previous=True)
    checkpoint.save(p, {"step": 2, "w": torch.ones(3) * 2}, keep_previous=True)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        checkpoint.load(p)
    warned = []
    state, used = checkpoint.load_latest_good(p, warn=warned.append)
    assert state["step"] == 1 and used.name == "last.pt.prev" and "previous" in warned[0]
    # a flipped byte inside the payload is caught by the checksum
    checkpoint.save(p, {"step": 3, "w": torch.zeros(1000)})
    raw = bytearray(p.read_bytes())
    i = raw.find(b"\x00\x00\x00\x00\x00\x00\x00\x00", len(raw) // 2)
    raw[i] = 7
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch|unreadable"):
        checkpoint.load(p)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"step": 1, "payload": Evil()}, tmp_path / "evil.pt")  # a bare hostile checkpoint
    with pytest.raises(CheckpointError, match="refused"):
        checkpoint.load(tmp_path / "evil.pt")
    import hashlib
    import io  # hostile inside a valid envelope

    buf = io.BytesIO()
    torch.save({"step": 1, "payload": Evil()}, buf)
    blob = buf.getvalue()
    torch.save(
        {
            "format": 1,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "blob": torch.frombuffer(bytearray(blob), dtype=torch.uint8),
        },
        tmp_path / "evil2.pt",
    )
    with pytest.raises(CheckpointError, match="refused"):
        checkpoint.load(tmp_path / "evil2.pt")
    assert not (tmp_path / "PWNED").exists()
    r = subprocess.run(
        [sys.executable, "-m", "ganlab.cli", "sample", str(tmp_path / "evil.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "PWNED").exists()


def test_yaml_is_read_safely(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: !!python/object/apply:os.system ['touch PWNED']\n")
    with pytest.raises(config.ConfigError):
        config.load(p)
    assert not (tmp_path / "PWNED").exists()


def test_disk_full_keeps_previous_checkpoint_and_says_so(tiny_cfg, monkeypatch, capsys):
    cfg = tiny_cfg("train.steps=16", "train.checkpoint_every=8", "eval.every=8")
    res = train.train(cfg, quiet=True, stop_at=8)
    good = checkpoint.load(res.run_dir / "last.pt")

    def full(f, data):
        f.write(data[: len(data) // 3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_all", full)
    res2 = train.train(cfg, run_dir=res.run_dir, resume=True, quiet=True)
    assert res2.step == 16  # training itself went on
    errors = [e for e in read_events(res.run_dir) if e["kind"] == "error"]
    assert errors and "No space left" in errors[0]["detail"] and "kept" in errors[0]["detail"]
    state, _ = checkpoint.load_latest_good(res.run_dir / "last.pt", warn=lambda m: None)
    assert state["step"] == good["step"]
    assert not list(res.run_dir.glob(".*.tmp"))  # no half-written leftovers


def test_a_corrupt_kept_generator_and_a_failed_handover_still_end_the_run(tiny_cfg, monkeypatch):
    """keep_top 3: step 16's kept file is corrupted before the end, and the hand-over score runs out of
    memory. The re-evaluation leaves step 16 out and says so, the hand-over failure is an error event,
    and the run still finishes: `finished` event, MLflow run FINISHED, a model registered."""
    from ganlab.eval import protocol

    values = iter([3.0, 1.0, 2.0] + [2.5, 1.5])  # evaluations 8, 16, 24; re-evaluation of 24, 8
    monkeypatch.setattr(protocol.Evaluator, "metrics_for", lambda self, fake, seed=None: {"fid": next(values)})

    def oom(self, g):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(protocol.Evaluator, "handover_draws", oom)
    orig = train.Run._reevaluate_top

    def corrupt_then_reevaluate(self):
        (self.run_dir / "top" / "step_0000016.pt").write_bytes(b"not a checkpoint")
        return orig(self)

    monkeypatch.setattr(train.Run, "_reevaluate_top", corrupt_then_reevaluate)
    cfg = tiny_cfg(
        "selection.keep_top=3",
        "selection.on_collapse=ignore",
        "tracking.enabled=true",
        "tracking.system_metrics=false",
        "tracking.register_model=true",
    )
    res = train.train(cfg, quiet=True)
    events = read_events(res.run_dir)
    left_out = [e for e in events if e["kind"] == "warning" and "left out of the re-evaluation" in e["detail"]]
    assert len(left_out) == 1 and "step 16" in left_out[0]["detail"]
    assert res.handed_over_step == 8 and res.handover == {}
    assert any(e["kind"] == "error" and "hand-over score failed" in e["detail"] for e in events)
    assert events[-1]["kind"] == "finished"
    c = mlflow.MlflowClient(tracking_uri(cfg))
    assert c.get_run(res.run_id).info.status == "FINISHED"
    assert c.search_model_versions(f"run_id = '{res.run_id}'")


def test_non_finite_weights_never_reach_best(tiny_cfg, monkeypatch):
    """The weights guard at evaluation: diagnostics are read only every 100 steps here, so a NaN loss
    cannot stop the run first; the evaluation at step 16 must see the NaN weights itself."""
    script_evaluations(monkeypatch, [5.0, 1.0, 1.0])
    orig = trainer.Trainer.step

    def poisoned(self, step):
        orig(self, step)
        if step == 12:  # weights go bad after the first eval
            with torch.no_grad():
                next(self.g.parameters()).fill_(float("nan"))

    monkeypatch.setattr(trainer.Trainer, "step", poisoned)
    res = train.train(tiny_cfg("selection.on_collapse=stop", "train.log_every=100"), quiet=True)
    best = checkpoint.load(res.run_dir / "best.pt")
    assert best["step"] == 8
    assert all(torch.isfinite(v).all() for v in best["trainer"]["g"].values() if v.is_floating_point())
    signals = [e for e in read_events(res.run_dir) if e["kind"] == "collapse_signal"]
    assert [(e["step"], e["signal"]) for e in signals] == [(16, "non_finite")] and "weights" in signals[0]["detail"]
    assert res.stopped == "early_stop" and res.step == 16


# ---------------------------------------------------------------------------------- atomic writes

WRITER = """
import sys, torch
from ganlab import checkpoint
i = 0
while True:
    checkpoint.save(sys.argv[1], {"i": i, "w": torch.full((2_000_000,), float(i))}, keep_previous=True)
    i += 1
    print(i, flush=True)
"""


@pytest.mark.slow
def test_kill_during_checkpoint_writes_never_corrupts(tmp_path):
    path = tmp_path / "last.pt"
    rng = random.Random(0)
    for trial in range(4):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        p.stdout.readline()  # at least one complete write
        time.sleep(rng.uniform(0.05, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        state, used = checkpoint.load_latest_good(path, warn=lambda m: None)
        assert state["w"][0].item() == state["i"]


# --------------------------------------------------------------------------------------- kill -9


def write_experiment(tmp_path, extractor, **sets):
    ov = dict(o.split("=", 1) for o in tiny_overrides(tmp_path, extractor))
    ov.update(
        {
            "tracking.enabled": "true",
            "tracking.system_metrics": "false",
            "tracking.register_model": "false",
            **{k: str(v) for k, v in sets.items()},
        }
    )
    raw = config.apply_overrides({}, [f"{k}={v}" for k, v in ov.items()])
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.slow
def test_kill_9_then_resume_keeps_best_and_one_mlflow_run(tmp_path, script_extractor):
    exp = write_experiment(
        tmp_path,
        script_extractor,
        **{"train.steps": 400, "train.checkpoint_every": 10, "eval.every": 40, "name": "killme"},
    )
    cmd = [sys.executable, "-m", "ganlab.cli", "train", str(exp), "--quiet"]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = None
    for line in p.stdout:
        if line.startswith("run folder:"):
            run_dir = Path(line.split(":", 1)[1].strip())
            break
    run_dir = run_dir if run_dir.is_absolute() else tmp_path / run_dir
    rng = random.Random(1)
    kills, killed_at, bests = 0, [], []
    seen = None
    while True:
        # kill only once this process has written a checkpoint of its own, then at a random moment
        while p.poll() is None and (
            not (run_dir / "last.pt").exists() or (run_dir / "last.pt").stat().st_mtime_ns == seen
        ):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        seen = (run_dir / "last.pt").stat().st_mtime_ns
        killed_at.append(checkpoint.load_latest_good(run_dir / "last.pt", warn=lambda m: None)[0]["step"])
        if (run_dir / "best.pt").exists():
            best = checkpoint.load(run_dir / "best.pt")
            bests.append((best["step"], best["best"]["value"]))
        p = subprocess.Popen(
            [sys.executable, "-m", "ganlab.cli", "train", "--resume", str(run_dir), "--quiet"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if kills >= 3:
            break
    assert p.wait(timeout=600) == 0
    assert kills >= 2
    cfg = config.load(run_dir / "config.yaml")
    c = mlflow.MlflowClient(tracking_uri(cfg))
    exp_id = c.get_experiment_by_name("killme").experiment_id
    runs = c.search_runs([exp_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run, resumed
    steps = [m.step for m in c.get_metric_history(runs[0].info.run_id, "fid")]
    assert steps == list(range(40, 401, 40))  # no duplicates, none missing
    ev = [e for e in read_events(run_dir) if e["kind"] in ("eval", "improved")]
    assert [e["step"] for e in ev] == list(range(40, 401, 40))
    assert [e["kind"] for e in read_events(run_dir)].count("resume") == kills
    # each resume started where the killed process's last.pt was, not from step 0
    assert [e["step"] for e in read_events(run_dir) if e["kind"] == "resume"] == killed_at
    best = checkpoint.load(run_dir / "best.pt")
    assert runs[0].data.metrics["selection_best_fid"] == best["best"]["value"]
    # the best at each kill survived the resumed processes: the final best is it, or a better one later
    for step, value in bests:
        assert best["best"]["value"] <= value and (best["step"] >= step)
        if best["step"] == step:
            assert best["best"]["value"] == value


# ------------------------------------------------------------------------------- parallel writers


@pytest.mark.slow
def test_two_trainings_and_a_sweep_share_one_store(tmp_path, script_extractor):
    a = write_experiment(tmp_path, script_extractor, **{"name": "par", "variant": "a", "train.steps": 40})
    a_text = a.read_text()
    (tmp_path / "b.yaml").write_text(a_text.replace("variant: a", "variant: b"))
    (tmp_path / "sw.yaml").write_text("base: exp.yaml\nname: parsweep\nvariants:\n  x: {}\n  y: {train.lr_d: 0.0004}\n")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ganlab.cli", *args],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in (["train", "exp.yaml", "--quiet"], ["train", "b.yaml", "--quiet"], ["sweep", "sw.yaml", "--quiet"])
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    c = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name(n).experiment_id for n in ("par", "parsweep")])
    children = [r for r in runs if r.info.run_name.startswith(("a-", "b-", "x-", "y-"))]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    for r in children:
        assert [m.step for m in c.get_metric_history(r.info.run_id, "fid")] == [8, 16, 24, 32, 40]
        assert len(c.get_metric_history(r.info.run_id, "loss_d")) == 10
        assert {x.path for x in c.list_artifacts(r.info.run_id)} >= {"config.yaml", "events.jsonl", "images"}


# ------------------------------------------------------------------------------ bad input, one line


def _one_line_error(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ganlab: error:"), err
    return err[0]


@pytest.mark.parametrize("case", ["empty", "non_images", "smaller_than_batch", "unreadable_only"])
def test_bad_data_is_one_clear_line(tmp_path, script_extractor, capsys, case):
    import numpy as np
    from PIL import Image

    root = tmp_path / "data"
    root.mkdir()
    if case == "non_images":
        for i in range(3):
            (root / f"{i}.png").write_text("not a png")
    elif case == "smaller_than_batch":
        for i in range(10):
            Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(root / f"{i}.png")
    elif case == "unreadable_only":
        (root / "gone.png").symlink_to(tmp_path / "nowhere.png")  # unreadable (root ignores chmod)
    sets = [s for o in tiny_overrides(tmp_path, script_extractor) for s in ("--set", o)]
    (tmp_path / "exp.yaml").write_text("name: bad\n")
    msg = _one_line_error(capsys, ["train", str(tmp_path / "exp.yaml"), "--quiet", *sets, "--set", f"data.root={root}"])
    want = {
        "empty": "no image files",
        "non_images": "0 usable image",
        "smaller_than_batch": "fewer than one batch",
        "unreadable_only": "0 usable image",
    }[case]
    assert want in msg and "Traceback" not in msg


def test_bad_cli_values_are_one_line(tmp_path, capsys):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    assert "must be a YAML mapping" in _one_line_error(capsys, ["train", str(p)])
    ok = tmp_path / "ok.yaml"
    ok.write_text("name: ok\n")
    assert "must be an integer" in _one_line_error(capsys, ["train", str(ok), "--set", "train.steps=many"])
    assert "not a run folder" in _one_line_error(capsys, ["train", "--resume", str(tmp_path)])
    assert "expected a checkpoint file" in _one_line_error(capsys, ["sample", "nothing-here"])


@pytest.mark.parametrize("where", ["on_start", "on_eval_interrupt"])
def test_no_run_is_left_running(tiny_cfg, tmp_path, where):
    """A failure right after the MLflow run starts (here: the on_start hook) ends it FAILED; an
    interrupt that does not wait for the step's end (second Ctrl-C, SIGTERM) ends it KILLED; both
    with the reason as a tag."""
    import mlflow

    from ganlab import train as train_mod
    from ganlab.track import tracking_uri

    cfg = tiny_cfg(
        "tracking.enabled=true",
        "tracking.system_metrics=false",
        "tracking.register_model=false",
        f"tracking.uri=sqlite:///{tmp_path}/runs.db",
    )
    seen = {}

    def on_start(run_id, run_dir):
        seen["id"] = run_id
        if where == "on_start":
            raise RuntimeError("the study could not record its trial")

    def on_eval(step, metrics, last):
        raise KeyboardInterrupt

    with pytest.raises(RuntimeError if where == "on_start" else KeyboardInterrupt):
        train_mod.train(cfg, quiet=True, on_start=on_start, on_eval=on_eval)
    run = mlflow.MlflowClient(tracking_uri(cfg)).get_run(seen["id"])
    assert run.info.status == ("FAILED" if where == "on_start" else "KILLED")
    assert (
        ("could not record" in run.data.tags["ganlab.end_reason"])
        if where == "on_start"
        else run.data.tags["ganlab.end_reason"].startswith("interrupted at step")
    )


def test_last_checkpoint_is_written_in_the_background_from_a_snapshot(tiny_cfg, tmp_path, monkeypatch):
    """save_last returns while the write is still in flight (the step does not wait for hashing and
    fsync), and what lands is the state at the save, not the weights trained after it."""
    import threading

    from ganlab import train as train_mod

    run = train_mod.Run(tiny_cfg(), tmp_path / "r", quiet=True, tracker=None)
    run.begin(resume=False, new_period=False, experiment_file="")
    run.train_step()
    at_save = {k: v.clone() for k, v in run.trainer.g.state_dict().items()}
    gate, orig = threading.Event(), checkpoint._write_all

    def held(f, data):
        gate.wait(30)
        orig(f, data)

    monkeypatch.setattr(checkpoint, "_write_all", held)
    run.save_last()
    assert run._writer is not None and run._writer[0].is_alive()  # returned with the write in flight
    for _ in range(3):
        run.train_step()  # training goes on meanwhile
    gate.set()
    run.wait_for_checkpoint()
    saved = checkpoint.load(tmp_path / "r" / "last.pt")
    assert saved["step"] == 1
    assert all(torch.equal(saved["trainer"]["g"][k], v) for k, v in at_save.items())
    assert any(not torch.equal(run.trainer.g.state_dict()[k].cpu(), v) for k, v in at_save.items())


def test_a_background_write_that_fails_with_any_error_is_an_outcome(tiny_cfg, monkeypatch):
    """A MemoryError in the writer thread (not an OSError) is an error event, and the top/ clean-up keeps
    the generators the older last.pt still lists; before, the thread died silently and counted as success."""
    cfg = tiny_cfg("train.steps=16", "train.checkpoint_every=4", "eval.every=4", "selection.keep_top=1")
    save = checkpoint.save

    def no_memory(path, state, **kw):
        if Path(path).name == "last.pt":
            raise MemoryError("cannot allocate the host copy")
        return save(path, state, **kw)

    monkeypatch.setattr(checkpoint, "save", no_memory)
    res = train.train(cfg, quiet=True)
    errors = [e["detail"] for e in read_events(res.run_dir) if e["kind"] == "error"]
    assert any("could not write last.pt (MemoryError: cannot allocate" in d for d in errors), errors
    assert not (res.run_dir / "last.pt").exists() or checkpoint.load(res.run_dir / "last.pt")["step"] < 16


def test_a_writer_never_started_neither_raises_nor_counts_as_written(tiny_cfg, tmp_path):
    """A signal between creating the writer thread and starting it: the interrupt still saves, says so
    and ends tracking (joining an unstarted thread raised, and the MLflow run stayed RUNNING)."""
    import threading

    import mlflow

    from ganlab import track

    cfg = tiny_cfg(
        "tracking.enabled=true",
        "tracking.system_metrics=false",
        "tracking.register_model=false",
        f"tracking.uri=sqlite:///{tmp_path}/runs.db",
    )
    run = train.Run(cfg, tmp_path / "r", quiet=True, tracker=track.Tracker(cfg))
    run.begin(resume=False, new_period=False, experiment_file="")
    run.train_step()
    run._writer = (threading.Thread(target=lambda: None), {}, run.step, [8])  # created, never started
    with pytest.raises(KeyboardInterrupt):
        run.interrupt()
    kinds = [(e["kind"], e["detail"]) for e in read_events(tmp_path / "r")]
    assert any(k == "error" and "never started" in d for k, d in kinds), kinds
    assert any(k == "error" and d.startswith("interrupted at step 1") for k, d in kinds)
    assert checkpoint.load(tmp_path / "r" / "last.pt")["step"] == 1  # the interrupt's own save landed
    assert mlflow.MlflowClient(tracking_uri(cfg)).get_run(run.run_id).info.status == "KILLED"


def test_temporary_files_of_a_killed_write_are_removed_on_start_and_resume(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.steps=8", "train.checkpoint_every=4", "eval.every=4")
    res = train.train(cfg, quiet=True, stop_at=4)
    for name in (".last.pt.abc123.tmp", ".last.pt.prev.4242.tmp", "top/.step_4.pt.x.tmp"):
        (res.run_dir / name).parent.mkdir(exist_ok=True)
        (res.run_dir / name).write_bytes(b"\0" * 1000)
    train.train(cfg, run_dir=res.run_dir, resume=True, quiet=True)
    assert not list(res.run_dir.glob(".*.tmp")) and not list(res.run_dir.glob("top/.*.tmp"))


def test_packs_and_groups_must_fill_each_process_share_of_the_batch(capsys):
    """A global batch of 12 on 2 processes with pack 4: each process's 6 images are 1.5 packs, and the lean
    step's halves would be 2 and 1 packs with one pack mixing real and fake. Refused in one line, before
    any process starts; so is a batch that packs and minibatch-std groups do not divide on one process."""
    exp = str(Path(__file__).resolve().parent.parent / "experiments" / "default.yaml")
    msg = _one_line_error(
        capsys,
        [
            "train",
            exp,
            "--nproc",
            "2",
            "--set",
            "train.batch_size=12",
            "--set",
            "model.pack=4",
            "--set",
            "model.d_norm=none",
        ],
    )
    assert "train.batch_size 12 does not split evenly over 2 processes x model.pack 4: use a multiple of 8" in msg
    msg = _one_line_error(
        capsys,
        [
            "train",
            exp,
            "--set",
            "train.batch_size=24",
            "--set",
            "model.pack=2",
            "--set",
            "model.mbstd_group=8",
            "--set",
            "model.d_norm=none",
        ],
    )
    assert "model.pack 2 x model.mbstd_group 8 = 16 does not divide train.batch_size 24" in msg
