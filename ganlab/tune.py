"""`ganlab tune STUDY.yaml`: hyperparameter search on Optuna, one ordinary ganlab run per trial.
`ganlab sweep` runs on the same machinery: a grid sampler over its variants (ganlab/sweep.py).

    base: ../recommended.yaml           # relative to the study file
    name: lr-search                     # Optuna study and MLflow experiment (default: the file's stem)
    set: {train.steps: 3000}            # applied to every trial
    space:                              # dotted config key -> a range or a list of choices
      train.lr_d: {low: 1.0e-4, high: 1.0e-3, log: true}
      train.batch_size: {low: 32, high: 128, step: 32}   # ints when low and high are ints
      train.loss: [hinge, bce]
      train.diffaug: [[translation], [color, translation, cutout]]   # a choice may be a list ...
      widths: [{model.g_width: 64, model.d_width: 64}, {model.g_width: 80, model.d_width: 40}]   # ... or a
                                        # bundle: a label of your own -> keys set together
    sampler: tpe                        # tpe | random | grid (grid: lists only)
    pruner: median                      # median | hyperband | none
    trials: 20                          # trials in the study, all workers and machines together
    seed: 0                             # the sampler's seed
    storage: ""                         # RDB URL; default sqlite:///<tracking.runs_dir>/optuna.db
    heartbeat: 10                       # seconds; a trial silent for 3x this is marked failed
    timeout: 0                          # seconds after which a worker starts no new trial (0 = none)
    start_with: [{train.lr_d: 0.0004, train.batch_size: 64, train.loss: hinge}]   # tried first (known-good points)

Each trial is a child MLflow run under the study's parent run (its id is kept in the study, so a
worker on another machine finds it), with the usual run folder. Every evaluation's selection
metric is reported to Optuna; when the pruner says so the run stops as `pruned`, and the trial
records the step and the trials it was compared with. Workers are processes that share the
storage: `--workers N` starts N here (`--devices 0,1` gives each its own GPU); the same command on
another machine joins the study. A dead worker's trial is marked failed by Optuna's heartbeat.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import config as config_mod
from . import metrics as metrics_mod
from .errors import ConfigError

log = logging.getLogger("ganlab")

ALLOWED = {
    "base",
    "name",
    "set",
    "space",
    "sampler",
    "pruner",
    "trials",
    "seed",
    "storage",
    "heartbeat",
    "start_with",
    "timeout",
}
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
PARENT = "mlflow_parent_run_id"  # study user attribute: the parent MLflow run
READY = "ready"  # study user attribute: the creator has queued its points and made the parent
PINNED = "handover_signature"  # study user attributes: the hand-over protocol every trial is scored on
PINNED_FIELDS = "handover_signature_fields"
RETRIES = 1  # a point lost with a dead worker is queued again this many times


@dataclass
class Spec:
    """A study: what each trial runs, what varies, and how the search proceeds."""

    path: Path  # the study (or sweep) file
    name: str  # Optuna study name and MLflow experiment
    space: dict  # key -> {"low", "high", "log", "step"} or a list of choices
    sampler: str = "tpe"
    pruner: str = "median"
    trials: int = 20
    seed: int = 0
    storage: str = ""
    heartbeat: int = 10
    timeout: int = 0  # seconds after which a worker starts no new trial (0 = none)
    experiment: str = ""  # MLflow experiment (default: name)
    start_with: list = field(default_factory=list)  # points tried first, once (Optuna's enqueue_trial)
    configure: Callable | None = None  # (params, number, extra_sets) -> Config; None = base + set + params.
    # A sweep supplies its own (ganlab/sweep.py: each variant's file and overrides)
    command: str = "tune"  # what a spawned worker runs (`ganlab tune|sweep FILE --worker`)
    pin_signature: bool = True  # a study ranks trials in one feature space; a sweep compares what its
    # variants are (their table shows each one's hand-over signature)
    base: Path | None = None
    sets: list = field(default_factory=list)

    def trial_config(self, params: dict, number: int, extra_sets=()):
        """The config of a trial with these sampled params."""
        if self.configure is not None:
            return self.configure(params, number, extra_sets)
        over = [
            config_mod.as_override(k2, v2)
            for k, v in params.items()
            for k2, v2 in (v.items() if isinstance(v, dict) else [(k, v)])
        ]  # a bundle sets its keys
        return config_mod.load(self.base, self.sets + over + list(extra_sets) + [f"variant=trial-{number}"])


def read_file(path: Path, allowed: set, what: str) -> dict:
    """A study or sweep file: its keys checked against `allowed`, and a base experiment named."""
    raw = config_mod.read_yaml(path)
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{path}: unknown {what} key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    if not isinstance(raw.get("base"), str):
        raise ConfigError(f"{path}: key 'base' must name the base experiment file")
    return raw


def load_spec(path: str | Path) -> Spec:
    """Read and check a study file; every mistake is one line naming the file and key."""
    path = Path(path)
    raw = read_file(path, ALLOWED, "study")
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: key 'space' must map dotted config keys to ranges or lists of choices")
    sets = raw.get("set") or {}
    if not isinstance(sets, dict):
        raise ConfigError(f"{path}: key 'set' must be a mapping of dotted keys to values")
    spec = Spec(
        path=path,
        name=str(raw.get("name") or path.stem),
        space=space,
        base=path.parent / raw["base"],
        sets=[config_mod.as_override(k, v) for k, v in sets.items()],
    )
    for key, kind in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if key in raw and raw[key] not in kind:
            raise ConfigError(f"{path}: {key} {raw[key]!r} is not one of {list(kind)}")
        setattr(spec, key, raw.get(key, getattr(spec, key)))
    for key in ("trials", "seed", "heartbeat", "timeout"):
        if key in raw and (
            not isinstance(raw[key], int)
            or isinstance(raw[key], bool)
            or raw[key] < (0 if key in ("seed", "timeout") else 1)
        ):
            raise ConfigError(f"{path}: {key} must be a positive integer, got {raw[key]!r}")
        setattr(spec, key, raw.get(key, getattr(spec, key)))
    spec.storage = str(raw.get("storage") or "")
    spec.start_with = raw.get("start_with") or []
    if not isinstance(spec.start_with, list) or not all(
        isinstance(p, dict) and set(p) <= set(space) for p in spec.start_with
    ):
        raise ConfigError(f"{path}: start_with must be a list of mappings over the keys of 'space'")
    if spec.sampler == "grid":  # the grid, once: a trial per combination
        spec.trials = min(spec.trials if "trials" in raw else 10**9, _grid_size(space))
    for key, dom in space.items():
        _check_domain(path, key, dom, spec.sampler)
    for params in _corners(space):  # every key exists and takes its extremes
        try:
            spec.trial_config(params, 0)
        except ConfigError as e:
            raise ConfigError(f"{path}: space {sorted(params)} does not give a valid config: {e}") from None
    return spec


def _check_domain(path, key, dom, sampler):
    if isinstance(dom, list) and dom:
        return
    if sampler == "grid":
        raise ConfigError(f"{path}: space.{key}: the grid sampler takes lists of values only")
    if not (
        isinstance(dom, dict)
        and {"low", "high"} <= set(dom) <= {"low", "high", "log", "step"}
        and all(isinstance(dom[k], (int, float)) and not isinstance(dom[k], bool) for k in ("low", "high"))
        and dom["low"] < dom["high"]
    ):
        raise ConfigError(
            f"{path}: space.{key} must be a list of choices or {{low, high[, log][, step]}} with low < high"
        )


def _grid_size(space: dict) -> int:
    n = 1
    for choices in space.values():
        n *= len(choices)
    return n


def _corners(space: dict):
    lo = {k: (d[0] if isinstance(d, list) else d["low"]) for k, d in space.items()}
    hi = {k: (d[-1] if isinstance(d, list) else d["high"]) for k, d in space.items()}
    return [lo, hi]


def choice_label(value) -> str | int | float | bool | None:
    """What Optuna stores for a choice: scalars as they are; a list or a bundle (mapping) as its YAML
    text, since Optuna's categorical choices are scalars only."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return config_mod.as_override("", value)[1:]


