"""SLURM scripts without a cluster: shell-checked, runnable as plain batch scripts, and their
signal handling with a stand-in `scontrol` (tests/test_slurm_real.py runs them under a real SLURM)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from revjepa.data import GenConfig, generate, write_generated

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "train_jepa_osc.sh",
    "test_jepa_osc.sh",
    "run",
    ".ci/run",
    "scripts/gpu_check.sh",
    "scripts/slurm_local.sh",
]
TINY = "--n_layer 1 --n_embd 32 --n_head 2 --batch_size 16 --device cpu --eval_steps 5"


def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck not installed")
    proc = subprocess.run([shellcheck, *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_sbatch_lines_have_no_personal_settings():
    for name in ("train_jepa_osc.sh", "test_jepa_osc.sh"):
        text = (REPO / name).read_text()
        active = [line for line in text.splitlines() if line.startswith("#SBATCH")]
        assert not any("--account" in line or "--partition" in line for line in active)
        assert "/fs/" not in text and "herb" not in text
    assert "#SBATCH --signal=B:USR1@120" in (REPO / "train_jepa_osc.sh").read_text()


@pytest.fixture()
def slurm_env(tmp_path) -> dict[str, str]:
    """A fake SLURM around the script: scontrol records its calls; python is the test's venv."""
    data = tmp_path / "data"
    write_generated(generate(GenConfig(num_ga_entities=200, num_rel_pairs=2, test_size=40)), data)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    (bin_dir / "scontrol").chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(
        f'export PATH="{Path(sys.executable).parent}:{bin_dir}:$PATH"\n'
    )
    env = dict(os.environ)
    env.pop("REVJEPA_CRASH", None)
    env.update(
        REPO_DIR=str(REPO),
        DATA_DIR=str(data),
        VENV=str(venv),
        SLURM_JOB_ID="4242",
        OUTPUT_DIR=str(tmp_path / "run"),
        GPUS_PER_NODE="1",
        PATH=f"{bin_dir}:{env['PATH']}",
    )
    return env


def start_until_metrics(env: dict[str, str], metrics: Path) -> subprocess.Popen:
    """train_jepa_osc.sh started as a batch job would be, once its trainer has logged a step."""
    proc = subprocess.Popen(
        ["bash", str(REPO / "train_jepa_osc.sh")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    return proc


def test_train_script_requeues_on_usr1_and_the_requeued_job_resumes(slurm_env, tmp_path):
    env = dict(slurm_env, EXTRA_ARGS=f"{TINY} --max_steps 400 --log_interval 2 --save_steps 1000")
    proc = start_until_metrics(env, tmp_path / "run" / "metrics.jsonl")
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` does
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    ckpts = list((tmp_path / "run" / "checkpoints").glob("checkpoint_step_*.pt"))
    assert len(ckpts) == 1
    stopped = int(ckpts[0].stem.split("_")[-1])
    assert 0 < stopped < 400

    # the requeued job runs the same script again and continues from the checkpoint
    env["EXTRA_ARGS"] = f"{TINY} --max_steps {stopped + 4} --log_interval 2 --save_steps 1000"
    again = subprocess.run(
        ["bash", str(REPO / "train_jepa_osc.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert f"resumed from {ckpts[0]} at step {stopped}" in again.stdout
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == stopped + 4


def test_train_script_does_not_requeue_on_term(slurm_env, tmp_path):
    """TERM is a cancel (or SLURM's own preemption, which requeues by itself): checkpoint, end."""
    env = dict(slurm_env, EXTRA_ARGS=f"{TINY} --max_steps 100000 --log_interval 2")
    proc = start_until_metrics(env, tmp_path / "run" / "metrics.jsonl")
    proc.send_signal(signal.SIGUSR1)  # the pre-timeout warning first...
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # ...then a cancel: the cancel wins
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert not (tmp_path / "scontrol.log").exists()
    state = json.loads((tmp_path / "run" / "run_state.json").read_text())
    assert state["state"] == "stopped"
    ckpts = list((tmp_path / "run" / "checkpoints").glob("checkpoint_step_*.pt"))
    assert [int(p.stem.split("_")[-1]) for p in ckpts] == [state["step"]]


def test_requeued_job_of_a_finished_run_is_a_no_op(slurm_env, tmp_path):
    """A job requeued (or resubmitted) after its run finished: exit 0, nothing written."""
    env = dict(slurm_env, EXTRA_ARGS=f"{TINY} --max_steps 6 --log_interval 2")
    for attempt in range(2):
        proc = subprocess.run(
            ["bash", str(REPO / "train_jepa_osc.sh")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        if attempt == 0:
            before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert "the run is already at step 6 (--max_steps 6)" in proc.stdout
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before
    assert json.loads((tmp_path / "run" / "run_state.json").read_text())["state"] == "finished"
    assert not (tmp_path / "scontrol.log").exists()


def test_quick_test_script_trains_and_evaluates(slurm_env, tmp_path):
    # test_jepa_osc.sh has no EXTRA_ARGS: run it on the tiny dataset as written (1 epoch)
    proc = subprocess.run(
        ["bash", str(REPO / "test_jepa_osc.sh")],
        cwd=REPO,
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["splits"]) == {"train", "atomic", "test"}


def test_gpu_check_script_smoke_runs_on_cpu(tmp_path):
    """scripts/gpu_check.sh is what a GPU session runs in its few minutes: its training, resume,
    evaluation and profiler stages must work before they get there (tiny sizes, CPU)."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(
        os.environ,
        OUT=str(out),
        WORK=str(work),
        STAGES="e2e profile",
        STEPS="8",
        PROFILE_VARIANTS="eager",
        GEN_EXTRA="--num_ga_entities 400 --test_size 50",
        TRAIN_EXTRA="--n_layer 1 --n_embd 32 --n_head 2 --batch_size 32 --device cpu",
        PY=sys.executable,
        DEADLINE_S="600",
    )
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True
    )
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "=== e2e rc=0" in log and "=== profile rc=0" in log, log[-3000:]
    # one thread (conftest): the resumed run must match the uninterrupted one exactly
    assert "RESUME uninterrupted vs resumed halfway: max |dw| = 0.0 " in log
    results = json.loads((out / "eval_A.json").read_text())
    assert results["step"] == 8 and list(results["splits"]) == ["train", "atomic", "test"]
    assert all(0 < split["mrr"] <= 1 for split in results["splits"].values())
    profile = json.loads((out / "profile.json").read_text())
    assert profile["eager"]["ms_per_step"] > 0 and "failed" not in profile["eager"]
