"""`revjepa sweep` / `revjepa report` / `revjepa train --config`: a real 2 variants x 2 seeds
sweep on tiny models, its report checked against a computation from the runs' own
eval_all.jsonl, a sweep killed mid-run and started again, and every refused spec."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from revjepa.cli import main
from revjepa.runlog import lock_held, read_jsonl

DATA = {"num_ga_entities": 200, "gb_ratio": 0.5, "num_rel_pairs": 2, "test_size": 20, "seed": 0}
BASE = {
    "n_layer": 1, "n_embd": 32, "n_head": 2, "max_steps": 40, "batch_size": 16,
    "learning_rate": 1e-3, "dropout": 0, "eval_steps": 20, "save_steps": 20,
    "save_step_dense": 0, "save_step_dense_interval": 20, "log_interval": 10,
    "eval_batch_size": 64,
}  # fmt: skip
SPEC = {
    "name": "tiny",
    "data": DATA,
    "base": BASE,
    "variants": {"ntp": {"no_jepa": True}, "jepa_cos": {"distance_metric": "cosine"}},
    "seeds": [0, 1],
}


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "revjepa", *argv], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    spec = write_spec(root / "spec.yaml", SPEC)
    proc = cli("sweep", str(spec), "--out", str(root / "out"), "--parallel", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "out"


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / "checkpoint_step_40.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]


def test_sweep_runs_every_variant_and_seed_to_a_complete_evaluated_run(finished_sweep):
    plan = json.loads((finished_sweep / "sweep.json").read_text())
    names = sorted(r["name"] for r in plan["runs"])
    assert names == ["jepa_cos-seed0", "jepa_cos-seed1", "ntp-seed0", "ntp-seed1"]
    for run in plan["runs"]:
        run_dir = finished_sweep / "runs" / run["name"]
        args = json.loads((run_dir / "training_args.json").read_text())
        assert args["train"]["seed"] == run["seed"]
        assert args["objective"]["use_jepa"] is (run["variant"] != "ntp")
        steps = [r["step"] for r in read_jsonl(run_dir / "eval_all.jsonl")]
        assert steps == [20, 40]
        assert (finished_sweep / "state" / f"{run['name']}.done.json").is_file()
    # the two seeds of a variant differ; the data is shared
    assert not torch.equal(
        final_state(finished_sweep / "runs/ntp-seed0")["transformer.wte.weight"],
        final_state(finished_sweep / "runs/ntp-seed1")["transformer.wte.weight"],
    )
    assert len({r["data_dir"] for r in plan["runs"]}) == 1


def _expected(out: Path, variant: str, split: str, select: str = "test", metric="mrr") -> dict:
    """Mean and sample std over seeds, from the runs' own eval_all.jsonl."""
    best, last, steps = [], [], []
    for seed in (0, 1):
        records = read_jsonl(out / "runs" / f"{variant}-seed{seed}" / "eval_all.jsonl")
        top = max(records, key=lambda r: (r["splits"][select][metric], -r["step"]))
        best.append(top["splits"][split][metric])
        last.append(max(records, key=lambda r: r["step"])["splits"][split][metric])
        steps.append(top["step"])

    def stats(v):
        m = (v[0] + v[1]) / 2
        return m, math.sqrt(((v[0] - m) ** 2 + (v[1] - m) ** 2) / 1)

    return {"best": stats(best), "last": stats(last), "steps": steps}


@pytest.mark.parametrize("select", ["test", "atomic"])
def test_report_means_and_stds_equal_a_computation_from_eval_all(finished_sweep, select):
    proc = cli("report", str(finished_sweep), "--format", "json", "--select_split", select,
               "--metric", "mrr")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {r["group"]: r for r in json.loads(proc.stdout)}
    assert set(rows) == {"ntp", "jepa_cos"}
    for variant, row in rows.items():
        assert row["n"] == 2 and row["seeds"] == [0, 1] and not row["in_progress"]
        for split in ("train", "atomic", "test"):
            want = _expected(finished_sweep, variant, split, select)
            for which in ("best", "last"):
                assert row[f"{split}_{which}"]["mean"] == pytest.approx(want[which][0], abs=1e-12)
                assert row[f"{split}_{which}"]["std"] == pytest.approx(want[which][1], abs=1e-12)
        steps = _expected(finished_sweep, variant, "test", select)["steps"]
        assert row["best_step"] == {"mean": sum(steps) / 2, "min": min(steps), "max": max(steps)}