def suggest(trial, space: dict) -> dict:
    """Sample one value per key from the space, through Optuna's suggest API."""
    out = {}
    for key, dom in space.items():
        if isinstance(dom, list):
            labels = [choice_label(c) for c in dom]
            out[key] = dom[labels.index(trial.suggest_categorical(key, labels))]
        elif all(isinstance(dom[k], int) for k in ("low", "high")) and not isinstance(dom.get("step", 1), float):
            out[key] = trial.suggest_int(
                key, dom["low"], dom["high"], step=dom.get("step", 1), log=dom.get("log", False)
            )
        else:
            out[key] = trial.suggest_float(
                key, dom["low"], dom["high"], step=dom.get("step"), log=dom.get("log", False)
            )
    return out


# ------------------------------------------------------------------------------------------ storage


def storage_url(spec: Spec, cfg) -> str:
    from .track import is_local, tracking_uri

    url = spec.storage or ""
    shared = cfg.tracking.enabled and not is_local(tracking_uri(cfg))
    if shared and (not url or url.startswith("sqlite")):
        # a team tracking server means workers on several machines; sqlite's file (and AskTurn's lock)
        # is one machine's, so a worker elsewhere would silently start a study of its own
        raise ConfigError(
            f"{spec.path}: study {spec.name!r} tracks to a shared server ({tracking_uri(cfg)}) but keeps "
            f"its trials in sqlite ({url or 'the default, under tracking.runs_dir'}), which workers on other "
            f"machines cannot share: set `storage: postgresql://...` (docs/tuning.md)"
        )
    if url:
        return url
    root = Path(cfg.tracking.runs_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'optuna.db'}"


