"""Atomic, verified checkpoints that load with `torch.load(weights_only=True)`.

A file is a small envelope {format, sha256, blob}: blob is the torch-serialised state as a uint8
tensor and sha256 its checksum, so truncation or bit rot is detected before anything is used. The
state holds only tensors and plain types (no pickled objects), so a hostile file cannot run code.
Knows nothing about what the state means.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import UserError

FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint cannot be used (missing, corrupt, wrong format, unsafe). One line, shown as is."""


def atomic_write_bytes(path: str | Path, data: bytes):
    """Write to a temp file in the same folder, fsync, rename: readers see the old file or the new
    one, never half of one. On failure (disk full...) the temp file is removed and the old file kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _write_all(f, data: bytes):
    """The one place bytes hit the disk (tests inject faults here)."""
    f.write(data)


def save(path: str | Path, state: dict, keep_previous: bool = False):
    """Atomically write `state`. keep_previous moves the current file to `<name>.prev` first, so a
    damaged newest file still leaves one good one behind."""
    buf = io.BytesIO()
    torch.save(state, buf)
    blob = buf.getvalue()
    env = io.BytesIO()
    torch.save(
        {
            "format": FORMAT_VERSION,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "blob": torch.frombuffer(bytearray(blob), dtype=torch.uint8),
        },
        env,
    )
    path = Path(path)
    if keep_previous and path.exists():
        keep_as_previous(path)
    atomic_write_bytes(path, env.getvalue())


def keep_as_previous(path: Path):
    """`<name>.prev` becomes the current file, which stays where it is: a hard link (a copy where links
    are refused) put in place by a rename. `path` is never missing, even for a kill between this and
    the new file's rename (moving it aside would leave that window open for a whole write and fsync)."""
    prev = previous_path(path)
    if prev.exists() and os.path.samefile(path, prev):
        return  # already (the last write failed): and rename() of a link onto its twin is a no-op
    tmp = prev.with_name(f".{prev.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copy2(path, tmp)
            _fsync_file(tmp)  # a copy is new data: durable before it replaces the old .prev
        os.replace(tmp, prev)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_file(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_leftover_temps(folder: Path) -> list[str]:
    """Delete the temporary files of writes a kill -9 interrupted (`.last.pt.XXXX.tmp`, a whole state
    each; `.last.pt.prev.<pid>.tmp`): never renamed into place, they would only fill the disk. Called
    when a run starts or resumes in `folder`, before it writes anything. Returns their names."""
    gone = []
    for sub in (folder, folder / "top"):
        for tmp in sorted(sub.glob(".*.tmp")) if sub.is_dir() else []:
            tmp.unlink(missing_ok=True)
            gone.append(str(tmp.relative_to(folder)))
    return gone


def previous_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".prev")


def load(path: str | Path, map_location="cpu") -> dict:
    """Verified load. Raises CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        env = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused, it holds objects other than tensors and plain data "
            f"(not loaded: {str(e).splitlines()[0][:120]})"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable or truncated ({e.__class__.__name__})") from None
    if not isinstance(env, dict) or "blob" not in env or "sha256" not in env:
        raise CheckpointError(f"{path}: not a ganlab checkpoint")
    if env.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {env.get('format')!r}, this ganlab reads {FORMAT_VERSION}")
    blob = env["blob"].numpy().tobytes()
    if hashlib.sha256(blob).hexdigest() != env["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt")
    try:
        return torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused, the state holds objects other than tensors and plain data "
            f"({str(e).splitlines()[0][:120]})"
        ) from None


def load_latest_good(path: str | Path, map_location="cpu", warn=print) -> tuple[dict, Path]:
    """`path`, or its `.prev` when `path` is damaged (saying so)."""
    try:
        return load(path, map_location), Path(path)
    except CheckpointError as e:
        prev = previous_path(path)
        if prev.exists():
            warn(f"{e}; using the previous checkpoint {prev}")
            return load(prev, map_location), prev
        raise