def test_report_defaults_to_the_entity_metric_with_chance_and_own_metric(finished_sweep, tmp_path):
    """Every run has entity_mrr (the sweep's evaluation computes it): the table uses it, prints
    the chance level of the entity table, and keeps the family's own `mrr` beside it."""
    from revjepa.metrics import chance_mrr

    plot = tmp_path / "bands.png"
    proc = cli("report", str(finished_sweep), "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout
    assert "`entity_mrr` (gpt2_jepa)" in table
    n = read_jsonl(finished_sweep / "runs/ntp-seed0/eval_all.jsonl")[0]["splits"]["test"]
    n = n["num_entities"]
    assert f"{chance_mrr(n):.4f} for N = {n:,}" in table
    row = next(x for x in table.splitlines() if x.startswith("| ntp |"))
    want = _expected(finished_sweep, "ntp", "test", metric="entity_mrr")["best"]
    assert row.startswith("| ntp | gpt2_jepa | 2 |") and f"{want[0]:.4f} ± {want[1]:.4f}" in row
    rows = {r["group"]: r for r in json.loads(cli("report", str(finished_sweep), "--format",
                                                  "json").stdout)}  # fmt: skip
    own = rows["ntp"]["own_test_best"]
    # the own metric is read at the checkpoints the entity metric picked
    best_steps = []
    for seed in (0, 1):
        records = read_jsonl(finished_sweep / f"runs/ntp-seed{seed}/eval_all.jsonl")
        top = max(records, key=lambda r: (r["splits"]["test"]["entity_mrr"], -r["step"]))
        best_steps.append(top["splits"]["test"]["mrr"])
    assert own["mean"] == pytest.approx(sum(best_steps) / 2, abs=1e-12)
    assert f"{own['mean']:.4f} ±" in row
    assert plot.stat().st_size > 10_000
    csv_file = tmp_path / "r.csv"
    assert (
        cli("report", str(finished_sweep), "--format", "csv", "--out", str(csv_file)).returncode
        == 0
    )
    header = csv_file.read_text().splitlines()[0].split(",")
    assert "test_best_mean" in header and "best_step_max" in header


def test_rerunning_a_finished_sweep_trains_nothing(finished_sweep):
    spec = finished_sweep.parent / "spec.yaml"
    before = {p: p.stat().st_mtime_ns for p in (finished_sweep / "runs").rglob("*") if p.is_file()}
    proc = cli("sweep", str(spec), "--out", str(finished_sweep), "--parallel", "2")
    assert proc.returncode == 0, proc.stderr
    assert "4 done, 0 to run" in proc.stdout
    after = {p: p.stat().st_mtime_ns for p in (finished_sweep / "runs").rglob("*") if p.is_file()}
    assert after == before
    status = cli("sweep", "--status", "--out", str(finished_sweep))
    assert status.returncode == 0 and "4 runs: 4 done" in status.stdout


def test_a_killed_sweep_resumes_to_the_same_weights(finished_sweep, tmp_path):
    """SIGKILL the sweep process mid-run (its trainers get SIGTERM and checkpoint), start it
    again: every run completes, finished runs are not retrained, the interrupted one resumes
    from its checkpoint, and the final weights equal the uninterrupted sweep's."""
    # checkpoints every 10 steps (the weights do not depend on the schedule), and the kill at
    # the first: 30 steps of margin before the run could finish, for a loaded machine
    base = {**BASE, "max_steps": 40, "save_steps": 10, "save_step_dense_interval": 10}
    spec = {**SPEC, "variants": {"ntp": {"no_jepa": True}}, "base": base}
    spec_file = write_spec(tmp_path / "spec.yaml", spec)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "revjepa", "sweep", str(spec_file), "--out", str(out),
         "--threads_per_run", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    first = out / "runs" / "ntp-seed0" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (first / "checkpoint_step_10.pt").exists():
        time.sleep(0.02)
    assert (first / "checkpoint_step_10.pt").exists(), "the first run never checkpointed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 60  # the orphaned task gets SIGTERM, checkpoints and exits
    while time.time() < deadline and lock_held(out / "state", "ntp-seed0.lock"):
        time.sleep(0.1)
    assert not lock_held(out / "state", "ntp-seed0.lock")
    assert not (out / "state" / "ntp-seed0.done.json").exists()
    status = cli("sweep", "--status", "--out", str(out))
    assert status.returncode == 1 and "ntp-seed1" in status.stdout
    assert "not started" in status.stdout and "interrupted" in status.stdout
    again = cli("sweep", str(spec_file), "--out", str(out), "--threads_per_run", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    for seed in (0, 1):
        run = out / "runs" / f"ntp-seed{seed}"
        steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
        assert steps == [10, 20, 30, 40]  # each log step once: nothing trained twice
        ours, reference = final_state(run), final_state(finished_sweep / "runs" / run.name)
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[k], reference[k]) for k in ours)
    resumed = (out / "runs" / "ntp-seed0" / "training.log").read_text()
    assert "resum" in resumed.lower()


