"""The files of a run directory besides checkpoints: JSONL records (`metrics.jsonl`,
`eval_all.jsonl`), `run_state.json`, and the one-trainer-per-directory lock."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError, one_line
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


def write_run_state(
    output_dir: Path, state: str, step: int, max_steps: int, signum, error: str | None = None
) -> None:
    """`run_state.json`: running / finished / stopped (by a signal) / failed (with the error's
    line), written atomically. The SLURM script reads it to requeue only a run that a signal
    stopped short of --max_steps."""
    record = {"state": state, "step": step, "max_steps": max_steps, "time": time.time()}
    if signum is not None:
        record["signal"] = signal.Signals(signum).name
    if error is not None:
        record["error"] = error
    tmp = output_dir / f".{RUN_STATE}.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, output_dir / RUN_STATE)


def error_line(exc: BaseException) -> str:
    """The one line a failed run's `run_state.json` keeps: a UserError's message as the CLI
    prints it, `Type: first line` for anything else."""
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, UserError):
        return first[:500]
    return one_line(exc, 500) if first else type(exc).__name__


@contextmanager
def failure_recorded(
    output_dir: Path | None, step: Callable[[], int], max_steps: int, lock: RunLock | None
) -> Iterator[None]:
    """Write `run_state.json` = failed (step, error line) when the body raises, release the
    run's lock (the traceback may keep the run alive in this process), then re-raise.
    `output_dir` None (not the main process) records nothing."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as exc:
        if output_dir is not None:
            try:
                write_run_state(output_dir, "failed", step(), max_steps, None, error_line(exc))
            except OSError:
                pass  # the original error matters more than its record
        if lock is not None:
            lock.release()
        raise


def lock_held(output_dir: Path, name: str = ".lock") -> bool:
    """Whether a trainer holds `output_dir`'s lock now. Probes with a shared non-blocking flock
    on a read-only descriptor: never creates or truncates `.lock`, and a trainer that starts
    during the probe's microseconds retries (RunLock)."""
    try:
        fd = os.open(output_dir / name, os.O_RDONLY)
    except OSError:
        return False  # no lock file: no trainer ever started here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class RunLock:
    """One trainer per output directory; the OS drops the lock when the process dies."""

    RETRIES = 10  # x 50 ms: outlasts a `revjepa status` probe (lock_held), not a trainer

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / ".lock"
        self.fh = open(self.path, "a+")
        for attempt in range(self.RETRIES + 1):
            try:
                fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if attempt < self.RETRIES:
                    time.sleep(0.05)
        else:
            self.fh.close()
            raise UserError(f"{output_dir}: another trainer is running in this directory")
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"{os.getpid()}\n")
        self.fh.flush()

    def release(self) -> None:
        """Give the directory up (the file stays: removing it could race a new trainer)."""
        self.fh.close()


def loss_term_keys(records: list[dict[str, Any]]) -> list[str]:
    """The `<term>_loss` keys of a run's training records, in first-seen order: each named loss
    term of its family (`ntp_loss`, `jepa_loss`, `mlm_loss`, ...), not the total nor the
    evaluations' `eval_*` keys."""
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            if key.endswith("_loss") and key != "loss" and not key.startswith("eval_"):
                seen.setdefault(key)
    return list(seen)
