"""`--report_to`: TensorBoard event files (read back with tensorboard's own EventAccumulator) and
W&B offline run files (read back record by record) hold exactly the scalars of metrics.jsonl at
the same steps, also across resumes and a crash; a resumed W&B run keeps its id; a missing
package is one line and exit 2, before any file is written."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from revjepa.cli import main
from revjepa.config import report_backends
from revjepa.data import GenConfig, generate, write_generated
from revjepa.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
RUN = [
    *("--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--batch_size", "16"),
    *("--device", "cpu", "--dropout", "0", "--log_interval", "2", "--eval_steps", "6"),
    *("--save_steps", "8", "--save_step_dense", "0", "--max_steps", "24"),
]


def need(module: str) -> None:
    """Skip without the optional package, except in CI (`.[dev]` installs it): fail there."""
    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} is not installed (pip install -e '.[dev]')")
        pytest.skip(f"{module} is not installed (pip install 'revjepa[{module}]')")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_generated(generate(GenConfig(num_ga_entities=200, num_rel_pairs=2, test_size=40)), d)
    return d


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No account, no network: W&B's own files under tmp_path, WANDB_MODE unset (our default
    must make the run offline)."""
    for var in [v for v in os.environ if v.startswith("WANDB_")]:
        monkeypatch.delenv(var)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


