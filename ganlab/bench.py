"""`ganlab bench`: ganlab beside the seed's own loop, in one process, on one device, data and batch size.

Contenders run in alternating rounds (seed, baseline, baseline-bf16, recommended, seed, ...) so that
machine noise hits them alike; each reports the median over rounds. A benchmark, never a timed test.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from . import config as config_mod
from . import data, models
from .device import bf16_supported, pick_device
from .generator import prepare_for_sampling
from .trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"


def rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")


# -------------------------------------------------------------------------------- the seed's loop


class SeedLoop:
    """The user's gans.py, re-implemented faithfully as the baseline: PIL decoding of every PNG through
    a DataLoader with 2 workers each epoch, Sigmoid + BCELoss, fp32, both checkpoints (model +
    optimizer) reloaded from disk before and rewritten after every step, the loss printed (a host
    sync) every step, and a sample grid every 100 iterations."""

    def __init__(self, folder: Path, workdir: Path, device, batch_size=64, num_workers=2):
        import torchvision.datasets as dset
        import torchvision.transforms as T
        from PIL import Image

        self.device, self.workdir = device, Path(workdir)
        tf = T.Compose([T.Resize((64, 64)), T.ToTensor(), T.Normalize((0.5,) * 4, (0.5,) * 4)])
        loader = lambda p: Image.open(open(p, "rb")).convert("RGBA")
        self.dataset = dset.ImageFolder(root=str(folder), transform=tf, loader=loader)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )
        cfg = config_mod.load(EXPERIMENTS / "seed_baseline.yaml", check_paths=False)
        self.g, d = models.build(cfg.model, 64, seed=0)
        self.d = nn.Sequential(d, nn.Sigmoid())
        self.g.to(device)
        self.d.to(device)
        self.crit = nn.BCELoss()
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.paths = (self.workdir / "generator_model", self.workdir / "discriminator_model")
        self.saves = self.loads = self.i = 0
        self._it = iter(self.loader)
        self.lines = []

    def _batch(self):
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)

    def step(self):
        for path, net, opt in zip(self.paths, (self.g, self.d), (self.opt_g, self.opt_d)):
            if path.exists():
                ck = torch.load(path, weights_only=False)
                net.load_state_dict(ck["model_state_dict"])
                opt.load_state_dict(ck["optimizer_state_dict"])
                self.loads += 1
        real, _ = self._batch()
        real = real.to(self.device)
        n = real.shape[0]
        self.d.zero_grad()
        err_real = self.crit(self.d(real).view(-1), torch.ones(n, device=self.device))
        noise = torch.randn(n, 100, 1, 1, device=self.device)
        fake = self.g(noise)
        err_fake = self.crit(self.d(fake.detach()).view(-1), torch.zeros(n, device=self.device))
        err_d = err_real + err_fake
        err_d.backward()
        self.opt_d.step()
        self.g.zero_grad()
        err_g = self.crit(self.d(fake).view(-1), torch.ones(n, device=self.device))
        err_g.backward()
        self.opt_g.step()
        self.lines.append("Loss_D: %.4f Loss_G: %.4f" % (err_d.data, err_g.data))  # host sync, as printed
        del self.lines[:-10]
        for path, net, opt, err in zip(self.paths, (self.g, self.d), (self.opt_g, self.opt_d), (err_g, err_d)):
            if path.exists():
                os.remove(path)
            torch.save(
                {
                    "epoch": 0,
                    "model_state_dict": net.state_dict(),
                    "optimizer_state_dict": opt.state_dict(),
                    "loss": err,
                    "noise": noise,
                },
                path,
            )
            self.saves += 1
        if self.i % 100 == 0:
            import torchvision.utils as vutils

            vutils.save_image(fake.data, str(self.workdir / "fake_samples.png"), normalize=True)
        self.i += 1
        return n


# ------------------------------------------------------------------------------------- contenders

FP32, BF16, REFERENCE = ["train.precision=fp32"], ["train.precision=bf16"], ["train.lean_step=false"]
LOG_EVERY = ["train.log_every=4"]  # diagnostics and MLflow writes inside the timed window
# (key for --skip, name, experiment, overrides). "reference" is the step before issue 26 (two D forwards,
# a power iteration on every D forward): each lean contender has its reference beside it, measured in
# the same alternating rounds, so their ratio is a paired before/after.
CONTENDERS = [
    ("baseline", "ganlab seed_baseline fp32", "seed_baseline.yaml", FP32),
    ("baseline-bf16", "ganlab seed_baseline bf16", "seed_baseline.yaml", BF16),
    ("recommended-ref", "ganlab recommended fp32 reference", "recommended.yaml", FP32 + REFERENCE),
    ("recommended", "ganlab recommended fp32", "recommended.yaml", FP32),
    ("recommended-bf16-ref", "ganlab recommended bf16 reference", "recommended.yaml", BF16 + REFERENCE),
    ("recommended-bf16", "ganlab recommended bf16", "recommended.yaml", BF16),
    # issue 22's best candidate: lazy R1 costs a double backward every 4th D step
    (
        "r1-color-bf16",
        "ganlab recommended + R1/4 + colour bf16",
        "recommended.yaml",
        BF16 + ["train.r1_gamma=1.0", "train.r1_every=4", "train.diffaug=[color,translation,cutout]"],
    ),
]
# On CUDA the contenders above are captured as CUDA graphs (train.cuda_graph: auto); these are the same
# steps eager and compiled, measured beside them (on a CPU they equal their plain twins: skipped there)
EAGER, COMPILE = ["train.cuda_graph=off"], ["train.compile=true"]
CUDA_CONTENDERS = [
    ("baseline-eager", "ganlab seed_baseline fp32 eager", "seed_baseline.yaml", FP32 + EAGER),
    ("baseline-bf16-eager", "ganlab seed_baseline bf16 eager", "seed_baseline.yaml", BF16 + EAGER),
    ("recommended-eager", "ganlab recommended fp32 eager", "recommended.yaml", FP32 + EAGER),
    ("recommended-bf16-eager", "ganlab recommended bf16 eager", "recommended.yaml", BF16 + EAGER),
    ("recommended-bf16-compile", "ganlab recommended bf16 compile", "recommended.yaml", BF16 + COMPILE),
]


class GanlabStep:
    """ganlab's training step with its diagnostics (read back every log_every steps) and MLflow
    logging of them on, as in a real run."""

    def __init__(self, name, experiment, sets, images, device, tracker):
        self.name = name
        self.cfg = config_mod.load(EXPERIMENTS / experiment, sets, check_paths=False)
        self.trainer = Trainer(self.cfg, images, device)
        self.tracker, self.s = tracker, 0
        self.device = device

    def step(self):
        self.trainer.step(self.s)
        self.s += 1
        if self.s % self.cfg.train.log_every == 0:
            diag = self.trainer.pop_diagnostics()
            if self.tracker is not None:
                self.tracker.log_metrics({f"{self.name}.{k}": v for k, v in diag.items()}, self.s)
        return self.cfg.train.batch_size


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(c, steps, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        c.step()
    _sync(device)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- main


def main(args):
    device = pick_device(args.device)
    torch.manual_seed(0)
    steps = args.steps or (50 if device.type == "cuda" else 8)
    out = {
        "command": "ganlab " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("ganlab") else "ganlab bench",
        "machine": machine_info(device),
        "device": str(device),
        "batch_size": 64,
        "steps_per_round": steps,
        "rounds": args.rounds,
        "results": [],
        "speedup_vs_seed": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = data_folder(args.data, tmp)
        cfg_data = config_mod.load(
            EXPERIMENTS / "seed_baseline.yaml", [f"data.root={src}", f"data.cache_dir={tmp / 'cache'}"]
        ).data
        before = rss_mb()
        images = data.load_images(cfg_data).train
        out["dataset"] = {"images": len(images), "uint8_mb": images.numel() / 2**20, "rss_growth_mb": rss_mb() - before}
        tracker = bench_tracker(tmp) if "tracking" not in args.skip else None
        contenders = []
        if "seed" not in args.skip:
            contenders.append(("seed loop", SeedLoop(src, tmp, device)))
        for key, name, exp, sets in CONTENDERS + (CUDA_CONTENDERS if device.type == "cuda" else []):
            if key not in args.skip:
                contenders.append((name, GanlabStep(name, exp, sets + LOG_EVERY, images, device, tracker)))
        out["results"] = measure(contenders, args.rounds, steps, device)
        for row, (_, c) in zip([r for r in out["results"] if "error" not in r], contenders):
            row.update(ops_per_step(c, device))
            busy_share(row)
        seed = next((r for r in out["results"] if r["name"] == "seed loop"), None)
        if seed:
            for r in out["results"]:
                if "error" not in r:
                    out["speedup_vs_seed"][r["name"]] = r["images_per_s"] / seed["images_per_s"]
            loop = contenders[0][1]
            out["seed_loop_io"] = {
                "checkpoint_loads": loop.loads,
                "checkpoint_saves": loop.saves,
                "checkpoint_mb": sum(p.stat().st_size for p in loop.paths) / 2**20,
            }
        if tracker is not None:
            out["tracking"] = tracking_cost(tracker, args.rounds)
        if "eval" not in args.skip:
            out["eval"] = eval_cost(tmp, device)
        del contenders
    print_table(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return out


def ops_per_step(c, device, steps: int = 2) -> dict:
    """What one step launches, from torch.profiler over `steps` warm steps: aten operators (on the CPU,
    where each is a kernel; nested calls counted too) and, on CUDA, kernels with their GPU time, whose
    share of the step's wall time is how busy the step keeps the GPU (a captured step shows its kernels
    under one graph launch)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            c.step()
        _sync(device)
    wall = (time.perf_counter() - t0) / steps
    events = prof.events()
    out = {"aten_ops_per_step": sum(e.name.startswith("aten::") for e in events) / steps}
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1000 / steps  # us -> ms
        out.update(kernels_per_step=len(kernels) / steps, gpu_busy_ms_per_step=busy, profiled_ms_per_step=wall * 1000)
    return out


