"""The files of a run directory besides checkpoints: JSONL records (`metrics.jsonl`,
`eval_all.jsonl`), `run_state.json`, and the one-trainer-per-directory lock."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from .errors import UserError
from .faults import crash, crash_requested

RUN_STATE = "run_state.json"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a half-written last line (killed writer) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    line = json.dumps(record, allow_nan=True) + "\n"
    with open(path, "a") as fh:
        if crash_requested("metrics", record.get("step")):
            fh.write(line[: len(line) // 2])
            fh.flush()
            crash()
        fh.write(line)
        fh.flush()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records past `last_step` and any half-written line (exact metrics after resume)."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def write_run_state(output_dir: Path, state: str, step: int, max_steps: int, signum) -> None:
    """`run_state.json`: running / finished / stopped (by a signal), written atomically. The
    SLURM script reads it to requeue only a run that a signal stopped short of --max_steps."""
    record = {"state": state, "step": step, "max_steps": max_steps, "time": time.time()}
    if signum is not None:
        record["signal"] = signal.Signals(signum).name
    tmp = output_dir / f".{RUN_STATE}.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, output_dir / RUN_STATE)


class RunLock:
    """One trainer per output directory; the OS drops the lock when the process dies."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / ".lock"
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise UserError(f"{output_dir}: another trainer is running in this directory") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"{os.getpid()}\n")
        self.fh.flush()
