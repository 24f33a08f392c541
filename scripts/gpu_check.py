"""The prepared GPU check (issues 14, 26, 32): one call on a lent machine, within a time budget, one JSON
rewritten after every part, so a call that is cut still leaves every finished figure.

    bash scripts/gpu_check.sh [OUT_DIR] --budget 330          # on the GPU machine (installs from .whl/)
    python scripts/gpu_check.py --device cpu --quick --out /tmp/x   # the same code, smoke-tested on a CPU

Parts, in order of value; each runs in its own process with a deadline, and a part whose estimate
does not fit in what is left of the budget is skipped with one line:
  cuda_tests      tests/test_graph_step.py's CUDA tests (graph replays == eager steps, compile on CUDA)
  train_*         single runs of seed_baseline.yaml and recommended.yaml at a GPU user's defaults:
                  whole-run median img/s, wall time, the share of it spent evaluating
  bench_steps     `ganlab bench`: each step captured, eager and compiled, fp32 and bf16, with kernels per
                  step and the GPU's busy share
  eval_10k        a 10,000-sample evaluation of the trained generator, cold and warm
  exact_resume_*  2N steps straight == N, resume, N (bit for bit), set resident on the GPU / in host memory
  shared_card     four runs of recommended.yaml at once on the card: each one's img/s and the total
  study           experiments/studies/levers64_gpu.yaml through `ganlab sweep --per-device 8` (the 8 runs
                  at once), when the data folder is given (--study-data)
  bench_seed      the seed's own loop at 20 steps, beside ganlab's step
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

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the resume check
os.environ.setdefault("GANLAB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
QUICK = [
    "eval.num_samples=64",
    "eval.every=4",
    "train.batch_size=16",
    "data.sprites=400",
    "data.min_holdout=64",
    "model.g_width=8",
    "model.d_width=8",
    "train.log_every=2",
    "eval.encoder_steps=5",
    "eval.handover_draws=2",
]


# ------------------------------------------------------------------------------------------- parts


def run_sets(a, steps: int, tag: str = "") -> list[str]:
    """One single run's overrides: the defaults a GPU user gets (precision auto: bf16 on the GPU)."""
    sets = [
        f"train.device={a.device}",
        f"train.steps={steps}",
        f"tracking.runs_dir={a.out / ('mlruns' + tag)}",
        "tracking.system_metrics=false",
        f"data.cache_dir={a.out / 'cache'}",
    ]
    return sets + (QUICK if a.quick else [])


def cuda_tests(a) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-n",
        "0",
        "-p",
        "no:cacheprovider",
        "tests/test_graph_step.py",
        "-k",
        "cuda and not compile",
        "-rA",
    ]  # compile: bench_steps' contender
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    tail = (r.stdout + r.stderr)[-3000:]
    if r.returncode:
        raise RuntimeError(tail)
    return {"pytest": tail.splitlines()[-1], "log_tail": tail[-1500:]}


def run_metric(runs_dir: Path, key: str) -> list[float]:
    """A metric's values in step order, from the store in runs_dir (each part's runs_dir holds one run)."""
    import sqlite3

    db = sqlite3.connect(runs_dir / "mlflow.db")
    return [v for (v,) in db.execute("select value from metrics where key=? order by step", (key,))]


