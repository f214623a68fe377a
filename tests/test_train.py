"""Trainer: checkpoint schedule, files of a run, exact resume, epoch mode, bad flags."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from revjepa.checkpoint import load_checkpoint, save_checkpoint
from revjepa.cli import main
from revjepa.data import KIND_ID, GenConfig, generate, write_generated
from revjepa.errors import UserError
from revjepa.ops import TORCH_OPS
from revjepa.schedule import checkpoint_steps, lr_multiplier, should_save

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TIMING = ("steps_per_s", "tokens_per_s", "mfu")  # measured speeds: differ between any two runs

# 15,600 training items with num_ga_entities 2000; tiny model so a run takes a second or two.
SMALL = [
    "--n_layer",
    "1",
    "--n_embd",
    "32",
    "--n_head",
    "2",
    "--batch_size",
    "64",
    "--learning_rate",
    "1e-3",
    "--dropout",
    "0.1",
    "--log_interval",
    "5",
    "--seed",
    "3",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_generated(generate(GenConfig(num_ga_entities=400, num_rel_pairs=2, test_size=60)), d)
    return d


def run_train(data_dir: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data_dir", str(data_dir), "--output_dir", str(out), *SMALL, *extra])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model_state_dict"]


def metrics_without_timing(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        for key in TIMING:
            r.pop(key, None)
    return rows


# ----------------------------------------------------------------------------- schedule


def test_seed_schedule_is_exactly_66_checkpoints():
    expected = [5_000 * i for i in range(1, 7)] + [50_000 * i for i in range(1, 61)]
    assert checkpoint_steps(3_000_000, 50_000, 30_000, 5_000) == expected
    assert len(expected) == 66
    brute = [s for s in range(1, 3_000_001) if should_save(s, 50_000, 30_000, 5_000, 3_000_000)]
    assert brute == expected


@pytest.mark.parametrize(
    "final, save, dense, interval, expected",
    [
        (20, 10, 6, 2, [2, 4, 6, 10, 20]),
        (23, 10, 6, 2, [2, 4, 6, 10, 20, 23]),  # the final step is always saved
        (5, 10, 0, 3, [5]),
        (12, 4, 12, 5, [5, 10, 12]),
    ],
)
def test_small_schedules(final, save, dense, interval, expected):
    assert checkpoint_steps(final, save, dense, interval) == expected
    assert [
        s for s in range(1, final + 1) if should_save(s, save, dense, interval, final)
    ] == expected


def test_lr_schedules_match_hugging_face_formulas():
    assert lr_multiplier(0, 10, 100, "constant_with_warmup") == 0.0
    assert lr_multiplier(5, 10, 100, "constant_with_warmup") == 0.5
    assert lr_multiplier(50, 10, 100, "constant_with_warmup") == 1.0
    assert lr_multiplier(55, 10, 100, "linear") == pytest.approx(0.5)
    assert lr_multiplier(100, 10, 100, "linear") == 0.0
    assert lr_multiplier(55, 10, 100, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(10, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(32, 10, 100, "cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 22 / 90))
    )


# ----------------------------------------------------------------------------- a run's files


def test_run_writes_schedule_checkpoints_and_records(data_dir, tmp_path):
    out = tmp_path / "run"
    assert (
        run_train(
            data_dir,
            out,
            "--max_steps",
            "23",
            "--save_step_dense",
            "6",
            "--save_step_dense_interval",
            "2",
            "--save_steps",
            "10",
            "--eval_steps",
            "10",
        )
        == 0
    )
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    expected = [f"checkpoint_step_{s}.pt" for s in (2, 4, 6, 10, 20, 23)] + ["best_model.pt"]
    assert names == sorted(expected)
    args = json.loads((out / "training_args.json").read_text())
    assert args["train"]["max_steps"] == 23
    assert args["resolved"]["global_batch_size"] == 64
    assert args["model"]["n_embd"] == 32
    assert "training.log" in os.listdir(out)

    state = torch.load(out / "checkpoints" / "checkpoint_step_10.pt", weights_only=True)
    for key in (
        "model_state_dict",
        "optimizer_state_dict",
        "scheduler_state_dict",
        "step",
        "epoch",
        "rng_state",
        "config",
        "checksum",
        "vocab",
    ):
        assert key in state
    assert state["step"] == 10
    assert "transformer.h.0.attn.c_attn.weight" in state["model_state_dict"]
    json.dumps(state["config"])  # plain data

    rows = metrics_without_timing(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 23]
    assert all(math.isfinite(r["loss"]) for r in rows)
    evals = [r for r in rows if "eval_test_mrr" in r]
    assert [r["step"] for r in evals] == [10, 20, 23]
    best = torch.load(out / "checkpoints" / "best_model.pt", weights_only=True)
    assert best["best_mrr"] == pytest.approx(max(r["eval_test_mrr"] for r in evals))


@pytest.mark.parametrize("reverse_training", ["none", "token"])
def test_resume_is_bit_identical_with_identical_metrics(data_dir, tmp_path, reverse_training):
    common = [
        "--reverse_training",
        reverse_training,
        "--max_steps",
        "30",
        "--save_step_dense",
        "0",
        "--save_steps",
        "10",
        "--save_step_dense_interval",
        "10",
        "--eval_steps",
        "10",
        "--loss_dropout",
        "0.3",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_train(data_dir, full, *common) == 0
    assert run_train(data_dir, part, *common) == 0
    for s in (20, 30):
        (part / "checkpoints" / f"checkpoint_step_{s}.pt").unlink()
    # resume from the middle checkpoint; the run directory follows the checkpoint
    assert (
        main(
            [
                "train",
                "--resume_from",
                str(part / "checkpoints" / "checkpoint_step_10.pt"),
                "--max_steps",
                "30",
            ]
        )
        == 0
    )
    a, b = (
        weights(full / "checkpoints/checkpoint_step_30.pt"),
        weights(part / "checkpoints/checkpoint_step_30.pt"),
    )
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_without_timing(full / "metrics.jsonl") == metrics_without_timing(
        part / "metrics.jsonl"
    )


def test_resume_latest_extends_max_steps(data_dir, tmp_path):
    out = tmp_path / "run"
    common = [
        "--save_step_dense",
        "0",
        "--save_steps",
        "10",
        "--save_step_dense_interval",
        "10",
        "--eval_steps",
        "10",
    ]
    assert run_train(data_dir, out, "--max_steps", "10", *common) == 0
    assert run_train(data_dir, out, "--max_steps", "20", "--resume_from", "latest", *common) == 0
    full = tmp_path / "full"
    assert run_train(data_dir, full, "--max_steps", "20", *common) == 0
    a, b = (
        weights(out / "checkpoints/checkpoint_step_20.pt"),
        weights(full / "checkpoints/checkpoint_step_20.pt"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_latest_without_checkpoints_starts_fresh(data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_train(data_dir, out, "--max_steps", "4", "--resume_from", "latest") == 0
    assert (out / "checkpoints" / "checkpoint_step_4.pt").is_file()


def test_epoch_mode_and_max_steps_precedence(data_dir, tmp_path, capsys):
    out = tmp_path / "epochs"
    assert run_train(data_dir, out, "--num_epochs", "2", "--eval_steps", "1000") == 0
    args = json.loads((out / "training_args.json").read_text())
    spe = args["resolved"]["steps_per_epoch"]
    n_train = len(json.loads((data_dir / "train.json").read_text()))
    assert spe == n_train // 64
    assert args["resolved"]["max_steps"] == 2 * spe
    assert (out / "checkpoints" / f"checkpoint_step_{2 * spe}.pt").is_file()
    both = tmp_path / "both"
    assert run_train(data_dir, both, "--num_epochs", "2", "--max_steps", "3") == 0
    assert "wins over --num_epochs" in capsys.readouterr().out
    assert json.loads((both / "training_args.json").read_text())["resolved"]["max_steps"] == 3


def test_epoch_data_order_covers_each_item_once(data_dir):
    from revjepa.data import epoch_permutation

    perm = epoch_permutation(3, 0, 1000)
    assert sorted(perm.tolist()) == list(range(1000))
    assert torch.equal(perm, epoch_permutation(3, 0, 1000))
    assert not torch.equal(perm, epoch_permutation(3, 1, 1000))


# ----------------------------------------------------------------------------- checkpoints


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint_step_5.pt"

    def exploding_save(obj, fh):
        fh.write(b"PK\x03\x04 partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(UserError, match="No space left"):
        save_checkpoint(target, {"model_state_dict": {}, "config": {}})
    assert list(tmp_path.iterdir()) == []


def test_corrupted_checkpoint_is_detected(tmp_path):
    path = tmp_path / "checkpoint_step_1.pt"
    save_checkpoint(
        path, {"model_state_dict": {"w": torch.arange(1000.0)}, "config": {}, "step": 1}
    )
    assert load_checkpoint(path)["step"] == 1
    raw = bytearray(path.read_bytes())
    # flip bytes inside the tensor payload (a run of float32 values 0..999)
    needle = torch.arange(100.0, 110.0).numpy().tobytes()
    at = bytes(raw).find(needle)
    assert at > 0
    raw[at : at + 4] = b"\x00\x00\x80\x7f"
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="checksum mismatch"):
        load_checkpoint(path)
    path.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(UserError, match="checkpoint_step_1.pt"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- bad input


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "train_jepa.py", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--max_steps", "0"], "--max_steps must be positive"),
        (["--max_steps", "-5"], "--max_steps must be positive"),
        (["--k_pred_tok", "5"], "--k_pred_tok must be between 0 and 4"),
        (["--distance_metric", "manhattan"], "invalid choice"),
        (["--n_embd", "30", "--n_head", "4"], "not divisible"),
        (["--loss_dropout", "1.5"], "--loss_dropout"),
        (["--batch_size", "0"], "--batch_size must be positive"),
        (["--fp16", "--bf16"], "mutually exclusive"),
        (["--learning_rate", "abc"], "invalid float value"),
        (["--no_such_flag"], "unrecognized arguments"),
        (["--reverse_training", "words"], "invalid choice"),
        (["--vocab_size", "99"], "does not match"),
        (["--batch_size", "100000", "--max_steps", "1"], "fewer than one global batch"),
    ],
)
def test_bad_flags_exit_2_with_one_line(data_dir, tmp_path, flags, needle):
    out = tmp_path / "bad"
    proc = _cli(
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(out),
        "--n_layer",
        "1",
        "--n_embd",
        "32",
        "--n_head",
        "2",
        "--max_steps",
        "2",
        *flags,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_refuses_foreign_or_existing_run_directory(data_dir, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        from revjepa.config import RunConfig, apply_overrides
        from revjepa.train import train

        cfg = apply_overrides(
            RunConfig(), {"train": {"data_dir": str(data_dir), "output_dir": str(foreign)}}
        )
        train(cfg)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    out = tmp_path / "run"
    assert run_train(data_dir, out, "--max_steps", "2") == 0
    assert run_train(data_dir, out, "--max_steps", "2") == 2  # refused: resume it instead


def test_resume_with_conflicting_flags_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_train(data_dir, out, "--max_steps", "2") == 0
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    rc = main(
        [
            "train",
            "--output_dir",
            str(out),
            "--resume_from",
            "latest",
            "--n_embd",
            "64",
            "--max_steps",
            "4",
        ]
    )
    assert rc == 2
    after = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    assert before == after


# ----------------------------------------------------------------------------- torch.compile


class _Compiled(torch.nn.Module):
    """Stands in for torch.compile's wrapper: forwards to the model, or fails like a compiler
    that cannot handle the graph (compilation is lazy: the failure comes at the first call)."""

    def __init__(self, model: torch.nn.Module, fail: bool) -> None:
        super().__init__()
        self.model, self.fail, self.calls = model, fail, 0

    def forward(self, *args):
        self.calls += 1
        if self.fail:
            raise AssertionError("inductor: get_pw_red_splits\n(internal stack)")
        return self.model(*args)


@pytest.mark.parametrize("fail", [False, True])
def test_compile_probe_leaves_no_trace_and_falls_back_to_eager(
    data_dir, tmp_path, monkeypatch, capsys, fail
):
    """--compile on: the probe step (one forward + backward of the compiled model on the first
    batch) restores the RNG and drops its gradients, so a run whose compiled model computes the
    eager function ends bit-identical to --compile off (dropout 0.1 would notice a consumed RNG
    draw, AdamW a leftover gradient); a compiler failure becomes one warning and an eager run."""
    import revjepa.train as train_mod

    made: list[_Compiled] = []

    def fake_compile(model, cuda_graphs):
        assert cuda_graphs is False  # CPU
        made.append(_Compiled(model, fail))
        return made[-1]

    monkeypatch.setattr(train_mod, "compile_model", fake_compile)
    # both runs with the ops a compiled model gets (torch's plain ops; --compile off would
    # give the eager CPU ops, whose dropout masks are another draw): the probe is the only
    # difference left
    monkeypatch.setattr(train_mod, "step_ops", lambda device, compiled: TORCH_OPS)
    # no clipping: clipped gradients would hide a leftover probe gradient (2g clips like g)
    common = ("--max_steps", "12", "--max_grad_norm", "0")
    assert run_train(data_dir, tmp_path / "off", *common, "--compile", "off") == 0
    assert not made
    capsys.readouterr()
    assert run_train(data_dir, tmp_path / "on", *common, "--compile", "on") == 0
    assert len(made) == 1
    assert made[0].calls == (1 if fail else 13)  # the probe, then every step when it works
    printed = capsys.readouterr()
    lines = (printed.out + printed.err).splitlines()
    warned = [line.split(" ", 2)[2] for line in lines if "torch.compile failed" in line]
    if fail:
        assert warned == [
            "torch.compile failed (AssertionError: inductor: get_pw_red_splits): running eagerly"
        ]
    else:
        assert not warned
    a = weights(tmp_path / "off" / "checkpoints" / "checkpoint_step_12.pt")
    b = weights(tmp_path / "on" / "checkpoints" / "checkpoint_step_12.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_without_timing(tmp_path / "off" / "metrics.jsonl") == metrics_without_timing(
        tmp_path / "on" / "metrics.jsonl"
    )


def test_compiled_run_resumes_bit_identically(data_dir, tmp_path):
    """A real --compile on run (dropout 0.1: masks from inductor's random stream) resumed
    halfway ends with the uninterrupted run's weights and metrics, bit for bit (CPU)."""
    common = ("--compile", "on", "--save_step_dense_interval", "6", "--save_step_dense", "12")
    assert run_train(data_dir, tmp_path / "a", *common, "--max_steps", "12") == 0
    assert run_train(data_dir, tmp_path / "b", *common, "--max_steps", "6") == 0
    resumed = ("--max_steps", "12", "--resume_from", "latest")
    assert run_train(data_dir, tmp_path / "b", *common, *resumed) == 0
    a = weights(tmp_path / "a" / "checkpoints" / "checkpoint_step_12.pt")
    b = weights(tmp_path / "b" / "checkpoints" / "checkpoint_step_12.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the last record (a log window after the resume; the 6-step run closed its own window at
    # its max_steps, so the window 6-10 legitimately differs)
    last = [metrics_without_timing(tmp_path / x / "metrics.jsonl")[-1] for x in ("a", "b")]
    assert last[0] == last[1] and last[0]["step"] == 12 and "eval_test_mrr" in last[0]
    # and the compiled run really differs from an eager one (its own dropout stream)
    assert run_train(data_dir, tmp_path / "e", "--compile", "off", "--max_steps", "6") == 0
    e = weights(tmp_path / "e" / "checkpoints" / "checkpoint_step_6.pt")
    c = weights(tmp_path / "b" / "checkpoints" / "checkpoint_step_6.pt")
    assert not all(torch.equal(e[k], c[k]) for k in e)


def test_real_compile_of_the_losses_matches_eager_and_compiles_once(small_dir):
    """The real torch.compile path (CPU inductor here; on CUDA the same graph gets CUDA graphs):
    batches with different kind mixes give the eager losses and gradients, and the fixed-shape
    packing means one graph, never a recompilation."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from revjepa.compiled import compile_model
    from revjepa.config import ModelConfig, ObjectiveConfig
    from revjepa.data import Batch, load_dataset
    from revjepa.families import build_model
    from revjepa.step import StepContext, forward_losses

    ds = load_dataset(small_dir)
    torch.manual_seed(0)
    oc = ObjectiveConfig(k_pred_tok=1, loss_dropout=0.3)
    mc = ModelConfig(n_layer=1, n_embd=32, n_head=2, dropout=0.0)
    model = build_model(mc, oc, ds.vocab, ds.entity_len).train()
    torch._dynamo.reset()
    counters.clear()
    compiled = compile_model(model, cuda_graphs=False)
    cpu = torch.device("cpu")

    def loss_and_grads(run_model, seq, kind, keep):
        ctx = StepContext(run_model, None, None, [], oc, "fp32", cpu, 1, 0.0)
        _, loss, means = forward_losses(ctx, Batch(seq, kind, keep))
        ntp, jepa = means["ntp"], means["jepa"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return torch.stack([loss, ntp, jepa]).detach(), grads

    n_jepa = []
    for i in range(3):
        idx = torch.randperm(len(ds.train.seq), generator=torch.Generator().manual_seed(i))[:48]
        seq, kind = ds.train.seq[idx], ds.train.kind[idx]
        keep = torch.rand(48, generator=torch.Generator().manual_seed(10 + i)) < 0.7
        n_jepa.append(int((kind == KIND_ID["train"]).sum()))
        eager, ge = loss_and_grads(model, seq, kind, keep)
        comp, gc = loss_and_grads(compiled, seq, kind, keep)
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
        assert ge.keys() == gc.keys() and len(ge) > 5
        # inductor's generated kernels (vectorised for this CPU) against the eager ops / C
        # kernels: float32 rounding that follows each tensor's magnitudes, not each element's
        # (an elementwise atol 1e-6 was 14% used on near-zero elements): 1e-5 of the largest
        for name in ge:
            diff = (gc[name] - ge[name]).abs().max().item()
            assert diff <= 1e-5 * ge[name].abs().max().item(), (name, diff)
    assert len(set(n_jepa)) > 1  # the batches really had different packings
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["gpt2_jepa", "concept_jepa", "mlm_u"])
def test_cuda_training_step_never_waits_for_the_device(small_dir, family):
    """The trainer's batch layout (sequences on the GPU, kinds on the host) and one training
    step, loss dropout included, with CUDA's sync debug mode raising on any host sync."""
    from revjepa.config import ModelConfig, ObjectiveConfig
    from revjepa.data import Batch, load_dataset, loss_dropout_keep
    from revjepa.families import build_model
    from revjepa.step import StepContext, param_groups, train_step

    dev = torch.device("cuda")
    ds = load_dataset(small_dir)
    mc = ModelConfig(family=family, n_layer=1, n_embd=64, n_head=2, dropout=0.1)
    oc = ObjectiveConfig(loss_dropout=0.2)
    model = build_model(mc, oc, ds.vocab, ds.entity_len, train_seq=ds.train.seq).to(dev)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    params = [p for p in model.parameters() if p.requires_grad]
    seq_all = ds.train.seq.to(dev)

    def step(i: int):
        idx = torch.arange(i * 64, (i + 1) * 64)
        keep = loss_dropout_keep(0, i, 64, 0.2).to(dev, non_blocking=True)
        seq, kind = seq_all[idx.to(dev, non_blocking=True)], ds.train.kind[idx]
        ctx = StepContext(model, opt, scaler, params, oc, "bf16", dev, 1, 1.0)
        return train_step(ctx, Batch(seq, kind, keep), 1e-3)

    step(0)  # lazy CUDA initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = step(1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(float(res.loss)) and not bool(res.bad)


@pytest.mark.parametrize("max_norm", [0.05, 1e6, 0.0])  # clipping, not reached, off
def test_train_step_update_equals_clip_grad_norm_then_adamw(small_dir, max_norm):
    """train_step's update (fused AdamW, found_inf set) and logged norm equal clip_grad_norm_
    followed by a plain (foreach) AdamW step."""
    import copy

    from revjepa.config import ModelConfig, ObjectiveConfig
    from revjepa.data import Batch, load_dataset
    from revjepa.families import build_model
    from revjepa.step import StepContext, forward_losses, param_groups, train_step

    ds = load_dataset(small_dir)
    torch.manual_seed(0)
    oc = ObjectiveConfig(k_pred_tok=1)
    model = build_model(
        ModelConfig(n_layer=1, n_embd=32, n_head=2, dropout=0.0), oc, ds.vocab, ds.entity_len
    )
    model.train()
    reference = copy.deepcopy(model)
    cpu = torch.device("cpu")
    seq, kind = ds.train.seq[:24], ds.train.kind[:24]

    def adamw(m, fused):
        return torch.optim.AdamW(param_groups(m, 0.1), lr=1e-2, fused=fused, foreach=not fused)

    opt = adamw(model, True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    params = [p for p in model.parameters() if p.requires_grad]
    ctx = StepContext(model, opt, scaler, params, oc, "fp32", cpu, 1, max_norm)
    res = train_step(ctx, Batch(seq, kind, None), 1e-2)

    ref_opt = adamw(reference, False)
    ref_ctx = StepContext(reference, None, None, [], oc, "fp32", cpu, 1, 0.0)
    _, loss, _ = forward_losses(ref_ctx, Batch(seq, kind, None))
    loss.backward()
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm if max_norm > 0 else math.inf)
    ref_opt.step()

    assert res.grad_norm.item() == pytest.approx(norm.item(), rel=1e-6)
    if max_norm == 0.05:
        assert norm.item() > 10 * max_norm  # the clip really applied
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
