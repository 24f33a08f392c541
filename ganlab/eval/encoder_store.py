"""The team's copy of a domain encoder, in the tracking store: which encoder is *the* one for a data
set and recipe (its key), so that every machine scores in one feature space.

Each encoder is uploaded by an MLflow run in the experiment `ganlab-encoders`. Which upload is the
team's is claimed by creating the registered model `ganlab-encoder-<key>` with tags naming the file
and the run: a registered model's name is unique in every MLflow store, so when two machines publish
at once exactly one creation succeeds and the other adopts the winner's file (ordering uploads by
start time, as before, let each machine adopt its own while the other's run was still uploading).
Every use reads the claim again, so a machine whose local cache holds another encoder switches.

A published file whose weights do not match the hash in its name (a broken upload) is tagged
`ganlab.encoder_damaged` on its claim, and the next upload claims `ganlab-encoder-<key>.2` (then .3):
one bad upload never blocks the team for good; a file that fails its check is downloaded once more
before it is marked (one truncated download must not move the whole team to a new feature space).

MLflow's SQL stores create a registered model atomically; its file store does not (two creations at
once can both succeed, or one fail with "Yaml file exists"), so on a file store every claim is made
under an exclusive lock on a file beside the store (`.ganlab-claims.lock`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from .. import store  # the MLflow store's helpers; evaluation never imports tracking
from ..checkpoint import atomic_write_bytes
from ..errors import UserError

log = logging.getLogger("ganlab")

ENCODERS = "ganlab-encoders"  # the experiment holding the upload runs
DAMAGED = "ganlab.encoder_damaged"
TURNS = 4  # claims found damaged or lost to another machine before giving up


class StoreUnreachable(UserError):
    """The tracking store did not answer (or refused) while the team's encoder was looked up."""


class _Local(Exception):
    """Training this machine's encoder failed: not a store error."""


def claim_name(key: str, generation: int) -> str:
    return f"ganlab-encoder-{key}" + (f".{generation}" if generation > 1 else "")


def _store(cfg):
    uri = store.tracking_uri(cfg)
    client = store.open_client(uri)
    return client, store.ensure_experiment(client, ENCODERS, uri, cfg.tracking.runs_dir)


def current_claim(client, key: str) -> tuple[int, dict | None]:
    """(generation, tags) of the team's claim for key: the first generation not tagged damaged, or
    (the next free generation, None) when there is none."""
    generation = 1
    while True:
        try:
            model = store.with_retry(client.get_registered_model, claim_name(key, generation))
        except Exception as e:
            if store.is_error(e, "RESOURCE_DOES_NOT_EXIST", "not found"):
                return generation, None
            raise
        if DAMAGED not in model.tags:
            return generation, dict(model.tags)
        generation += 1


def file_store_root(uri: str) -> Path | None:
    """The folder of an MLflow file store (file:///path or a plain path), else None."""
    if uri.startswith("file:"):
        return Path(urlparse(uri).path)
    return Path(uri) if uri and "://" not in uri and not uri.startswith("sqlite:") else None


@contextmanager
def claim_lock(uri: str):
    """Exclusive across processes and threads (flock on a file beside a file store); nothing on SQL stores."""
    root = file_store_root(uri)
    if root is None:
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".ganlab-claims.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def claim(client, key: str, generation: int, run_id: str, file: str, uri: str = "") -> dict:
    """Claim `generation` for this upload. Returns the claim's tags: ours, or the first claimant's."""
    with claim_lock(uri):
        try:
            model = store.with_retry(client.get_registered_model, claim_name(key, generation))
            return dict(model.tags)  # claimed already (under the lock: by whoever came first)
        except Exception as e:
            if not store.is_error(e, "RESOURCE_DOES_NOT_EXIST", "not found"):
                raise
        return _create_claim(client, key, generation, run_id, file)


def _create_claim(client, key: str, generation: int, run_id: str, file: str) -> dict:
    tags = {"ganlab.encoder_key": key, "ganlab.encoder_file": file, "ganlab.encoder_run": run_id}
    try:
        store.with_retry(
            client.create_registered_model,
            claim_name(key, generation),
            tags=tags,
            description="ganlab's domain encoder for one data set and recipe: the file its tags name, "
            f"uploaded by run {run_id} in the experiment {ENCODERS}",
        )
        return tags
    except Exception as e:
        if not store.is_error(e, "RESOURCE_ALREADY_EXISTS", "already exists"):
            raise
    return dict(store.with_retry(client.get_registered_model, claim_name(key, generation)).tags)