def make_pruner(name: str, cfg):
    """The study's pruner; Hyperband's smallest resource is one evaluation interval of the trials' runs
    (config.eval_interval: eval.every_images when set), the largest a whole run."""
    import optuna

    interval = config_mod.eval_interval(cfg) or cfg.train.steps
    return {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(
            min_resource=max(1, interval), max_resource=cfg.train.steps
        ),
        "none": lambda: optuna.pruners.NopPruner(),
    }[name]()


def open_study(spec: Spec, cfg, create: bool):
    """The study in its RDB storage, with heartbeats (a dead worker's trial becomes FAIL)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.9
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES)

    def stale(study, trial):  # a dead worker's trial: its point is queued again, and its MLflow run says so
        retry(study, trial)  # first: the point must not be lost if MLflow errs
        try:
            _mark_failed(cfg, trial)
        except Exception as e:  # a tracking error must not crash the worker outside Optuna's catch
            log.error(
                "trial %s: could not mark its MLflow run FAILED (%s: %s); its point is queued again",
                trial.number,
                e.__class__.__name__,
                str(e).splitlines()[0][:200] if str(e) else "",
            )

    url = storage_url(spec, cfg)
    # sqlite: a write waits for another process's lock (default 5 s, then it raises). A heartbeat write
    # that raises ends Optuna's heartbeat thread silently, and a live worker's trial then looks dead.
    engine = {"connect_args": {"timeout": 3 * spec.heartbeat}} if url.startswith("sqlite") else None
    storage = optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine,
        heartbeat_interval=spec.heartbeat,
        grace_period=3 * spec.heartbeat,
        heartbeat_stale_trial_callback=stale,
    )
    seed = worker_seed(spec.seed)
    sampler = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "grid": lambda: optuna.samplers.GridSampler(
            {k: [choice_label(c) for c in v] for k, v in spec.space.items()}, seed=spec.seed
        ),
    }[spec.sampler]()
    pruner = make_pruner(spec.pruner, cfg)
    direction = "minimize" if metrics_mod.mode_of(cfg.selection.metric, cfg.selection.mode) == "min" else "maximize"
    if create:  # exactly one launcher creates the study (the storage's unique name decides)
        try:
            return optuna.create_study(
                storage=storage, sampler=sampler, pruner=pruner, study_name=spec.name, direction=direction
            ), True
        except optuna.exceptions.DuplicatedStudyError:
            pass
    return optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler, pruner=pruner), False


def worker_seed(study_seed: int) -> int:
    """The sampler seed of this worker: the study's seed mixed with the worker's host and process, so
    that two workers asking at the same moment with the same history do not propose the same point
    (random and TPE samplers are deterministic given their seed). Recorded on every trial."""
    import hashlib

    who = f"{study_seed}:{socket.gethostname()}:{os.getpid()}:{os.environ.get('GANLAB_WORKER', '')}"
    return int(hashlib.sha256(who.encode()).hexdigest()[:8], 16)


def _mark_failed(cfg, trial):
    """Optuna found a trial whose worker stopped beating: its MLflow run says so too."""
    run_id = trial.user_attrs.get("run_id")
    if not run_id or not cfg.tracking.enabled:
        return
    from . import track

    client = track.open_client(track.tracking_uri(cfg))
    client.set_tag(run_id, "ganlab.failed", "its worker died (no Optuna heartbeat)")
    client.set_terminated(run_id, "FAILED")


# ------------------------------------------------------------------------------------------ a trial


def objective(spec: Spec, parent: str | None, extra_sets=(), quiet=True):
    """Optuna's objective: one ganlab run; the hand-over score of the generator it hands over is the
    trial's value (the selection best, a minimum of noisy evaluations, would reward luck)."""
    import optuna

    from . import train

    def run_trial(trial):
        if spec.sampler == "grid" and not trial.user_attrs.get("queued"):
            # another worker popped the last queued point between this worker's look and its ask:
            # nothing is left, and a sampled point would repeat one (a spare, left out of summaries)
            trial.set_user_attr("spare", True)
            raise optuna.TrialPruned("spare: every grid point was taken by another worker")
        cfg = spec.trial_config(suggest(trial, spec.space), trial.number, extra_sets)
        trial.set_user_attr("sampler_seed", worker_seed(spec.seed))
        res = train.train(
            cfg,
            quiet=quiet,
            experiment_file=str(spec.path),
            parent_run_id=parent,
            on_start=_on_start(trial, cfg),
            on_eval=_on_eval(trial, cfg.selection.metric),
        )
        return _trial_value(trial, res, spec, cfg.selection.metric)

    def recorded(trial):  # the reason a trial failed, where summaries and the worker read it
        try:
            return run_trial(trial)
        except optuna.TrialPruned:
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{e.__class__.__name__}: {e}"[-1000:])
            raise

    return recorded