def busy_share(row: dict) -> None:
    """GPU busy share of a step: its kernels' GPU time over the step's unprofiled median wall time (the
    profiler's own host cost inflates the profiled step several times over). Over 100% can only mean
    the two profiled steps held more work than the average one (lazy R1 every 4th step)."""
    if "gpu_busy_ms_per_step" in row:
        row["gpu_busy_share"] = row["gpu_busy_ms_per_step"] / row["ms_per_step"]


def measure(contenders, rounds: int, steps: int, device) -> list[dict]:
    """Warm up, then time every contender round by round (alternating, so machine noise hits them
    alike); medians per contender, with peak memory."""
    from .graph_step import WARMUP

    warm = 3 if device.type != "cuda" else 4 * WARMUP + 2  # lazy R1's plan (every 4th step) captured too
    failed = []
    for n, c in contenders:  # warm-up: first-call costs, caches, workers, graph capture
        try:
            time_steps(c, warm, device)
        except Exception as e:  # noqa: BLE001 - one contender that cannot run (compile on a new stack) is a row, not an abort
            failed.append({"name": n, "error": f"{e.__class__.__name__}: {str(e)[:300]}"})
            print(f"bench: {n} failed ({failed[-1]['error']}); left out", file=sys.stderr, flush=True)
    contenders[:] = [(n, c) for n, c in contenders if n not in {f["name"] for f in failed}]
    times = {n: [] for n, _ in contenders}
    peak = {n: 0.0 for n, _ in contenders}
    peak_gpu = {n: 0.0 for n, _ in contenders}
    for r in range(rounds):
        for n, c in contenders:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[n].append(time_steps(c, steps, device) / steps)
            peak[n] = max(peak[n], rss_mb())
            if device.type == "cuda":
                peak_gpu[n] = max(peak_gpu[n], torch.cuda.max_memory_allocated() / 2**20)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    rows = failed
    for n, _ in contenders:
        ms = statistics.median(times[n]) * 1000
        row = {
            "name": n,
            "ms_per_step": ms,
            "images_per_s": 64 / (ms / 1000),
            "peak_rss_mb": peak[n],
            "rounds_ms": [t * 1000 for t in times[n]],
        }
        if device.type == "cuda":
            row["peak_gpu_mb"] = peak_gpu[n]
        rows.append(row)
    return rows


