"""The training loop, read top to bottom in `train()`: set up, resume or start, then for every step
train, log, evaluate and select, checkpoint; then finish.

`Run` holds what the phases share (trainer, evaluator, selector, tracker, the step counter) and
gives each phase a short method. It asks `evaluate` for metrics, `select` for decisions,
`checkpoint` to save and `track` to record; it knows nothing about MLflow internals.

Files in a run folder: config.yaml, events.jsonl, last.pt (+ .prev), best.pt, start.pt (the first
state: what a collapse rolls back to before there is a best), generator.pt / .safetensors, samples/.

Several processes (torchrun, `ganlab train --nproc N`): every rank trains its share of the batch;
rank 0 alone evaluates, writes files, tracks and prints, and the others follow its decisions
(`_follow_rank0`), so a rollback or a stop happens on every rank at the same step. Ranks share
the run folder (one machine), which is how a rollback reads the best checkpoint on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, data, distributed, events, models, report, select, track
from . import config as config_mod
from .device import pick_device
from .eval import protocol
from .generator import export_generator, load_generator
from .trainer import Trainer, global_rng_state, set_global_rng_state

log = logging.getLogger("ganlab")


@dataclass
class RunResult:
    run_dir: Path
    step: int  # steps trained when the run ended
    best: float | None  # best value of selection.metric
    best_step: int
    stopped: str  # why it ended: "finished", "early_stop", "collapse", "pruned", "paused"
    rollbacks: int
    run_id: str | None = None  # MLflow run id, when tracked
    handed_over_step: int = -1  # the step of generator.pt (the re-evaluation's winner with keep_top)
    handover: dict = dataclasses.field(
        default_factory=dict
    )  # the hand-over score (select.handover_summary); {} if none
    handover_signature: str = ""  # runs' hand-over scores are comparable when these match

    def score(self, metric: str) -> tuple[float | None, float | None]:
        """(hand-over score, its standard error) of `metric`; (None, None) when the run handed nothing over."""
        return self.handover.get(f"handover_{metric}"), self.handover.get(f"handover_{metric}_se")


def train(
    cfg,  # a validated config.Config
    run_dir: str | Path | None = None,  # run folder; None = a new one under tracking.runs_dir
    resume: bool = False,  # continue the run in run_dir from its last good checkpoint
    stop_at: int | None = None,  # end this call after this global step (--stop-at, tests); None = train.steps
    quiet: bool = False,  # no progress bar, only event lines
    tracker=None,  # a track.Tracker; None = built from cfg.tracking
    experiment_file: str = "",  # recorded as a tag
    new_period: bool = False,  # on resume, accept a changed evaluation signature as a new selection period
    parent_run_id: str | None = None,  # MLflow parent run (a tune study's); None = the active fluent run, if any
    on_start=None,  # on_start(run_id, run_dir) once the run exists (tune records its trial's run)
    on_eval=None,  # on_eval(step, metrics, last) after each evaluation; True stops the run as
    # "pruned" (never asked to at the last step: a fully trained run completes)
) -> RunResult:
    # ---- set up: data, evaluation protocol (its weights checked before any training), networks
    run = Run(cfg, run_dir, quiet=quiet, tracker=tracker)
    run.tracker.parent_run_id, run.on_eval = parent_run_id, on_eval
    end = min(cfg.train.steps, stop_at) if stop_at is not None else cfg.train.steps
    with stop_requests(run.share) as requested:
        try:
            # ---- resume or start
            run.begin(resume=resume, new_period=new_period, experiment_file=experiment_file)
            if on_start is not None:
                on_start(run.run_id, run.run_dir)
            while run.step < end and not run.stopped:
                # ---- step
                run.train_step()
                # ---- log (and the collapse signals read from the diagnostics)
                if run.step % cfg.train.log_every == 0:
                    run.log_diagnostics()
                # ---- evaluate and select
                if run.eval_due():
                    run.evaluate_and_select()
                # ---- checkpoint
                if run.step % cfg.train.checkpoint_every == 0:
                    run.save_last()
                if requested():  # Ctrl-C: stop here, at a step boundary, with everything saved
                    run.interrupt()
            if run.final_eval_due():
                run.evaluate_and_select()
        except KeyboardInterrupt:  # a second Ctrl-C, SIGTERM, or any Ctrl-C under several processes
            run.killed()
            raise
        except BaseException as e:
            run.fail(e)
            raise
    # ---- finish
    try:
        return run.finish()
    except KeyboardInterrupt:  # Ctrl-C during the re-evaluation or the hand-over: the run still ends
        run.events.emit(
            run.step, "error", f"interrupted while finishing at step {run.step}; generator.pt is the last one written"
        )
        run.end_tracking("KILLED", f"interrupted while finishing at step {run.step}")
        raise
    except BaseException as e:
        run.fail(e)
        raise
    finally:
        distributed.leave(run.share)


@contextmanager
def stop_requests(share=distributed.SINGLE):
    """While training, Ctrl-C only asks the loop to stop: the step in flight completes (never D
    updated and G not), then the loop saves and ends. A second Ctrl-C interrupts at once.
    Several processes: Ctrl-C ends them all at once (torchrun); last.pt is the point to resume."""
    asked = []
    if threading.current_thread() is not threading.main_thread() or share.world > 1:
        yield lambda: False
        return

    def handler(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(True)
        print("\n[ganlab] stopping at the end of this step (Ctrl-C again to abort now)", file=sys.stderr, flush=True)

    def terminate(signum, frame):  # SIGTERM (a scheduler, `kill`): end now, the run marked KILLED
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, handler)
    old_term = signal.signal(signal.SIGTERM, terminate)
    try:
        yield lambda: bool(asked)
    finally:
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, old_term)


class Run:
    """The state the loop's phases share, and one method per phase."""

    def __init__(self, cfg, run_dir, quiet: bool, tracker):
        t = cfg.train
        self.cfg = cfg
        self.share, self.device = distributed.join(pick_device(t.device))
        main = self.share.main
        self.quiet = quiet or not main
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        with distributed.main_first(self.share):  # rank 0 decodes into the cache, the others read it
            self.images = data.load_images(cfg.data, cfg.seed)
        # rank 0's alone: evaluation (real statistics, perhaps the domain encoder), tracking, files
        self.evaluator = protocol.Evaluator(cfg, self.images.holdout, self.device, images=self.images) if main else None
        self.run_dir = Path(distributed.broadcast(str(run_dir or track.new_run_dir(cfg)) if main else None, self.share))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.trainer = Trainer(cfg, self.images.train, self.device, self.share, holdout_images=self.images.holdout)
        self.selector = select.Selector.from_config(cfg)
        if not main:
            tracker = track.NullTracker()
        self.tracker = tracker if tracker is not None else track.Tracker.from_config(cfg)
        self.eval_every = config_mod.eval_interval(cfg)
        self.progress = Progress(t.steps, self.quiet)
        self.step, self.last_eval, self.rolled_back_at = 0, -1, -1
        self.stopped = ""  # why the run ends early ("" = it goes on)
        self.on_eval = None  # a pruner's question after each evaluation (see train())
        self.run_id = None
        self.tracking_ended = False  # end_tracking() ran (or finish() ended the run)
        self._writer = None  # the last.pt write in flight: (thread, its outcome, its step, its drops)
        # top/ generators that left the top, deleted only once neither last.pt nor last.pt.prev lists
        # them: a crash between an evaluation and the next last.pt restores a state that still does
        self._dropped_unsaved, self._dropped_in_last = [], []
        self.t_start = self.t_log = time.time()
        self.events = self.curves = Silent()  # rank 0's event log and curves open in begin()
        self.last_metrics: dict = {}  # the last evaluation's metrics
        self.saved_world = self.share.world  # processes that wrote the restored checkpoint
        self.said_refusal = False  # a refused CUDA-graph capture is in the event log

    # ---- resume or start
    def begin(self, resume: bool, new_period: bool, experiment_file: str):
        changed = self._load_last(new_period) if resume else ""
        if not self.share.main:  # the event log, curves and checkpoints are rank 0's
            return
        leftovers = checkpoint.remove_leftover_temps(self.run_dir)
        if leftovers:
            log.info(
                "removed %d temporary file(s) of writes a kill interrupted: %s", len(leftovers), ", ".join(leftovers)
            )
        (self.run_dir / "config.yaml").write_text(config_mod.to_yaml(self.cfg))
        self.events = events.Events(
            self.run_dir / "events.jsonl", quiet=self.quiet, resume_step=self.step if resume else None
        )
        self.curves = events.JsonLines(self.run_dir / "metrics.jsonl", resume_step=self.step if resume else None)
        self.run_id = self.tracker.start(
            self.run_dir,
            images=self.images,
            evaluator=self.evaluator,
            device=self.device,
            run_id=self.run_id,
            experiment_file=experiment_file,
        )
        if not resume:  # what a collapse goes back to before there is a best
            checkpoint.save(self.run_dir / "start.pt", self._state())
        else:  # training on changes generator.pt: its score is stale until scored again
            self.tracker.set_tags({"ganlab.handover_stale": "true"})
            self._forget_abandoned_top()
        if resume and self.saved_world != self.share.world:
            self.events.emit(
                self.step,
                "warning",
                f"saved by {self.saved_world} process(es), resumed on "
                f"{self.share.world}: the global batch and data order are the same, but per-rank "
                f"batch-norm statistics (unless train.sync_bn) and float rounding are not, so this is "
                f"not an exact continuation",
            )
        tr, ev = self.trainer, self.evaluator
        procs = (
            f" x {self.share.world} processes{' (sync_bn)' if self.cfg.train.sync_bn else ''}"
            if self.share.world > 1
            else ""
        )
        self.events.emit(
            self.step,
            "resume" if resume else "start",
            f"{self.images.describe()}; device {self.device}{procs}{' bf16' if tr.use_bf16 else ''}"
            f"{'; step captured as CUDA graphs' if tr.graphs is not None else ''}; "
            f"G {models.count_params(tr.g):,} / D {models.count_params(tr.d):,} params; eval "
            f"{ev.extractor.name}{f' ({ev.extractor.why})' if ev.extractor.why else ''} signature "
            f"{ev.signature_hash}; run folder {self.run_dir}",
            device=str(self.device),
            world_size=self.share.world,
            n_train=len(self.images.train),
            n_holdout=len(self.images.holdout),
            experiment_file=str(Path(experiment_file).resolve()) if experiment_file else "",
        )
        if changed:
            archive = self._archive_period(self.selector.state.period - 1)
            # the period's own start: a collapse before its first best goes back here, not to the run's
            # untrained weights in the first start.pt
            checkpoint.save(self.run_dir / "start.pt", self._state())
            self.events.emit(
                self.step,
                "new_period",
                f"evaluation or selection changed ({changed}): selection period "
                f"{self.selector.state.period} starts; best and patience start again; the previous "
                f"period's best and kept generators are in {archive}",
                signature=ev.signature_hash,
                period=self.selector.state.period,
            )
            self.tracker.set_tags(
                {
                    "ganlab.selection_period": self.selector.state.period,
                    f"ganlab.period{self.selector.state.period}.start_step": self.step,
                }
            )
        log.info("run folder: %s", self.run_dir)

    def _archive_period(self, period: int) -> Path:
        """The ending period's best.pt, generator.pt/.safetensors and top/ move to period<N>/: the new
        period would overwrite them at its first evaluation, and its re-evaluation must not score
        generators from another protocol. Nothing is overwritten: a second --new-period before the new
        period's first last.pt restores the same ending period, whose archive is there already, and what
        sits in the run folder then (the abandoned attempt's) goes to period<N>.2/, .3/ and so on."""
        names = [n for n in ("best.pt", "generator.pt", "generator.safetensors", "top") if (self.run_dir / n).exists()]
        dest, attempt = self.run_dir / f"period{period}", 2
        while names and dest.exists() and any(dest.iterdir()):
            dest, attempt = self.run_dir / f"period{period}.{attempt}", attempt + 1
        dest.mkdir(exist_ok=True)
        for name in names:
            os.replace(self.run_dir / name, dest / name)
        return dest

    def _forget_abandoned_top(self):
        """top/ generators kept after the restored step by a run that died before its next last.pt: the
        restored state does not list them, and training again from here keeps its own."""
        live = self.selector.top_steps()
        for path in sorted((self.run_dir / "top").glob("step_*.pt")):
            step = int(path.stem.removeprefix("step_"))
            if step > self.step and step not in live:
                path.unlink()
                log.info(
                    "top/%s: kept after the restored step %d by the run that stopped; removed", path.name, self.step
                )

    def _load_last(self, new_period: bool) -> str:
        """Restore last.pt. Returns how the evaluation signature changed ("" = it did not)."""
        state, _ = checkpoint.load_latest_good(
            self.run_dir / "last.pt", warn=log.warning if self.share.main else (lambda msg: None)
        )
        changed = distributed.broadcast(
            signature_change(state, self.evaluator) if self.share.main else None, self.share
        )
        if changed and not new_period:
            raise config_mod.ConfigError(
                f"--resume {self.run_dir}: the evaluation signature changed ({changed}), so its best, patience "
                f"and collapse thresholds would compare numbers from two feature spaces; resume with the old "
                f"protocol (--set eval.KEY=VALUE), or pass --new-period to start a new selection period"
            )
        rule = selection_change(state, self.cfg)
        if rule and not new_period:
            raise config_mod.ConfigError(
                f"--resume {self.run_dir}: the selection rule changed ({rule}), so the stored best would be compared "
                f"under another rule; resume with the old one (--set selection.KEY=VALUE), or pass --new-period"
            )
        changed = "; ".join(c for c in (changed, rule) if c)
        self.trainer.load_state_dict(state["trainer"])
        self.selector.load_state_dict(state["selection"])
        set_global_rng_state(state["global_rng"])
        self.step, self.run_id = int(state["step"]), state.get("mlflow_run_id")
        self.last_eval = int(state.get("last_eval", -1))
        self.saved_world = int(state.get("world_size", 1))
        if changed:
            self.selector.new_period()
        return changed

    # ---- step, log
    def train_step(self):
        self.trainer.step(self.step)
        self.step += 1

    def log_diagnostics(self):
        graphs = self.trainer.graphs
        if graphs is not None and graphs.refused and not self.said_refusal:
            self.said_refusal = True  # capture is tried once per plan after warm-up: said in the event log once
            self.events.emit(self.step, "warning", f"train.cuda_graph: capture refused ({graphs.refused}); eager steps")
        diag = self.trainer.pop_diagnostics()
        now, t = time.time(), self.cfg.train
        diag["img_per_s"] = t.log_every * t.batch_size / max(now - self.t_log, 1e-9)
        diag["lr_g"], diag["lr_d"] = self.trainer.learning_rates()
        self.t_log = now
        self.curves.write({"step": self.step, **diag})
        self.tracker.log_metrics(diag, self.step)
        self.progress.update(self.step, diag, diag["img_per_s"])
        self.act(self.selector.on_diagnostics(self.step, diag), stop_kind="collapse")

    # ---- evaluate and select
    def eval_due(self) -> bool:
        # not right after a rollback: the weights are the restored best, already scored at its own step
        due = (
            not self.stopped
            and bool(self.eval_every)
            and self.step % self.eval_every == 0
            and self.rolled_back_at != self.step
        )
        return due and self._within_eval_budget()

    def _within_eval_budget(self) -> bool:
        """eval.max_share: a periodic evaluation is skipped while evaluating has taken more than this share
        of the run's wall time (never the last step's); each skip is an event. Rank 0 decides for all."""
        cap = self.cfg.eval.max_share
        if not cap or self.step >= self.cfg.train.steps:
            return True
        share = self.evaluator.seconds / max(time.time() - self.t_start, 1e-9) if self.share.main else 0.0
        go = distributed.broadcast(share <= cap, self.share)
        if not go:
            self.events.emit(
                self.step,
                "eval_skipped",
                f"evaluation has taken {100 * share:.0f}% of the wall time, "
                f"over eval.max_share {100 * cap:.0f}%: no evaluation at step {self.step}",
                share=share,
            )
        return go

    def final_eval_due(self) -> bool:
        return (
            not self.stopped
            and self.last_eval != self.step
            and self.step == self.cfg.train.steps
            and self.rolled_back_at != self.step
        )

    def evaluate_and_select(self):
        s = self.last_eval = self.step
        dec = self._follow_rank0(self._evaluate() if self.share.main else None)
        self.act(dec, stop_kind="early_stop")
        last = s >= self.cfg.train.steps
        asked = (
            self.share.main
            and not self.stopped
            and self.on_eval is not None
            and self.on_eval(s, self.last_metrics, last)
            and not last
        )
        if distributed.broadcast(asked, self.share):
            self.stopped = "pruned"
            if self.share.main:
                self.events.emit(
                    s,
                    "pruned",
                    f"the study's pruner stopped this trial at step {s} "
                    f"({self.cfg.selection.metric} {self.last_metrics[self.cfg.selection.metric]:.4g})",
                )
        self.t_log = time.time()  # evaluation time is not training speed

    def _follow_rank0(self, dec: select.Decision | None) -> select.Decision:
        """Rank 0's decision and selection state on every rank (with one process: `dec`)."""
        if self.share.world == 1:
            return dec
        dec, state = distributed.broadcast((dec, self.selector.state_dict()), self.share)
        self.selector.load_state_dict(state)
        return dec

    def _evaluate(self) -> select.Decision:
        """Rank 0: evaluate, log, decide, and save what the decision keeps (best.pt, the top K)."""
        s = self.step
        g = self.trainer.sampling_generator()
        m = self.evaluator(g)
        m["eval_share"] = self.evaluator.seconds / max(time.time() - self.t_start, 1e-9)
        self.last_metrics = m
        grid = protocol.save_grid(self.evaluator.last_images[:64], self.run_dir / "samples" / f"step_{s:07d}.png")
        self.tracker.log_samples(grid, s)  # before the metrics: a resume keys on them
        self.tracker.log_metrics(m, s)
        self.curves.write({"step": s, **m})
        before = self.selector.state_dict()
        dec = self.selector.on_eval(s, m, finite_weights=self.trainer.weights_finite())
        if dec.improved and not self._save_best(g, m):
            self.selector.load_state_dict(before)  # the best on disk is still the old one
            dec = select.Decision()
        if dec.improved and self.selector.needs_noise_band():
            self._measure_noise_band(g)
        self._keep_top(g, m, dec)
        return dec

    def _save_best(self, g, metrics: dict) -> bool:
        """best.pt, generator.pt and generator.safetensors, all or none: each is written in full to a
        staging folder first, then all are renamed into place (renames do not run out of space)."""
        st = self._state()
        st["best"] = {
            "metric": self.cfg.selection.metric,
            "value": self.selector.best,
            "step": self.step,
            "metrics": metrics,
        }
        stage = self.run_dir / ".staging"
        try:
            shutil.rmtree(stage, ignore_errors=True)
            checkpoint.save(stage / "best.pt", st)
            export_generator(stage / "generator.pt", g, self.cfg, self.step, metrics, self.evaluator.signature_hash)
        except OSError as e:
            shutil.rmtree(stage, ignore_errors=True)
            self.events.emit(
                self.step, "error", f"could not write best.pt and generator.pt ({e}); the previous best is kept"
            )
            return False
        for name in ("best.pt", "generator.pt", "generator.safetensors"):
            os.replace(stage / name, self.run_dir / name)
        stage.rmdir()
        self.tracker.log_metrics(self.selector.summary(), self.step)
        return True

    def _measure_noise_band(self, g):
        """min_delta: auto. The metric of the new best over select.NOISE_SEEDS fresh latent draws at the
        run's protocol; the band is select.NOISE_BAND_PER_SD SDs. Measured per run, on the best (FID's
        noise grows with its value, so a band from an early, far-off generator would be too wide for a
        late one), again whenever the best has moved far."""
        metric = self.cfg.selection.metric
        values = [
            self.evaluator.with_fresh_latents(g, seed=self.cfg.eval.seed + select.NOISE_SEED_OFFSET + k)[metric]
            for k in range(select.NOISE_SEEDS)
        ]
        band = self.selector.set_noise_band(values)
        if band is None:
            self.events.emit(
                self.step,
                "warning",
                f"noise band not measured: a draw of {metric} is not finite "
                f"({values}); min_delta stays {self.selector.min_delta:.3g}",
            )
            return
        self.events.emit(
            self.step,
            "noise_band",
            f"{metric} of the best over {len(values)} latent seeds: mean "
            f"{statistics.mean(values):.4g}, sd {statistics.stdev(values):.3g}; min_delta auto = "
            f"{select.NOISE_BAND_PER_SD:.2f} sd = {band:.3g}",
            band=band,
            sd=statistics.stdev(values),
            values=json.dumps(values),
        )
        self.tracker.log_metrics({f"noise_band_{metric}": band}, self.step)

    def _top_path(self, step: int) -> Path:
        return self.run_dir / "top" / f"step_{step:07d}.pt"

    def _keep_top(self, g, metrics: dict, dec: select.Decision):
        """selection.keep_top: the generators of the K best evaluations, for the re-evaluation at the end."""
        try:
            if dec.keep:
                export_generator(
                    self._top_path(self.step),
                    g,
                    self.cfg,
                    self.step,
                    metrics,
                    self.evaluator.signature_hash,
                    safetensors=False,
                )
            self._dropped_unsaved += dec.drop
        except OSError as e:
            self.events.emit(
                self.step, "error", f"could not keep the top-{self.cfg.selection.keep_top} generator ({e})"
            )

    def act(self, dec: select.Decision, stop_kind: str):
        for kind, detail, extra in dec.events:
            self.events.emit(self.step, kind, detail, **extra)
        if dec.rollback:
            self.roll_back(dec.rollback)
        if dec.stop:
            self.stopped = stop_kind

    def roll_back(self, why: str):
        """Back to best.pt, or to start.pt when there is no best yet, at a compounded learning rate."""
        target = next((p for p in (self.run_dir / "best.pt", self.run_dir / "start.pt") if p.exists()), None)
        if target is None:
            self.events.emit(self.step, "early_stop", f"collapse with nothing to roll back to: {why}")
            self.stopped = "collapse"
            return
        state = checkpoint.load(target, map_location=self.device)
        self.trainer.load_state_dict(state["trainer"], rng=False)
        self.selector.rolled_back()
        self.trainer.lr_scale = self.selector.lr_scale
        self.trainer.reseed(self.cfg.seed + 1 + 1000 * self.selector.rollbacks)
        self.rolled_back_at = self.step
        what = (
            f"step {state['step']} ({self.cfg.selection.metric} {self.selector.best:.4g})"
            if target.name == "best.pt" and self.selector.best is not None
            else f"{target.name} (step {state['step']})"
        )
        self.events.emit(
            self.step,
            "rollback",
            f"{why}: restored {what}, lr x{self.trainer.lr_scale:.3g}, noise reseeded",
            restored_step=int(state["step"]),
            restored=target.name,
            rollbacks=self.selector.rollbacks,
        )
        self.tracker.log_metrics({"rollbacks": self.selector.rollbacks}, self.step)

    # ---- checkpoint
    def _state(self) -> dict:
        ev = self.evaluator
        return {
            "step": self.step,
            "last_eval": self.last_eval,
            "trainer": self.trainer.state_dict(),
            "selection": self.selector.state_dict(),
            "selection_rule": selection_rule(self.cfg),
            "global_rng": global_rng_state(),
            "config": config_mod.to_yaml(self.cfg),
            "mlflow_run_id": self.run_id,
            "world_size": self.share.world,
            "signature": ev.signature_hash,
            "signature_fields": dict(ev.signature),
        }

    def save_last(self, wait: bool = False):
        """last.pt, written in the background: the state is copied to host memory here (training goes
        on changing the live tensors), then serialised, hashed, fsynced and renamed by a thread while
        the next steps train. One write at a time; a failed write is said at the next save or at the end."""
        if not self.share.main:
            return
        self.wait_for_checkpoint()
        state, box = snapshot(self._state()), {}
        drops, self._dropped_unsaved = self._dropped_unsaved, []

        def write():
            try:
                checkpoint.save(self.run_dir / "last.pt", state, keep_previous=True)
                box["ok"] = True  # success is marked, never assumed from a silent end
            except BaseException as e:  # noqa: BLE001 - MemoryError too: every failure is an outcome
                box["error"] = f"{e.__class__.__name__}: {e}"

        self._writer = (threading.Thread(target=write, name="ganlab-checkpoint"), box, self.step, drops)
        self._writer[0].start()
        if wait:
            self.wait_for_checkpoint()

    def wait_for_checkpoint(self):
        """Join the last.pt write in flight, if any, and say if it failed. A writer never started (a
        signal between its creation and start) wrote nothing: its dropped generators stay listed."""
        if self._writer is None:
            return
        thread, box, step, drops = self._writer
        if thread.ident is not None:
            thread.join()
        self._writer = None
        if not box.get("ok"):
            why = box.get("error") or (
                "its thread never started" if thread.ident is None else "its thread ended without an outcome"
            )
            self.events.emit(step, "error", f"could not write last.pt ({why}); the previous checkpoint is kept")
            self._dropped_unsaved = drops + self._dropped_unsaved
            return
        self._delete_dropped(self._dropped_in_last)  # last.pt.prev is now a state written after they left
        self._dropped_in_last = drops

    def _delete_dropped(self, steps: list):
        """Delete kept generators that left the top, unless the live state lists them again (a rollback
        can evaluate and keep the same step a second time)."""
        live = self.selector.top_steps()
        for s in steps:
            if s not in live:
                self._top_path(s).unlink(missing_ok=True)

    # ---- finish
    def interrupt(self):
        self.progress.close()
        try:
            self.save_last(wait=True)
        finally:  # whatever the last save did, the run is ended and said so
            self.events.emit(
                self.step,
                "error",
                f"interrupted at step {self.step}; resume with: ganlab train --resume {self.run_dir}",
            )
            self.end_tracking("KILLED", f"interrupted at step {self.step}")
        raise KeyboardInterrupt

    def killed(self):
        """Stopped without waiting for a step boundary: the write in flight is joined, the run ends KILLED."""
        self.wait_for_checkpoint()
        self.end_tracking("KILLED", f"interrupted at step {self.step}")

    def fail(self, e: BaseException):
        self.progress.close()
        self.wait_for_checkpoint()  # (no write in flight before begin(), nor on other ranks)
        self.events.emit(self.step, "error", f"{e.__class__.__name__}: {e}")  # (silent before begin())
        self.end_tracking("FAILED", f"{e.__class__.__name__}: {e}")

    def end_tracking(self, status: str, reason: str):
        """End the MLflow run once, whatever path the run ends on, with the reason as a tag: a run
        must never be left RUNNING."""
        if self.tracking_ended or self.tracker.run_id is None:
            return
        self.tracking_ended = True
        try:
            self.tracker.set_tags({"ganlab.end_reason": reason[:500]})
        except Exception as e:  # the status below matters more than the tag
            log.warning("could not tag the run's end reason (%s)", e)
        self.tracker.finish(status, self.selector.summary(), step=self.step, final=False)

    def finish(self) -> RunResult:
        self.progress.close()
        self.save_last(wait=True)
        self._delete_dropped(self._dropped_in_last)  # the run's end: top/ holds what last.pt lists
        self._dropped_in_last = []
        sel, ev = self.selector, self.evaluator
        reason = self.stopped or ("finished" if self.step >= self.cfg.train.steps else "paused")
        handed, score = sel.best_step, {}
        done = reason not in ("paused", "pruned")  # a pruned trial is not worth a hand-over, report or model
        if done and self.share.main:
            handed = self._guarded(
                "the keep_top re-evaluation",
                self._reevaluate_top,
                sel.best_step,
                "generator.pt stays the selection best",
            )
            score = self._guarded("the hand-over score", self._score_handover, {}, "this run has no hand-over score")
            best = "none" if sel.best is None else format(sel.best, ".4g")
            self.events.emit(
                self.step,
                "finished",
                f"{reason} at step {self.step}; selection best {self.cfg.selection.metric} "
                f"{best} at step {sel.best_step}; handed over step {handed}{_score_text(score, self.cfg)}; "
                f"rollbacks {sel.rollbacks}; eval took {ev.seconds:.0f}s "
                f"({100 * ev.seconds / max(time.time() - self.t_start, 1e-9):.0f}% of wall time); "
                f"generator: {self.run_dir / 'generator.pt'}",
                stopped=reason,
            )
            if self.tracker.run_id is not None:
                self._log_report()
        self.tracking_ended = True
        self.tracker.finish("FINISHED", {**sel.summary(), **score}, step=self.step, stopped=reason, final=done)
        return RunResult(
            self.run_dir,
            self.step,
            sel.best,
            sel.best_step,
            reason,
            sel.rollbacks,
            self.run_id,
            handed,
            handover={k: v for k, v in score.items() if k.startswith("handover_")},
            handover_signature=ev.handover_hash if score and ev is not None else "",
        )

    def _guarded(self, what: str, fn, default, otherwise: str):
        """A finishing step that must not cost the run its end: a failure is an error event, and the
        run finishes with `default` (the files on disk are written atomically, so they stay as they were)."""
        try:
            return fn()
        except Exception as e:
            self.events.emit(self.step, "error", f"{what} failed ({e.__class__.__name__}: {e}); {otherwise}")
            return default

    def _score_handover(self) -> dict:
        """The hand-over score: generator.pt (whatever picked it) on the hand-over protocol, fresh latents
        of its own over several draws (protocol.Evaluator.handover). The one number every ranking of
        runs uses; written into generator.pt, logged with the hand-over signature. {} when there is no
        generator to hand over."""
        path, ev = self.run_dir / "generator.pt", self.evaluator
        if not path.exists():
            return {}
        g, info = load_generator(path, self.device)
        score = select.handover_summary(ev.handover_draws(g))
        try:
            export_generator(
                path,
                g,
                self.cfg,
                info["step"],
                {**info["metrics"], **score},
                ev.signature_hash,
                handover_signature=ev.handover_hash,
            )
        except OSError as e:  # the score is still logged; the file keeps its weights, without the score
            self.events.emit(self.step, "error", f"could not write the hand-over score into generator.pt ({e})")
        h = ev.handover
        self.events.emit(
            self.step,
            "handover",
            f"generator.pt (step {info['step']}) scored on the hand-over protocol "
            f"({h['handover_draws']} draws of {h['handover_samples']} fresh samples, signature "
            f"{ev.handover_hash}){_score_text(score, self.cfg)}",
            handed_over_step=info["step"],
            signature=ev.handover_hash,
            **score,
        )
        self.tracker.set_tags(
            {
                "ganlab.handed_over_step": info["step"],
                "ganlab.handover_signature": ev.handover_hash,
                "ganlab.handover_stale": "false",
            }
        )
        return {**score, "handed_over_step": info["step"]}

    def _reevaluate_top(self) -> int:
        """The best of several noisy evaluations is biased low (the winner's curse): evaluate the kept
        top checkpoints again, on fresh latents with twice the samples, and hand over the winner.
        Returns the step of the generator handed over."""
        cfg, sel = self.cfg, self.selector
        metric, n = cfg.selection.metric, 2 * cfg.eval.num_samples
        rows, unreadable = [], []
        for value, step in sel.state.top:
            path = self._top_path(step)
            try:
                g, info = load_generator(path, self.device)
            except Exception as e:  # missing, truncated, corrupt: left out, and said
                unreadable.append(f"step {step} ({str(e).splitlines()[0][:120]})")
                continue
            again = self.evaluator.with_fresh_latents(g, seed=cfg.eval.seed + select.REEVAL_SEED_OFFSET, num_samples=n)[
                metric
            ]
            if math.isfinite(again):
                rows.append((again, step, value, g, info))
                self.tracker.log_metrics({f"reeval_{metric}": again}, step)
            else:
                unreadable.append(f"step {step} (re-evaluated {metric} {again})")
        if unreadable:
            self.events.emit(
                self.step, "warning", f"kept generator(s) left out of the re-evaluation: {'; '.join(unreadable)}"
            )
        if len(rows) < 2:
            if cfg.selection.keep_top > 1 and sel.state.top:
                self.events.emit(
                    self.step,
                    "warning",
                    f"fewer than 2 kept generators to re-evaluate: generator.pt "
                    f"stays the selection best (step {sel.best_step})",
                )
            return sel.best_step
        win = min(rows, key=lambda r: select.rank_key(sel.mode)(r[0]))
        again, step, _, g, info = win
        export_generator(
            self.run_dir / "generator.pt",
            g,
            cfg,
            step,
            {**info["metrics"], f"reeval_{metric}": again},
            self.evaluator.signature_hash,
        )
        table = "; ".join(f"step {s}: {v:.4g} -> {a:.4g}" for a, s, v, _, _ in rows)
        self.events.emit(
            self.step,
            "reevaluated",
            f"top {len(rows)} by {metric} again on fresh latents with {n} samples ({table}): hand over step {step}",
            winner_step=step,
            reeval=again,
        )
        return step

    def _log_report(self):
        """report/report.html in the run folder, logged to the MLflow run."""
        try:
            page = report.write_report([self.run_dir])
            self.tracker.log_artifacts(page.parent, "report")
        except Exception as e:  # the run's results are safe; say what failed
            log.warning("could not write or log the run report (%s)", e)


def _score_text(score: dict, cfg) -> str:
    m = cfg.selection.metric
    if f"handover_{m}" not in score:
        return ""
    return f": hand-over {m} {score[f'handover_{m}']:.4g} +/- {score[f'handover_{m}_se']:.2g} (standard error)"


SELECTION_RULE = ("metric", "mode", "min_delta")  # what the stored best means


def selection_rule(cfg) -> dict:
    return {k: getattr(cfg.selection, k) for k in SELECTION_RULE}


def selection_change(state: dict, cfg) -> str:
    """How the selection rule differs from the checkpoint's ("" = the same, or an older checkpoint)."""
    old, new = state.get("selection_rule"), selection_rule(cfg)
    if not old:
        return ""
    return "; ".join(f"selection.{k} {old.get(k)!r} -> {new[k]!r}" for k in SELECTION_RULE if old.get(k) != new[k])


def signature_change(state: dict, evaluator) -> str:
    """How the checkpoint's evaluation signature differs from this run's ("" = the same)."""
    old = state.get("signature")
    if not old or old == evaluator.signature_hash:
        return ""
    fields = state.get("signature_fields")
    if not fields:
        return f"{old} -> {evaluator.signature_hash}"
    new = evaluator.signature
    keys = sorted(k for k in set(fields) | set(new) if fields.get(k) != new.get(k))
    return "; ".join(f"{k} {fields.get(k)!r} -> {new.get(k)!r}" for k in keys)


def snapshot(obj):
    """A copy of a state with every tensor in host memory, detached from the live one."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class Silent:
    """The event log and metrics file of a rank other than 0 (rank 0 writes them), and of rank 0 before begin()."""

    def emit(self, *args, **kwargs):
        pass

    def write(self, *args, **kwargs):
        pass


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
        line = (
            f"step {step}/{self.total} | loss_d {diag['loss_d']:.4f} loss_g {diag['loss_g']:.4f} "
            f"D(x) {diag['d_real']:.3f} D(G(z)) {diag['d_fake']:.3f} | {img_s:.0f} img/s | ETA {_hms(eta)}"
        )
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