def _on_start(trial, cfg):
    """The run's on_start hook: the trial records its run, folder and worker; the run is tagged with the worker."""

    def started(run_id, run_dir):
        trial.set_user_attr("run_id", run_id or "")
        trial.set_user_attr("run_dir", str(run_dir))
        worker = f"{socket.gethostname()}:{os.getpid()}"
        trial.set_user_attr("worker", worker)
        if run_id:
            from . import track

            # retried like every other write: several workers on one sqlite store meet "database is locked"
            track.with_retry(track.open_client(track.tracking_uri(cfg)).set_tag, run_id, "ganlab.worker", worker)

    return started


def _on_eval(trial, metric: str):
    """The run's on_eval hook: report each evaluation to Optuna; True (stop the run) when it prunes."""
    import optuna

    def evaluated(step, m, last):
        trial.report(m[metric], step)
        if last or not trial.should_prune():  # a fully trained trial completes
            return False
        # the median pruner compares with COMPLETE trials' values at this step
        others = [
            t.number
            for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if step in t.intermediate_values
        ]
        trial.set_user_attr("pruned_at_step", step)
        trial.set_user_attr("pruned_against", others)
        return True

    return evaluated


def _trial_value(trial, res, spec: Spec, metric: str) -> float:
    """The finished run's hand-over score as the trial's value, with what summaries read beside it."""
    import optuna

    trial.set_user_attr("best_step", res.best_step)
    trial.set_user_attr("stopped", res.stopped)
    if res.stopped == "pruned":
        raise optuna.TrialPruned(f"pruned at step {trial.user_attrs['pruned_at_step']}")
    score, se = res.score(metric)
    if score is None:
        raise RuntimeError(f"trial {trial.number}: no generator to hand over ({res.stopped})")
    pinned = trial.study.user_attrs.get(PINNED)
    if pinned and spec.pin_signature and res.handover_signature != pinned:
        raise RuntimeError(
            f"trial {trial.number}: scored under hand-over signature {res.handover_signature}, "
            f"not the study's {pinned}: its value is not comparable"
        )
    trial.set_user_attr("handover_se", se)
    trial.set_user_attr("handover_signature", res.handover_signature)
    trial.set_user_attr("handed_over_step", res.handed_over_step)
    trial.set_user_attr("selection_best", res.best)
    return score