def test_a_failed_run_does_not_stop_the_others(tmp_path):
    spec = {
        **SPEC,
        "variants": {"ok": {"no_jepa": True}, "bad": {"no_jepa": True, "data": {"seed": 1}}},
        "seeds": [0],
    }
    spec_file = write_spec(tmp_path / "spec.yaml", spec)
    out = tmp_path / "out"
    assert (
        main(["sweep", str(spec_file), "--out", str(out), "--executor", "slurm", "--dry_run"]) == 0
    )
    bad = next(
        r for r in json.loads((out / "sweep.json").read_text())["runs"] if r["variant"] == "bad"
    )
    assert bad["name"] == "bad-seed0"
    # the failing run (its own data block) finds a broken data file; the other one runs
    (Path(bad["data_dir"]) / "train.json").write_text("{not json")
    proc = cli("sweep", str(spec_file), "--out", str(out))
    assert proc.returncode == 1
    assert "bad-seed0: FAILED" in proc.stdout
    status = cli("sweep", "--status", "--out", str(out))
    assert status.returncode == 1
    line = next(x for x in status.stdout.splitlines() if x.startswith("bad-seed0"))
    assert "failed" in line and "train.json" in line
    ok = next(x for x in status.stdout.splitlines() if x.startswith("ok-seed0"))
    assert " done " in ok


BAD_SPECS = [
    ({"colour": 1}, "unknown key(s) ['colour']"),
    ({"base": {**BASE, "learnin_rate": 1e-3}}, "unknown key 'learnin_rate'"),
    ({"base": {**BASE, "n_layer": "two"}}, "invalid int value: 'two'"),
    ({"base": {**BASE, "n_layer": 1.5}}, "invalid int value: '1.5'"),
    ({"base": {**BASE, "no_jepa": "yes"}}, "no_jepa is a switch"),
    ({"grid": {"learning_rate": []}}, "grid.learning_rate: expected a non-empty list"),
    ({"grid": {"learning_rate": 1e-3}}, "grid.learning_rate: expected a non-empty list"),
    ({"grid": {}, "variants": {}}, "spec variants: expected a non-empty mapping"),
    ({"seeds": []}, "spec seeds: expected a non-empty list"),
    ({"seeds": [0, 0]}, "repeated seeds"),
    ({"data": {**DATA, "entities": 5}}, "unknown key 'entities'"),
    ({"data": {**DATA, "num_ga_entities": "many"}}, "num_ga_entities: expected a number"),
    ({"base": {**BASE, "output_dir": "x"}}, "output_dir is set by the sweep"),
    ({"base": {**BASE, "seed": 3}}, "seed is set by the sweep"),
    ({"base": {**BASE, "n_head": 3}}, "not divisible by --n_head 3"),
    (
        {"variants": {"c": {"model_family": "concept_jepa", "k_pred_tok": 2}}},
        "k_pred_tok: not a flag of model family concept_jepa",
    ),
    (
        {"variants": {"n": {"num_sem_layers": 2}}},
        "num_sem_layers: not a flag of model family gpt2_jepa",
    ),
    ({"slurm": {"partiton": "gpu"}}, "spec slurm: unknown key 'partiton'"),
]