def median_rate(runs_dir: Path) -> float | None:
    """A run's median training img/s over its log intervals (the first left out: warm-up and capture)."""
    rate = run_metric(runs_dir, "img_per_s")
    rate = sorted(rate[1:] or rate)
    return rate[len(rate) // 2] if rate else None


def training(a, experiment: str) -> dict:
    from ganlab import config, train

    steps = 8 if a.quick else a.steps
    cfg = config.load(ROOT / "experiments" / experiment, run_sets(a, steps, tag=f"-{Path(experiment).stem}"))
    t0 = time.time()
    res = train.train(cfg, quiet=True, experiment_file=experiment)
    wall = time.time() - t0
    events = [json.loads(x) for x in (res.run_dir / "events.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["kind"] == "start")
    runs_dir = Path(cfg.tracking.runs_dir)
    evals = run_metric(runs_dir, "eval_seconds")
    return {
        "experiment": experiment,
        "steps": res.step,
        "wall_s": wall,
        "stopped": res.stopped,
        "median_img_per_s": median_rate(runs_dir),
        "whole_run_img_per_s": res.step * cfg.train.batch_size / wall,
        "eval_seconds": evals,
        "eval_share_of_wall": sum(evals) / wall,
        "best": res.best,
        "best_step": res.best_step,
        "start_line": start["detail"],
        "run_dir": str(res.run_dir),
    }


COMPILE_ONLY = [
    "baseline",
    "baseline-bf16",
    "recommended-ref",
    "recommended",
    "recommended-bf16-ref",
    "r1-color-bf16",
    "baseline-eager",
    "baseline-bf16-eager",
    "recommended-eager",
]


def bench(a, seed: bool, compile_: bool = False) -> dict:
    """`ganlab bench`: the steps (captured, eager; compile apart: its compilation takes a minute), or the
    seed's loop beside the captured recommended step."""
    path = a.out / ("bench_seed.json" if seed else "bench_compile.json" if compile_ else "bench_steps.json")
    cmd = [
        sys.executable,
        "-m",
        "ganlab.cli",
        "bench",
        "--device",
        a.device,
        "--json",
        str(path),
        "--skip",
        "eval",
        "--skip",
        "tracking",
    ]
    if seed:  # the seed's loop beside ganlab's captured step, 20 steps a round
        cmd += (["--steps", "1", "--rounds", "1"] if a.quick else ["--steps", "20", "--rounds", "2"]) + [
            x
            for k in (
                "baseline",
                "recommended-ref",
                "recommended-bf16-ref",
                "r1-color-bf16",
                "recommended",
                "recommended-eager",
                "recommended-bf16-eager",
                "recommended-bf16-compile",
                "baseline-eager",
                "baseline-bf16-eager",
            )
            for x in ("--skip", k)
        ]
    else:
        skip = COMPILE_ONLY if compile_ else ["recommended-bf16-compile"]
        cmd += ["--skip", "seed", "--rounds", "3"] + [x for k in skip for x in ("--skip", k)]
        cmd += ["--steps", "2", "--rounds", "1"] if a.quick else ["--steps", "50"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(path.read_text())


def eval_10k(a) -> dict:
    import torch

    from ganlab import config, data
    from ganlab.eval import protocol
    from ganlab.generator import load_generator

    done = json.loads((a.out / "gpu_check.json").read_text())
    run_dir = next(
        (done[k]["run_dir"] for k in ("train_recommended", "train_seed_baseline") if done.get(k, {}).get("ok")), None
    )
    if run_dir is None:
        raise RuntimeError("no trained generator: both single runs failed or were skipped")
    g, info = load_generator(Path(run_dir) / "generator.pt", a.device)
    n = 256 if a.quick else 10_000
    sets = [
        f"eval.num_samples={n}",
        f"eval.batch_size={64 if a.quick else 250}",
        f"data.cache_dir={a.out / 'cache'}",
        "eval.kid_subset_size=1000",
    ]
    cfg = config.from_dict(config.apply_overrides(config.to_dict(info["config"]), sets))
    images = data.load_images(cfg.data, cfg.seed)
    ev = protocol.Evaluator(cfg, images.holdout, a.device)
    times, fids = [], []
    for _ in range(2):
        if a.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        fids.append(ev(g).get("fid"))
        times.append(time.time() - t0)
    return {
        "num_samples": n,
        "extractor": ev.extractor.name,
        "cold_s": times[0],
        "warm_s": times[1],
        "fid": fids[1],
        "same_fid_twice": fids[0] == fids[1],
    }


def exact_resume(a, placement: str) -> dict:
    import torch

    from ganlab import checkpoint, config, data, train
    from ganlab.trainer import Trainer

    sets = [
        f"train.device={a.device}",
        "train.deterministic=true",
        f"data.placement={placement}",
        "data.image_size=32",
        "data.sprites=600",
        "data.min_holdout=64",
        f"data.cache_dir={a.out / 'cache'}",
        "model.nz=32",
        "model.g_width=16",
        "model.d_width=16",
        "train.steps=40",
        "train.batch_size=32",
        "train.log_every=5",
        "train.checkpoint_every=1000",
        "train.ema_halflife=500",
        "train.diffaug=[translation,cutout]",
        "eval.every=20",
        "eval.num_samples=64",
        "eval.batch_size=32",
        "tracking.enabled=false",
    ]
    sets += ["eval.encoder_steps=5", "train.steps=16", "eval.every=8"] if a.quick else []
    cfg = config.load(None, sets)
    full = train.train(cfg, run_dir=a.out / f"resume-{placement}-a", quiet=True)
    train.train(cfg, run_dir=a.out / f"resume-{placement}-b", quiet=True, stop_at=cfg.train.steps // 2)
    resumed = train.train(cfg, run_dir=a.out / f"resume-{placement}-b", resume=True, quiet=True)
    sa, sb = (checkpoint.load(r.run_dir / "last.pt")["trainer"] for r in (full, resumed))
    diffs = [f"{net}.{k}" for net in ("g", "d", "g_ema") for k in sa[net] if not torch.equal(sa[net][k], sb[net][k])]
    tr = Trainer(cfg, data.load_images(cfg.data, cfg.seed).train, torch.device(a.device))
    return {
        "placement": placement,
        "data_resident_on_device": tr.batches.resident,
        "captured": tr.graphs is not None,
        "bit_identical": not diffs,
        "differing": diffs[:10],
    }


def shared_card(a, runs: int = 4, mps: bool = False) -> dict:
    """`runs` trainings of recommended.yaml at once on one card (a sweep's situation): each one's median
    img/s while they all train, and their sum. With mps: under CUDA's Multi-Process Service, which lets
    kernels of several processes run at once (without it the card time-slices between them)."""
    from ganlab.distributed import cpu_share

    steps = 8 if a.quick else a.shared_steps
    runs = 2 if a.quick else runs
    if mps:
        subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True, capture_output=True)
    procs, tag = [], "-mps" if mps else ""
    try:
        for k in range(runs):
            sets = run_sets(a, steps, tag=f"-shared{tag}{k}") + [
                f"seed={k}",
                "selection.keep_top=1",
                "tracking.register_model=false",
            ]
            cmd = [
                sys.executable,
                "-m",
                "ganlab.cli",
                "train",
                str(ROOT / "experiments" / "recommended.yaml"),
                "--quiet",
            ]
            for x in sets:
                cmd += ["--set", x]
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=a.out,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=cpu_share(dict(os.environ), runs),
                )
            )
        t0, outs = time.time(), [p.communicate()[0] for p in procs]
    finally:
        if mps:
            subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, capture_output=True)
    wall = time.time() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(next(o for p, o in zip(procs, outs) if p.returncode)[-1500:])
    each = [median_rate(a.out / f"mlruns-shared{tag}{k}") for k in range(runs)]
    return {
        "runs": runs,
        "steps": steps,
        "mps": mps,
        "wall_s": wall,
        "img_per_s_each": each,
        "img_per_s_total": sum(x or 0 for x in each),
    }


def study(a) -> dict:
    """levers64's arms on 4 seeds, the 8 runs at once through `ganlab sweep --per-device 8`."""
    if not a.study_data:
        raise RuntimeError("no --study-data folder")
    from ganlab import sweep

    sets = [
        f"data.root={a.study_data}",
        f"tracking.runs_dir={a.out / 'mlruns-study'}",
        f"data.cache_dir={a.out / 'cache'}",
    ]
    sets += QUICK + ["train.steps=8"] if a.quick else []
    from ganlab.tune import worker_slots

    workers, devices = worker_slots(1, "", 8, gpus=None if a.device == "cuda" else 0)
    t0 = time.time()
    rows = sweep.run_sweep(
        ROOT / "experiments" / "studies" / "levers64_gpu.yaml", sets, quiet=True, workers=workers, devices=devices
    )
    return {"wall_s": time.time() - t0, "workers": workers, "devices": devices, "rows": rows}


PARTS = {  # name: (seconds on an H200, function, args); the budget skips a part whose estimate does not fit
    "cuda_tests": (45, cuda_tests, ()),
    "train_seed_baseline": (60, training, ("seed_baseline.yaml",)),
    "train_recommended": (60, training, ("recommended.yaml",)),
    "bench_steps": (75, bench, (False,)),
    "bench_compile": (90, bench, (False, True)),
    "eval_10k": (25, eval_10k, ()),
    "exact_resume_device": (30, exact_resume, ("device",)),
    "exact_resume_host": (30, exact_resume, ("host",)),
    "shared_card": (60, shared_card, ()),
    "shared_card_mps": (60, shared_card, (4, True)),
    "study": (150, study, ()),
    "bench_seed": (45, bench, (True,)),
}


# parts that mean nothing without a GPU: skipped in the CPU form unless named with --only
GPU_ONLY = {
    "bench_compile": "capture against compile is a CUDA comparison (on a CPU neither applies)",
    "shared_card_mps": "needs CUDA's Multi-Process Service",
    "study": "8 runs at once are a GPU's situation (on a CPU: --only study)",
}


# -------------------------------------------------------------------------------------------- main


def write(a, res: dict):
    res["summary"] = summary_lines(res)
    tmp = a.out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(res, indent=2, default=str))
    os.replace(tmp, a.out / "gpu_check.json")  # a cut call leaves the last whole file