def _grid_points(spec: Spec) -> list[dict]:
    """A grid study's points, each enqueued once: workers pop queued trials atomically, whereas two
    workers asking Optuna's GridSampler at the same moment (with the same seed) get the same point."""
    if spec.sampler != "grid":
        return []
    keys = list(spec.space)
    return [dict(zip(keys, values)) for values in itertools.product(*(spec.space[k] for k in keys))][: spec.trials]


def work(spec: Spec, extra_sets=(), quiet=True) -> int:
    """One worker: take trials until the study has `trials` of them (any state); in a grid study,
    until no queued point is left. Returns trials run. TPE/random: two workers may both start the
    last one, so a study can end a trial or two over, never under. A worker whose hand-over protocol
    differs from the one the study pinned refuses to start (ConfigError, one line)."""
    import optuna

    cfg0 = spec.trial_config(_first(spec), 0, extra_sets)
    study, _ = open_study(spec, cfg0, create=False)
    if spec.pin_signature:
        pin_signature(study, cfg0, spec)
    run = objective(spec, study.user_attrs.get(PARENT), extra_sets, quiet)
    done, t0 = 0, time.time()
    turn = AskTurn(storage_url(spec, cfg0))
    while (
        _taken(study) < spec.trials
        and (spec.sampler != "grid" or _waiting(study))
        and not (spec.timeout and time.time() - t0 > spec.timeout)
    ):
        mine = []  # this worker's trial (get_trials()[-1] may be another worker's)
        # a failing trial is recorded as FAIL (with its error) and the study goes on
        with turn:
            study.optimize(turn.then(run), n_trials=1, catch=(Exception,), callbacks=[lambda st, t: mine.append(t)])
        done += 1
        if mine and mine[0].state == optuna.trial.TrialState.FAIL:
            print(
                f"trial {mine[0].number} failed: {mine[0].user_attrs.get('error', '(no reason recorded)')[-300:]}",
                file=sys.stderr,
            )
    return done


class AskTurn:
    """Workers of one sqlite study take turns asking for a trial. sqlite has no row locks (Optuna's
    SELECT ... FOR UPDATE is a no-op there), so two workers popping queued trials at the same moment
    could both get the same one: with 9 workers starting at once, a sweep point ran twice. The turn
    is held from `optimize` until the objective starts (the trial is popped or sampled by then).
    Other storages (PostgreSQL) lock the row themselves: no turn needed."""

    def __init__(self, url: str):
        from filelock import FileLock

        self.lock = FileLock(url[len("sqlite:///") :] + ".ask.lock") if url.startswith("sqlite:///") else None
        self.held = False

    def __enter__(self):
        if self.lock is not None:
            self.lock.acquire()
            self.held = True
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self):
        if self.held:
            self.held = False
            self.lock.release()

    def then(self, objective):
        def run(trial):
            self.release()  # this worker has its trial: the next may ask
            return objective(trial)

        return run


