"""The training step and the loop.

`Trainer` owns the networks, optimisers, EMA and the training RNG, and does one generator update
(with `d_steps` discriminator updates) per `step()`. Everything that varies over time (learning
rate, instance-noise level, the batch drawn) is a pure function of the step, so a resumed run
retraces an uninterrupted one exactly. Diagnostics are summed on the device and read back once per
`log_every` steps: no host sync in the step.

`train()` is the loop: it asks `evaluate` for metrics, `select` for decisions, `checkpoint` to
save, and `track` to record. Knows nothing about MLflow internals.
"""
from __future__ import annotations

import copy
import logging
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from . import checkpoint, config as config_mod, data, losses, models
from .augment import diff_augment

log = logging.getLogger("ganlab")

DIAG = ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_g", "grad_norm_d")


# ------------------------------------------------------------------------------------------ device

def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise config_mod.ConfigError("train.device is 'cuda' but no CUDA GPU is available; use auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise config_mod.ConfigError("train.device is 'mps' but MPS is not available; use auto or cpu")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


# ------------------------------------------------------------------------------------- schedules

def lr_factor(step: int, cfg_train) -> float:
    """Multiplier of the base learning rate at `step`: warm-up, then constant / linear / cosine decay."""
    if cfg_train.lr_warmup and step < cfg_train.lr_warmup:
        return (step + 1) / cfg_train.lr_warmup
    t = min(1.0, step / max(1, cfg_train.steps))
    if cfg_train.lr_schedule == "linear":
        return 1.0 - t
    if cfg_train.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def noise_level(step: int, cfg_train) -> float:
    if not cfg_train.instance_noise:
        return 0.0
    if not cfg_train.instance_noise_anneal:
        return cfg_train.instance_noise
    return cfg_train.instance_noise * max(0.0, 1.0 - step / cfg_train.instance_noise_anneal)


def ema_beta(cfg_train) -> float:
    return 0.5 ** (cfg_train.batch_size / cfg_train.ema_halflife) if cfg_train.ema_halflife else 0.0


# ----------------------------------------------------------------------------------------- trainer

class Trainer:
    def __init__(self, cfg, train_images: torch.Tensor, device: torch.device):
        self.cfg, self.device = cfg, device
        t = cfg.train
        self.g, self.d = models.build(cfg.model, cfg.data.image_size, seed=cfg.seed)
        self.g.to(device)
        self.d.to(device)
        self.g_ema = copy.deepcopy(self.g).requires_grad_(False) if t.ema_halflife else None
        fused = {"fused": True} if device.type == "cuda" else {}
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=t.lr_g, betas=(t.beta1, t.beta2), **fused)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=t.lr_d, betas=(t.beta1, t.beta2), **fused)
        self.batches = data.Batches(train_images, t.batch_size, cfg.seed, cfg.data.alpha, device)
        self.rng = torch.Generator(device=device).manual_seed(cfg.seed + 1)   # latents, noise, augment
        self.lr_scale = 1.0
        self.use_bf16 = t.precision == "bf16" and bf16_supported(device)
        if t.precision == "bf16" and not self.use_bf16:
            log.warning("train.precision is bf16 but %s has no native bf16: training in fp32", device)
        self.mem = torch.channels_last if t.channels_last else torch.contiguous_format
        if t.channels_last:
            self.g.to(memory_format=self.mem)
            self.d.to(memory_format=self.mem)
        self.g_fwd, self.d_fwd = (torch.compile(self.g), torch.compile(self.d)) if t.compile else (self.g, self.d)
        self._acc = torch.zeros(len(DIAG) + 1, device=device)
        self._loss_g_max = torch.full((), float("-inf"), device=device)   # spikes hide in interval means
        self._ema_beta = ema_beta(t)

    # ---- one step
    def autocast(self):
        if not self.use_bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _d_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        if sigma:
            x = x + sigma * torch.randn(x.shape, device=x.device, generator=self.rng)
        if self.cfg.train.diffaug:
            x = diff_augment(x, self.cfg.train.diffaug, self.rng)
        return x.contiguous(memory_format=self.mem)

    def step(self, step: int):
        """One generator update at global step `step` (0-based), preceded by d_steps D updates."""
        t = self.cfg.train
        f = lr_factor(step, t) * self.lr_scale
        for grp in self.opt_g.param_groups:
            grp["lr"] = t.lr_g * f
        for grp in self.opt_d.param_groups:
            grp["lr"] = t.lr_d * f
        sigma = noise_level(step, t)
        real_target = 1.0 - t.label_smoothing
        bs = t.batch_size
        for k in range(t.d_steps):
            i = step * t.d_steps + k
            real = self.batches(i)
            z = torch.randn(bs, self.cfg.model.nz, device=self.device, generator=self.rng)
            with self.autocast():
                fake = self.g_fwd(z)
                d_real = self.d_fwd(self._d_input(real, sigma))
                d_fake = self.d_fwd(self._d_input(fake.detach(), sigma))
                loss_d = losses.d_loss(t.loss, d_real.float(), d_fake.float(), real_target)
                if t.loss == "wgan-gp" and t.gp_lambda:
                    loss_d = loss_d + t.gp_lambda * losses.gradient_penalty(self.d_fwd, real, fake, self.rng)
                if t.r1_gamma and i % t.r1_every == 0:
                    loss_d = loss_d + 0.5 * t.r1_gamma * t.r1_every * losses.r1_penalty(self.d_fwd, real)
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            gn_d = self._clip(self.d, t.clip_norm_d, t.clip_value_d)
            self.opt_d.step()
        # G update on the batch's fake images (as the seed does). D's weights are frozen meanwhile:
        # their gradients would be thrown away, and skipping them saves a third of D's backward.
        self.d.requires_grad_(False)
        with self.autocast():
            d_out = self.d_fwd(self._d_input(fake, sigma))
            loss_g = losses.g_loss(t.loss, d_out.float())
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.d.requires_grad_(True)
        gn_g = self._clip(self.g, t.clip_norm_g, t.clip_value_g)
        self.opt_g.step()
        if self.g_ema is not None:
            self._update_ema()
        with torch.no_grad():
            self._acc += torch.stack([loss_d.detach().float(), loss_g.detach().float(),
                                      losses.d_probs(t.loss, d_real).mean(), losses.d_probs(t.loss, d_fake).mean(),
                                      gn_g, gn_d, torch.ones((), device=self.device)])
            self._loss_g_max = torch.maximum(self._loss_g_max, loss_g.detach().float())

    @staticmethod
    def _clip(net, max_norm: float, max_value: float) -> torch.Tensor:
        """Clip as configured and return the total gradient norm before clipping (no host sync)."""
        params = [p for p in net.parameters() if p.grad is not None]
        if max_value:
            torch.nn.utils.clip_grad_value_(params, max_value)
        if max_norm:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True).float()
        norms = torch._foreach_norm([p.grad for p in params])
        return torch.linalg.vector_norm(torch.stack(norms)).float()

    @torch.no_grad()
    def _update_ema(self):
        ps = list(self.g_ema.parameters())
        torch._foreach_lerp_(ps, [p.detach() for p in self.g.parameters()], 1.0 - self._ema_beta)
        for be, b in zip(self.g_ema.buffers(), self.g.buffers()):
            be.copy_(b)

    def pop_diagnostics(self) -> dict:
        """Mean of each diagnostic since the last call (one host sync)."""
        vals = torch.cat([self._acc, self._loss_g_max.view(1)]).tolist()
        self._acc.zero_()
        self._loss_g_max.fill_(float("-inf"))
        n = max(vals[-2], 1.0)
        out = {k: v / n for k, v in zip(DIAG, vals)}
        out["loss_g_max"] = vals[-1]
        return out

    # ---- sampling
    def sampling_generator(self) -> torch.nn.Module:
        """A copy of the generator that evaluation and export use: the EMA one when EMA is on, with
        batch-norm statistics prepared as eval.bn_stats says."""
        g = copy.deepcopy(self.g_ema if self.g_ema is not None else self.g).float()
        g.to(memory_format=torch.contiguous_format)
        return prepare_for_sampling(g, self.cfg, self.device)

    # ---- state
    def state_dict(self) -> dict:
        return {
            "g": self.g.state_dict(), "d": self.d.state_dict(),
            "g_ema": self.g_ema.state_dict() if self.g_ema is not None else None,
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "lr_scale": self.lr_scale, "rng": self.rng.get_state(),
        }

    def load_state_dict(self, s: dict, rng: bool = True):
        self.g.load_state_dict(s["g"])
        self.d.load_state_dict(s["d"])
        if self.g_ema is not None and s.get("g_ema") is not None:
            self.g_ema.load_state_dict(s["g_ema"])
        self.opt_g.load_state_dict(s["opt_g"])
        self.opt_d.load_state_dict(s["opt_d"])
        self.lr_scale = float(s["lr_scale"])
        if rng:
            self.rng.set_state(s["rng"])
        self._acc.zero_()
        self._loss_g_max.fill_(float("-inf"))

    def reseed(self, seed: int):
        self.rng.manual_seed(seed)


