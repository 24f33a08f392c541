"""Recording in MLflow (params, tags, metrics, images, models).

Default store: sqlite:///mlruns/mlflow.db with artifacts under mlruns/artifacts (MLflow 3 refuses a
new plain file store); `tracking.uri` or $MLFLOW_TRACKING_URI points at a server instead. Metrics
are written once per diagnostic interval: synchronously to a local store (about 3 ms, so a locked
sqlite file is retried and nothing waits in a queue), asynchronously in MLflow's batches to a
server; `flush()` runs before anything reads them back. Knows nothing about training.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import random
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from .events import read_events
from .store import ensure_experiment, is_local, open_client, set_fluent_uri, tracking_uri, with_retry  # noqa: F401
from .store import is_error as _is

log = logging.getLogger("ganlab")


def new_run_dir(cfg) -> Path:
    label = cfg.variant or cfg.name
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.tracking.runs_dir) / "runs" / cfg.name / f"{_safe(label)}-{stamp}-{random.randrange(16**4):04x}"


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)[:60] or "run"


def git_info() -> dict:
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if commit.returncode == 0:
            return {"git.commit": commit.stdout.strip(), "git.dirty": str(bool(dirty.stdout.strip())).lower()}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git.commit": "unknown", "git.dirty": "unknown"}


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no login name (some containers)
        return "unknown"


def header_comment(experiment_file: str) -> str:
    """The comment block at the top of an experiment file: what the experiment is for, in its
    author's words."""
    try:
        lines = Path(experiment_file).read_text().splitlines() if experiment_file else []
    except OSError:
        return ""
    head = []
    for ln in lines:
        if not ln.startswith("#"):
            break
        head.append(ln.lstrip("#").strip())
    return "\n".join(head).strip()


NOTE_EVENTS = (
    "improved",
    "copy_refused",
    "rollback",
    "early_stop",
    "new_period",
    "reevaluated",
    "handover",
    "finished",
)


def run_note(header: str, run_dir: Path) -> str:
    """The run's description in the MLflow UI: the experiment's header, then the run's decisions."""
    decisions = [
        f"- step {e['step']}: {e['kind']}: {e['detail']}" for e in read_events(run_dir) if e["kind"] in NOTE_EVENTS
    ]
    parts = [header or "(no header comment in the experiment file)"]
    if decisions:
        parts.append("Decisions:\n" + "\n".join(decisions[-50:]))
    return "\n\n".join(parts)


_NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9_\-. :/]")


def mlflow_name(name: str) -> str:
    """A metric or tag name MLflow accepts (alphanumerics, underscores, dashes, periods, spaces, colons,
    slashes): every other character becomes '_'. The one place names are made valid before they
    reach MLflow (a bench contender "recommended + R1/4" once crashed the bench)."""
    return _NOT_IN_NAMES.sub("_", name)


class NullTracker:
    """Tracking off: the same calls, recording nothing beyond the run folder."""

    run_id = None

    def start(self, run_dir, **context):
        return None

    def log_metrics(self, metrics: dict, step: int):
        pass

    def log_samples(self, grid_path: Path, step: int):
        pass

    def set_tags(self, tags: dict):
        pass

    def log_artifacts(self, folder: Path, artifact_path: str):
        pass

    def finish(self, status: str, summary: dict, step: int = 0, stopped: str = "", final: bool = True):
        pass