def pin_signature(study, cfg, spec: Spec):
    """The study's hand-over signature: pinned by its first worker, checked by every later one, so
    TPE and the pruner only ever compare numbers from one feature space."""
    import json

    from . import data
    from .device import pick_device
    from .eval import protocol

    images = data.load_images(cfg.data, cfg.seed)
    ev = protocol.Evaluator(cfg, images.holdout, pick_device(cfg.train.device), images=images)
    pinned = claim_pin(study, ev.handover_hash, json.dumps(ev.handover, sort_keys=True))
    if pinned != ev.handover_hash:
        old = json.loads(study.user_attrs.get(PINNED_FIELDS, "{}"))
        diff = (
            "; ".join(
                f"{k} {old.get(k)!r} here {ev.handover.get(k)!r}"
                for k in sorted(set(old) | set(ev.handover))
                if old.get(k) != ev.handover.get(k)
            )
            or f"{pinned} here {ev.handover_hash}"
        )
        raise ConfigError(
            f"{spec.path}: this worker's evaluation differs from study {spec.name!r}'s pinned hand-over "
            f"protocol {pinned} (study {diff}); its scores would not be comparable, so it does not join"
        )


def claim_pin(study, value: str, fields: str, timeout: float = 60.0) -> str:
    """The study's pinned hand-over signature, set once: the first worker to create the marker study
    `<name>#pin` (the storage's unique study name makes that atomic, on sqlite and PostgreSQL alike)
    writes its value; every other worker, however close behind, waits for it and reads it. A read-then-
    set would let two workers starting together each pin their own, and the loser train in full."""
    import optuna

    pinned = study.user_attrs.get(PINNED)
    if pinned is not None:
        return pinned
    try:
        optuna.create_study(study_name=f"{study.study_name}#pin", storage=study._storage)
    except optuna.exceptions.DuplicatedStudyError:  # another worker claimed it: wait for its value
        deadline = time.time() + timeout
        while time.time() < deadline:
            pinned = optuna.load_study(study_name=study.study_name, storage=study._storage).user_attrs.get(PINNED)
            if pinned is not None:
                return pinned
            time.sleep(0.2)
        raise ConfigError(
            f"study {study.study_name!r}: another worker claimed the hand-over signature pin but "
            f"wrote none within {timeout:.0f} s"
        )
    study.set_user_attr(PINNED_FIELDS, fields)
    study.set_user_attr(PINNED, value)
    return value


def _waiting(study) -> bool:
    import optuna

    return any(t.state == optuna.trial.TrialState.WAITING for t in study.get_trials(deepcopy=False))


