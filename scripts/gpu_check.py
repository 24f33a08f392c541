"""The prepared GPU check (issues 14, 26): one call on a lent machine, about 5 minutes on an H200, one JSON out.

    bash scripts/gpu_check.sh OUT_DIR              # on the GPU machine (installs from .whl/, no network)
    python scripts/gpu_check.py --device cpu --quick --out /tmp/x   # the same code, smoke-tested on a CPU

It runs, each step timed and recorded even when a later one fails:
  1. `ganlab bench --device cuda --json` (the seed's loop vs ganlab's steps, fp32 and bf16, lean and reference);
  2. single runs of seed_baseline.yaml and recommended.yaml at the defaults a GPU user gets (precision
     auto, TF32, cudnn.benchmark): img/s, wall time and the share of it spent evaluating;
  3. a 10,000-sample evaluation of the trained generator, timed cold and warm;
  4. four runs of recommended.yaml sharing the card (a sweep's situation): img/s each;
  5. an exact-resume check in deterministic mode: 2N steps straight == N, resume, N (bit for bit),
     with the training set resident on the GPU and again kept in host memory (data.placement=host).
Then one line per contender: `<GPU> | <contender> | <precision> | <img/s> | FID 10k <s> | eval share <%>`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")      # deterministic cuBLAS for the resume check
os.environ.setdefault("GANLAB_OFFLINE", "1")

import torch  # noqa: E402

from ganlab import checkpoint, config, data, train  # noqa: E402
from ganlab.eval import protocol  # noqa: E402
from ganlab.generator import load_generator  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def step(results: dict, name: str):
    """Decorator-ish runner: time fn, store its result or its error, never stop the check."""
    def run(fn, *a, **k):
        t0 = time.time()
        try:
            results[name] = {"ok": True, **fn(*a, **k)}
        except Exception as e:
            results[name] = {"ok": False, "error": f"{e.__class__.__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        results[name]["seconds"] = round(time.time() - t0, 2)
        print(json.dumps({name: results[name]}, default=str)[:2000], flush=True)
    return run


def bench(out: Path, device: str, quick: bool) -> dict:
    path = out / "bench.json"
    cmd = [sys.executable, "-m", "ganlab.cli", "bench", "--device", device, "--json", str(path)]
    cmd += ["--steps", "2", "--rounds", "1", "--skip", "eval", "--skip", "tracking", "--skip", "seed",
            "--skip", "baseline", "--skip", "recommended-ref", "--skip", "recommended-bf16-ref",
            "--skip", "r1-color-bf16"] if quick else ["--rounds", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(r.stderr[-1500:])
    return json.loads(path.read_text())


QUICK = ["eval.num_samples=64", "eval.every=4", "train.batch_size=16", "data.sprites=400", "data.min_holdout=64",
         "model.g_width=8", "model.d_width=8", "train.log_every=2", "eval.encoder_steps=5", "eval.handover_draws=2"]


def run_sets(out: Path, device: str, steps: int, quick: bool, tag: str = "") -> list[str]:
    """One single run's overrides: the defaults a GPU user gets (precision auto: bf16 on the GPU)."""
    sets = [f"train.device={device}", f"train.steps={steps}", f"tracking.runs_dir={out / ('mlruns' + tag)}",
            "tracking.system_metrics=false", f"data.cache_dir={out / 'cache'}"]
    return sets + (QUICK if quick else [])


