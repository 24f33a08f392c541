"""One run on two processes (gloo on CPU, started by `ganlab train --nproc 2`, so through torchrun)
against the same run in one process with the same global batch.

Tolerance: the two differ only in the order float32 sums are taken (two half-batch means averaged
instead of one mean; batch-norm sums all-reduced), which measured at most 1.8e-7 relative on these
runs. RTOL = 1e-5 leaves 50x room for that rounding to grow over a few steps, while every mistake we
made or could make is far above it: batch norm per rank differs by ~1e-2, a cross-rank batch norm
whose backward could not be differentiated twice (R1 through it) by 7e-4, and a rank drawing its own
latents, noise or data order by the size of the losses themselves.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from ganlab import checkpoint, config, generator, train
from ganlab.events import read_events

pytestmark = pytest.mark.slow

RTOL = 1e-5
STEPS = 6
BASE = [f"train.steps={STEPS}", "train.log_every=1", "train.checkpoint_every=3", "train.channels_last=false", "seed=3"]
# Every evaluation "worse" than the best (fid maximised while it falls) rolls back: the other rank
# must follow rank 0's decisions, or its weights leave rank 0's and the losses part.
ROLLBACKS = [
    "eval.every=1",
    "selection.mode=max",
    "selection.collapse_factor=1.0",
    "selection.collapse_evals=1",
    "selection.max_rollbacks=20",
]
CASES = {
    # R1 through D's batch norm, instance noise, DiffAugment, EMA, global batch norm, rollbacks
    "bce-r1": [
        "train.loss=bce",
        "train.r1_gamma=1.0",
        "train.r1_every=2",
        "train.instance_noise=0.1",
        "train.diffaug=translation,cutout,color",
        "train.ema_halflife=100",
        "train.sync_bn=true",
        *ROLLBACKS,
    ],
    # the gradient penalty's interpolates, two D steps per G step
    "wgan-gp": ["train.loss=wgan-gp", "model.d_norm=none", "train.d_steps=2", "train.sync_bn=true"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, script_extractor):
    """Runs by (case, how), made once per module: 'one' in this process, 'two' on two processes."""
    root = tmp_path_factory.mktemp("ddp")
    made = {}

    def get(case: str, how: str, *extra: str) -> Path:
        key = (case, how, extra)
        if key not in made:
            sets = tiny_overrides(root, script_extractor) + BASE + CASES[case] + list(extra)
            cfg = config.load(None, sets + [f"tracking.runs_dir={root / 'mlruns' / case / how}"])
            if how == "one":
                made[key] = train.train(cfg, quiet=True).run_dir
            else:
                exp = root / f"{case}-{how}.yaml"
                exp.write_text(config.to_yaml(cfg))
                made[key] = launch(exp, "--nproc", "2")
        return made[key]

    return get


def launch(*args) -> Path:
    p = subprocess.run(
        [sys.executable, "-m", "ganlab.cli", "train", *map(str, args), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return Path(next(ln for ln in p.stdout.splitlines() if ln.startswith("run folder: "))[len("run folder: ") :])


def losses(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss_d"], r["loss_g"]) for r in rows if "loss_d" in r]


def worst_relative_gap(a: Path, b: Path) -> float:
    la, lb = losses(a), losses(b)
    assert [r[0] for r in la] == [r[0] for r in lb] == list(range(1, len(la) + 1))
    return max(abs(x - y) / max(abs(y), 1e-3) for ra, rb in zip(la, lb) for x, y in zip(ra[1:], rb[1:]))


def decisions(run: Path) -> list[tuple[int, str]]:
    return [
        (e["step"], e["kind"]) for e in read_events(run) if e["kind"] in ("rollback", "collapse_signal", "finished")
    ]


def weights(run: Path, name: str = "last.pt") -> dict:
    return checkpoint.load(run / name)["trainer"]


def apart(a: dict, b: dict) -> float:
    """The distance between two networks' weights. Weights are compared against how far training
    moved them, not elementwise: Adam divides by the gradient's size, so an element whose gradient
    is nearly zero (a sum that cancels) can step differently by a good share of the learning rate
    from rounding alone (seen: 7.6e-5 on one of G's weights under wgan-gp, 5e-5 of G's movement)."""
    return torch.cat([(a[k].float() - b[k].float()).flatten() for k in a if a[k].is_floating_point()]).norm().item()


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_as_one_with_the_same_global_batch(runs, case):
    one, two = runs(case, "one"), runs(case, "two")
    assert worst_relative_gap(two, one) < RTOL
    assert decisions(two) == decisions(one)
    if case == "bce-r1":
        assert sum(k == "rollback" for _, k in decisions(one)) >= 2  # the case does exercise rollbacks
    start = next(e for e in read_events(two) if e["kind"] == "start")
    assert start["world_size"] == 2 and sum(e["kind"] == "start" for e in read_events(two)) == 1  # rank 0 writes
    a, b, start = weights(one), weights(two), weights(one, "start.pt")
    for net in ("g", "d"):
        assert apart(a[net], b[net]) < 1e-3 * apart(a[net], start[net])
    if case == "bce-r1":  # EMA is kept by rank 0, updated every step as one process does, and saved
        assert b["g_ema"] is not None and not torch.equal(b["g_ema"]["main.0.weight"], b["g"]["main.0.weight"])
        assert apart(a["g_ema"], b["g_ema"]) < 1e-3 * apart(a["g_ema"], start["g_ema"])


def test_batch_norm_is_per_rank_unless_sync_bn(runs):
    """The default (statistics of each rank's half batch) is a different computation: the option is
    what makes the two runs one. Same global batch, so the same order of magnitude."""
    gap = worst_relative_gap(runs("bce-r1", "two", "train.sync_bn=false"), runs("bce-r1", "one"))
    assert 1e-3 < gap < 0.5


def test_resume_on_two_processes_is_exact_and_the_checkpoints_load_in_one(runs, tmp_path):
    full = runs("bce-r1", "two")
    exp = tmp_path / "exp.yaml"
    exp.write_text((full / "config.yaml").read_text())
    half = launch(exp, "--nproc", "2", "--stop-at", "3")
    assert checkpoint.load(half / "last.pt")["step"] == 3
    single = tmp_path / "single"  # the same checkpoint, continued in one process
    subprocess.run(["cp", "-r", str(half), str(single)], check=True)
    assert launch("--resume", half, "--nproc", "2") == half
    assert losses(half) == losses(full)  # exact: the same sums in the same order
    assert decisions(half) == decisions(full)
    a, b = weights(half), weights(full)
    assert all(torch.equal(a[n][k], b[n][k]) for n in ("g", "d", "g_ema") for k in a[n])

    cfg = config.load(single / "config.yaml")
    res = train.train(cfg, run_dir=single, resume=True, quiet=True)
    assert res.step == STEPS
    assert [e["step"] for e in read_events(single) if e["kind"] == "resume"] == [3]  # continued, not restarted
    assert worst_relative_gap(single, full) < RTOL
    warned = [e for e in read_events(single) if e["kind"] == "warning" and "2 process" in e["detail"]]
    assert warned, "resuming on another number of processes must say it is not an exact continuation"
    g, info = generator.load_generator(full / "generator.pt")
    imgs = generator.generate(g, torch.randn(4, cfg.model.nz), cfg.data.alpha, "cpu")
    assert imgs.shape == (4, 4, 32, 32) and info["step"] >= 1


def test_mlflow_records_one_run_from_rank_0(runs, tmp_path):
    import mlflow

    db = tmp_path / "mlflow.db"
    run = runs(
        "wgan-gp",
        "two",
        "tracking.enabled=true",
        f"tracking.uri=sqlite:///{db}",
        "tracking.system_metrics=false",
        "tracking.register_model=false",
    )
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(found[0].info.run_id, "loss_d")] == list(range(1, STEPS + 1))
    assert run.exists()


def test_a_batch_that_does_not_split_is_one_line(tmp_path, script_extractor):
    cfg = config.load(None, tiny_overrides(tmp_path, script_extractor) + ["train.batch_size=15"])
    exp = tmp_path / "odd.yaml"
    exp.write_text(config.to_yaml(cfg))
    p = subprocess.run(
        [sys.executable, "-m", "ganlab.cli", "train", str(exp), "--nproc", "2", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "ganlab: error: train.batch_size 15 does not split evenly over 2 processes: use a multiple of 2"
    ]