def _taken(study) -> int:
    """Trials started or done (enqueued ones still waiting do not count, nor a failed one queued again)."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return sum(t.state != optuna.trial.TrialState.WAITING and t.number not in retried for t in trials)


def _first(spec: Spec) -> dict:
    return _corners(spec.space)[0]


# --------------------------------------------------------------------------------------- the study


def execute(
    spec: Spec,
    workers: int = 1,
    devices: str = "",
    extra_sets=(),
    quiet=True,
    worker_args=(),
    parent_name: str = "",
    parent_tags=None,
):
    """Create (or join) the study and its parent run, run the workers here, fail what died.
    Returns (study, parent run id or None, the config of the first trial)."""
    import optuna

    cfg0 = spec.trial_config(_first(spec), 0, extra_sets)
    study, created = open_study(spec, cfg0, create=True)
    if created:  # this launcher alone queues the points and makes the parent run
        for point in spec.start_with + _grid_points(spec):
            point = {k: choice_label(v) for k, v in point.items()}
            study.enqueue_trial(point, skip_if_exists=True, user_attrs={"queued": True})
        _parent_run(study, spec, cfg0, parent_name or f"study-{spec.name}", parent_tags or {})
        study.set_user_attr(READY, True)
    else:
        _wait_ready(study, spec)
    parent = study.user_attrs.get(PARENT)
    with ends_parent(cfg0, parent if created else None):  # the launcher's parent never stays RUNNING
        if workers <= 1 and not devices:
            work(spec, extra_sets, quiet)
        else:
            _spawn(spec, workers, devices, list(worker_args) + [a for s in extra_sets for a in ("--set", s)])
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial: FAIL, and its point queued again
        if _waiting(study):  # ... which nobody is left to run: run it here
            work(spec, extra_sets, quiet)
    return study, parent, cfg0


@contextmanager
def ends_parent(cfg, parent: str | None):
    """A study's or sweep's parent MLflow run ends FAILED (an error) or KILLED (an interrupt), with the
    reason, when what runs inside fails; it is left alone otherwise (its summary ends it)."""
    try:
        yield
    except BaseException as e:
        if parent is not None and cfg.tracking.enabled:
            from . import track

            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            try:
                client = track.open_client(track.tracking_uri(cfg))
                track.with_retry(client.set_tag, parent, "ganlab.end_reason", f"{e.__class__.__name__}: {e}"[:500])
                track.with_retry(client.set_terminated, parent, status)
            except Exception as err:  # the original error matters more; say this one
                log.error("could not end the parent run %s as %s (%s)", parent, status, err)
        raise


def run_study(spec: Spec, workers: int = 1, devices: str = "", extra_sets=(), quiet=True, worker_args=()) -> list[dict]:
    """`ganlab tune`: the study, its trials summarised on stdout and on the parent run."""
    study, parent, cfg0 = execute(spec, workers, devices, extra_sets, quiet, worker_args=worker_args)
    with ends_parent(cfg0, parent):
        rows = summarise(study)
        _log_summary(cfg0, parent, rows, study)
    return rows


def _wait_ready(study, spec: Spec, timeout: float = 120.0):
    """A launcher that did not create the study waits until its creator has queued the points and made
    the parent run (seconds), instead of doing either a second time."""
    t0 = time.time()
    while not study.user_attrs.get(READY) and not study.get_trials(
        deepcopy=False
    ):  # (a study of an older ganlab has trials)
        if time.time() - t0 > timeout:
            raise ConfigError(
                f"study {spec.name!r} exists but its creator never finished setting it up "
                f"(no {READY!r} attribute after {timeout:.0f} s); delete the study or use another name"
            )
        time.sleep(0.5)  # user_attrs reads the storage each time


def _parent_run(study, spec: Spec, cfg, run_name: str, tags: dict) -> str | None:
    """The study's parent MLflow run, made once by the launcher that created the study; the others
    find its id in the study."""
    if not cfg.tracking.enabled:
        return None
    from . import track

    uri = track.tracking_uri(cfg)
    client = track.open_client(uri)
    exp_id = track.ensure_experiment(client, spec.experiment or cfg.name, uri, cfg.tracking.runs_dir)
    run = client.create_run(
        exp_id, run_name=run_name, tags={"ganlab.study": spec.name, "ganlab.study_file": str(spec.path), **tags}
    )
    study.set_user_attr(PARENT, run.info.run_id)
    return run.info.run_id


def worker_slots(workers: int, devices: str, per_device: int, gpus: int | None = None) -> tuple[int, str]:
    """--workers, --devices and --per-device N as (worker count, one GPU per worker, comma-separated):
    N workers on each GPU named (all visible ones when none is named), so a study fills a card that
    one small run leaves idle (docs/benchmarks.md). Without a GPU, N workers share the CPU."""
    if per_device <= 1:
        return workers, devices
    devs = [d.strip() for d in devices.split(",") if d.strip()]
    if not devs:
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        devs = [str(i) for i in range(gpus)]
    if not devs:
        return max(workers, per_device), ""
    slots = devs * per_device  # round robin: worker i on devs[i % len(devs)]
    return max(workers, len(slots)), ",".join(slots)


def _spawn(spec: Spec, workers: int, devices: str, args: list):
    """N worker processes on this machine (`ganlab tune|sweep FILE --worker`), one GPU each with --devices."""
    devs = [d.strip() for d in devices.split(",") if d.strip()] if devices else []
    command = spec.command
    cmd = [
        sys.executable,
        "-m",
        "ganlab.cli",
        command,
        str(spec.path),
        "--worker",
        "--name",
        spec.name,
        "--storage",
        spec.storage,
        "--quiet",
        *args,
    ]
    from . import distributed

    procs, n = [], max(workers, len(devs))
    for i in range(n):
        env = distributed.cpu_share(dict(os.environ, GANLAB_WORKER=str(i)), n)
        if devs:
            env["CUDA_VISIBLE_DEVICES"] = devs[i % len(devs)]
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        p.wait()
    if any(p.returncode != 0 for p in procs):
        # a killed worker's trial is failed once its heartbeat is stale (grace: 3 heartbeats)
        time.sleep(3 * spec.heartbeat + 1)


def summarise(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("spare"):
            continue
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                "pruned_at_step": t.user_attrs.get("pruned_at_step"),
                "pruned_against": t.user_attrs.get("pruned_against"),
                "best_step": t.user_attrs.get("best_step"),
                "se": t.user_attrs.get("handover_se"),
                "handed_over_step": t.user_attrs.get("handed_over_step"),
                "run_id": t.user_attrs.get("run_id"),
                "run_dir": t.user_attrs.get("run_dir", ""),
                "error": t.user_attrs.get("error", ""),
                "retry_of": t.system_attrs.get("failed_trial"),
            }
        )
    return rows


def format_rows(rows: list[dict], metric: str) -> str:
    lines = [
        f"| trial | state | hand-over {metric} +/- se | params | pruned at step (against trials) | run id |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        # a pruned trial's value is its last evaluation (Optuna keeps it), not a hand-over score
        done = r["state"] == "COMPLETE" and r["value"] is not None
        val = f"{r['value']:.4g} +/- {r['se'] or 0:.2g}" if done else "-"
        pruned = (
            "-"
            if r["pruned_at_step"] is None
            else (
                f"{r['pruned_at_step']}: {metric} {r['value']:.4g} against trials {r['pruned_against']}"
                if r["value"] is not None
                else f"{r['pruned_at_step']} (against {r['pruned_against']})"
            )
        )
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"| {r['trial']} | {r['state']} | {val} | {params} | {pruned} | {r['run_id'] or '-'} |")
    return "\n".join(lines)


def _log_summary(cfg, parent: str | None, rows: list[dict], study):
    import json
    import tempfile

    table = format_rows(rows, cfg.selection.metric)
    print(table)
    if parent is None:
        return
    from . import track

    client = track.open_client(track.tracking_uri(cfg))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "study_summary.md").write_text(table + "\n")
        (Path(d) / "study_trials.json").write_text(json.dumps(rows, indent=2, default=str))
        client.log_artifact(parent, str(Path(d) / "study_summary.md"))
        client.log_artifact(parent, str(Path(d) / "study_trials.json"))
    states = {r["state"] for r in rows}
    if "RUNNING" not in states:  # workers elsewhere may still be at it
        best = [r for r in rows if r["state"] == "COMPLETE"]
        if best:
            client.log_metric(parent, f"handover_{cfg.selection.metric}", study.best_value)
            client.set_tag(parent, "ganlab.best_trial", str(study.best_trial.number))
        client.set_terminated(parent, "FINISHED")