def train_proc(data_dir: Path, out: Path, *extra: str, crash: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "REVJEPA_CRASH"}
    if crash:
        env["REVJEPA_CRASH"] = crash
    argv = ["-m", "revjepa", "train", "--data_dir", str(data_dir), "--output_dir", str(out)]
    return subprocess.run(
        [PY, *argv, *RUN, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def expected_scalars(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {tag: {step: value}}, by the documented tag rule."""
    out: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key == "step":
                continue
            tag = "eval/" + key[len("eval_") :] if key.startswith("eval_") else "train/" + key
            out.setdefault(tag, {})[record["step"]] = float(value)
    return out


def tb_scalars(path: Path) -> dict[str, dict[int, float]]:
    """What TensorBoard shows: its EventAccumulator over the directory (or one event file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: duplicated steps {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def as_float32(scalars: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """TensorBoard keeps float32 scalars: the JSONL values rounded the same way."""
    return {t: {s: float(np.float32(v)) for s, v in d.items()} for t, d in scalars.items()}


def same(a: dict[str, dict[int, float]], b: dict[str, dict[int, float]]) -> None:
    assert sorted(a) == sorted(b)
    for tag in a:
        assert sorted(a[tag]) == sorted(b[tag]), tag
        for step, value in a[tag].items():
            other = b[tag][step]
            assert value == other or (np.isnan(value) and np.isnan(other)), (tag, step)


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_holds_the_metrics_across_a_crash_and_resume(data_dir, tmp_path):
    """Killed after step 11 (records to step 10 written, checkpoint at 8), resumed from 8: the
    first session's event file holds steps 9-10 twice-written values would collide with; with
    purge_step TensorBoard's reader keeps the resumed run's ones, exactly metrics.jsonl."""
    need("tensorboard")
    out = tmp_path / "run"
    killed = train_proc(data_dir, out, "--report_to", "tensorboard", crash="step:11")
    assert killed.returncode == -9, killed.stderr
    first_file = sorted((out / "tensorboard").iterdir())
    assert len(first_file) == 1
    crashed = tb_scalars(first_file[0])
    assert max(crashed["train/loss"]) == 10  # past the checkpoint: these must not survive
    assert crashed["train/steps_per_s"][10] != 0
    done = train_proc(data_dir, out, "--report_to", "tensorboard", "--resume_from", "latest")
    assert done.returncode == 0, done.stderr
    assert len(list((out / "tensorboard").iterdir())) == 2
    want = as_float32(expected_scalars(out))
    assert sorted(want["train/loss"]) == list(range(2, 25, 2))
    assert sorted(want["eval/test_mrr"]) == [6, 12, 18, 24]
    got = tb_scalars(out / "tensorboard")
    same(got, want)
    # steps_per_s of step 10 is the resumed session's measurement, not the crashed one's
    assert got["train/steps_per_s"][10] == want["train/steps_per_s"][10]


# ----------------------------------------------------------------------------- W&B


def wandb_records(run_file: Path) -> list:
    """The records of an offline run's `run-<id>.wandb` (LevelDB log format: 32 KiB blocks,
    7-byte chunk headers; W&B's 7-byte file header first), parsed with W&B's protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks, partial = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            chunks.append(chunk)
        elif kind == 2:  # first
            partial = chunk
        elif kind == 3:  # middle
            partial += chunk
        elif kind == 4:  # last
            chunks.append(partial + chunk)
    records = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def wandb_run(run_dir: Path) -> dict:
    """One offline session: its run id, project/group/name and history {tag: {step: value}}."""
    (run_file,) = glob.glob(str(run_dir / "run-*.wandb"))
    info: dict = {"history": {}}
    for r in wandb_records(Path(run_file)):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            info.update(id=r.run.run_id, project=r.run.project, group=r.run.run_group)
            info["name"] = r.run.display_name
        elif kind == "history":
            # a key is in `key`, or (this W&B version) in `nested_key` as one element
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            step = r.history.step.num
            for tag, value in items.items():
                if not tag.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                    assert step not in info["history"].get(tag, {}), (tag, step)
                    info["history"].setdefault(tag, {})[step] = float(value)
    return info


SPEEDS = {"train/steps_per_s", "train/tokens_per_s", "train/mfu"}  # measured, not replayed


def test_wandb_offline_run_holds_the_metrics_and_a_resume_keeps_its_id(
    data_dir, tmp_path, wandb_env
):
    """Session 1 to step 12, session 2 resumed to 24 and killed after step 19 (checkpoint 16),
    session 3 resumed from 16: one W&B run id throughout (the checkpoints keep it), and the
    three offline sessions together hold every metrics.jsonl scalar exactly once: session 3
    re-sends from metrics.jsonl what the killed session had not flushed to disk."""
    need("wandb")
    need("tensorboard")
    import torch

    out = tmp_path / "run"
    wb = ["--report_to", "all", "--wandb_project", "revjepa-test"]
    first = train_proc(data_dir, out, *wb, "--max_steps", "12")
    assert first.returncode == 0, first.stderr
    resume = [*wb, "--resume_from", "latest"]
    killed = train_proc(data_dir, out, *resume, crash="step:19")
    assert killed.returncode == -9, killed.stderr
    third = train_proc(data_dir, out, *resume)
    assert third.returncode == 0, third.stderr
    sessions = sorted((out / "wandb").glob("offline-run-*"))  # named by start time
    assert len(sessions) == 3  # offline by default: no network was needed
    runs = [wandb_run(s) for s in sessions]
    ckpt = torch.load(out / "checkpoints" / "checkpoint_step_24.pt", weights_only=True)
    run_id = ckpt["wandb_run_id"]
    assert len(run_id) == 8 and all(s.name.endswith(f"-{run_id}") for s in sessions)
    for r in (runs[0], runs[2]):  # the killed session may not have flushed its run record
        assert r["id"] == run_id and r["project"] == "revjepa-test" and r["name"] == "run"
        assert r["group"].startswith("gpt2_jepa-cosine-d32-")
    assert set(runs[0]["history"]["train/loss"]) == set(range(2, 13, 2))
    assert {20, 22, 24} <= set(runs[2]["history"]["train/loss"]) <= set(range(14, 25, 2))
    want, merged = expected_scalars(out), {}
    for i, r in enumerate(runs):
        for tag, values in r["history"].items():
            for step, value in values.items():
                assert step not in merged.get(tag, {}), f"{tag} step {step} sent twice"
                merged.setdefault(tag, {})[step] = value
                if i == 1 and step > 16 and tag in SPEEDS:
                    continue  # the killed session's own measurement (metrics.jsonl: session 3)
                assert value == want[tag][step] or np.isnan(value), (tag, step, i)
    assert {t: sorted(d) for t, d in merged.items()} == {t: sorted(d) for t, d in want.items()}
    same(tb_scalars(out / "tensorboard"), as_float32(want))


def test_wandb_steps_on_disk_reads_the_sessions_of_one_run(tmp_path, wandb_env):
    """The reader behind the resume rule, on files W&B itself wrote (two sessions of one id,
    another run beside them)."""
    need("wandb")
    import wandb

    from revjepa.tracking import wandb_steps_on_disk

    for run_id, steps in (("aaaa1111", [2, 4, 6]), ("aaaa1111", [8, 10]), ("bbbb2222", [50])):
        run = wandb.init(
            project="p", id=run_id, resume="allow", mode="offline", dir=str(tmp_path),
            settings=wandb.Settings(console="off"),
        )  # fmt: skip
        for step in steps:
            run.log({"train/loss": 1.0 / step}, step=step)
        run.finish()
        # W&B names an offline session's directory by the second it started: two sessions of
        # one id within one second share it (a real resume is minutes apart); a fresh-clone CI
        # run once saw exactly that (the second session's steps missing)
        time.sleep(1.1)
    assert wandb_steps_on_disk(tmp_path / "wandb", "aaaa1111") == 10
    assert wandb_steps_on_disk(tmp_path / "wandb", "bbbb2222") == 50
    assert wandb_steps_on_disk(tmp_path / "wandb", "cccc3333") == 0


# ----------------------------------------------------------------------------- missing package


@pytest.mark.parametrize("backend,package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_missing_package_exits_2_before_writing_anything(data_dir, tmp_path, backend, package):
    """The package hidden as on a machine without it: `sys.modules[name] = None` makes every
    import of it (and of its submodules) raise ImportError."""
    out = tmp_path / "run"
    code = (
        "import sys\n"
        f"sys.modules[{package!r}] = None\n"
        "from revjepa.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["train", "--data_dir", str(data_dir), "--output_dir", str(out), *RUN]
    proc = subprocess.run(
        [PY, "-c", code, *argv, "--report_to", backend],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"needs the {package} package" in lines[0] and f"revjepa[{package}]" in lines[0]
    assert not out.exists()


def test_missing_package_on_resume_leaves_the_run_untouched(data_dir, tmp_path):
    out = tmp_path / "run"
    assert (
        main(["train", "--data_dir", str(data_dir), "--output_dir", str(out), *RUN[:-1], "8"]) == 0
    )
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code = (
        "import sys\n"
        "sys.modules['wandb'] = None  # import wandb -> ImportError\n"
        "from revjepa.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["train", "--output_dir", str(out), "--resume_from", "latest", "--max_steps", "24"]
    proc = subprocess.run(
        [PY, "-c", code, *argv, "--report_to", "wandb"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "pip install 'revjepa[wandb]'" in proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_report_to_values():
    assert report_backends("none") == ()
    assert report_backends("all") == ("tensorboard", "wandb")
    assert report_backends("wandb, tensorboard,wandb") == ("wandb", "tensorboard")
    for bad in ("", "mlflow", "none,wandb", "all,wandb"):
        with pytest.raises(UserError, match="--report_to"):
            report_backends(bad)


def test_bad_report_to_is_one_line_exit_2(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data_dir", str(data_dir), "--output_dir", str(out), *RUN]
    assert main([*argv, "--report_to", "tensorbord"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--report_to 'tensorbord'" in err[0]
    assert not out.exists()


def test_seedless_group_joins_seeds_and_separates_configurations():
    from revjepa.config import RunConfig, apply_overrides
    from revjepa.tracking import seedless_group

    def group(**train) -> str:
        return seedless_group(apply_overrides(RunConfig(), {"train": train}))

    base = group(seed=1, output_dir="runs/a", data_dir="/x/data/d1")
    assert group(seed=2, output_dir="runs/b", data_dir="/y/d1", log_interval=7) == base
    assert group(seed=1, output_dir="runs/a", data_dir="/x/data/d2") != base
    assert group(seed=1, output_dir="runs/a", data_dir="/x/data/d1", learning_rate=3e-4) != base
    assert base.startswith("gpt2_jepa-cosine-d768-")