def prepare_for_sampling(g: torch.nn.Module, cfg, device) -> torch.nn.Module:
    mode = cfg.eval.bn_stats
    if mode == "standing":
        return models.standing_stats(g, cfg.model.nz, device, seed=cfg.eval.seed + 1)
    g.train(mode == "batch")
    return g


# ------------------------------------------------------------------------------------- RNG states

def global_rng_state() -> dict:
    """Every global RNG as tensors and plain types, so the checkpoint loads with weights_only."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                     "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
           "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                      "gauss": py_state[2]}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_global_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


# ------------------------------------------------------------------------------------- progress

class Progress:
    """A one-line progress bar on stderr (or plain lines when quiet / not a terminal)."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet = total, quiet
        self.tty = sys.stderr.isatty() and not quiet
        self.t0, self.s0 = time.time(), None

    def update(self, step: int, diag: dict, img_s: float):
        if self.s0 is None:
            self.s0, self.t0 = step, time.time()
        rate = (step - self.s0) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        line = (f"step {step}/{self.total} | loss_d {diag['loss_d']:.4f} loss_g {diag['loss_g']:.4f} "
                f"D(x) {diag['d_real']:.3f} D(G(z)) {diag['d_fake']:.3f} | {img_s:.0f} img/s | ETA {_hms(eta)}")
        if self.tty:
            print("\r" + line.ljust(120), end="", file=sys.stderr, flush=True)
        elif not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.tty:
            print(file=sys.stderr)


