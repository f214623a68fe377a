"""Progress bars of long evaluations: a tqdm bar on stderr (items/s and an ETA), shown only when
it helps. `--progress auto` (the default) shows it when stderr is a terminal, so SLURM logs and
CI output stay clean; `on` / `off` force it. A bar appears only after `DELAY_S` seconds, so
evaluations that finish quickly print nothing."""

from __future__ import annotations

import sys
from typing import Any

PROGRESS_CHOICES = ("auto", "on", "off")
DELAY_S = 2.0  # seconds before a bar is drawn: "takes more than a few seconds"


def progress_enabled(mode: str, stream: Any = None) -> bool:
    """Whether `--progress MODE` shows bars on `stream` (default stderr)."""
    if mode not in PROGRESS_CHOICES:
        raise ValueError(f"progress mode must be one of {PROGRESS_CHOICES}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Bar:
    """A progress bar that may be off: `update(n)` and `close()` are no-ops then."""

    def __init__(self, enabled: bool, total: int, desc: str, unit: str, leave: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=desc, unit=unit, leave=leave, delay=DELAY_S,
                file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
            )  # fmt: skip

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_description(self, desc: str) -> None:
        if self._bar is not None:
            self._bar.set_description(desc)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """The bars of one command: `bar(total, desc)` opens one (or a silent one when off)."""

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled

    def bar(self, total: int, desc: str, unit: str = "item", leave: bool = True) -> Bar:
        return Bar(self.enabled, total, desc, unit, leave)


NO_PROGRESS = Progress(False)
SILENT = Bar(False, 0, "", "item", False)  # a bar that shows nothing