def data_folder(src: str, tmp: Path) -> Path:
    """The seed loop reads PNG files (ImageFolder layout); built-in sprites are written out once."""
    if src not in ("", data.BUILTIN):
        return Path(src)
    from PIL import Image

    folder = tmp / "sprites"
    (folder / "sprites").mkdir(parents=True)
    imgs = data.make_sprites(2048, 64, seed=12345)
    for i, im in enumerate(imgs):
        Image.fromarray(im.permute(1, 2, 0).numpy(), "RGBA").save(folder / "sprites" / f"{i:05d}.png")
    return folder


def bench_tracker(tmp: Path):
    from . import track

    cfg = config_mod.load(None, [f"tracking.runs_dir={tmp / 'mlruns'}", "name=bench", "tracking.system_metrics=false"])
    t = track.Tracker(cfg)
    t.start(tmp / "run")
    return t


def tracking_cost(tracker, rounds: int) -> dict:
    """Milliseconds of one diagnostics write (10 metrics, async batch) and per training step at the
    default log_every, with the flush that precedes any read-back."""
    calls = []
    metrics = {f"m{i}": float(i) for i in range(10)}
    for r in range(max(rounds, 3) * 20):
        t0 = time.perf_counter()
        tracker.log_metrics(metrics, 10_000 + r)
        calls.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    tracker.flush()
    flush = time.perf_counter() - t0
    per_call = statistics.median(calls) * 1000
    log_every = config_mod.TrainConfig().log_every
    return {
        "ms_per_log_call": per_call,
        "ms_per_step_at_default_log_every": per_call / log_every,
        "default_log_every": log_every,
        "flush_ms": flush * 1000,
        "calls": len(calls),
    }


