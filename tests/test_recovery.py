"""Reliability: SIGKILL anywhere, corrupt checkpoints, full disks, NaNs, locks, bad input."""

from __future__ import annotations

import errno
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

from revjepa import checkpoint as checkpoint_module
from revjepa.cli import main
from revjepa.data import GenConfig, generate, write_generated

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
RUN = [
    "--n_layer",
    "1",
    "--n_embd",
    "32",
    "--n_head",
    "2",
    "--batch_size",
    "32",
    "--learning_rate",
    "1e-3",
    "--dropout",
    "0.1",
    "--loss_dropout",
    "0.2",
    "--seed",
    "5",
    "--max_steps",
    "24",
    "--save_step_dense",
    "0",
    "--save_steps",
    "6",
    "--save_step_dense_interval",
    "6",
    "--eval_steps",
    "8",
    "--log_interval",
    "4",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_generated(generate(GenConfig(num_ga_entities=200, num_rel_pairs=2, test_size=40)), d)
    return d


# Exact-resume comparisons pin one CPU thread everywhere (the in-process reference and every
# subprocess): CPU sums such as LayerNorm's backward are split by thread, so runs are
# bit-identical only at equal thread counts, and a test must not depend on how many cores the
# machine happens to report to each process.
THREADS = 1


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        assert main(["train", "--data_dir", str(data_dir), "--output_dir", str(out), *RUN]) == 0
    finally:
        torch.set_num_threads(before)
    return out


def train_proc(
    data_dir: Path,
    out: Path,
    *extra: str,
    crash: str | None = None,
    threads: int = THREADS,
    **kw,
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("REVJEPA_CRASH", None)
    env["OMP_NUM_THREADS"] = str(threads)
    if crash:
        env["REVJEPA_CRASH"] = crash
    return subprocess.run(
        [
            PY,
            "-m",
            "revjepa",
            "train",
            "--data_dir",
            str(data_dir),
            "--output_dir",
            str(out),
            *RUN,
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "checkpoint_step_24.pt", weights_only=True)[
        "model_state_dict"
    ]


def clean_metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        for key in ("steps_per_s", "tokens_per_s", "mfu"):  # measured speeds
            r.pop(key, None)
    return rows


@pytest.mark.parametrize(
    "crash",
    ["step:9", "save:checkpoint_step_12.pt", "metrics:16", "step:1", "save:checkpoint_step_6.pt"],
)
def test_sigkill_anywhere_then_resume_is_bit_identical(data_dir, reference_run, tmp_path, crash):
    out = tmp_path / "run"
    killed = train_proc(data_dir, out, crash=crash)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    if crash.startswith("save"):
        assert leftovers  # the half-written temporary file, never under the final name
        assert not (out / "checkpoints" / crash.split(":")[1]).exists()
    resumed = train_proc(data_dir, out, "--resume_from", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    ref, got = final_weights(reference_run), final_weights(out)
    differ = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not differ, (differ, killed.stdout[-2000:], resumed.stdout[-3000:])
    assert clean_metrics(out) == clean_metrics(reference_run)


def test_resume_with_another_thread_count_is_announced(data_dir, tmp_path):
    """CPU sums (LayerNorm's backward) are split by thread: exact resume needs the same count."""
    out = tmp_path / "run"
    first = train_proc(data_dir, out, "--max_steps", "6", threads=1)
    assert first.returncode == 0, first.stderr
    saved = torch.load(out / "checkpoints" / "checkpoint_step_6.pt", weights_only=True)
    assert saved["cpu_threads"] == 1
    same = tmp_path / "same"
    shutil.copytree(out, same)
    resumed = train_proc(data_dir, out, "--resume_from", "latest", "--max_steps", "12", threads=2)
    assert resumed.returncode == 0, resumed.stderr
    warning = "resuming with 2 CPU threads, the checkpoint was written with 1"
    assert warning in resumed.stdout + resumed.stderr
    assert "device cpu (2 threads)" in resumed.stdout + resumed.stderr
    resolved = json.loads((out / "training_args.json").read_text())["resolved"]
    assert resolved["cpu_threads"] == 2
    again = train_proc(data_dir, same, "--resume_from", "latest", "--max_steps", "12", threads=1)
    assert again.returncode == 0, again.stderr
    assert "CPU threads" not in again.stdout + again.stderr


def test_latest_skips_corrupted_and_truncated_checkpoints(data_dir, reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    ckpts = out / "checkpoints"
    for s in (18, 24):
        (ckpts / f"checkpoint_step_{s}.pt").unlink()
    # 12: truncated; 6: valid. Corrupt a byte inside 12's copy first, then truncate the original.
    data = (ckpts / "checkpoint_step_12.pt").read_bytes()
    (ckpts / "checkpoint_step_12.pt").write_bytes(data[: len(data) // 3])
    corrupt = bytearray((ckpts / "checkpoint_step_6.pt").read_bytes())
    (ckpts / "checkpoint_step_8.pt").write_bytes(bytes(corrupt))  # a valid step-6 file as 8
    proc = train_proc(data_dir, out, "--resume_from", "latest")
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint_step_12.pt" in proc.stderr  # named when skipped
    ref, got = final_weights(reference_run), final_weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_disk_full_during_save_stops_cleanly(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, fh, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:
            fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, fh, *a, **k)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    rc = main(
        [
            "train",
            "--data_dir",
            str(data_dir),
            "--output_dir",
            str(out),
            *RUN,
            "--eval_steps",
            "1000",
        ]
    )
    assert rc == 2
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint_step_6.pt"]  # the earlier checkpoint, intact, no partial file
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert checkpoint_module.load_checkpoint(out / "checkpoints" / "checkpoint_step_6.pt")


def test_nan_steps_are_skipped_then_the_run_stops(data_dir, tmp_path, monkeypatch, capsys):
    from revjepa.config import ModelConfig, ObjectiveConfig
    from revjepa.data import load_dataset
    from revjepa.families import gpt2_jepa as model_module

    real_forward = model_module.GPT2Jepa.forward
    calls = {"n": 0}
    poison = {"steps": {1}}

    def forward(self, seq, kind, jepa_keep=None, with_logits=False, per_layer=False):
        out = real_forward(self, seq, kind, jepa_keep, with_logits, per_layer)
        if self.training:
            calls["n"] += 1
            if calls["n"] in poison["steps"]:
                out.sums["ntp"] = out.sums["ntp"] * float("nan")
        return out

    monkeypatch.setattr(model_module.GPT2Jepa, "forward", forward)
    out = tmp_path / "one_bad"
    args = [
        "--n_layer",
        "1",
        "--n_embd",
        "32",
        "--n_head",
        "2",
        "--batch_size",
        "32",
        "--seed",
        "5",
        "--dropout",
        "0",
        "--max_steps",
        "1",
        "--eval_steps",
        "100",
    ]
    assert main(["train", "--data_dir", str(data_dir), "--output_dir", str(out), *args]) == 0
    # the poisoned step 1 was not applied: the weights are still the initial ones
    ds = load_dataset(data_dir, with_train=False)
    torch.manual_seed(5)
    init = model_module.GPT2Jepa(
        ModelConfig(n_layer=1, n_embd=32, n_head=2, dropout=0.0),
        ObjectiveConfig(),
        ds.vocab,
        ds.entity_len,
    ).hf_state_dict()
    got = torch.load(out / "checkpoints" / "checkpoint_step_1.pt", weights_only=True)[
        "model_state_dict"
    ]
    assert all(torch.equal(init[k], got[k]) for k in init)

    calls["n"] = 0
    poison["steps"] = set(range(8, 100))
    out2 = tmp_path / "many_bad"
    rc = main(
        [
            "train",
            "--data_dir",
            str(data_dir),
            "--output_dir",
            str(out2),
            *args,
            "--max_steps",
            "30",
            "--save_steps",
            "6",
            "--save_step_dense",
            "0",
            "--save_step_dense_interval",
            "6",
            "--max_bad_steps",
            "3",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "stopping at step 10: 3 consecutive non-finite steps" in err[0]
    assert "checkpoint_step_6.pt" in err[0]


def test_second_trainer_on_same_directory_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ)
    env.pop("REVJEPA_CRASH", None)
    first = subprocess.Popen(
        [
            PY,
            "-m",
            "revjepa",
            "train",
            "--data_dir",
            str(data_dir),
            "--output_dir",
            str(out),
            *RUN,
            "--max_steps",
            "100000",
            "--save_steps",
            "100000",
            "--eval_steps",
            "100000",
            "--log_interval",
            "2",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / "metrics.jsonl").exists()
        second = train_proc(data_dir, out, "--resume_from", "latest")
        assert second.returncode == 2
        assert "another trainer is running" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the lock died with its process: a resume (fresh start, no checkpoint yet) is accepted
    third = train_proc(data_dir, out, "--resume_from", "latest", "--max_steps", "2")
    assert third.returncode == 0, third.stderr


# ----------------------------------------------------------------------------- bad input matrix


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def bad_world(data_dir, reference_run, tmp_path_factory) -> Path:
    """A directory of broken inputs next to good ones; snapshots prove nothing is changed."""
    w = tmp_path_factory.mktemp("bad")
    shutil.copytree(data_dir, w / "data")
    shutil.copytree(reference_run / "checkpoints", w / "ckpts")
    (w / "empty").mkdir()
    # Fixed bytes, not os.urandom: random garbage that starts with a pickle header (0x80 + a
    # protocol byte) makes torch warn before it fails, so a random file tested that case by chance.
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
    (w / "garbage.pt").write_bytes(bytes(noise.to(torch.uint8).tolist()))
    (w / "pickle_garbage.pt").write_bytes(b"\x80\x05" + bytes(noise[2:].to(torch.uint8).tolist()))
    good = (w / "ckpts" / "checkpoint_step_6.pt").read_bytes()
    (w / "truncated.pt").write_bytes(good[: len(good) // 2])
    torch.save({"hello": torch.zeros(2)}, w / "foreign.pt")

    def variant(name: str, edit) -> None:
        shutil.copytree(data_dir, w / name)
        edit(w / name)

    def rewrite(path: Path, fn) -> None:
        path.write_text(json.dumps(fn(json.loads(path.read_text()))))

    variant("no_vocab", lambda d: (d / "vocab.json").unlink())
    variant("no_train", lambda d: (d / "train.json").unlink())
    variant("bad_json", lambda d: (d / "valid.json").write_text('{"train": [1, 2'))
    variant(
        "no_test_split",
        lambda d: rewrite(d / "valid.json", lambda v: {k: v[k] for k in ("train", "atomic")}),
    )
    variant(
        "bad_shape",
        lambda d: rewrite(
            d / "train.json", lambda t: [{**t[0], "input_text": t[0]["input_text"][:2]}] + t[1:]
        ),
    )
    variant(
        "bad_id",
        lambda d: rewrite(
            d / "train.json", lambda t: [{**t[0], "target_text": [[999999, 1]]}] + t[1:]
        ),
    )
    variant(
        "bad_type",
        lambda d: rewrite(d / "train.json", lambda t: [{**t[0], "type": "weird"}] + t[1:]),
    )
    variant(
        "no_pred",
        lambda d: rewrite(
            d / "vocab.json", lambda v: {**{k: i for k, i in v.items() if k != "<PRED>"}}
        ),
    )
    variant(
        "orphan_relation",
        lambda d: rewrite(
            d / "vocab.json",
            lambda v: {(k if k != "<r_1_inv>" else "<r_9_inv>"): i for k, i in v.items()},
        ),
    )
    other = w / "other_data"
    write_generated(generate(GenConfig(num_ga_entities=250, num_rel_pairs=2, test_size=40)), other)
    (w / "foreign_out").mkdir()
    (w / "foreign_out" / "thesis.tex").write_text("precious")
    (w / "export_full").mkdir()
    (w / "export_full" / "keep.txt").write_text("keep")
    return w


T = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--max_steps", "2", "--batch_size", "8"]

BAD_INPUTS = [
    (
        "gen-data odd entities",
        ["gen-data", "--num_ga_entities", "7", "--output_dir", "{w}/g1"],
        "even",
    ),
    (
        "gen-data comb",
        ["gen-data", "--num_ga_entities", "100", "--comb", "7", "--output_dir", "{w}/g2"],
        "--comb",
    ),
    (
        "gen-data test_size",
        ["gen-data", "--num_ga_entities", "100", "--test_size", "100000", "--output_dir", "{w}/g3"],
        "--test_size",
    ),
    (
        "gen-data overwrite",
        ["gen-data", "--num_ga_entities", "200", "--test_size", "40", "--output_dir", "{w}/data"],
        "--overwrite",
    ),
    ("gen-data bad flag", ["gen-data", "--bogus"], "unrecognized"),
    (
        "train missing data dir",
        ["train", "--data_dir", "{w}/nope", "--output_dir", "{w}/o1", *T],
        "not found",
    ),
    (
        "train cuda graphs without cuda",
        [
            "train",
            "--data_dir",
            "{w}/data",
            "--output_dir",
            "{w}/o_cg",
            "--cuda_graphs",
            "on",
            "--device",
            "cpu",
            *T,
        ],
        "--cuda_graphs on needs",
    ),
    (
        "train missing vocab",
        ["train", "--data_dir", "{w}/no_vocab", "--output_dir", "{w}/o2", *T],
        "vocab.json",
    ),
    (
        "train missing train.json",
        ["train", "--data_dir", "{w}/no_train", "--output_dir", "{w}/o3", *T],
        "train.json",
    ),
    (
        "train malformed json",
        ["train", "--data_dir", "{w}/bad_json", "--output_dir", "{w}/o4", *T],
        "malformed JSON",
    ),
    (
        "train missing split",
        ["train", "--data_dir", "{w}/no_test_split", "--output_dir", "{w}/o5", *T],
        "missing split 'test'",
    ),
    (
        "train wrong shape",
        ["train", "--data_dir", "{w}/bad_shape", "--output_dir", "{w}/o6", *T],
        "wrong shape",
    ),
    (
        "train id out of range",
        ["train", "--data_dir", "{w}/bad_id", "--output_dir", "{w}/o7", *T],
        "outside the vocabulary",
    ),
    (
        "train unknown type",
        ["train", "--data_dir", "{w}/bad_type", "--output_dir", "{w}/o8", *T],
        "type 'weird'",
    ),
    (
        "train vocab lacks PRED",
        ["train", "--data_dir", "{w}/no_pred", "--output_dir", "{w}/o9", *T],
        "<PRED>",
    ),
    (
        "train relation without inverse",
        ["train", "--data_dir", "{w}/orphan_relation", "--output_dir", "{w}/o10", *T],
        "no inverse",
    ),
    (
        "train vocab size mismatch",
        ["train", "--data_dir", "{w}/data", "--output_dir", "{w}/o11", *T, "--vocab_size", "5"],
        "does not match",
    ),
    (
        "train foreign output dir",
        ["train", "--data_dir", "{w}/data", "--output_dir", "{w}/foreign_out", *T],
        "not a revjepa run",
    ),
    (
        "train k too large",
        ["train", "--data_dir", "{w}/data", "--output_dir", "{w}/o12", *T, "--k_pred_tok", "9"],
        "--k_pred_tok",
    ),
    (
        "train resume garbage",
        ["train", "--resume_from", "{w}/garbage.pt", "--output_dir", "{w}/o13"],
        "garbage.pt",
    ),
    (
        "train resume pickle-header garbage",
        ["train", "--resume_from", "{w}/pickle_garbage.pt", "--output_dir", "{w}/o13p"],
        "pickle_garbage.pt",
    ),
    (
        "train resume conflicting",
        ["train", "--resume_from", "{w}/ckpts/checkpoint_step_6.pt", "--n_layer", "3"],
        "conflict",
    ),
    (
        "train resume other data",
        [
            "train",
            "--resume_from",
            "{w}/ckpts/checkpoint_step_6.pt",
            "--data_dir",
            "{w}/other_data",
            "--output_dir",
            "{w}/o14",
        ],
        "vocabulary",
    ),
    (
        "evaluate missing checkpoint",
        ["evaluate", "--checkpoint", "{w}/missing.pt", "--data_dir", "{w}/data"],
        "not found",
    ),
    (
        "evaluate garbage checkpoint",
        ["evaluate", "--checkpoint", "{w}/garbage.pt", "--data_dir", "{w}/data"],
        "garbage.pt",
    ),
    (
        "evaluate truncated checkpoint",
        ["evaluate", "--checkpoint", "{w}/truncated.pt", "--data_dir", "{w}/data"],
        "truncated.pt",
    ),
    (
        "evaluate foreign checkpoint",
        ["evaluate", "--checkpoint", "{w}/foreign.pt", "--data_dir", "{w}/data"],
        "not a revjepa checkpoint",
    ),
    (
        "evaluate vocab mismatch",
        [
            "evaluate",
            "--checkpoint",
            "{w}/ckpts/checkpoint_step_6.pt",
            "--data_dir",
            "{w}/other_data",
        ],
        "does not match",
    ),
    (
        "evaluate missing split",
        [
            "evaluate",
            "--checkpoint",
            "{w}/ckpts/checkpoint_step_6.pt",
            "--data_dir",
            "{w}/no_test_split",
        ],
        "missing split",
    ),
    (
        "evaluate empty dir",
        ["evaluate", "--checkpoint", "{w}/empty", "--data_dir", "{w}/data"],
        "no checkpoint_step",
    ),
    (
        "evaluate bad split",
        ["evaluate", "--checkpoint", "{w}/ckpts/checkpoint_step_6.pt", "--splits", "dev"],
        "--splits",
    ),
    (
        "export non-empty dir",
        ["export", "{w}/ckpts/checkpoint_step_6.pt", "{w}/export_full"],
        "not empty",
    ),
    ("export garbage", ["export", "{w}/garbage.pt", "{w}/export_new"], "garbage.pt"),
    (
        "export pickle-header garbage",
        ["export", "{w}/pickle_garbage.pt", "{w}/export_new"],
        "pickle_garbage.pt",
    ),
    (
        "evaluate pickle-header garbage",
        ["evaluate", "--checkpoint", "{w}/pickle_garbage.pt", "--data_dir", "{w}/data"],
        "pickle_garbage.pt",
    ),
    ("unknown command", ["frobnicate"], "unknown command"),
]


@pytest.mark.parametrize("name, argv, needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_matrix(bad_world, name, argv, needle):
    before = _snapshot(bad_world)
    args = [a.format(w=bad_world) for a in argv]
    proc = subprocess.run(
        [PY, "-m", "revjepa", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, (name, proc.stderr)
    assert needle in lines[0], (name, lines[0])
    assert "Traceback" not in proc.stderr
    after = _snapshot(bad_world)
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, (name, changed)
    assert sorted(after) == sorted(before), (name, sorted(set(after) - set(before)))


def test_output_into_a_closed_pipe_is_not_a_traceback():
    """`revjepa ... | head -1` with more output than a pipe holds: the reader leaves early, the
    command ends quietly (exit 141), no BrokenPipeError traceback."""
    script = (
        "import sys\n"
        "from revjepa.cli import run_guarded\n"
        "def fn(argv):\n"
        "    for i in range(200000):\n"
        "        print(f'line {i} of a long table')\n"
        "    return 0\n"
        "sys.exit(run_guarded(fn, []))\n"
    )
    proc = subprocess.run(
        f"{PY} -c \"$SCRIPT\" | head -1; echo \"rc=${{PIPESTATUS[0]}}\"", shell=True,
        executable="/bin/bash", capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "SCRIPT": script},
    )  # fmt: skip
    assert proc.stdout.splitlines() == ["line 0 of a long table", "rc=141"], proc.stdout[-500:]
    assert proc.stderr == ""
