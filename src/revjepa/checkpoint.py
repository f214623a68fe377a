"""Checkpoints: atomic save with a content checksum, verified `weights_only` load, find latest.

A checkpoint is a plain dict (seed key names: model_state_dict, optimizer_state_dict,
scheduler_state_dict, step, epoch) of tensors and plain data only, so `torch.load(path,
weights_only=True)` reads it. `checksum` is a SHA-256 over every other entry; a truncated or
corrupted file is reported by name and skipped by `--resume_from latest`.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .faults import crash, crash_requested
from .schedule import checkpoint_steps, should_save

CHECKPOINT_RE = re.compile(r"^checkpoint_step_(\d+)\.pt$")
FORMAT = "revjepa-checkpoint-1"


def _feed(h: Any, obj: Any) -> None:
    """Hash an object tree deterministically (dict keys sorted, tensors by dtype/shape/bytes)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def content_checksum(state: dict[str, Any]) -> str:
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "checksum"})
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: temporary file, fsync, rename. Never leaves a partial `path`."""
    state = dict(state, format=FORMAT)
    state["checksum"] = content_checksum(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            if crash_requested("save", path.name):
                fh.truncate(fh.tell() // 2)
                fh.flush()
                crash()
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise UserError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _load_quietly(path: Path) -> Any:
    """torch.load whose warnings reach the user only when the load succeeds.

    A corrupted file whose first bytes happen to look like a pickle header makes torch warn
    about the protocol before it fails; that warning is noise next to our one-line error.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = torch.load(path, map_location="cpu", weights_only=True)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return state


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Load with weights_only=True and verify the checksum; UserError naming the file if bad."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = _load_quietly(path)
    except (
        RuntimeError,
        EOFError,
        OSError,
        zipfile.BadZipFile,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
    ) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{path}: not a readable checkpoint (truncated or corrupted?): {first[:200]}"
        ) from None
    except Exception as exc:  # unpickling errors have no common base class
        raise UserError(f"{path}: not a loadable checkpoint: {type(exc).__name__}") from None
    if not isinstance(state, dict) or "model_state_dict" not in state or "config" not in state:
        raise UserError(f"{path}: not a revjepa checkpoint (model_state_dict/config missing)")
    if verify and "checksum" in state and content_checksum(state) != state["checksum"]:
        raise UserError(f"{path}: checksum mismatch: the checkpoint is corrupted")
    return state


def remove_stale_temporaries(directory: Path) -> None:
    """Delete temporary files of saves that were killed midway (never a user's file)."""
    if directory.is_dir():
        for p in directory.glob(".*.pt.tmp-*"):
            p.unlink(missing_ok=True)


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """`checkpoint_step_*.pt` files in a directory, by step."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        match = CHECKPOINT_RE.match(p.name)
        if match:
            found.append((int(match.group(1)), p))
    return sorted(found)


def find_latest_valid(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """Newest checkpoint that loads and verifies; invalid ones are reported and skipped."""
    for _step, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except UserError as exc:
            print(f"skipping invalid checkpoint: {exc}", file=sys.stderr)
    return None


class Checkpointer:
    """A run's checkpoints: the dense-then-sparse schedule, `best_model.pt` (the best headline
    metric so far), stale temporaries of killed saves, and the state assembled from the
    run's stateful objects. Only the main process writes."""

    def __init__(self, ckpt_dir: Path, train_cfg: Any, max_steps: int, main: bool) -> None:
        self.dir, self.main, self.max_steps = ckpt_dir, main, max_steps
        tc = train_cfg
        self.schedule = (tc.save_steps, tc.save_step_dense, tc.save_step_dense_interval)
        self.best = -math.inf

    def prepare(self) -> None:
        if self.main:
            self.dir.mkdir(exist_ok=True)
            remove_stale_temporaries(self.dir)

    def due(self, step: int) -> bool:
        return should_save(step, *self.schedule, self.max_steps)

    def planned_after(self, step: int) -> int:
        """How many scheduled checkpoints come after `step`."""
        save_steps, dense, interval = self.schedule
        return len(
            [s for s in checkpoint_steps(self.max_steps, save_steps, dense, interval) if s > step]
        )

    def improves(self, value: float) -> bool:
        """Record `value` as the best if it beats it (the best-model rule)."""
        if value > self.best:
            self.best = value
            return True
        return False

    def save_step(self, step: int, state: dict[str, Any]) -> Path:
        path = self.dir / f"checkpoint_step_{step}.pt"
        save_checkpoint(path, state)
        return path

    def save_best(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.dir / "best_model.pt", state)
