"""`--cpu_kernels on|off`: the C kernels are an explicit opt-in, applied once at set-up and
recorded; the default run is plain torch ops whatever the machine's compiler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import revjepa.cpu.fastpath as fastpath
import revjepa.cpu.kernels as kernels
from revjepa.cli import main
from revjepa.config import RunConfig
from revjepa.cpu import setup_cpu_kernels, uses_cpu_kernels
from revjepa.data import GenConfig, generate, write_generated
from revjepa.distributed import Dist
from revjepa.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# a tiny model with dropout 0.1: the dropout draws are where the two paths part
SMALL = [
    *("--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--batch_size", "64"),
    *("--learning_rate", "1e-3", "--dropout", "0.1", "--log_interval", "3", "--seed", "5"),
    *("--max_steps", "6", "--eval_steps", "6", "--save_steps", "6", "--save_step_dense", "0"),
]

needs_kernels = pytest.mark.skipif(
    kernels.library() is None, reason="no C compiler: the kernels could not be built"
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_generated(generate(GenConfig(num_ga_entities=400, num_rel_pairs=2, test_size=60)), d)
    return d


def _args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data_dir", str(data_dir), "--output_dir", str(out), *SMALL, *extra]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    path = out / "checkpoints" / "checkpoint_step_6.pt"
    return torch.load(path, weights_only=True)["model_state_dict"]


def _config(out: Path) -> dict:
    path = out / "checkpoints" / "checkpoint_step_6.pt"
    return torch.load(path, weights_only=True)["config"]


def _training_args(out: Path) -> dict:
    return json.loads((out / "training_args.json").read_text())


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _never_load(*_args, **_kwargs):
    raise AssertionError("the C kernels were built or loaded")


# ----------------------------------------------------------------------------- the default

# A default run in a process that has no C compiler at all: $CC names none and PATH holds no
# cc or gcc. It checks afterwards that the library never came near the process.
_NO_COMPILER = """
import sys
from pathlib import Path
from revjepa.cli import main
rc = main(sys.argv[1:])
from revjepa.cpu import hostmem, kernels
assert "cpu_kernels-" not in Path("/proc/self/maps").read_text(), "library mapped"
assert kernels._state == {}, kernels._state
assert hostmem._malloc_tuned is False
sys.exit(rc)
"""


def test_default_run_never_loads_the_kernels_and_is_the_same_without_a_compiler(
    data_dir, tmp_path, monkeypatch
):
    for name in ("load", "_load", "build"):
        monkeypatch.setattr(kernels, name, _never_load)
    here = tmp_path / "here"
    assert main(_args(data_dir, here)) == 0  # this machine, compiler or not
    args = _training_args(here)
    assert args["train"]["cpu_kernels"] == "off" and args["resolved"]["cpu_kernels"] is False
    assert _config(here)["train"]["cpu_kernels"] == "off"

    bare = tmp_path / "bare"
    empty = tmp_path / "empty-path"
    empty.mkdir()
    env = {
        **os.environ,
        "CC": str(tmp_path / "no-such-cc"),
        "PATH": str(empty),
        "REVJEPA_KERNEL_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _NO_COMPILER, *_args(data_dir, bare)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cpu_kernels" not in proc.stderr and "C kernels" not in proc.stdout
    assert not (tmp_path / "cache").exists()
    assert _training_args(bare)["resolved"]["cpu_kernels"] is False
    assert _same(_weights(here), _weights(bare))  # bit for bit, dropout 0.1


# ----------------------------------------------------------------------------- on


@needs_kernels
def test_cpu_kernels_on_is_recorded_and_used(data_dir, tmp_path, monkeypatch):
    calls = []
    real = fastpath._lib

    def counting():
        calls.append(1)
        return real()

    monkeypatch.setattr(fastpath, "_lib", counting)
    on = tmp_path / "on"
    assert main(_args(data_dir, on, "--cpu_kernels", "on")) == 0
    args = _training_args(on)
    assert args["train"]["cpu_kernels"] == "on" and args["resolved"]["cpu_kernels"] is True
    assert _config(on)["train"]["cpu_kernels"] == "on"
    # per step: 5 dropout draws, attention, GELU and the residuals forward and backward, and
    # the head's cross-entropy
    assert len(calls) > 6 * 10
    calls.clear()
    off = tmp_path / "off"
    assert main(_args(data_dir, off)) == 0
    assert calls == []  # the default run in the same process: no kernel call
    # the same run with the kernels' dropout draws is another draw
    assert not _same(_weights(on), _weights(off))
    # not a resumable override: a resume keeps the run's choice (and is bit for bit the
    # uninterrupted run), and a conflicting flag is refused with the usual one line
    part = tmp_path / "part"
    assert main(_args(data_dir, part, "--cpu_kernels", "on", "--max_steps", "3")) == 0
    resume = ["train", "--output_dir", str(part), "--resume_from", "latest", "--max_steps", "6"]
    assert main([*resume, "--cpu_kernels", "off"]) == 2
    assert main(resume) == 0
    assert _training_args(part)["resolved"]["cpu_kernels"] is True
    assert _same(_weights(on), _weights(part))


def test_cpu_kernels_on_without_a_compiler_warns_once_and_runs_torch_ops(
    data_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(kernels, "_state", {})  # this process never tried to build them
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    on = tmp_path / "on"
    assert main(_args(data_dir, on, "--cpu_kernels", "on")) == 0
    said = [ln for ln in capsys.readouterr().out.splitlines() if "--cpu_kernels" in ln]
    assert len(said) == 1, said
    assert "does not apply here (the C kernels were not built: no C compiler" in said[0]
    log = (on / "training.log").read_text()
    assert log.count("--cpu_kernels on does not apply here") == 1
    args = _training_args(on)
    assert args["train"]["cpu_kernels"] == "on"  # what was asked for
    assert args["resolved"]["cpu_kernels"] is False  # what ran
    off = tmp_path / "off"
    assert main(_args(data_dir, off)) == 0
    assert _same(_weights(on), _weights(off))  # exactly the default run


@pytest.mark.parametrize(
    ("device", "compiled", "why"),
    [("cuda", False, "the device is cuda"), ("cpu", True, "torch.compile is on")],
)
def test_cpu_kernels_on_does_not_apply_to_other_devices_or_compiled_models(
    monkeypatch, device, compiled, why
):
    monkeypatch.setattr(kernels, "load", _never_load)
    said: list[str] = []
    model = torch.nn.Linear(2, 2)
    assert not setup_cpu_kernels(model, "on", torch.device(device), compiled, Dist(), said.append)
    assert not uses_cpu_kernels(model)
    assert len(said) == 1 and why in said[0], said
    assert not setup_cpu_kernels(model, "off", torch.device("cpu"), False, Dist(), said.append)
    assert len(said) == 1  # off: nothing to say


# ----------------------------------------------------------------------------- bad values


def test_bad_cpu_kernels_value_exits_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--output_dir", str(out), "--cpu_kernels", "maybe"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--cpu_kernels" in lines[0] and "maybe" in lines[0], lines
    assert not out.exists()
    cfg = RunConfig()
    cfg.train.cpu_kernels = "yes"
    with pytest.raises(UserError, match="--cpu_kernels must be on or off"):
        cfg.validate()
