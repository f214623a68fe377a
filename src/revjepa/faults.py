"""Crash injection for the recovery tests, off unless REVJEPA_CRASH is set.

REVJEPA_CRASH="phase:key" kills the process with SIGKILL (no clean-up can run) at that point:
  step:N                     after step N's backward pass, before its optimizer update
  save:checkpoint_step_N.pt  while that checkpoint is being written (temporary file half written)
  metrics:N                  while step N's metrics.jsonl record is being written (half a line)
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("REVJEPA_CRASH")


def crash_requested(phase: str, key: object) -> bool:
    return _SPEC is not None and _SPEC == f"{phase}:{key}"


def crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
