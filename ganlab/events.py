"""The run folder's own records: events.jsonl (one JSON object per decision, and a readable line in the
log) and metrics.jsonl. Apart from MLflow: `ganlab report` and anything else that reads a run folder
needs only these."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class JsonLines:
    """An append-only file of one JSON object per line, each with a "step". On resume, lines after
    the checkpoint's step are dropped: the resumed run writes them again, identically."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, rec: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(_plain(rec)) + "\n")


class Events(JsonLines):
    """One JSON object per decision in events.jsonl, and one readable line in the log."""

    def __init__(self, path: Path, quiet: bool = False, resume_step: int | None = None):
        super().__init__(path, resume_step)
        self.quiet = quiet

    def emit(self, step: int, kind: str, detail: str, **extra):
        self.write({"step": step, "kind": kind, "detail": detail, "time": time.time(), **extra})
        if not self.quiet or kind in ("error", "rollback", "early_stop", "collapse_signal", "finished"):
            print(
                f"\n[{kind}] step {step}: {detail}" if not self.quiet else f"[{kind}] step {step}: {detail}",
                file=sys.stderr,
                flush=True,
            )


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


def _plain(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in d.items()}


def read_events(run_dir: Path, name: str = "events.jsonl") -> list[dict]:
    p = Path(run_dir) / name
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []
