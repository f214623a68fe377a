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
  continues the same run (`resume="allow"`), each step sent once (`WandbBackend`).
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
from .runlog import read_jsonl

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
    without the fields that do not change the run (paths, intervals, trackers; the dataset by
    its directory's name), hashed."""
    data = config.to_dict()
    dataset = Path(config.train.data_dir).name  # the dataset, wherever it is mounted
    # as `revjepa report` groups runs: the run length is part of the configuration
    for name in (RESUMABLE_OVERRIDES - {"max_steps", "num_epochs"}) | {"seed", "preset"}:
        data["train"].pop(name, None)
    data["train"]["dataset"] = dataset
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


def wandb_root(output_dir: Path) -> Path:
    """Where W&B writes the run's session directories (`wandb/` under WANDB_DIR if set)."""
    return Path(os.environ.get("WANDB_DIR") or output_dir) / "wandb"


def wandb_steps_on_disk(root: Path, run_id: str) -> int:
    """The highest history step of run `run_id` in the local session directories (offline or
    online, `*-<id>/run-<id>.wandb`: W&B's transaction log, LevelDB log format: 32 KiB blocks
    of chunks with a 7-byte header, after a 7-byte file header, each record a protobuf). 0 if
    there is none. A killed session's file holds what W&B had flushed when it died."""
    from wandb.proto import wandb_internal_pb2 as pb

    best = 0
    for path in root.glob(f"*-{run_id}/run-{run_id}.wandb"):
        for chunk in _leveldb_records(path.read_bytes()):
            record = pb.Record()
            try:
                record.ParseFromString(chunk)
            except Exception:  # a torn last record of a killed writer  # noqa: BLE001
                continue
            if record.WhichOneof("record_type") == "history":
                best = max(best, int(record.history.step.num))
    return best


def _leveldb_records(data: bytes, block: int = 32768) -> list[bytes]:
    if data[:4] != b":W&B":
        return []
    pos, out, partial = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too short for a header: padding to the next block
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0 or pos + 7 + length > len(data):
            break  # zero padding or a torn chunk: the end of what was written
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # a full record
            out.append(chunk)
        elif kind == 2:  # first / middle / last pieces of one record
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            out.append(partial + chunk)
    return out


class WandbBackend:
    """One W&B run over all sessions of a training run. W&B cannot take a step back, so each
    step is sent once: a resumed session first finds the highest step its earlier sessions
    wrote to disk (`wandb_steps_on_disk`: a session killed mid-run keeps only what W&B had
    flushed), re-sends the metrics.jsonl records past it up to the resumed step, and skips
    the steps the killed session had already written."""

    def __init__(self, config: RunConfig, output_dir: Path, run_id: str | None) -> None:
        import wandb

        root = wandb_root(output_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.logged_through = wandb_steps_on_disk(root, run_id) if run_id else 0
        kwargs: dict[str, Any] = dict(
            wandb_settings(config),
            id=run_id or new_run_id(),
            resume="allow",
            dir=str(root.parent),
            config=config.to_dict(),
            # our own training.log is the console record; W&B wrapping stdout would also
            # fight the progress bar
            settings=wandb.Settings(console="off"),
        )
        if "WANDB_MODE" not in os.environ:
            kwargs["mode"] = "offline"  # compute nodes often have no internet: sync later
        self.run = wandb.init(**kwargs)
        self.run_id: str = self.run.id

    def replay(self, records: list[dict[str, Any]], through: int) -> None:
        """Send the records of steps up to `through` that the run does not hold yet."""
        for record in records:
            if record.get("step", 0) <= through:
                self.log(int(record["step"]), tag_scalars(record))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step > self.logged_through:
            self.run.log(scalars, step=step)
            self.logged_through = step

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
    config: RunConfig, output_dir: Path, start_step: int, state: dict[str, Any] | None
) -> Tracker:
    """The backends of `--report_to` for the main process of a run starting at `start_step`
    (`state`: the checkpoint resumed from, for the W&B run id), after metrics.jsonl was cut
    back to `start_step`."""
    run_id = (state or {}).get("wandb_run_id")
    backends: list[Backend] = []
    try:
        for name in report_backends(config.train.report_to):
            if name == "tensorboard":
                backends.append(TensorBoardBackend(output_dir / "tensorboard", start_step))
            else:
                wb = WandbBackend(config, output_dir, run_id)
                wb.replay(read_jsonl(output_dir / "metrics.jsonl"), start_step)
                run_id = wb.run_id
                backends.append(wb)
    except BaseException:
        Tracker(backends, run_id).close(False)
        raise
    return Tracker(backends, run_id)
