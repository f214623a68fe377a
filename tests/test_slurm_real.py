"""The SLURM scripts under a real one-node SLURM (scripts/slurm_local.sh up), driven with the
real sbatch / squeue / scancel / scontrol from a fresh checkout of the repository.

Skipped with one line where no local cluster answers; under CI (CI=true, where .ci/run brings
the cluster up first) a missing cluster is a failure instead. Every job is a tiny model trained
for seconds on the CPU-only partition, submitted with the documented CPU overrides.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from revjepa.data import GenConfig, generate, write_generated

REPO = Path(__file__).resolve().parents[1]
SLURM_CONF = os.environ.get("SLURM_CONF", "/var/tmp/revjepa-slurm/slurm.conf")
# what the README tells a user to pass on a CPU-only partition (the node has 2 CPUs)
CPU_SBATCH = ["--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G"]
TINY = "--n_layer 1 --n_embd 32 --n_head 2 --batch_size 16 --device cpu --dropout 0"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def _cluster_problem() -> str | None:
    for cmd in ("sbatch", "squeue", "scancel", "scontrol", "sinfo"):
        if shutil.which(cmd) is None:
            return f"{cmd} not installed (scripts/slurm_local.sh up installs and starts SLURM)"
    if not Path(SLURM_CONF).exists():
        return f"no local SLURM configuration {SLURM_CONF} (run scripts/slurm_local.sh up)"
    proc = subprocess.run(
        ["sinfo", "-h", "-o", "%T"],
        env=dict(os.environ, SLURM_CONF=SLURM_CONF),
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.returncode != 0 or not {"idle", "mixed", "allocated"} & set(proc.stdout.split()):
        return f"local SLURM not answering (run scripts/slurm_local.sh up): {proc.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict:
    problem = _cluster_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-SLURM tests: {problem}")
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("slurm")
    checkout = root / "checkout"
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=False
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot make a fresh copy of the tracked files")
    for name in listed.stdout.split("\0"):
        if name and (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, checkout / name)
    data = root / "data"
    write_generated(generate(GenConfig(num_ga_entities=200, num_rel_pairs=2, test_size=40)), data)
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "activate").exists():  # not a venv: a shim that puts python first
        venv = root / "venv"
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "activate").write_text(
            f'export PATH="{Path(sys.executable).parent}:$PATH"\n'
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REVJEPA_", "SLURM_"))}
    env.update(SLURM_CONF=SLURM_CONF, DATA_DIR=str(data), VENV=str(venv), OMP_NUM_THREADS="1")
    return {"root": root, "checkout": checkout, "env": env}


def submit(cluster: dict, script: str, sbatch_args: list[str], **env: str) -> str:
    proc = subprocess.run(
        ["sbatch", "--parsable", *sbatch_args, script],
        cwd=cluster["checkout"],
        env={**cluster["env"], **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(cluster: dict, job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(cluster: dict, job: str, timeout: float = 240) -> dict[str, str]:
    """The job's final record. A requeued batch job starts again only when its old credential
    has expired (slurm_local.sh sets 10 s; SLURM's default is 120 s). Moving its start time to
    now instead makes slurmd refuse the launch ("Job credential revoked")."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(cluster, job)
        if info.get("JobState") in FINAL_STATES:
            return info
        time.sleep(0.3)
    raise AssertionError(f"job {job} did not end in {timeout} s: {job_info(cluster, job)}")


def wait_for_metrics(run: Path, job: str, cluster: dict, timeout: float = 120) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().strip():
            return
        info = job_info(cluster, job)
        if info.get("JobState") not in {"PENDING", "CONFIGURING", "RUNNING"}:
            log = log_of(cluster, "jepa_train", job)
            raise AssertionError(f"job {job} ended before any metrics: {info}\n{log[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"job {job} wrote no metrics in {timeout} s")


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def log_of(cluster: dict, prefix: str, job: str) -> str:
    path = cluster["checkout"] / "logs" / f"{prefix}_{job}.out"
    return path.read_text() if path.exists() else f"(no {path})"


def steps_of(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    path = run / "checkpoints" / f"checkpoint_step_{step}.pt"
    return torch.load(path, weights_only=True)["model_state_dict"]


def run_state(run: Path) -> dict:
    return json.loads((run / "run_state.json").read_text())


# ----------------------------------------------------------------------------- the tests


def test_both_scripts_complete_from_a_fresh_checkout_on_a_cpu_partition(cluster):
    """`logs/` ships with the checkout (SLURM opens --output before the script runs), and the
    documented CPU overrides replace the scripts' GPU request."""
    assert (cluster["checkout"] / "logs").is_dir()
    root = cluster["root"]
    train = submit(
        cluster,
        "train_jepa_osc.sh",
        CPU_SBATCH,
        OUTPUT_DIR=str(root / "full"),
        EXTRA_ARGS=f"{TINY} --max_steps 40 --eval_steps 20 --log_interval 10",
    )
    # test_jepa_osc.sh takes no EXTRA_ARGS: its own small model, 1 epoch of the tiny data
    quick = submit(cluster, "test_jepa_osc.sh", CPU_SBATCH, OUTPUT_DIR=str(root / "quick"))
    for job, prefix in ((train, "jepa_train"), (quick, "jepa_test")):
        info = wait_for(cluster, job)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log_of(
            cluster, prefix, job
        )[-3000:]
    assert run_state(root / "full")["state"] == "finished"
    assert steps_of(root / "full") == [10, 20, 30, 40]
    assert (root / "full" / "checkpoints" / "checkpoint_step_40.pt").exists()
    results = json.loads((root / "quick" / "results.json").read_text())
    assert set(results["splits"]) == {"train", "atomic", "test"}
    assert "done: " in log_of(cluster, "jepa_train", train)


def test_gpu_request_is_refused_by_a_cpu_partition(cluster):
    """As written, the scripts ask for a GPU: a CPU-only partition refuses it at submission."""
    proc = subprocess.run(
        ["sbatch", "--parsable", "train_jepa_osc.sh"],
        cwd=cluster["checkout"],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "Invalid generic resource (gres) specification" in proc.stderr


def test_usr1_checkpoints_requeues_and_ends_bit_identical(cluster):
    """`scancel --signal=USR1 --batch` (what --signal=B:USR1@120 sends before the time limit):
    the trainer checkpoints, the script requeues, the requeued job resumes and ends with the
    same weights as an uninterrupted job, and metrics.jsonl holds each step once."""
    root = cluster["root"]
    args = f"{TINY} --max_steps 1500 --log_interval 10 --save_steps 100000 --save_step_dense 0"
    args += " --eval_steps 500"
    whole = submit(
        cluster, "train_jepa_osc.sh", CPU_SBATCH, OUTPUT_DIR=str(root / "whole"), EXTRA_ARGS=args
    )
    cut = submit(
        cluster, "train_jepa_osc.sh", CPU_SBATCH, OUTPUT_DIR=str(root / "cut"), EXTRA_ARGS=args
    )
    wait_for_metrics(root / "cut", cut, cluster)
    subprocess.run(
        ["scancel", "--signal=USR1", "--batch", cut], env=cluster["env"], check=True, timeout=30
    )
    deadline = time.time() + 120
    while run_state(root / "cut")["state"] == "running":
        assert time.time() < deadline, "the trainer never stopped on USR1"
        time.sleep(0.1)
    stopped = run_state(root / "cut")
    assert stopped["state"] == "stopped" and stopped["signal"] == "SIGUSR1"
    assert 0 < stopped["step"] < 1500
    assert (root / "cut" / "checkpoints" / f"checkpoint_step_{stopped['step']}.pt").exists()

    info = wait_for(cluster, cut)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0")
    assert wait_for(cluster, whole)["JobState"] == "COMPLETED"
    log = log_of(cluster, "jepa_train", cut)  # --open-mode=append: both runs of the job
    assert f"requeueing job {cut}" in log
    assert f"at step {stopped['step']}" in log and "done: 1500 steps" in log
    assert run_state(root / "cut")["state"] == "finished"
    assert steps_of(root / "cut") == steps_of(root / "whole") == list(range(10, 1501, 10))
    a, b = final_weights(root / "cut", 1500), final_weights(root / "whole", 1500)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_scancel_ends_the_job_for_good(cluster):
    """A user's cancel (SIGTERM to the job) checkpoints and ends: never requeued."""
    run = cluster["root"] / "cancelled"
    job = submit(
        cluster,
        "train_jepa_osc.sh",
        CPU_SBATCH,
        OUTPUT_DIR=str(run),
        EXTRA_ARGS=f"{TINY} --max_steps 100000 --log_interval 10 --save_step_dense 0",
    )
    wait_for_metrics(run, job, cluster)
    subprocess.run(["scancel", job], env=cluster["env"], check=True, timeout=30)
    info = wait_for(cluster, job)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0")
    time.sleep(2)  # a requeue would show up as a new pending run of the same job
    assert job_info(cluster, job)["JobState"] == "CANCELLED"
    state = run_state(run)
    assert state["state"] == "stopped" and state["signal"] == "SIGTERM"
    assert (run / "checkpoints" / f"checkpoint_step_{state['step']}.pt").exists()
    assert "requeueing" not in log_of(cluster, "jepa_train", job)


def test_slurm_requeue_is_not_doubled_by_the_script(cluster):
    """SLURM's own requeue (what PreemptMode=REQUEUE does: SIGTERM, then back to the queue):
    the script does not requeue a second time, and the job resumes once and finishes."""
    run = cluster["root"] / "preempted"
    job = submit(
        cluster,
        "train_jepa_osc.sh",
        CPU_SBATCH,
        OUTPUT_DIR=str(run),
        EXTRA_ARGS=f"{TINY} --max_steps 1500 --log_interval 10 --save_step_dense 0 --eval_steps 500",
    )
    wait_for_metrics(run, job, cluster)
    subprocess.run(["scontrol", "requeue", job], env=cluster["env"], check=True, timeout=30)
    info = wait_for(cluster, job)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1")
    log = log_of(cluster, "jepa_train", job)
    assert "requeueing" not in log and log.count("resumed from") == 1
    assert run_state(run)["state"] == "finished"
    assert steps_of(run) == list(range(10, 1501, 10))


def test_job_array_tasks_train_their_own_runs(cluster):
    run = cluster["root"] / "array"
    job = submit(
        cluster,
        "train_jepa_osc.sh",
        [*CPU_SBATCH, "--array=0-1"],
        OUTPUT_DIR=str(run),
        EXTRA_ARGS=f"{TINY} --max_steps 30 --eval_steps 30 --log_interval 10 --seed %a",
    )
    for task in (0, 1):
        info = wait_for(cluster, f"{job}_{task}")
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0")
        args = json.loads((run / f"task_{task}" / "training_args.json").read_text())
        assert args["train"]["seed"] == task
        assert steps_of(run / f"task_{task}") == [10, 20, 30]
    a, b = final_weights(run / "task_0", 30), final_weights(run / "task_1", 30)
    assert not torch.equal(a["transformer.wte.weight"], b["transformer.wte.weight"])


def test_two_task_srun_matches_one_process(cluster):
    """The script's multi-process path (MASTER_ADDR from `scontrol show hostnames`, srun with
    one task per GPU), here as 2 CPU tasks on the one node: the same global batch as a
    1-process job, weights within 1e-4, and one writer of checkpoints and metrics."""
    root = cluster["root"]
    # float32 (EXTRA_ARGS come after the script's --precision bf16 and win)
    schedule = "--max_steps 30 --eval_steps 30 --log_interval 10 --learning_rate 1e-3"
    schedule += " --precision fp32"
    tiny = TINY.replace("--batch_size 16", "")
    two = submit(
        cluster,
        "train_jepa_osc.sh",
        [*CPU_SBATCH, "--ntasks-per-node=2"],
        OUTPUT_DIR=str(root / "ddp2"),
        GPUS_PER_NODE="2",
        MASTER_PORT=free_port(),
        EXTRA_ARGS=f"{tiny} --batch_size 8 {schedule}",
    )
    one = submit(
        cluster,
        "train_jepa_osc.sh",
        CPU_SBATCH,
        OUTPUT_DIR=str(root / "ddp1"),
        EXTRA_ARGS=f"{tiny} --batch_size 16 {schedule}",
    )
    for job in (two, one):
        info = wait_for(cluster, job)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log_of(
            cluster, "jepa_train", job
        )[-3000:]
    assert "world size 2" in log_of(cluster, "jepa_train", two)
    args = json.loads((root / "ddp2" / "training_args.json").read_text())
    assert args["resolved"]["world_size"] == 2 and args["resolved"]["global_batch_size"] == 16
    assert steps_of(root / "ddp2") == steps_of(root / "ddp1") == [10, 20, 30]
    assert sorted(p.name for p in (root / "ddp2" / "checkpoints").iterdir()) == [
        "best_model.pt",
        "checkpoint_step_30.pt",
    ]
    # 1e-4 as in test_distributed (measured up to ~1.1e-5 after 30 steps: the gradient
    # all-reduce sums two halves where one process sums the whole batch)
    a, b = final_weights(root / "ddp2", 30), final_weights(root / "ddp1", 30)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4


def test_usr1_reaches_every_srun_task_and_the_job_resumes(cluster):
    """The multi-process path under the pre-timeout signal: the script signals srun, srun
    forwards USR1 to both ranks, they stop together, and the requeued job finishes."""
    run = cluster["root"] / "ddp_usr1"
    job = submit(
        cluster,
        "train_jepa_osc.sh",
        [*CPU_SBATCH, "--ntasks-per-node=2"],
        OUTPUT_DIR=str(run),
        GPUS_PER_NODE="2",
        MASTER_PORT=free_port(),
        EXTRA_ARGS=f"{TINY.replace('16', '8')} --max_steps 800 --log_interval 10 "
        "--save_step_dense 0 --eval_steps 5000 --precision fp32",
    )
    wait_for_metrics(run, job, cluster)
    subprocess.run(
        ["scancel", "--signal=USR1", "--batch", job], env=cluster["env"], check=True, timeout=30
    )
    info = wait_for(cluster, job)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0")
    log = log_of(cluster, "jepa_train", job)
    assert f"requeueing job {job}" in log and log.count("world size 2") == 2
    assert run_state(run)["state"] == "finished"
    assert steps_of(run) == list(range(10, 801, 10))


def submit_sweep(cluster: dict, tmp_path: Path, name: str, **spec: object) -> tuple[Path, str]:
    """Write a tiny CPU sweep spec (1-block model, 200 entities, 1-CPU tasks on the local
    partition; `spec` adds or overrides top-level keys and `base` flags), submit it with
    `revjepa sweep --executor slurm` and return the sweep directory and the array's job id."""
    import yaml

    base = {
        "n_layer": 1, "n_embd": 32, "n_head": 2, "batch_size": 16, "dropout": 0,
        "save_step_dense": 0, "device": "cpu", **spec.pop("base", {}),
    }  # fmt: skip
    doc = {
        "name": name,
        "data": {"num_ga_entities": 200, "gb_ratio": 0.5, "num_rel_pairs": 2, "test_size": 20},
        "base": base,
        "seeds": [0],
        "slurm": {"partition": "cpu", "cpus_per_task": 1, "mem": "1G",
                  "setup": ["export OMP_NUM_THREADS=1"]},
        **spec,
    }  # fmt: skip
    sweep_args = doc.pop("sweep_args", [])
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "revjepa", "sweep", str(spec_file), "--out", str(out),
         "--executor", "slurm", *sweep_args],
        env=cluster["env"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout.split("submitted job array ")[1].split(":")[0]


def test_sweep_job_array_runs_every_task_and_report_reads_it(cluster, tmp_path):
    """`revjepa sweep --executor slurm`: one array task per run under the real SLURM, at most
    two at once; every run ends trained and evaluated, and `revjepa report` reads the sweep."""
    base = {"max_steps": 20, "save_steps": 10, "save_step_dense_interval": 10,
            "eval_steps": 10, "log_interval": 10}  # fmt: skip
    out, job = submit_sweep(
        cluster, tmp_path, "arr", base=base, seeds=[0, 1],
        variants={"ntp": {"no_jepa": True}, "jepa": {}}, sweep_args=["--max_concurrent", "2"],
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], env=cluster["env"],
                                capture_output=True, text=True, timeout=30).stdout  # fmt: skip
        if not queued.strip():
            break
        time.sleep(0.5)
    assert not queued.strip(), f"array {job} still queued: {queued}"
    status = subprocess.run(
        [sys.executable, "-m", "revjepa", "sweep", "--status", "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    logs = "\n".join(p.read_text() for p in (out / "logs").glob("slurm-*.out"))
    assert status.returncode == 0, status.stdout + logs
    assert "4 runs: 4 done" in status.stdout
    assert len(list((out / "logs").glob(f"slurm-{job}_*.out"))) == 4
    report = subprocess.run(
        [sys.executable, "-m", "revjepa", "report", str(out), "--format", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    rows = {r["group"]: r for r in json.loads(report.stdout)}
    assert set(rows) == {"ntp", "jepa"} and all(r["n"] == 2 for r in rows.values())
    records = [
        json.loads(x) for x in (out / "runs/ntp-seed0/eval_all.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [10, 20]


def test_sweep_task_on_usr1_checkpoints_requeues_and_finishes(cluster, tmp_path):
    """The sweep array's preemption handling, as train_jepa_osc.sh's: USR1 to a task makes
    its run checkpoint, the task is requeued, resumes and ends done; each step logged once."""
    base = {"max_steps": 1500, "save_steps": 100000, "save_step_dense_interval": 100000,
            "eval_steps": 1500, "log_interval": 10, "no_jepa": True}  # fmt: skip
    out, array = submit_sweep(cluster, tmp_path, "pre", base=base)
    run = out / "runs" / "seed0"
    wait_for_metrics(run, array, cluster)
    task = f"{array}_0"
    subprocess.run(
        ["scancel", "--signal=USR1", "--batch", task], env=cluster["env"], check=True, timeout=30
    )
    deadline = time.time() + 120
    while run_state(run)["state"] == "running":
        assert time.time() < deadline, "the run never stopped on USR1"
        time.sleep(0.1)
    stopped = run_state(run)
    assert stopped["state"] == "stopped" and 0 < stopped["step"] < 1500
    info = wait_for(cluster, task)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0")
    log = "\n".join(p.read_text() for p in (out / "logs").glob("slurm-*.out"))
    assert "requeueing task 0" in log and "seed0: done" in log
    assert (out / "state" / "seed0.done.json").is_file()
    assert steps_of(run) == list(range(10, 1501, 10))