def run_part(a, name: str, left: float) -> dict:
    """The part in a child process (`--part NAME`), killed at the deadline: a hang cannot eat the budget."""
    cmd = (
        [
            sys.executable,
            __file__,
            "--part",
            name,
            "--out",
            str(a.out),
            "--device",
            a.device,
            "--steps",
            str(a.steps),
            "--shared-steps",
            str(a.shared_steps),
        ]
        + (["--quick"] if a.quick else [])
        + (["--study-data", a.study_data] if a.study_data else [])
    )
    part_file = a.out / f"part_{name}.json"
    part_file.unlink(missing_ok=True)
    try:
        with open(a.out / f"part_{name}.log", "w") as log:
            subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=max(left, 1.0))
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"cut at the budget's deadline ({left:.0f} s left when it started)"}
    if not part_file.exists():
        log_tail = (a.out / f"part_{name}.log").read_text()[-1500:]
        return {"ok": False, "error": "the part's process died", "log_tail": log_tail}
    return json.loads(part_file.read_text())


def part_main(a):
    """Child: run one part, write its result (or its error) to part_NAME.json."""
    _, fn, args = PARTS[a.part]
    try:
        out = {"ok": True, **fn(a, *args)}
    except Exception as e:  # noqa: BLE001 - every failure is a recorded outcome
        out = {"ok": False, "error": f"{e.__class__.__name__}: {e}"[:3000], "trace": traceback.format_exc()[-2000:]}
    (a.out / f"part_{a.part}.json").write_text(json.dumps(out, default=str))


