"""torchrun (DDP on CPU/gloo) equivalence, world-size changes on resume, and preemption signals."""

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
import torch

from revjepa.config import ModelConfig, ObjectiveConfig
from revjepa.data import GenConfig, epoch_permutation, generate, load_dataset, write_generated
from revjepa.families.gpt2_jepa import GPT2Jepa

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
COMMON = [
    "--n_layer",
    "1",
    "--n_embd",
    "32",
    "--n_head",
    "2",
    "--learning_rate",
    "1e-3",
    "--dropout",
    "0",
    "--seed",
    "5",
    "--device",
    "cpu",
]
SCHEDULE = [
    "--max_steps",
    "12",
    "--save_step_dense",
    "0",
    "--save_steps",
    "6",
    "--save_step_dense_interval",
    "6",
    "--eval_steps",
    "6",
    "--log_interval",
    "3",
]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("REVJEPA_CRASH", None)
    e["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    return e


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_generated(generate(GenConfig(num_ga_entities=200, num_rel_pairs=2, test_size=40)), d)
    return d


def single(data_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            PY,
            "train_jepa.py",
            "--data_dir",
            str(data_dir),
            "--output_dir",
            str(out),
            *COMMON,
            *extra,
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def torchrun(data_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            "train_jepa.py",
            "--data_dir",
            str(data_dir),
            "--output_dir",
            str(out),
            *COMMON,
            *extra,
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model_state_dict"]


# Weights of a 2-process run against one process with the same global batch: another float
# path (each rank's half-batch gradient, summed by the all-reduce), so the gradients differ in
# their last bits, and AdamW's first steps move every weight by about lr * g / (|g| + eps),
# which turns that noise on near-zero gradient elements into up to ~lr * noise / eps. Seen:
# 2e-6 to 3e-6 after 12 steps (lr 1e-3) on every kernel set tried, which used 32% of the 1e-5
# this was. 1e-4 is still 1/10 of a single step's move (lr): a missing all-reduce, a wrong data
# shard or a lost step moves weights by ~lr per step.
DDP_ATOL = 1e-4


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_match_one_process_with_the_same_global_batch(data_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = single(data_dir, one, "--batch_size", "32", *SCHEDULE)
    assert p1.returncode == 0, p1.stderr
    p2 = torchrun(data_dir, two, "--batch_size", "16", *SCHEDULE)
    assert p2.returncode == 0, p2.stderr[-3000:]
    # checkpoints written once, on the schedule; metrics written once
    names = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert names == ["best_model.pt", "checkpoint_step_12.pt", "checkpoint_step_6.pt"]
    rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    args = json.loads((two / "training_args.json").read_text())["resolved"]
    assert args["world_size"] == 2 and args["global_batch_size"] == 32
    assert (
        max_diff(
            weights(one / "checkpoints/checkpoint_step_12.pt"),
            weights(two / "checkpoints/checkpoint_step_12.pt"),
        )
        < DDP_ATOL
    )
    rows1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows1, rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["jepa_loss"] == pytest.approx(b["jepa_loss"], rel=1e-4, abs=1e-7)

    # a 2-process checkpoint resumes on 1 process (the per-process batch follows the world size)
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    for s in (12,):
        (resumed / "checkpoints" / f"checkpoint_step_{s}.pt").unlink()
    p3 = single(data_dir, resumed, "--resume_from", "latest", *SCHEDULE)
    assert p3.returncode == 0, p3.stderr
    assert (
        max_diff(
            weights(one / "checkpoints/checkpoint_step_12.pt"),
            weights(resumed / "checkpoints/checkpoint_step_12.pt"),
        )
        < DDP_ATOL
    )
    # an explicit per-process batch that changes the global batch is refused
    p4 = single(
        data_dir, resumed, "--resume_from", "latest", "--batch_size", "16", "--max_steps", "18"
    )
    assert p4.returncode == 2 and "global batch is 32" in p4.stderr


def test_infonce_negatives_are_per_rank(data_dir, tmp_path):
    """Under DDP each rank contrasts its items against its own batch slice only (documented)."""
    out = tmp_path / "two"
    p = torchrun(
        data_dir,
        out,
        "--batch_size",
        "16",
        "--distance_metric",
        "infonce",
        "--max_steps",
        "1",
        "--log_interval",
        "1",
        "--eval_steps",
        "100",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["jepa_loss"]

    ds = load_dataset(data_dir)
    torch.manual_seed(5)
    model = GPT2Jepa(
        ModelConfig(n_layer=1, n_embd=32, n_head=2, dropout=0.0),
        ObjectiveConfig(distance_metric="infonce"),
        ds.vocab,
        ds.entity_len,
    )
    idx = epoch_permutation(5, 0, len(ds.train))[:32]
    seq, kind = ds.train.seq[idx], ds.train.kind[idx]
    with torch.no_grad():
        halves = [model(seq[r * 16 : (r + 1) * 16], kind[r * 16 : (r + 1) * 16]) for r in (0, 1)]
        whole = model(seq, kind)
    per_rank = sum(float(h.sums["jepa"]) for h in halves) / sum(
        float(h.counts["jepa"]) for h in halves
    )
    gathered = float(whole.sums["jepa"]) / float(whole.counts["jepa"])
    assert logged == pytest.approx(per_rank, rel=1e-5)
    assert abs(per_rank - gathered) > 1e-3  # the two definitions really differ here


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "trainer exited early"
        if metrics.exists():
            rows = [x for x in metrics.read_text().splitlines() if x.strip()]
            if rows and json.loads(rows[-1])["step"] >= step:
                return
        time.sleep(0.05)
    raise AssertionError("trainer did not reach the step in time")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_checkpoints_and_resume_matches(data_dir, tmp_path, sig):
    long = [
        "--batch_size",
        "32",
        "--max_steps",
        "60",
        "--save_step_dense",
        "0",
        "--save_steps",
        "1000",
        "--save_step_dense_interval",
        "1000",
        "--eval_steps",
        "1000",
        "--log_interval",
        "2",
        "--dropout",
        "0.1",
    ]
    ref = tmp_path / "ref"
    p = single(data_dir, ref, *long)
    assert p.returncode == 0, p.stderr

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            PY,
            "train_jepa.py",
            "--data_dir",
            str(data_dir),
            "--output_dir",
            str(out),
            *COMMON,
            *long,
        ],
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(out / "metrics.jsonl", 4, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    ckpts = sorted(
        int(p.stem.split("_")[-1]) for p in (out / "checkpoints").glob("checkpoint_step_*.pt")
    )
    assert len(ckpts) == 1 and 4 <= ckpts[0] < 60
    assert f"checkpointed step {ckpts[0]}" in stdout
    p2 = single(data_dir, out, "--resume_from", "latest", *long)
    assert p2.returncode == 0, p2.stderr
    assert (
        max_diff(
            weights(ref / "checkpoints/checkpoint_step_60.pt"),
            weights(out / "checkpoints/checkpoint_step_60.pt"),
        )
        == 0.0
    )
