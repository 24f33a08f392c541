import json

import numpy as np
import pytest
import torch
from PIL import Image

from ganlab import bench


def test_seed_loop_really_saves_and_reloads_checkpoints_every_step(tmp_path):
    folder = tmp_path / "data" / "cls"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i in range(8):
        Image.fromarray(rng.randint(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA").save(folder / f"{i}.png")
    loop = bench.SeedLoop(tmp_path / "data", tmp_path, torch.device("cpu"), batch_size=4, num_workers=0)
    loop.step()
    assert (loop.saves, loop.loads) == (2, 0)
    gpath, dpath = loop.paths
    assert gpath.exists() and dpath.exists()
    # whatever is on disk is what the next step trains from: plant a zeroed generator there
    ck = torch.load(gpath, weights_only=False)
    ck["model_state_dict"] = {
        k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in ck["model_state_dict"].items()
    }
    torch.save(ck, gpath)
    loop.step()
    assert (loop.saves, loop.loads) == (4, 2)
    first_conv = loop.g.main[0].weight
    assert first_conv.abs().max().item() < 5e-3  # one Adam step away from the planted zeros
    mtime = gpath.stat().st_mtime_ns
    loop.step()
    assert gpath.stat().st_mtime_ns != mtime and loop.saves == 6 and loop.loads == 4
    assert isinstance(loop.d[-1], torch.nn.Sigmoid)


@pytest.mark.slow
def test_bench_json_has_one_entry_per_contender(tmp_path):
    """Every shipped contender runs through real MLflow tracking (its name in metric names: one with
    a '+' once crashed the bench)."""
    from ganlab import cli

    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--steps", "1", "--rounds", "1", "--skip", "eval", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    names = [r["name"] for r in d["results"]]
    assert names == ["seed loop"] + [name for _, name, _, _ in bench.CONTENDERS]
    for r in d["results"]:
        assert r["images_per_s"] > 0 and r["ms_per_step"] > 0 and r["peak_rss_mb"] > 0
        assert d["speedup_vs_seed"][r["name"]] > 0
    assert d["speedup_vs_seed"]["seed loop"] == 1.0
    assert d["seed_loop_io"]["checkpoint_saves"] >= 2 * 4 and d["tracking"]["ms_per_log_call"] > 0


def test_names_reaching_mlflow_are_made_valid(tmp_path):
    """A metric named after the '+ R1/4' contender is logged, not refused, by a real MLflow store."""
    import mlflow

    from ganlab import config, track

    cfg = config.load(
        None,
        [
            f"tracking.runs_dir={tmp_path / 'mlruns'}",
            f"tracking.uri=sqlite:///{tmp_path}/m.db",
            "tracking.system_metrics=false",
        ],
    )
    t = track.Tracker(cfg)
    t.start(tmp_path / "run")
    t.log_metrics({"ganlab recommended + R1/4 + colour bf16.loss_d": 1.5}, 4)
    t.set_tags({"a+b": "c"})
    t.flush()
    run = mlflow.MlflowClient(track.tracking_uri(cfg)).get_run(t.run_id)
    assert run.data.metrics == {"ganlab recommended _ R1/4 _ colour bf16.loss_d": 1.5}
    assert run.data.tags["a_b"] == "c"
    t.finish("FINISHED", {})