def summary_lines(res: dict) -> list[str]:
    """`<GPU> | <what> | <img/s> | <more>`, one per figure."""
    gpu, lines = res.get("gpu", res["device"]), []
    for r in [r for k in ("bench_steps", "bench_compile", "bench_seed") for r in res.get(k, {}).get("results", [])]:
        if "error" in r:
            lines.append(f"{gpu} | step only: {r['name']} | FAILED: {r['error'][:200]}")
            continue
        busy = (
            f"GPU busy {100 * r['gpu_busy_share']:.0f}%, {r.get('kernels_per_step', 0):.0f} kernels"
            if "gpu_busy_share" in r
            else "-"
        )
        lines.append(f"{gpu} | step only: {r['name']} | {r['images_per_s']:.0f} img/s | {busy}")
    for key in ("train_seed_baseline", "train_recommended"):
        t = res.get(key, {})
        if t.get("ok"):
            lines.append(
                f"{gpu} | run: {t['experiment']} ({t['steps']} steps) | {t['median_img_per_s'] or 0:.0f} img/s median, "
                f"{t['whole_run_img_per_s']:.0f} whole run | wall {t['wall_s']:.0f} s, eval share {100 * t['eval_share_of_wall']:.1f}%"
            )
    e = res.get("eval_10k", {})
    if e.get("ok"):
        lines.append(
            f"{gpu} | FID on {e['num_samples']} samples ({e['extractor']}) | cold {e['cold_s']:.1f} s, warm {e['warm_s']:.1f} s"
        )
    for key in ("shared_card", "shared_card_mps"):
        sh = res.get(key, {})
        if sh.get("ok"):
            each = ", ".join(f"{x:.0f}" for x in sh["img_per_s_each"] if x)
            lines.append(
                f"{gpu} | {sh['runs']} runs sharing the card{' (MPS)' if sh['mps'] else ''} | {each} img/s each "
                f"(medians), {sh['img_per_s_total']:.0f} total"
            )
    for name, r in res.items():
        if isinstance(r, dict) and r.get("skipped"):
            lines.append(f"{gpu} | {name} | skipped: {r['skipped']}")
        elif isinstance(r, dict) and r.get("ok") is False:
            lines.append(f"{gpu} | {name} | FAILED: {r.get('error', '')[:200]}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script itself")
    p.add_argument(
        "--steps", type=int, default=3000, help="steps of each single run (3,000: the eval share of a full run)"
    )
    p.add_argument("--shared-steps", type=int, default=1500, help="steps of each run sharing the card")
    p.add_argument(
        "--budget", type=float, default=330, help="seconds for the whole check: parts that would not fit are skipped"
    )
    p.add_argument(
        "--started", type=float, default=None, help="epoch seconds the call began (gpu_check.sh: install included)"
    )
    p.add_argument("--estimate-scale", type=float, default=1.0, help=argparse.SUPPRESS)  # tests: estimates x this
    p.add_argument("--only", action="append", default=[], choices=list(PARTS), help="run only these parts")
    p.add_argument("--study-data", default="", help="twemoji64 folder for the study part")
    p.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # child process: one part
    a = p.parse_args(argv)
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.part:
        return part_main(a)
    started = a.started or time.time()
    import torch

    res = {
        "device": a.device,
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "budget_s": a.budget,
    }
    if a.device == "cuda":
        res.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    write(a, res)
    for name, (estimate, _, _) in PARTS.items():
        if a.only and name not in a.only:
            continue
        estimate *= a.estimate_scale
        left = a.budget - (time.time() - started)
        why_not = GPU_ONLY.get(name) if a.device != "cuda" and name not in a.only else None
        if why_not:  # on a CPU smoke test: said, not run
            res[name] = {"skipped": why_not}
            print(f"skip {name}: {why_not}", flush=True)
        elif estimate > left:
            res[name] = {"skipped": f"needs about {estimate:.0f} s, {left:.0f} s of the budget left"}
            print(f"skip {name}: needs about {estimate:.0f} s, {left:.0f} s of the budget left", flush=True)
        else:
            t0 = time.time()
            res[name] = run_part(a, name, left)
            res[name]["seconds"] = round(time.time() - t0, 1)
            print(json.dumps({name: res[name]}, default=str)[:1500], flush=True)
        write(a, res)
    print("\n".join(res["summary"]), flush=True)
    print(f"wrote {a.out / 'gpu_check.json'} ({time.time() - started:.0f} s of a {a.budget:.0f} s budget)")
    return 0 if all(v.get("ok", True) is not False for v in res.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
