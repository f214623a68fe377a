"""The JEPA collapse alarm: the log records' `pred_mean_cos` (mean pairwise cosine of the batch's
JEPA embeddings, `families.base.collapse_signal`) staying above a threshold for a window of consecutive
log records means the embeddings of different items are nearly one vector, so a cosine JEPA
loss is satisfied trivially. The alarm warns once per episode, marks the records
(`collapse: true`) and never stops the run. Plain Python on one float per log record.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

SIGNAL = "pred_mean_cos"


class CollapseAlarm:
    """Consecutive collapsed log records. `window` 0 turns the alarm off. Its state goes into
    checkpoints, so a resumed run marks exactly the records an uninterrupted one would."""

    def __init__(self, threshold: float, window: int) -> None:
        self.threshold, self.window = threshold, window
        self.recent: deque[tuple[int, float]] = deque(maxlen=max(window, 1))
        self.streak = 0  # consecutive records above the threshold, up to the latest
        self.first_step: int | None = None  # the step at which the alarm first fired
        self.collapsed_records = 0  # records marked collapse: true so far

    def observe(self, record: dict[str, Any]) -> str | None:
        """Mark a training record (`collapse`: true/false) if it carries the signal; the warning
        line when the alarm fires at this record, else None."""
        if self.window <= 0 or SIGNAL not in record:
            return None
        cos, step = float(record[SIGNAL]), int(record["step"])
        if cos > self.threshold:  # NaN (a batch with < 2 JEPA items) is not collapsed
            self.streak += 1
            self.recent.append((step, cos))
        else:
            self.streak = 0
            self.recent.clear()
        collapsed = self.streak >= self.window
        record["collapse"] = collapsed
        if not collapsed:
            return None
        self.collapsed_records += 1
        if self.streak != self.window:
            return None  # the same episode: warned already
        if self.first_step is None:
            self.first_step = step
        values = ", ".join(f"{s}: {c:.4f}" for s, c in self.recent)
        std = record.get("pred_std")
        std_note = f"; pred_std {float(std):.3g}" if std is not None else ""
        return (
            f"JEPA collapse at step {step}: {SIGNAL} > {self.threshold:g} for the last "
            f"{self.window} log records ({values}){std_note}; the JEPA embeddings of different "
            "items are nearly the same vector (the run continues)"
        )

    def summary(self) -> str | None:
        """The final summary's line, or None if the alarm never fired."""
        if self.first_step is None:
            return None
        return (
            f"JEPA collapse alarm: first at step {self.first_step}, {self.collapsed_records} log "
            f"record(s) marked collapse: true ({SIGNAL} > {self.threshold:g} for "
            f"{self.window}+ consecutive records)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "recent": [list(x) for x in self.recent],
            "streak": self.streak,
            "first_step": self.first_step,
            "collapsed_records": self.collapsed_records,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent.clear()
        self.recent.extend((int(s), float(c)) for s, c in state["recent"])
        self.streak = int(state["streak"])
        self.first_step = None if state["first_step"] is None else int(state["first_step"])
        self.collapsed_records = int(state["collapsed_records"])


def collapse_summary(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """What a run's metrics.jsonl says about collapse (for `revjepa status`): the first step
    marked collapsed, how many records were, whether the latest record with the signal is,
    and that record's `pred_mean_cos`."""
    first, count, latest, last_cos = None, 0, None, math.nan
    for r in records:
        if SIGNAL not in r:
            continue
        last_cos = float(r[SIGNAL])
        latest = bool(r.get("collapse", False))
        if latest:
            count += 1
            first = r["step"] if first is None else first
    return {
        "collapse": first is not None,
        "collapse_first_step": first,
        "collapsed_records": count,
        "collapsed_now": bool(latest),
        "last_pred_mean_cos": None if math.isnan(last_cos) else last_cos,
    }
