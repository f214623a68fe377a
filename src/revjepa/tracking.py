"""Experiment trackers (`--report_to`): every scalar of every `metrics.jsonl` record goes to each
backend at the record's step, from the main process only.

Tags: a training key `k` is `train/k`, an evaluation key `eval_<split>_<metric>` is
`eval/<split>_<metric>` (booleans such as `collapse` as 0/1; `step` is the x axis, not a tag).

- TensorBoard (`torch.utils.tensorboard`): event files in `RUN_DIR/tensorboard/`, flushed at
  every record. A resumed run opens its writer with `purge_step` = the resumed step + 1, so the
  steps a crashed session wrote past its checkpoint are dropped by TensorBoard's reader and the
  resumed run's values are the only ones.
- W&B (optional extra `revjepa[wandb]`, imported only when asked for): offline unless the
  environment sets `WANDB_MODE`; the run id is kept in the checkpoints and a resumed run
  continues the same run (`resume="allow"`). W&B cannot take a step back, so a resumed session
  skips the steps the crashed one had already logged (the highest step of `metrics.jsonl`
  before it was cut back): every step appears once.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import secrets
import string
from pathlib import Path
from typing import Any, Protocol

from .config import RESUMABLE_OVERRIDES, RunConfig, report_backends
from .errors import UserError

# backend -> (module imported, pip package, extra of revjepa)
REQUIREMENTS = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb", "wandb"),
}


def check_backends(report_to: str) -> tuple[str, ...]:
    """The requested backends, each importable; else UserError naming the package and the extra
    (called before the run writes any file)."""
    names = report_backends(report_to)
    for name in names:
        module, package, extra = REQUIREMENTS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(
                f"--report_to {name} needs the {package} package: pip install {package} "
                f"(or pip install 'revjepa[{extra}]')"
            ) from None
    return names


def tag_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars (non-numeric values are left out)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, (str, list, dict)) or value is None:
            continue
        tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
        out[tag] = float(value)
    return out


def seedless_group(config: RunConfig) -> str:
    """A W&B group for the seeds of one configuration: the configuration without the seed and
    without the fields that do not change the run (paths, intervals, trackers), hashed."""
    data = config.to_dict()
    for name in (*RESUMABLE_OVERRIDES, "seed", "preset"):
        data["train"].pop(name, None)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
    m, o = config.model, config.objective
    jepa = o.distance_metric if o.jepa_active else "ntp"
    return f"{m.family}-{jepa}-d{m.n_embd}-{digest}"


def new_run_id() -> str:
    """A W&B run id (8 characters of [a-z0-9], as W&B makes them; not from torch's RNG, which
    would change the run)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class Backend(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self, ok: bool) -> None: ...


class TensorBoardBackend:
    def __init__(self, log_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at steps >= it (written by a crashed session past the
        # checkpoint resumed from) are discarded by TensorBoard's reader
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # one write per log record: a crash loses nothing logged

    def close(self, ok: bool) -> None:  # noqa: ARG002
        self.writer.close()


def wandb_settings(config: RunConfig) -> dict[str, Any]:
    """Project, group and name: the flag, else W&B's environment variable, else our default."""
    tc, env = config.train, os.environ
    return {
        "project": tc.wandb_project or env.get("WANDB_PROJECT") or "revjepa",
        "group": tc.wandb_group or env.get("WANDB_RUN_GROUP") or seedless_group(config),
        "name": tc.wandb_name or env.get("WANDB_NAME") or Path(tc.output_dir).resolve().name,
    }


class WandbBackend:
    def __init__(
        self, config: RunConfig, output_dir: Path, run_id: str | None, logged_through: int
    ) -> None:
        import wandb

        # a new W&B run (no id in the checkpoint) holds no step yet
        self.logged_through = logged_through if run_id else 0
        kwargs: dict[str, Any] = dict(
            wandb_settings(config),
            id=run_id or new_run_id(),
            resume="allow",
            dir=str(output_dir) if "WANDB_DIR" not in os.environ else None,
            config=config.to_dict(),
            # our own training.log is the console record; W&B wrapping stdout would also
            # fight the progress bar
            settings=wandb.Settings(console="off"),
        )
        if "WANDB_MODE" not in os.environ:
            kwargs["mode"] = "offline"  # compute nodes often have no internet: sync later
        self.run = wandb.init(**kwargs)
        self.run_id: str = self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step > self.logged_through:
            self.run.log(scalars, step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class Tracker:
    """The run's backends (possibly none): `log(record)` after each metrics.jsonl record."""

    def __init__(self, backends: list[Backend], wandb_run_id: str | None) -> None:
        self.backends = backends
        self.wandb_run_id = wandb_run_id  # carried in checkpoints even while W&B is off

    def log(self, record: dict[str, Any]) -> None:
        if not self.backends:
            return
        scalars, step = tag_scalars(record), int(record["step"])
        for backend in self.backends:
            backend.log(step, scalars)

    def close(self, ok: bool) -> None:
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.close(ok)


def open_tracker(
    config: RunConfig,
    output_dir: Path,
    start_step: int,
    state: dict[str, Any] | None,
    logged_through: int,
) -> Tracker:
    """The backends of `--report_to` for the main process of a run starting at `start_step`
    (`state`: the checkpoint resumed from, for the W&B run id)."""
    run_id = (state or {}).get("wandb_run_id")
    backends: list[Backend] = []
    try:
        for name in report_backends(config.train.report_to):
            if name == "tensorboard":
                backends.append(TensorBoardBackend(output_dir / "tensorboard", start_step))
            else:
                wb = WandbBackend(config, output_dir, run_id, logged_through)
                run_id = wb.run_id
                backends.append(wb)
    except BaseException:
        Tracker(backends, run_id).close(False)
        raise
    return Tracker(backends, run_id)