def _hms(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ------------------------------------------------------------------------------------------- loop

@dataclass
class RunResult:
    run_dir: Path
    step: int                          # steps trained when the run ended
    best: float | None                 # best value of selection.metric
    best_step: int
    stopped: str                       # why it ended: "finished", "early_stop: ...", ...
    rollbacks: int
    run_id: str | None = None          # MLflow run id, when tracked


def train(
    cfg,                               # a validated config.Config
    run_dir: str | Path | None = None, # run folder; None = a new one under tracking.runs_dir
    resume: bool = False,              # continue the run in run_dir from its last good checkpoint
    stop_at: int | None = None,        # end this call after this global step (tests, benchmarks); None = train.steps
    quiet: bool = False,               # no progress bar, only event lines
    tracker=None,                      # a track.Tracker; None = built from cfg.tracking
    experiment_file: str = "",         # recorded as a tag
) -> RunResult:
    from . import evaluate, select, track

    t = cfg.train
    device = pick_device(t.device)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    images = data.load_images(cfg.data, cfg.seed)
    evaluator = evaluate.Evaluator(cfg, images.holdout, device)       # weights checked before training
    run_dir = Path(run_dir) if run_dir else track.new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, images.train, device)
    selector = select.Selector.from_config(cfg)
    step, run_id, last_eval = 0, None, -1
    if resume:
        state, used = checkpoint.load_latest_good(run_dir / "last.pt", warn=log.warning)
        trainer.load_state_dict(state["trainer"])
        selector.load_state_dict(state["selection"])
        set_global_rng_state(state["global_rng"])
        step, run_id, last_eval = int(state["step"]), state.get("mlflow_run_id"), int(state.get("last_eval", -1))
    (run_dir / "config.yaml").write_text(config_mod.to_yaml(cfg))
    events = track.Events(run_dir / "events.jsonl", quiet=quiet, resume_step=step if resume else None)
    tracker = tracker if tracker is not None else track.Tracker.from_config(cfg)
    run_id = tracker.start(cfg, run_dir, images=images, evaluator=evaluator, device=device,
                           run_id=run_id, experiment_file=experiment_file)
    g_params, d_params = models.count_params(trainer.g), models.count_params(trainer.d)
    events.emit(step, "resume" if resume else "start",
                f"{images.describe()}; device {device}{' bf16' if trainer.use_bf16 else ''}; G {g_params:,} / D "
                f"{d_params:,} params; eval {evaluator.extractor['name']} signature {evaluator.signature_hash}; "
                f"run folder {run_dir}", device=str(device), n_train=len(images.train), n_holdout=len(images.holdout))
    log.info("run folder: %s", run_dir)

    def full_state(s):
        return {"step": s, "last_eval": last_eval, "trainer": trainer.state_dict(), "selection": selector.state_dict(),
                "global_rng": global_rng_state(), "config": config_mod.to_yaml(cfg),
                "mlflow_run_id": run_id, "signature": evaluator.signature_hash}

    def save_last(s):
        try:
            checkpoint.save(run_dir / "last.pt", full_state(s), keep_previous=True)
        except OSError as e:
            events.emit(s, "error", f"could not write last.pt ({e}); the previous checkpoint is kept")

    def evaluate_now(s) -> bool:
        """Evaluate, decide, act. Returns True when the run must stop."""
        g = trainer.sampling_generator()
        m = evaluator(g)
        m["eval_share"] = evaluator.seconds / max(time.time() - t_start, 1e-9)
        tracker.log_samples(g, evaluator, run_dir, s)     # before the metrics: resume keys on them
        tracker.log_metrics(m, s)
        finite = all(torch.isfinite(p).all() for p in list(trainer.g.parameters()) + list(trainer.d.parameters()))
        dec = selector.on_eval(s, m, finite_weights=bool(finite))
        if dec.improved:
            try:
                save_best(s, g, m)
            except OSError as e:
                events.emit(s, "error", f"could not write best.pt ({e}); the previous best is kept")
        return act(s, dec)

    def save_best(s, g, m):
        st = full_state(s)
        st["best"] = {"metric": cfg.selection.metric, "value": selector.s.best, "step": s, "metrics": m}
        checkpoint.save(run_dir / "best.pt", st)
        export_generator(run_dir / "generator.pt", g, cfg, s, m, evaluator.signature_hash)
        tracker.log_summary(selector, cfg)

    def act(s, dec) -> bool:
        for kind, detail, extra in dec.events:
            events.emit(s, kind, detail, **extra)
        if dec.rollback:
            best = checkpoint.load(run_dir / "best.pt", map_location=device)
            trainer.load_state_dict(best["trainer"], rng=False)
            trainer.lr_scale *= cfg.selection.rollback_lr_scale
            selector.rolled_back()
            trainer.reseed(cfg.seed + 1 + 1000 * selector.s.rollbacks)
            events.emit(s, "rollback", f"{dec.rollback}: restored step {best['step']} ({cfg.selection.metric} "
                        f"{selector.s.best:.4g}), lr x{trainer.lr_scale:.3g}, noise reseeded",
                        restored_step=int(best["step"]), rollbacks=selector.s.rollbacks)
            tracker.log_metrics({"rollbacks": selector.s.rollbacks}, s)
        return bool(dec.stop)

    end = min(t.steps, stop_at) if stop_at is not None else t.steps
    eval_every = max(1, cfg.eval.every_images // t.batch_size) if cfg.eval.every_images else cfg.eval.every
    progress = Progress(t.steps, quiet)
    t_start = t_log = time.time()
    stopped = ""
    try:
        while step < end and not stopped:
            trainer.step(step)
            step += 1
            if step % t.log_every == 0:
                diag = trainer.pop_diagnostics()
                now = time.time()
                diag["img_per_s"] = t.log_every * t.batch_size / max(now - t_log, 1e-9)
                t_log = now
                diag["lr_g"], diag["lr_d"] = trainer.opt_g.param_groups[0]["lr"], trainer.opt_d.param_groups[0]["lr"]
                tracker.log_metrics(diag, step)
                progress.update(step, diag, diag["img_per_s"])
                if act(step, selector.on_diagnostics(step, diag)):
                    stopped = "collapse"
            if not stopped and eval_every and step % eval_every == 0:
                last_eval = step
                if evaluate_now(step):
                    stopped = "early_stop"
                t_log = time.time()
            if step % t.checkpoint_every == 0:
                save_last(step)
        if not stopped and last_eval != step and step == t.steps:
            evaluate_now(step)                       # one evaluation at the end
        reason = stopped or ("finished" if step >= t.steps else "paused")
    except KeyboardInterrupt:
        progress.close()
        save_last(step)
        events.emit(step, "error", f"interrupted at step {step}; resume with: ganlab train --resume {run_dir}")
        tracker.finish("KILLED", selector, cfg, step=step)
        raise
    except Exception as e:
        progress.close()
        events.emit(step, "error", f"{e.__class__.__name__}: {e}")
        tracker.finish("FAILED", selector, cfg, step=step)
        raise
    progress.close()
    save_last(step)
    s = selector.s
    if reason != "paused":
        events.emit(step, "finished", f"{reason} at step {step}; best {cfg.selection.metric} "
                    f"{s.best if s.best is None else format(s.best, '.4g')} at step {s.best_step}; "
                    f"rollbacks {s.rollbacks}; eval took {evaluator.seconds:.0f}s "
                    f"({100 * evaluator.seconds / max(time.time() - t_start, 1e-9):.0f}% of wall time); "
                    f"generator: {run_dir / 'generator.pt'}", stopped=reason)
    tracker.finish("FINISHED", selector, cfg, step=step, stopped=reason, run_dir=run_dir,
                   final=reason != "paused")
    return RunResult(run_dir, step, s.best, s.best_step, reason, s.rollbacks, run_id)


# ---------------------------------------------------------------------------------------- export

def export_generator(path: Path, g: torch.nn.Module, cfg, step: int, metrics: dict, signature: str):
    """The generator a run hands over: sampling-ready weights (EMA, batch-norm prepared), its step and
    metrics, and what is needed to rebuild it. Loads with weights_only."""
    checkpoint.save(path, {
        "kind": "ganlab-generator", "step": step, "metrics": metrics, "signature": signature,
        "config": config_mod.to_yaml(cfg), "state_dict": {k: v.detach().cpu() for k, v in g.state_dict().items()},
        "bn_train_mode": cfg.eval.bn_stats == "batch",
    })


def load_generator(path: str | Path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """A generator.pt (or a best/last checkpoint) -> (generator ready to sample, info)."""
    state = checkpoint.load(path, map_location="cpu")
    cfg = config_mod.from_dict(yaml.safe_load(state["config"]), str(path))
    g = models.build_generator(cfg.model, cfg.data.image_size)
    if state.get("kind") == "ganlab-generator":
        g.load_state_dict(state["state_dict"])
        g.to(device).train(bool(state.get("bn_train_mode")))
        info = {"step": state["step"], "metrics": state["metrics"], "config": cfg, "signature": state.get("signature")}
        return g, info
    tr = state["trainer"]
    g.load_state_dict(tr["g_ema"] if tr.get("g_ema") is not None else tr["g"])
    g = prepare_for_sampling(g.to(device), cfg, torch.device(device))
    best = state.get("best") or {}
    return g, {"step": state["step"], "metrics": best.get("metrics", {}), "config": cfg,
               "signature": state.get("signature")}