class Tracker(NullTracker):
    def __init__(self, cfg):
        import mlflow

        self.mlflow = mlflow
        self.cfg = cfg  # what this run logs as params, and its tracking/selection settings
        self.uri = tracking_uri(cfg)
        self.client = open_client(self.uri)
        self.local = is_local(self.uri)  # a local store is written synchronously (see the module docstring)
        self.run_id = None
        self.parent_run_id = None  # a tune study's parent run (else the active fluent run)
        self.last_step: dict[str, int] = {}  # per metric: steps at or below were logged before a resume
        self.monitor = None
        self._run_dir, self._header, self._exp_id = None, "", None

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg) if cfg.tracking.enabled else NullTracker()

    def _call(self, fn, *args, **kwargs):
        return with_retry(fn, *args, **kwargs)

    # ---- lifecycle
    def start(self, run_dir, images=None, evaluator=None, device=None, run_id=None, experiment_file=""):
        """Open (or, with run_id, reopen after a resume) the MLflow run. Returns its id."""
        from . import config as config_mod

        cfg = self.cfg
        set_fluent_uri(self.uri)
        exp_id = ensure_experiment(self.client, cfg.name, self.uri, cfg.tracking.runs_dir)
        if run_id is None:
            run_id = self._create_run(exp_id, run_dir, config_mod.flatten(cfg))
        else:
            self.last_step = self._logged_steps(run_id)
            self._call(self.client.update_run, run_id, status="RUNNING")
        self.run_id = run_id
        self._tags(images, evaluator, device, experiment_file)
        if images is not None:
            self._log_input(images)
        for path in evaluator.extractor.files if evaluator is not None else []:
            self._call(self.client.log_artifact, run_id, path, "evaluation")  # the domain encoder and its card
        if cfg.tracking.system_metrics:
            self.monitor = _system_monitor(run_id, cfg.tracking.system_metrics_every)
        self._run_dir = Path(run_dir)
        self._header = header_comment(experiment_file)
        self.set_tags({"mlflow.note.content": run_note(self._header, self._run_dir)})
        self._say_where(exp_id)
        return run_id

    def _say_where(self, exp_id=None):
        """With a tracking server, the run's page in the UI (its runs view), printed for the user."""
        if self.uri.startswith(("http://", "https://")):
            self._exp_id = exp_id or self._exp_id
            print(
                f"MLflow run: {self.uri.rstrip('/')}/#/experiments/{self._exp_id}/runs/{self.run_id}",
                file=sys.stderr,
                flush=True,
            )

    def _create_run(self, exp_id, run_dir, params: dict) -> str:
        label = f"{self.cfg.variant or self.cfg.name}-{dt.datetime.now():%m%d-%H%M%S}"
        tags = {"ganlab.run_dir": str(Path(run_dir).resolve()), "ganlab.variant": self.cfg.variant or self.cfg.name}
        active = self.mlflow.active_run()
        parent = self.parent_run_id or (active.info.run_id if active is not None else None)
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self._call(self.client.create_run, exp_id, run_name=label, tags=tags)
        items = list(params.items())
        for i in range(0, len(items), 90):  # MLflow takes at most 100 params a batch
            self._call(
                self.client.log_batch,
                run.info.run_id,
                params=[self.mlflow.entities.Param(k, str(v)) for k, v in items[i : i + 90]],
            )
        return run.info.run_id

    def _logged_steps(self, run_id) -> dict:
        run = self._call(self.client.get_run, run_id)
        out = {}
        for key in run.data.metrics:
            hist = self._call(self.client.get_metric_history, run_id, key)
            out[key] = max((m.step for m in hist), default=-1)
        return out

    def _tags(self, images, evaluator, device, experiment_file):
        import torch_fidelity

        git = git_info()
        tags = {
            "ganlab.experiment_file": experiment_file,
            "ganlab.device": str(device),
            "versions.torch": torch.__version__,
            "versions.torch_fidelity": torch_fidelity.__version__,
            "versions.mlflow": self.mlflow.__version__,
            **git,
            # MLflow's own conventions: the UI's Source and User columns read these
            "mlflow.source.name": experiment_file or "ganlab train",
            "mlflow.source.type": "LOCAL",
            "mlflow.user": _user(),
        }
        if git["git.commit"] != "unknown":
            tags["mlflow.source.git.commit"] = git["git.commit"]
        if images is not None:
            tags.update(
                {
                    "data.hash": images.content_hash,
                    "data.holdout_size": str(len(images.holdout)),
                    "data.train_size": str(len(images.train)),
                    "data.holdout_hash": images.holdout_hash,
                    "data.skipped": str(len(images.skipped)),
                }
            )
        if evaluator is not None:
            tags.update(evaluator.describe())
        self.set_tags(tags)

    def set_tags(self, tags: dict):
        self._call(
            self.client.log_batch,
            self.run_id,
            tags=[self.mlflow.entities.RunTag(mlflow_name(k), str(v)) for k, v in tags.items()],
        )

    def _log_input(self, images):
        try:
            from mlflow.data.code_dataset_source import CodeDatasetSource
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset

            if Path(images.source).is_dir():
                with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local
                    warnings.simplefilter("ignore")
                    src = resolve_dataset_source(Path(images.source).resolve().as_uri())
                name = Path(images.source).name
            else:
                src, name = CodeDatasetSource(tags={"ganlab.data": images.source}), images.source
            ent = self.mlflow.entities
            # the same source, split by path hash: the held-out part is what every metric is measured on
            inputs = [
                ent.DatasetInput(
                    MetaDataset(src, name=f"{name}{suffix}", digest=digest)._to_mlflow_entity(),
                    tags=[ent.InputTag("mlflow.data.context", context)],
                )
                for suffix, digest, context in (
                    ("", images.content_hash, "training"),
                    (":held-out", images.holdout_hash, "evaluation"),
                )
            ]
            self._call(self.client.log_inputs, self.run_id, datasets=inputs)
        except Exception as e:  # lineage is nice to have; never fail a run over it
            log.warning("could not log the dataset input (%s)", e)

    # ---- during the run
    def log_metrics(self, metrics: dict, step: int):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [
            Metric(mlflow_name(k), float(v), now, step)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v)) and step > self.last_step.get(k, -1)
        ]
        if ms:
            self._call(self.client.log_batch, self.run_id, metrics=ms, synchronous=self.local)

    def log_samples(self, grid_path: Path, step: int):
        if step <= self.last_step.get("eval_seconds", -1):
            return  # logged before a resume
        from PIL import Image

        try:
            self._call(self.client.log_image, self.run_id, Image.open(grid_path), key="samples", step=step)
        except Exception as e:
            log.warning("could not log the sample grid (%s)", e)

    def flush(self):
        try:
            self.mlflow.flush_async_logging()
        except Exception as e:  # the metrics already queued may be lost: say so, training goes on
            log.warning("MLflow: flushing queued metrics failed (%s: %s)", e.__class__.__name__, e)

    def finish(self, status: str, summary: dict, step: int = 0, stopped: str = "", final: bool = True):
        """Summary metrics at the run's last step (MLflow sorts by a metric's latest value, so
        best_<metric> must be logged last), artifacts, the registry, and the run's status."""
        if self.run_id is None:
            return
        try:
            self.last_step = {}
            self.log_metrics(
                {**summary, "stopped_early": float(stopped.startswith("early") or stopped == "collapse")}, step
            )
            self.flush()
            run_dir = self._run_dir
            if stopped:
                self._call(self.client.set_tag, self.run_id, "ganlab.stopped", stopped)
            self.set_tags({"mlflow.note.content": run_note(self._header, run_dir)})
            for name in ("config.yaml", "events.jsonl", "metrics.jsonl"):
                if (run_dir / name).exists():
                    self._call(self.client.log_artifact, self.run_id, str(run_dir / name))
            if final and status == "FINISHED" and (run_dir / "generator.pt").exists():
                self._log_generator(run_dir)
        finally:
            if self.monitor is not None:
                self.monitor.finish()
            self._call(self.client.set_terminated, self.run_id, status=status)
            self._say_where()

    def log_artifacts(self, folder: Path, artifact_path: str):
        self._call(self.client.log_artifacts, self.run_id, str(folder), artifact_path)

    def _log_generator(self, run_dir: Path):
        for name in ("generator.pt", "generator.safetensors"):
            if (run_dir / name).exists():
                self._call(self.client.log_artifact, self.run_id, str(run_dir / name), "model")
        if self.cfg.tracking.register_model:
            try:
                register_generator(self, run_dir)
            except Exception as e:  # the run's own artifacts are safe; say what failed
                log.warning("could not register the generator in the Model Registry (%s)", e)


