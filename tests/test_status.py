"""`revjepa status`: a running run (a real trainer, and a lock held by the test), finished,
preempted (SIGUSR1), crashed (SIGKILL) and failed (an exception) runs, a sweep directory; the
figures (step, speed, evaluations, checkpoint) against the run's own files; and the probe
leaves a running trainer's lock alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import revjepa.train as train_mod
from revjepa.cli import main
from revjepa.convergence import trend
from revjepa.data import GenConfig, generate, write_generated
from revjepa.errors import UserError
from revjepa.families import FAMILIES
from revjepa.report import FAMILY_METRICS
from revjepa.runlog import RunLock, lock_held
from revjepa.status import collect_status, format_status, run_status

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
RUN = [
    *("--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--batch_size", "16"),
    *("--device", "cpu", "--log_interval", "2", "--eval_steps", "6"),
    *("--save_steps", "8", "--save_step_dense", "0"),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_generated(generate(GenConfig(num_ga_entities=200, num_rel_pairs=2, test_size=40)), d)
    return d


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fin") / "run"
    args = ["--data_dir", str(data_dir), "--output_dir", str(out), *RUN, "--max_steps", "20"]
    assert main(["train", *args]) == 0
    return out


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def popen(data_dir: Path, out: Path, *extra: str, crash: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "REVJEPA_CRASH"}
    if crash:
        env["REVJEPA_CRASH"] = crash
    argv = ["-m", "revjepa", "train", "--data_dir", str(data_dir), "--output_dir", str(out)]
    return subprocess.Popen(
        [PY, *argv, *RUN, *extra], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_records(out: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(records(out)) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(
        f"no {n} records (exit {proc.poll()}): {proc.stderr and proc.stderr.read()}"
    )


def test_fallback_metrics_are_the_families_own():
    """For runs older than training_args.json's record of them (report and status): a frozen
    table of the families that had such runs; a family added later (mlm_u) has none, so it
    needs no entry and report/status need no change for it."""
    assert set(FAMILY_METRICS) == {"gpt2_jepa", "concept_jepa"}
    for name, metrics in FAMILY_METRICS.items():
        cls = FAMILIES[name]
        assert metrics == (cls.comparable_metric, cls.headline_metric)


def test_finished_run_figures_match_its_files(finished):
    row = run_status(finished)
    recs = records(finished)
    assert row["state"] == "finished" and row["lock_held"] is False
    assert (row["step"], row["max_steps"]) == (20, 20)
    evals = [(r["step"], r["eval_test_mrr"]) for r in recs if "eval_test_mrr" in r]
    assert [s for s, _ in evals] == [6, 12, 18, 20]
    assert row["last_eval"] == {"step": 20, "mrr": {"test": evals[-1][1]}}
    best = max(evals, key=lambda e: e[1])
    assert row["best_eval"] == {"step": best[0], "mrr": {"test": best[1]}}
    # the curve, as report would read it: no eval_all.jsonl, so metrics.jsonl's evaluations;
    # no entity_mrr there (--eval_entity_mrr off), so the headline metric
    assert row["curve"] == {"metric": "mrr", "split": "test", **trend(*zip(*evals)).as_dict()}
    assert row["still_rising"] is row["curve"]["rising"]
    # steps/s over the last 5 records (steps 12..20, 2 steps each): steps over their time
    train = [r for r in recs if "loss" in r][-5:]
    assert row["steps_per_s"] == pytest.approx(10 / sum(2 / r["steps_per_s"] for r in train))
    assert row["eta_s"] is None  # not running
    assert row["checkpoint"]["step"] == 20 and row["checkpoint"]["verified"]
    assert row["error"] is None and row["signal"] is None


def test_newest_valid_checkpoint_skips_a_corrupted_one(finished, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    newest = run / "checkpoints" / "checkpoint_step_20.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert run_status(run)["checkpoint"]["step"] == 16
    assert run_status(run, verify=False)["checkpoint"] == {
        "step": 20, "path": str(newest), "verified": False,
    }  # fmt: skip


def test_running_then_preempted_real_trainer(data_dir, tmp_path):
    """A real trainer: running while it runs (the probe leaves its lock file alone and the
    trainer keeps going), preempted after SIGUSR1 (with the signal and its checkpoint)."""
    out = tmp_path / "run"
    proc = popen(data_dir, out, "--max_steps", "100000", "--save_steps", "100000")
    try:
        wait_for_records(out, 3, proc)
        lock_bytes = (out / ".lock").read_bytes()
        assert lock_bytes == f"{proc.pid}\n".encode()
        row = run_status(out)
        assert row["state"] == "running" and row["lock_held"]
        assert row["max_steps"] == 100000 and row["steps_per_s"] > 0
        assert row["eta_s"] == pytest.approx((100000 - row["step"]) / row["steps_per_s"])
        assert (out / ".lock").read_bytes() == lock_bytes
        n = len(records(out))
        wait_for_records(out, n + 2, proc)  # still training after the probes
    finally:
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=120)
    assert proc.returncode == 0, proc.stderr.read()
    row = run_status(out)
    assert row["state"] == "preempted" and row["signal"] == "SIGUSR1" and not row["lock_held"]
    state = json.loads((out / "run_state.json").read_text())
    assert state["state"] == "stopped"  # what train_jepa_osc.sh greps for its requeue
    assert row["checkpoint"]["step"] == state["step"] == row["step"]


def test_a_held_lock_means_running_and_the_probe_never_creates_it(finished, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert lock_held(empty) is False and not (empty / ".lock").exists()
    lock = RunLock(finished)  # as a trainer holds it
    try:
        assert run_status(finished)["state"] == "running"
    finally:
        lock.fh.close()
    assert run_status(finished)["state"] == "finished"
    RunLock(finished).fh.close()  # the probe left it free


def test_crashed_run(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = popen(data_dir, out, "--max_steps", "20", crash="step:11")
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    row = run_status(out)
    assert json.loads((out / "run_state.json").read_text())["state"] == "running"
    assert row["state"] == "crashed" and row["step"] == 10 and row["checkpoint"]["step"] == 8


def test_failed_runs_keep_the_error_line(data_dir, tmp_path, monkeypatch):
    real = train_mod.train_step
    calls = {"n": 0}

    def failing(ctx, batch, lr, step):
        calls["n"] += 1
        if calls["n"] == 5:
            raise calls["exc"]
        return real(ctx, batch, lr, step)

    monkeypatch.setattr(train_mod, "train_step", failing)
    base = ["train", "--data_dir", str(data_dir), *RUN, "--max_steps", "20"]
    calls["exc"] = RuntimeError("CUDA error: an illegal memory access\nsecond line")
    with pytest.raises(RuntimeError):
        main([*base, "--output_dir", str(tmp_path / "a")])
    calls["n"], calls["exc"] = 0, UserError("cannot write checkpoint x: No space left on device")
    assert main([*base, "--output_dir", str(tmp_path / "b")]) == 2
    a, b = run_status(tmp_path / "a"), run_status(tmp_path / "b")
    assert a["state"] == b["state"] == "failed"
    assert a["error"] == "RuntimeError: CUDA error: an illegal memory access"
    assert b["error"] == "cannot write checkpoint x: No space left on device"
    assert json.loads((tmp_path / "a" / "run_state.json").read_text())["step"] == 4


def test_sweep_directory_and_the_command_line(finished, tmp_path, capsys):
    import shutil

    sweep = tmp_path / "sweep"
    (sweep / "runs" / "planned").mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}\n")
    shutil.copytree(finished, sweep / "runs" / "a_done")
    rows = collect_status([sweep])
    assert [(Path(r["run_dir"]).name, r["state"]) for r in rows] == [
        ("a_done", "finished"), ("planned", "not started"),
    ]  # fmt: skip
    # with a plan, its runs in plan order, those without a directory yet included
    plan = {"runs": [{"name": "z_later"}, {"name": "a_done"}, {"name": "planned"}]}
    (sweep / "sweep.json").write_text(json.dumps(plan))
    assert [(Path(r["run_dir"]).name, r["state"]) for r in collect_status([sweep])] == [
        ("z_later", "not started"), ("a_done", "finished"), ("planned", "not started"),
    ]  # fmt: skip
    (sweep / "sweep.json").write_text("{}\n")
    assert main(["status", str(sweep)]) == 0
    table = capsys.readouterr().out
    assert table == format_status(rows) + "\n"
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["run", "state", "step"] and len(lines) == 4
    assert "finished" in lines[2] and "20/20" in lines[2] and "not started" in lines[3]
    assert main(["status", "--json", str(sweep / "runs" / "a_done")]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["state"] == "finished" and row["checkpoint"]["step"] == 20
    assert main(["status", str(tmp_path / "nope")]) == 2
    assert "no such run or sweep directory" in capsys.readouterr().err


def test_collapse_shows_in_status(finished, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        if "pred_mean_cos" in r:
            r["collapse"] = r["step"] >= 14
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    row = run_status(run)
    assert row["collapse"] and row["collapse_first_step"] == 14 and row["collapsed_now"]
    assert row["collapsed_records"] == 4
    assert "JEPA COLLAPSE: collapsed (since step 14" in format_status([row])