def short_training(out: Path, device: str, experiment: str, steps: int, quick: bool) -> dict:
    sets = run_sets(out, device, steps, quick)
    cfg = config.load(ROOT / "experiments" / experiment, sets)
    t0 = time.time()
    res = train.train(cfg, quiet=True, experiment_file=experiment)
    wall = time.time() - t0
    events = [json.loads(x) for x in (res.run_dir / "events.jsonl").read_text().splitlines()]
    fin = next(e for e in events if e["kind"] == "finished")
    import sqlite3
    db = sqlite3.connect(out / "mlruns" / "mlflow.db")
    rate = [v for (v,) in db.execute("select value from metrics where key='img_per_s' and run_uuid=?", (res.run_id,))]
    evals = [v for (v,) in db.execute("select value from metrics where key='eval_seconds' and run_uuid=?", (res.run_id,))]
    rate_sorted = sorted(rate[1:] or rate)          # the first interval holds compilation
    return {"experiment": experiment, "steps": res.step, "wall_s": wall, "stopped": res.stopped,
            "median_img_per_s": rate_sorted[len(rate_sorted) // 2] if rate_sorted else None,
            "eval_seconds": evals, "eval_share_of_wall": sum(evals) / wall, "best": res.best, "best_step": res.best_step,
            "finished_event": fin["detail"], "run_dir": str(res.run_dir)}


def eval_10k(out: Path, device: str, run_dir: str, quick: bool) -> dict:
    g, info = load_generator(Path(run_dir) / "generator.pt", device)
    n = 256 if quick else 10_000
    cfg = config.from_dict(config.apply_overrides(config.to_dict(info["config"]),
                                                  [f"eval.num_samples={n}", "eval.batch_size=250" if not quick else "eval.batch_size=64",
                                                   f"data.cache_dir={out / 'cache'}", "eval.kid_subset_size=1000"]))
    images = data.load_images(cfg.data, cfg.seed)
    if device == "cuda":
        torch.cuda.synchronize()
    ev = protocol.Evaluator(cfg, images.holdout, device)
    t0 = time.time()
    m1 = ev(g)
    cold = time.time() - t0
    t0 = time.time()
    m2 = ev(g)
    warm = time.time() - t0
    return {"num_samples": n, "extractor": ev.extractor.name, "cold_s": cold, "warm_s": warm,
            "fid": m2.get("fid"), "same_fid_twice": m1.get("fid") == m2.get("fid")}


def shared_card(out: Path, device: str, steps: int, quick: bool, runs: int = 4) -> dict:
    """`runs` trainings of recommended.yaml at once on one card (a sweep's situation): each one's img/s."""
    procs = []
    for k in range(runs):
        sets = run_sets(out, device, steps, quick, tag=f"-shared{k}") + [f"seed={k}", "selection.keep_top=1"]
        cmd = [sys.executable, "-m", "ganlab.cli", "train", str(ROOT / "experiments" / "recommended.yaml"), "--quiet"]
        for x in sets:
            cmd += ["--set", x]
        procs.append(subprocess.Popen(cmd, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    t0, outs = time.time(), [p.communicate()[0] for p in procs]
    wall = time.time() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(next(o for p, o in zip(procs, outs) if p.returncode)[-1500:])
    batch = 16 if quick else 64
    return {"runs": runs, "wall_s": wall, "img_per_s_each": steps * batch / wall}


def summary_lines(res: dict) -> list[str]:
    """`<GPU> | <contender> | <precision> | <img/s> | FID 10k <s> | eval share <%>`, one per contender."""
    gpu, lines = res.get("gpu", res["device"]), []
    fid10k = res.get("eval_10k", {}).get("warm_s")
    fid_text = f"FID 10k {fid10k:.1f} s" if fid10k is not None else "FID 10k -"
    for r in res.get("bench", {}).get("results", []):
        prec = "fp32" if "fp32" in r["name"] or r["name"] == "seed loop" else "bf16"
        lines.append(f"{gpu} | step only: {r['name']} | {prec} | {r['images_per_s']:.0f} | - | -")
    for key in ("train_seed_baseline", "train_recommended"):
        t = res.get(key, {})
        if t.get("ok"):
            lines.append(f"{gpu} | run: {t['experiment']} ({t['steps']} steps) | auto | {t['median_img_per_s'] or 0:.0f} | "
                         f"{fid_text} | eval share {100 * t['eval_share_of_wall']:.1f}%")
    sh = res.get("shared_card", {})
    if sh.get("ok"):
        lines.append(f"{gpu} | {sh['runs']} runs sharing the card: recommended | auto | {sh['img_per_s_each']:.0f} each | - | -")
    return lines


def exact_resume(out: Path, device: str, placement: str, quick: bool = False) -> dict:
    sets = [f"train.device={device}", "train.deterministic=true", f"data.placement={placement}",
            "data.image_size=32", "data.sprites=600", "data.min_holdout=64", f"data.cache_dir={out / 'cache'}",
            "model.nz=32", "model.g_width=16", "model.d_width=16", "train.steps=40", "train.batch_size=32",
            "train.log_every=5", "train.checkpoint_every=1000", "train.ema_halflife=500", "train.diffaug=translation,cutout",
            "eval.every=20", "eval.num_samples=64", "eval.batch_size=32", "tracking.enabled=false"]
    sets += ["eval.encoder_steps=5", "train.steps=16", "eval.every=8"] if quick else []
    cfg = config.load(None, sets)
    a = train.train(cfg, run_dir=out / f"resume-{placement}-a", quiet=True)
    train.train(cfg, run_dir=out / f"resume-{placement}-b", quiet=True, stop_at=cfg.train.steps // 2)
    b = train.train(cfg, run_dir=out / f"resume-{placement}-b", resume=True, quiet=True)
    sa, sb = (checkpoint.load(r.run_dir / "last.pt")["trainer"] for r in (a, b))
    diffs = [f"{net}.{k}" for net in ("g", "d", "g_ema") for k in sa[net] if not torch.equal(sa[net][k], sb[net][k])]
    from ganlab.trainer import Trainer
    tr = Trainer(cfg, data.load_images(cfg.data, cfg.seed).train, torch.device(device))
    return {"placement": placement, "data_resident_on_device": tr.batches.resident,
            "batch_device": str(tr.batches(0).device), "bit_identical": not diffs, "differing": diffs[:10]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script itself")
    p.add_argument("--steps", type=int, default=3000, help="steps of each single run (3,000: the eval share of a full run)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"device": a.device, "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if a.device == "cuda":
        res["gpu"] = torch.cuda.get_device_name(0)
        res["cuda"] = torch.version.cuda
    steps = 8 if a.quick else a.steps
    step(res, "bench")(bench, a.out, a.device, a.quick)
    step(res, "train_seed_baseline")(short_training, a.out, a.device, "seed_baseline.yaml", steps, a.quick)
    step(res, "train_recommended")(short_training, a.out, a.device, "recommended.yaml", steps, a.quick)
    run_dir = res["train_recommended"].get("run_dir") or res["train_seed_baseline"].get("run_dir")
    if run_dir:
        step(res, "eval_10k")(eval_10k, a.out, a.device, run_dir, a.quick)
    step(res, "shared_card")(shared_card, a.out, a.device, steps, a.quick, runs=2 if a.quick else 4)
    for placement in ("device", "host"):
        step(res, f"exact_resume_{placement}")(exact_resume, a.out, a.device, placement, a.quick)
    res["summary"] = summary_lines(res)
    print("\n".join(res["summary"]), flush=True)
    (a.out / "gpu_check.json").write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {a.out / 'gpu_check.json'}")
    return 0 if all(v.get("ok", True) for v in res.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