def upload(client, exp_id: str, key: str, path: Path) -> str:
    """An upload run holding the encoder file and its card. Returns its run id; a failed upload
    leaves a FAILED run, never a RUNNING one."""
    card = json.loads(path.with_suffix(".json").read_text())
    run = client.create_run(
        exp_id,
        run_name=f"encoder-{key}",
        tags={
            "ganlab.encoder_key": key,
            "ganlab.encoder_file": path.name,
            "data.hash": card["data_hash"],
            "ganlab.encoder_recipe": json.dumps(card["recipe"], sort_keys=True),
        },
    )
    try:
        for f in (path, path.with_suffix(".json")):
            client.log_artifact(run.info.run_id, str(f), "encoder")
    except BaseException as e:
        client.set_tag(run.info.run_id, "ganlab.end_reason", f"upload failed: {e.__class__.__name__}: {e}"[:500])
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def download(client, tags: dict, root: Path, damaged: Callable[[Path], str]) -> tuple[Path, str]:
    """The claimed file in root (downloaded unless there already). Returns (path, why it cannot be
    trusted: "" = it can); a bad file is left in a temporary folder, never in root."""
    name, run_id = tags["ganlab.encoder_file"], tags["ganlab.encoder_run"]
    path = root / name
    if path.exists() and not damaged(path):
        return path, ""
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        got = Path(client.download_artifacts(run_id, "encoder", tmp)) / name
        why = damaged(got) if got.exists() else "missing from its run's artifacts"
        if not why:
            atomic_write_bytes(path.with_suffix(".json"), got.with_suffix(".json").read_bytes())
            atomic_write_bytes(path, got.read_bytes())
    return path, why


def _legacy(client, exp_id: str, key: str):
    """An encoder published before claims existed (the earliest FINISHED upload run under key)."""
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`ganlab.encoder_key` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0] if runs else None


def team_encoder(
    cfg, key: str, root: Path, local: Path | None, train: Callable[[], Path], damaged: Callable[[Path], str]
) -> Path:
    """The team's encoder for key, as a file in root. When nobody has claimed one, this machine's
    (`local`, else `train()`) is uploaded and claimed; when another machine claims first, its file is
    fetched instead. A store that cannot be reached is a StoreUnreachable (one line)."""
    uri = store.tracking_uri(cfg)
    try:
        client, exp_id = _store(cfg)
        for _ in range(TURNS):
            generation, tags = current_claim(client, key)
            if tags is None:
                old = _legacy(client, exp_id, key) if generation == 1 else None
                if old is not None:
                    tags = claim(client, key, generation, old.info.run_id, old.data.tags["ganlab.encoder_file"], uri)
                else:
                    try:
                        local = local or train()
                    except Exception as e:  # not the store's doing: raised as it is, below
                        raise _Local() from e
                    run_id = upload(client, exp_id, key, local)
                    tags = claim(client, key, generation, run_id, local.name, uri)
                    if tags["ganlab.encoder_run"] == run_id:
                        log.info(
                            "domain encoder %s published to the tracking store (experiment %s, claim %s)",
                            local.name,
                            ENCODERS,
                            claim_name(key, generation),
                        )
                    else:
                        store.with_retry(
                            client.set_tag, run_id, "ganlab.encoder_adopted", "false: another machine claimed first"
                        )
            if local is not None and tags["ganlab.encoder_file"] == local.name:
                return local  # named by its weights' hash: the same file
            path, why = download(client, tags, root, damaged)
            if why:  # once more before blaming the file: a download can break too
                path, why = download(client, tags, root, damaged)
            if not why:
                log.info("domain encoder %s from the tracking store (run %s)", path.name, tags["ganlab.encoder_run"])
                return path
            log.warning(
                "the team's domain encoder %s (run %s) is %s: marked damaged; the next upload takes its place",
                tags["ganlab.encoder_file"],
                tags["ganlab.encoder_run"],
                why,
            )
            store.with_retry(client.set_registered_model_tag, claim_name(key, generation), DAMAGED, why[:500])
    except _Local as e:
        raise e.__cause__
    except UserError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise StoreUnreachable(
            f"tracking store {store.tracking_uri(cfg)}: could not look up or publish the team's domain encoder "
            f"({e.__class__.__name__}: {first}); bring the store back and run again, or set tracking.enabled=false "
            f"to evaluate with this machine's own encoder (another feature space than the team's)"
        ) from e
    raise StoreUnreachable(
        f"tracking store {store.tracking_uri(cfg)}: {TURNS} claims of the domain encoder {key} in a row "
        f"were damaged or lost; see the registered models {claim_name(key, 1)}*"
    )