@pytest.mark.parametrize(("change", "message"), BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_specs_are_refused_with_one_line_and_nothing_started(tmp_path, capsys, change, message):
    spec_file = write_spec(tmp_path / "spec.yaml", {**SPEC, **change})
    out = tmp_path / "out"
    assert main(["sweep", str(spec_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_unreadable_and_malformed_spec_files(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "bad.yaml").write_text("base: [unclosed")
    assert main(["sweep", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "cannot read the sweep spec" in err[0] and "not valid YAML/JSON" in err[1]
    assert not (tmp_path / "o").exists()


def test_a_changed_spec_is_refused_for_an_existing_sweep(tmp_path, capsys):
    spec_file = write_spec(tmp_path / "spec.yaml", SPEC)
    out = tmp_path / "out"
    assert (
        main(["sweep", str(spec_file), "--out", str(out), "--executor", "slurm", "--dry_run"]) == 0
    )
    plan = (out / "sweep.json").read_text()
    write_spec(spec_file, {**SPEC, "base": {**BASE, "max_steps": 80}, "seeds": [0, 1, 2]})
    capsys.readouterr()
    assert main(["sweep", str(spec_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "base.max_steps: 40 -> 80" in err and "seeds: [0, 1] -> [0, 1, 2]" in err
    assert (out / "sweep.json").read_text() == plan


def test_run_names_and_grid_expansion(tmp_path):
    spec = {**SPEC, "grid": {"learning_rate": [1e-3, 3e-4], "k_pred_tok": [1, 2]}, "seeds": [1]}
    spec_file = write_spec(tmp_path / "spec.yaml", spec)
    out = tmp_path / "out"
    assert main(["sweep", str(spec_file), "--out", str(out), "--executor", "slurm", "--dry_run",
                 "--max_concurrent", "3", "--partition", "cpu", "--time", "01:00:00"]) == 0  # fmt: skip
    plan = json.loads((out / "sweep.json").read_text())
    names = [r["name"] for r in plan["runs"]]
    assert (
        len(names) == 8 and "jepa_cos-lr3e-4-k2-seed1" in names and "ntp-lr1e-3-k1-seed1" in names
    )
    run = next(r for r in plan["runs"] if r["name"] == "jepa_cos-lr3e-4-k2-seed1")
    assert run["config"]["train"]["learning_rate"] == 3e-4
    assert run["config"]["objective"]["k_pred_tok"] == 2
    script = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-7%3" in script
    assert "#SBATCH --partition=cpu" in script and "#SBATCH --time=01:00:00" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    shellcheck = Path(sys.executable).with_name("shellcheck")
    if shellcheck.exists():
        lint = subprocess.run(
            [str(shellcheck), str(out / "sweep.sbatch")], capture_output=True, text=True
        )
        assert lint.returncode == 0, lint.stdout


def test_train_config_file_and_rerun_from_training_args(tmp_path, small_dir, capsys):
    """--config FILE: flags override it; a run's own training_args.json re-runs it exactly."""
    config = {
        "data_dir": str(small_dir), "n_layer": 1, "n_embd": 32, "n_head": 2, "max_steps": 12,
        "batch_size": 16, "dropout": 0, "learning_rate": 3e-3, "save_steps": 12,
        "save_step_dense": 0, "save_step_dense_interval": 12, "eval_steps": 12,
        "log_interval": 6, "no_jepa": True,
    }  # fmt: skip
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(file), "--learning_rate", "1e-3", "--print_config",
                 "--output_dir", str(tmp_path / "a")]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["learning_rate"] == 1e-3 and printed["objective"]["use_jepa"] is False
    assert not (tmp_path / "a").exists()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-m", "revjepa", "train", "--config", str(file),
                            "--output_dir", str(tmp_path / "a")], env=env, capture_output=True)  # fmt: skip
    assert first.returncode == 0, first.stderr
    again = subprocess.run([sys.executable, "-m", "revjepa", "train", "--config",
                            str(tmp_path / "a" / "training_args.json"), "--output_dir",
                            str(tmp_path / "b")], env=env, capture_output=True)  # fmt: skip
    assert again.returncode == 0, again.stderr
    a = torch.load(tmp_path / "a/checkpoints/checkpoint_step_12.pt", weights_only=True)
    b = torch.load(tmp_path / "b/checkpoints/checkpoint_step_12.pt", weights_only=True)
    assert a["config"]["train"] == {**b["config"]["train"], "output_dir": str(tmp_path / "a")}
    assert all(
        torch.equal(a["model_state_dict"][k], b["model_state_dict"][k])
        for k in a["model_state_dict"]
    )
    (tmp_path / "bad.yaml").write_text("learnin_rate: 1\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown key 'learnin_rate'" in capsys.readouterr().err


def test_base_flags_of_another_family_do_not_reach_a_variant(tmp_path):
    """The issue's own example: a base with gpt2_jepa's n_layer beside a concept variant."""
    variants = {**SPEC["variants"], "concept": {"preset": "ws_jepa_small"}}
    spec_file = write_spec(tmp_path / "spec.yaml", {**SPEC, "variants": variants, "seeds": [0]})
    out = tmp_path / "out"
    assert (
        main(["sweep", str(spec_file), "--out", str(out), "--executor", "slurm", "--dry_run"]) == 0
    )
    runs = {r["variant"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}
    concept = runs["concept"]["config"]
    assert (
        concept["model"]["family"] == "concept_jepa" and "--n_layer" not in runs["concept"]["argv"]
    )
    assert concept["model"]["n_embd"] == 32  # base flags both families read still apply
    assert runs["ntp"]["config"]["model"]["n_layer"] == 1


def test_local_dry_run_prints_the_runs_and_writes_nothing(tmp_path, capsys):
    spec = {**SPEC, "variants": {"ntp": {"no_jepa": True}, "long": {"max_steps": 60}}}
    spec_file = write_spec(tmp_path / "spec.yaml", spec)
    out = tmp_path / "out"
    assert main(["sweep", str(spec_file), "--out", str(out), "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sweep tiny: 4 runs, 1 dataset(s)"
    steps = {line.split()[0]: line.split()[2] for line in lines[1:5]}
    assert steps == {"ntp-seed0": "40", "ntp-seed1": "40", "long-seed0": "60", "long-seed1": "60"}
    assert lines[-1] == "nothing run or written (--dry_run)"
    assert not out.exists()


def test_seeds_split_a_sweep_into_parts(tmp_path):
    spec = {**SPEC, "variants": {"ntp": {"no_jepa": True}}, "base": {**BASE, "max_steps": 20}}
    spec_file = write_spec(tmp_path / "spec.yaml", spec)
    out = tmp_path / "out"
    first = cli("sweep", str(spec_file), "--out", str(out), "--seeds", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "1 runs, 0 done, 1 to run" in first.stdout
    done = sorted(p.name for p in (out / "state").glob("*.done.json"))
    assert done == ["ntp-seed1.done.json"]
    second = cli("sweep", str(spec_file), "--out", str(out))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "2 runs, 1 done, 1 to run" in second.stdout
    assert (out / "state" / "ntp-seed0.done.json").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seeds", "7"], "--seeds: the spec has no seed [7] (its seeds: [0, 1])"),
        (["--seeds", "0", "--executor", "slurm"], "--seeds: local executor only"),
    ],
)
def test_bad_seeds_are_refused_before_anything_is_written(tmp_path, extra, message):
    spec_file = write_spec(tmp_path / "spec.yaml", SPEC)
    out = tmp_path / "out"
    proc = cli("sweep", str(spec_file), "--out", str(out), *extra)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
