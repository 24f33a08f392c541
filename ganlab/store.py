"""The MLflow store ganlab talks to: its URI, a client whose store exists, retries while a shared sqlite
file is locked, experiments created once, and MLflow's errors told apart. Below both tracking (track.py)
and evaluation (eval/encoder_store.py), which share a store and nothing else."""

from __future__ import annotations

import os
import time
from pathlib import Path


def with_retry(fn, *args, tries: int = 12, **kwargs):
    """Call an MLflow client function, retrying while a shared sqlite store is locked by another
    process (two trainings and a sweep may write to one store at once)."""
    delay = 0.1
    for attempt in range(tries):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            text = str(e).lower()
            if attempt == tries - 1 or not ("locked" in text or "busy" in text):
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def tracking_uri(cfg) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.tracking.runs_dir).resolve() / 'mlflow.db'}"


def set_fluent_uri(uri: str):
    """Point MLflow's fluent API at uri without leaving it in $MLFLOW_TRACKING_URI (MLflow sets the
    variable for subprocesses; ganlab reads it as the user's choice, so a later run in the same
    process would otherwise inherit an earlier run's store)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def open_client(uri: str):
    """An MlflowClient whose store exists. Creating a sqlite store runs schema migrations, which race
    when two processes start on a new store at once (one sees the other's half-migrated schema); a
    file lock makes them take turns. MlflowClient opens its store in its constructor, so the
    constructor runs under the lock."""
    import mlflow

    if not uri.startswith("sqlite:///"):
        return mlflow.MlflowClient(uri)
    from filelock import FileLock  # portable (fcntl on POSIX, msvcrt on Windows)

    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db.with_name(db.name + ".lock"))):
        client = mlflow.MlflowClient(uri)
        client.search_experiments(max_results=1)  # creates / migrates the store
    return client


def is_local(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def ensure_experiment(client, name: str, uri: str, runs_dir: str) -> str:
    exp = with_retry(client.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    loc = (Path(runs_dir).resolve() / "artifacts").as_uri() if is_local(uri) else None
    try:
        return with_retry(client.create_experiment, name, artifact_location=loc)
    except Exception:  # another process created it first
        exp = with_retry(client.get_experiment_by_name, name)
        if exp is None:
            raise
        return exp.experiment_id


def is_error(e: Exception, code: str, text: str) -> bool:
    """An MLflow error of this kind (its error_code, or its message for stores that word it only)."""
    return getattr(e, "error_code", "") == code or text in str(e).lower()