def _system_monitor(run_id, every: float):
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        m = SystemMetricsMonitor(run_id, sampling_interval=every, samples_before_logging=1)
        m.start()
        return m
    except Exception as e:
        log.warning("system metrics are off (%s)", e)
        return None


# --------------------------------------------------------------------------------- model registry


def register_generator(tracker, run_dir: Path):
    """Log the handed-over generator twice, at its step: as an MLflow PyTorch model (pt2, for torch
    users) and as the `rgba_images` pyfunc (count + seed -> RGBA images, for `mlflow models serve`).
    Register the pyfunc under the experiment's name, tagged with its hand-over score, and move the
    `champion` alias only when that score beats the champion's under the same hand-over signature."""
    from . import select, serve
    from .config import metric_mode, to_yaml
    from .generator import load_generator

    mlflow, client, cfg = tracker.mlflow, tracker.client, tracker.cfg
    g, info = load_generator(run_dir / "generator.pt")
    name, metric = cfg.name, cfg.selection.metric
    value, se = info["metrics"].get(f"handover_{metric}"), info["metrics"].get(f"handover_{metric}_se")
    sig = info.get("handover_signature") or ""
    meta = {
        "ganlab_config": to_yaml(info["config"]),
        "step": info["step"],
        "signature": info["signature"],
        "handover_signature": sig,
        f"handover_{metric}": value,
        f"handover_{metric}_se": se,
    }
    pins = serve.pinned_requirements()
    with _quiet_logs(), mlflow.start_run(run_id=tracker.run_id, nested=mlflow.active_run() is not None):
        mlflow.pytorch.log_model(
            g,
            name="generator",
            pip_requirements=pins,
            step=info["step"],
            metadata=meta,
            input_example=torch.randn(2, info["config"].model.nz).numpy(),
            serialization_format="pt2",
        )
        model_info = mlflow.pyfunc.log_model(
            name="rgba_images",
            python_model=serve.GeneratorImages(),
            artifacts={"generator": str(run_dir / "generator.pt")},
            code_paths=[str(Path(__file__).resolve().parent)],
            pip_requirements=pins,
            signature=serve.signature(),
            metadata=meta,
            step=info["step"],
        )
    try:
        with_retry(client.create_registered_model, name)
    except Exception as e:
        if not _is(e, "RESOURCE_ALREADY_EXISTS", "already exists"):
            raise  # anything but "it exists already" is an error
    mv = with_retry(
        client.create_model_version,
        name,
        model_info.model_uri,
        run_id=tracker.run_id,
        tags={
            "eval.signature": str(info["signature"]),
            "eval.handover_signature": sig,
            f"handover_{metric}": str(value),
            f"handover_{metric}_se": str(se),
            "step": str(info["step"]),
        },
    )
    try:
        champ = champion(client, name)
    except Exception as e:  # the champion is unknown: the alias stays where it is
        log.error(
            "Model Registry: could not read %s's champion after retries (%s: %s); version %s is registered, "
            "the champion alias is left alone",
            name,
            e.__class__.__name__,
            str(e).splitlines()[0][:200],
            mv.version,
        )
        return mv
    beats = champ is None
    if champ is not None and value is not None:
        old = float(champ.tags.get(f"handover_{metric}", "nan"))
        # a champion scored under another hand-over protocol is not comparable: it keeps the alias
        same = champ.tags.get("eval.handover_signature") == sig
        key = select.rank_key(metric_mode(cfg))
        # nor is one without a score of this metric (selected on another): a missing score is not a bad one
        beats = same and not math.isnan(old) and key(value) < key(old)
    if beats and value is not None:
        with_retry(client.set_registered_model_alias, name, "champion", mv.version)
    return mv


def champion(client, name: str, tries: int = 3, delay: float = 0.5):
    """The model version under the `champion` alias, None when there is none. Any other error (a
    timeout, a server error) is retried, then raised: it is not "no champion"."""
    for attempt in range(tries):
        try:
            return with_retry(client.get_model_version_by_alias, name, "champion")
        except Exception as e:
            if _is(e, "RESOURCE_DOES_NOT_EXIST", "not found"):
                return None
            if attempt == tries - 1:
                raise
            time.sleep(delay * 2**attempt)


class _quiet_logs:
    def __enter__(self):
        self.level = logging.getLogger("mlflow").level
        logging.getLogger("mlflow").setLevel(logging.ERROR)

    def __exit__(self, *a):
        logging.getLogger("mlflow").setLevel(self.level)