def eval_cost(tmp: Path, device) -> dict:
    """Evaluation at experiments/default.yaml's protocol: generation + extractor images/s, and the
    seconds of one evaluation with the real-statistics cache cold and warm."""
    from .eval import protocol

    cfg = config_mod.load(EXPERIMENTS / "default.yaml", [f"data.cache_dir={tmp / 'evalcache'}"])
    images = data.load_images(cfg.data)
    g, _ = models.build(cfg.model, cfg.data.image_size, seed=0, with_d=False)
    g = prepare_for_sampling(g.to(device), cfg, device)
    t0 = time.perf_counter()
    ev = protocol.Evaluator(cfg, images.holdout, device, images=images)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev(g)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev(g)
    warm = time.perf_counter() - t0
    passes = cfg.eval.num_samples * (2 if cfg.eval.fid_alpha else 1)
    return {
        "protocol": "experiments/default.yaml",
        "extractor": ev.extractor.name,
        "num_samples": cfg.eval.num_samples,
        "n_holdout": len(images.holdout),
        "setup_s": setup,
        "cold_cache_s": cold,
        "warm_cache_s": warm,
        "generated_images_per_s": passes / warm,
    }


def machine_info(device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "bf16_native": bf16_supported(device),
    }
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(out: dict):
    print(
        f"\nganlab bench on {out['device']} ({out['machine'].get('gpu') or out['machine'].get('cpu', '?')}), "
        f"batch 64, {out['rounds']} rounds x {out['steps_per_round']} steps, medians"
    )
    print(
        f"{'contender':<34}{'img/s':>10}{'ms/step':>10}{'peak RSS MB':>13}{'vs seed':>9}{'ops/step':>10}{'GPU busy':>10}"
    )
    for r in out["results"]:
        if "error" in r:
            print(f"{r['name']:<34} failed: {r['error']}")
            continue
        sp = out["speedup_vs_seed"].get(r["name"])
        busy = f"{100 * r['gpu_busy_share']:.0f}%" if "gpu_busy_share" in r else "-"
        ops = r.get("kernels_per_step", r.get("aten_ops_per_step"))
        print(
            f"{r['name']:<34}{r['images_per_s']:>10.1f}{r['ms_per_step']:>10.1f}{r['peak_rss_mb']:>13.0f}"
            f"{(f'{sp:.2f}x' if sp else '-'):>9}{(f'{ops:.0f}' if ops is not None else '-'):>10}{busy:>10}"
        )
    d = out["dataset"]
    print(
        f"dataset: {d['images']} images, {d['uint8_mb']:.1f} MB as uint8; process RSS grew {d['rss_growth_mb']:.1f} MB loading it"
    )
    if "tracking" in out:
        t = out["tracking"]
        print(
            f"tracking: {t['ms_per_log_call']:.3f} ms per diagnostics write = {t['ms_per_step_at_default_log_every']:.4f} "
            f"ms per step at log_every={t['default_log_every']}; flush {t['flush_ms']:.1f} ms"
        )
    if "eval" in out:
        e = out["eval"]
        print(
            f"eval ({e['protocol']}, {e['extractor']}, {e['num_samples']} samples): cold cache {e['cold_cache_s']:.1f} s, "
            f"warm {e['warm_cache_s']:.1f} s, {e['generated_images_per_s']:.1f} extractor images/s"
        )
