"""Model family concept_jepa: hand-computed loss/MRR and memory layer, patch independence, no
positions, and a real run through the CLI (checkpoints, evaluation, export, bit-identical resume)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2Model

import revjepa.families.concept_jepa as concept_module
from revjepa.cli import main
from revjepa.config import ModelConfig, ObjectiveConfig, RunConfig, apply_overrides, expand_preset
from revjepa.data import load_dataset
from revjepa.errors import UserError
from revjepa.evaluate import evaluate_checkpoint, format_table
from revjepa.families.concept_jepa import (
    ConceptJepa,
    MemoryLayer,
    concept_logits,
    load_pretrained,
    ranks,
    rms_norm,
    run_blocks,
)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- hand-computed


def test_in_batch_loss_and_mrr_hand_computed():
    # d = 2, two items of two patches; labels: each item's second patch (columns 1 and 3)
    pred = rms_norm(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    targets = torch.tensor([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [2.0, 2.0]]]).flatten(0, 1)
    labels = torch.tensor([1, 3])
    logits = concept_logits(pred, targets)
    # by hand: rms_norm scales both rows by c = 1 / sqrt(1 + 1e-6), so the logits are
    # c (0, 1, 1, 4) with label 1 and c (0, 1, -1, 0) with label 3 (a figure to 6 digits that
    # left out the 1e-6 held by 2e-7, one float32 ulp: not on every CPU)
    c = 1.0 / math.sqrt(1.0 + 1e-6)
    ce0 = math.log(1.0 + 2.0 * math.exp(c) + math.exp(4.0 * c)) - c
    ce1 = math.log(2.0 + math.exp(c) + math.exp(-c))
    assert F.cross_entropy(logits, labels).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    rank = ranks(logits, logits.gather(1, labels[:, None]).squeeze(1))
    # row 2: logits (0, 1, -1, 0), label logit 0: only candidate 1 is strictly larger (the tie
    # with candidate 0 does not count)
    assert rank.tolist() == [2, 2]
    assert (1.0 / rank.double()).mean().item() == 0.5
    # temperature divides the logits; excluded candidates leave the softmax
    assert torch.allclose(concept_logits(pred, targets, 0.5), 2 * logits)
    excl = torch.zeros(2, 4, dtype=torch.bool)
    excl[1, 1] = True
    assert torch.isinf(concept_logits(pred, targets, exclude=excl)[1, 1])


def memory(top_k: int) -> MemoryLayer:
    mem = MemoryLayer(3, 2, top_k)
    with torch.no_grad():
        mem.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        mem.values.copy_(torch.tensor([[10.0, 0.0], [0.0, 10.0], [5.0, 5.0]]))
    return mem


def test_memory_layer_hand_computed():
    u = torch.tensor([[1.0, 0.2]])  # scores (1, 0.2, 1.2) / sqrt(2)
    mem = memory(1)
    out = mem(u)
    assert torch.allclose(out, torch.tensor([[5.0, 5.0]]))
    out.sum().backward()
    grad = mem.values.grad
    assert grad[2].abs().sum() > 0 and grad[:2].abs().sum() == 0  # only the third value row
    # top 2: keys 2 and 0, softmax weights w and 1 - w with w = sigmoid((1.2 - 1) / sqrt(2))
    w = 1.0 / (1.0 + math.exp(-0.2 / math.sqrt(2.0)))
    expected = torch.tensor([[10.0 * (1.0 - w) + 5.0 * w, 5.0 * w]])  # (7.3235, 2.6765)
    assert torch.allclose(memory(2)(u), expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- model structure


def tiny_model(abstract_or_small: Path, **model_kw) -> tuple[ConceptJepa, torch.Tensor]:
    ds = load_dataset(abstract_or_small)
    kw = dict(family="concept_jepa", n_embd=16, n_head=2, dropout=0.0, **model_kw)
    torch.manual_seed(0)
    model = ConceptJepa(ModelConfig(**kw), ObjectiveConfig(), ds.vocab, ds.entity_len, ds.train.seq)
    return model.eval(), ds.train.seq[:8]


VARIANTS = [
    dict(num_rec_layers=1, num_sem_layers=1),
    dict(num_rec_layers=2, num_sem_layers=3, concept_norm="layernorm"),
    dict(memory_layer=True, memory_top_k=2, num_sem_layers=2),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_patches_are_independent(small_dir, variant):
    model, seq = tiny_model(small_dir, **variant)
    e = model.entity_len
    with torch.no_grad():
        patches, concepts, pred, _ = model.encode(seq)
        # the tail: no concept but its own, and never the prediction
        other = seq.clone()
        other[:, e + 2 :] = seq[torch.arange(7, -1, -1), e + 2 :]
        _, c2, p2, _ = model.encode(other)
        assert torch.equal(c2[:, :3], concepts[:, :3]) and torch.equal(p2, pred)
        assert not torch.equal(c2[:, 3], concepts[:, 3])
        # the head entity: only its own concept (and so the prediction) changes
        other = seq.clone()
        other[:, :e] = seq[torch.arange(7, -1, -1), :e]
        _, c3, _, _ = model.encode(other)
        assert torch.equal(c3[:, 1:], concepts[:, 1:]) and not torch.equal(c3[:, 0], concepts[:, 0])
        # one patch of one item: no other patch, of this item or another, changes
        flat = patches.flatten(0, 1).clone()
        flat[5, 0] = flat[4, 0]  # item 1's relation patch gets item 1's head token
        c4 = model.recognise(flat)
        base = concepts.flatten(0, 1)
        keep = torch.arange(flat.shape[0]) != 5
        assert torch.allclose(c4[keep], base[keep], atol=1e-6)
        assert not torch.allclose(c4[5], base[5])
        # the pads: a different pad embedding changes nothing at all
        model.wte.weight[model.pad_id] += 1.0
        _, c5, p5, _ = model.encode(seq)
        assert torch.equal(c5, concepts) and torch.equal(p5, pred)
        assert (patches[:, 1:3, 1:] == model.pad_id).all()  # there were pads to change


def test_no_positional_parameters(small_dir):
    for variant in VARIANTS:
        model, seq = tiny_model(small_dir, **variant)
        names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
        assert not [n for n in names if "wpe" in n or "pos" in n]
    # order reaches the semantic module only through the causal mask: with one block the
    # output at the <mask> patch does not change when the two earlier concepts swap places
    model, seq = tiny_model(small_dir, **VARIANTS[0])
    with torch.no_grad():
        h = torch.randn(4, 3, 16)
        a, _ = run_blocks(model.sem, h)
        b, _ = run_blocks(model.sem, h[:, [1, 0, 2]])
        assert torch.allclose(a[:, 2], b[:, 2], atol=1e-6)
        # ... and the blocks are GPT-2's own math (HF GPT2Model with a zero position table)
        hf = GPT2Model(GPT2Config(n_embd=16, n_head=2, n_layer=2, n_positions=8)).eval()
        hf.h[0].load_state_dict(model.sem[0].state_dict())
        hf.wpe.weight.zero_()
        ref = hf(inputs_embeds=h, output_hidden_states=True).hidden_states[1]
        assert torch.allclose(a, ref, atol=1e-5)


def test_model_loss_is_the_in_batch_formula(small_dir):
    model, seq = tiny_model(small_dir, **VARIANTS[0])
    with torch.no_grad():
        out = model(seq, torch.zeros(8, dtype=torch.long))
        _, concepts, pred, _ = model.encode(seq)
        logits = concept_logits(pred, concepts.flatten(0, 1))
        ref = F.cross_entropy(logits, torch.arange(8) * 4 + 3, reduction="sum")
    assert (
        torch.allclose(out.sums["jepa"], ref)
        and out.counts["jepa"] == 8
        and list(out.sums) == ["jepa"]
    )
    keep = torch.tensor([True, False] * 4)
    assert model(seq, seq[:, 0], keep).counts["jepa"] == 4


def test_evaluation_metrics_are_per_item_and_batch_size_free(small_dir, monkeypatch):
    model, _ = tiny_model(small_dir, **VARIANTS[1])
    split = load_dataset(small_dir, with_train=False).valid["test"]
    n_ent = model.entities.shape[0]
    assert n_ent not in (4 * 30, 4 * 10, 4 * 100)  # in-batch scores have 4 per item
    full = []  # the scores and target scores of every full ranking, as the evaluator ranks them
    real_ranks = concept_module.ranks

    def spy(scores, target):
        if scores.shape[1] == n_ent:
            full.append((scores.detach().clone(), target.detach().clone()))
        return real_ranks(scores, target)

    monkeypatch.setattr(concept_module, "ranks", spy)
    a = model.evaluate_split(split, 30, per_layer=True)
    calls_a, full[:] = list(full), []
    b = model.evaluate_split(split, 100)
    calls_b = list(full)
    assert a["num_samples"] == 100 and a["num_entities"] == n_ent
    assert (a["concept_batch_size"], b["concept_batch_size"]) == (30, 100)
    assert [r["layer"] for r in a["per_layer"]] == [0, 1, 2, 3]
    # the last layer's full ranking is the model's own: the same tensors, the same numbers
    assert a["per_layer"][-1]["concept_mrr_full"] == pytest.approx(a["concept_mrr_full"])
    assert model.training is False
    model.train()
    model.evaluate_split(split, 50)
    assert model.training  # the mode is restored

    # The full-ranking metric does not depend on the batching (in-batch ones do, by design).
    # Batches of 30 and of 100 (and the entity table in chunks of 120 and of 400) are other
    # matmul shapes, so the scores differ in the last bits; the random model has near-ties
    # among 1600 entities. So: the ranks of batch 100's scores with every entity whose score
    # is within the two computations' largest difference of the target's counted either way
    # (twice that, as margin) bound both metrics, and few items are ambiguous.
    per_batch = 1 + len(a["per_layer"])  # each batch: the model's ranking, then each layer's
    assert len(calls_a) == 4 * per_batch and len(calls_b) == 1
    scores_a = torch.cat([calls_a[i][0] for i in range(0, len(calls_a), per_batch)]).double()
    target_a = torch.cat([calls_a[i][1] for i in range(0, len(calls_a), per_batch)]).double()
    scores, target = (x.double() for x in calls_b[0])
    assert (scores_a - scores).abs().max() <= 1e-5 * scores.abs().max()  # float32 rounding
    tol = 2 * ((scores_a - scores).abs().amax(1) + (target_a - target).abs())
    diff = scores - target[:, None]
    own = (model.entity_index(split.seq[:, model.entity_len + 2 :]) >= 0).long()
    best_rank = 1 + (diff > tol[:, None]).sum(1)
    worst_rank = 1 + (diff >= -tol[:, None]).sum(1) - own  # the target's own entry: no rival
    ambiguous = int((best_rank != worst_rank).sum())
    assert ambiguous <= 10, ambiguous
    per_item = {"concept_mrr_full": lambda r: 1.0 / r, "concept_acc_full": lambda r: r == 1}
    for got in (a, b):
        for key, value in per_item.items():
            best, worst = (
                value(r.double()).double().mean().item() for r in (best_rank, worst_rank)
            )
            assert worst - 1e-12 <= got[key] <= best + 1e-12, (key, got[key], worst, best)
    print(f"ambiguous full ranks: {ambiguous} of {len(split)}; tolerance up to {tol.max():.1e}")


def test_config_validation_and_presets():
    def cfg(**model):
        return apply_overrides(RunConfig(), {"model": {"family": "concept_jepa", **model}})

    cfg().validate()
    with pytest.raises(UserError, match="num_rec_layers 1"):
        cfg(memory_layer=True, num_rec_layers=2).validate()
    with pytest.raises(UserError, match="needs --memory_layer"):
        cfg(memory_value_only=True).validate()
    no_jepa = apply_overrides(cfg(), {"objective": {"use_jepa": False}})
    with pytest.raises(UserError, match="nothing to train"):
        no_jepa.validate()
    over = expand_preset({"train": {"preset": "ws_jepa_mem_6", "batch_size": 8}})
    c = apply_overrides(RunConfig(), over)
    c.validate()
    assert (c.model.num_sem_layers, c.model.memory_layer, c.model.n_embd) == (6, True, 768)
    assert (c.train.batch_size, c.train.weight_decay, c.train.warmup_steps) == (8, 0.25, 2000)
    assert c.train.preset == "ws_jepa_mem_6"


# ----------------------------------------------------------------------------- real runs

RUN = [
    "--model_family",
    "concept_jepa",
    "--n_embd",
    "32",
    "--n_head",
    "2",
    "--batch_size",
    "64",
    "--learning_rate",
    "3e-3",
    "--dropout",
    "0.1",
    "--loss_dropout",
    "0.2",
    "--save_step_dense",
    "8",
    "--save_step_dense_interval",
    "4",
    "--save_steps",
    "8",
    "--eval_steps",
    "8",
    "--log_interval",
    "4",
    "--eval_batch_size",
    "50",
    "--device",
    "cpu",
    "--seed",
    "5",
]


def train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data_dir", str(data), "--output_dir", str(out), *RUN, *extra])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, small_dir) -> Path:
    out = tmp_path_factory.mktemp("concept") / "full"
    assert train(small_dir, out, "--max_steps", "16") == 0
    return out


def test_run_checkpoints_evaluate_and_export(full_run, small_dir, tmp_path, capsys):
    ckpts = full_run / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == sorted([f"checkpoint_step_{s}.pt" for s in (4, 8, 16)] + ["best_model.pt"])
    args = json.loads((full_run / "training_args.json").read_text())
    assert args["model"]["family"] == "concept_jepa"
    records = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_test_concept_mrr_full" in r]
    assert [r["step"] for r in evals] == [8, 16]
    # the family's one loss term: no NTP key (it has no NTP loss), and loss = lambda x JEPA
    assert all(r["jepa_loss"] > 0 and "ntp_loss" not in r for r in records if "loss" in r)
    assert all(r["loss"] == r["jepa_loss"] for r in records if "loss" in r)
    state = torch.load(ckpts / "checkpoint_step_16.pt", weights_only=True)
    assert state["family"] == "concept_jepa" and state["model_state_dict"]["entities"].shape[0] > 0
    best = torch.load(ckpts / "best_model.pt", weights_only=True)
    assert best["best_mrr"] == max(r["eval_test_concept_mrr_full"] for r in evals)

    # the seed's evaluation script, on a checkpoint alone (the model is rebuilt from it)
    out_json = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "evaluate_all_splits.py"), "--checkpoint"]
        + [str(ckpts / "checkpoint_step_16.pt"), "--batch_size", "40", "--output", str(out_json)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "concept MRR (in-batch)" in proc.stdout and "concept MRR full" in proc.stdout
    results = json.loads(out_json.read_text())
    for m in results["splits"].values():
        assert 0 < m["concept_mrr_full"] <= 1 and 0 < m["concept_mrr"] <= 1
        assert m["concept_batch_size"] == 40 and m["num_samples"] == 100
    test = results["splits"]["test"]
    # the training run's evaluation (batches of 50) is the checkpoint's; the script's batches of
    # 40 are another float path (near-ties among the entities may rank otherwise: see
    # test_evaluation_metrics_are_per_item_and_batch_size_free), so each is compared with an
    # evaluation of the same batch size
    ds = load_dataset(small_dir, with_train=False)
    ckpt16 = ckpts / "checkpoint_step_16.pt"
    for batch, want in (
        (50, evals[-1]["eval_test_concept_mrr_full"]),
        (40, test["concept_mrr_full"]),
    ):
        api = evaluate_checkpoint(ckpt16, ds, batch, ("test",))["splits"]["test"]
        assert api["concept_mrr_full"] == pytest.approx(want, rel=1e-12), batch

    # export: safetensors + config; load_pretrained gives the same evaluation
    assert main(["export", str(ckpts / "checkpoint_step_16.pt"), str(tmp_path / "hf")]) == 0
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"model.safetensors", "config.json", "vocab.json", "revjepa.json"} <= files
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "revjepa_concept_jepa" and config["num_rec_layers"] == 1
    model = load_pretrained(tmp_path / "hf")
    again = model.evaluate_split(ds.valid["test"], 40)
    assert again["concept_mrr_full"] == pytest.approx(test["concept_mrr_full"], rel=1e-12)

    # the whole-run sweep (best step per split) and the table
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(full_run), "--splits", "test"]) == 0
    assert "best test MRR" in capsys.readouterr().out
    table = format_table(evaluate_checkpoint(ckpts / "best_model.pt", ds, 50, ("test",)))
    assert "concept loss" in table and "entities" in table


def test_resume_is_bit_identical(full_run, small_dir, tmp_path):
    part = tmp_path / "part"
    assert train(small_dir, part, "--max_steps", "8") == 0
    assert train(small_dir, part, "--max_steps", "16", "--resume_from", "latest") == 0
    a = torch.load(part / "checkpoints/checkpoint_step_16.pt", weights_only=True)
    b = torch.load(full_run / "checkpoints/checkpoint_step_16.pt", weights_only=True)
    for key in ("model_state_dict", "optimizer_state_dict"):
        flat_a, flat_b = a[key], b[key]
        if key == "optimizer_state_dict":
            flat_a = {k: t for k, s in flat_a["state"].items() for t in s.values()}
            flat_b = {k: t for k, s in flat_b["state"].items() for t in s.values()}
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a)

    def rows(run):
        out = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        timing = ("steps_per_s", "tokens_per_s", "mfu")
        return [{k: v for k, v in r.items() if k not in timing} for r in out]

    assert rows(part) == rows(full_run)


def test_memory_value_only_run_freezes_embeddings_and_keys(small_dir, tmp_path):
    out = tmp_path / "mem"
    extra = ["--memory_layer", "--memory_value_only", "--memory_spare_rows", "3"]
    extra += ["--concept_norm", "layernorm", "--concept_candidates", "entities"]
    assert train(small_dir, out, "--max_steps", "8", *extra) == 0
    s4, s8 = (
        torch.load(out / f"checkpoints/checkpoint_step_{s}.pt", weights_only=True)[
            "model_state_dict"
        ]
        for s in (4, 8)
    )
    assert torch.equal(s4["wte.weight"], s8["wte.weight"])
    assert torch.equal(s4["memory.keys"], s8["memory.keys"])
    assert not torch.equal(s4["memory.values"], s8["memory.values"])
    n_ent = s8["entities"].shape[0]
    assert s8["memory.keys"].shape[0] == n_ent + 3 * 2 + 1 + 3  # entities, 6 relations, <mask>
    # keys start as the mean name-token embedding of each entity
    mean = s8["wte.weight"][s8["entities"]].mean(1)
    assert torch.allclose(s8["memory.keys"][:n_ent], mean)


def test_ddp_two_processes(small_dir, tmp_path):
    """torchrun (gloo on CPU): each rank contrasts against its own batch slice (documented)."""
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k != "REVJEPA_CRASH"}
    env["OMP_NUM_THREADS"] = "1"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "train_jepa.py"]
        + ["--data_dir", str(small_dir), "--output_dir", str(out), *RUN]
        + ["--batch_size", "32", "--max_steps", "8"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = json.loads((out / "training_args.json").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["global_batch_size"] == 64
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8]
    assert 0 < rows[-1]["eval_test_concept_mrr_full"] <= 1
    assert (out / "checkpoints" / "checkpoint_step_8.pt").is_file()
