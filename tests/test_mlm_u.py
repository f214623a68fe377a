"""Model family mlm_u (MLM-U, Kitouni et al. 2024): the masking rule against an independent
draw and its distribution, the loss against a hand-written float64 bidirectional GPT-2, the
entity ranks against a slow per-candidate loop (with exact ties), the token metrics against
the same loop, and end to end: bit-identical resume (dropout on: the mask draws and the
dropout masks share torch's CPU generator), evaluate, status, export (loaded by Hugging Face,
run bidirectionally), a sweep with an mlm_u variant and its report, and 2 processes vs 1."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
import yaml

from revjepa.checkpoint import load_checkpoint
from revjepa.cli import main
from revjepa.config import ModelConfig, ObjectiveConfig, RunConfig, foreign_fields
from revjepa.data import (
    KIND_ID,
    KINDS,
    GenConfig,
    Split,
    entity_table,
    generate,
    load_dataset,
    vocab_from_mapping,
    write_generated,
)
from revjepa.errors import UserError
from revjepa.evaluate import format_table
from revjepa.families import FAMILIES, build_model, model_from_checkpoint
from revjepa.families.mlm_u import MlmU, draw_masks, expected_masked
from revjepa.flops import train_step_flops
from revjepa.metrics import chance_mrr
from revjepa.runlog import read_jsonl
from revjepa.status import collect_status

N_TOKENS = 8  # entity tokens <a0>..<a7> of the hand-built vocabulary
TOL = 1e-4  # |our float32 score - the float64 loop's score|
HF5 = int(transformers.__version__.split(".")[0]) >= 5  # honours config.is_causal = False
HAND_TABLES = {
    1: [[0], [1], [2], [3], [5], [6]],
    2: [[0, 1], [0, 2], [0, 3], [1, 0], [1, 4], [2, 5], [3, 3], [5, 0], [5, 1], [6, 6], [7, 2]],
    3: [[0, 1, 2], [0, 1, 3], [0, 2, 2], [1, 0, 0], [1, 0, 2], [1, 4, 4], [3, 3, 3], [5, 0, 1],
        [5, 1, 7], [6, 1, 7]],
}  # fmt: skip


# ----------------------------------------------------------------------------- hand-built pieces


def hand_vocab():
    names = [f"<a{i}>" for i in range(N_TOKENS)] + ["<mask>", "<r_0>", "<r_0_inv>", "<pad>"]
    return vocab_from_mapping({t: i for i, t in enumerate(names + ["<PRED>"])}, "hand")


VOCAB = hand_vocab()
M_ID = VOCAB.pred_id  # [M] of the hand-built vocabulary


def hand_items(table: list[list[int]], n: int, seed: int, outside: list[int]) -> torch.Tensor:
    """n items `head r <mask> tail` over the table, the last one with a tail outside it."""
    rng = random.Random(seed)
    rel = [VOCAB.token_to_id["<r_0>"], VOCAB.token_to_id["<r_0_inv>"]]
    rows = [
        rng.choice(table) + [rng.choice(rel), VOCAB.mask_id] + rng.choice(table)
        for _ in range(n - 1)
    ]
    rows.append(table[0] + [rel[0], VOCAB.mask_id] + outside)
    return torch.tensor(rows)


def random_model(e: int, seed: int, tie: bool = True, dropout: float = 0.1) -> MlmU:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=4, dropout=dropout, tie_embeddings=tie)
    return MlmU(cfg, ObjectiveConfig(), VOCAB, e)


def reference_logits(model: MlmU, ids: list[int]) -> torch.Tensor:
    """(T, V) float64 logits of one sequence by a hand-written GPT-2 forward whose attention
    has no mask at all: the definition of the bidirectional encoder, independent of our
    blocks, ops and batching."""
    lm = model.lm.double()
    try:
        tr, t = lm.transformer, len(ids)
        d = tr.wte.weight.shape[1]
        heads = tr.h[0].attn.num_heads
        x = tr.wte.weight[ids] + tr.wpe.weight[:t]
        for block in tr.h:
            a = block.ln_1(x) @ block.attn.c_attn.weight + block.attn.c_attn.bias
            q, k, v = (z.view(t, heads, d // heads).transpose(0, 1) for z in a.split(d, -1))
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d // heads), -1)
            y = (att @ v).transpose(0, 1).reshape(t, d)
            x = x + y @ block.attn.c_proj.weight + block.attn.c_proj.bias
            hid = block.ln_2(x) @ block.mlp.c_fc.weight + block.mlp.c_fc.bias
            hid = F.gelu(hid, approximate="tanh")
            x = x + hid @ block.mlp.c_proj.weight + block.mlp.c_proj.bias
        return tr.ln_f(x) @ lm.lm_head.weight.T
    finally:
        lm.float()


def loop_scores(model: MlmU, seq: torch.Tensor, table: list[list[int]]):
    """The definition, one item, one candidate, one tail token at a time: score(c) =
    sum_j log p(c_j | e1 r <mask> c_<j [M]..[M]) at tail position j, each factor from the
    float64 reference forward of the whole row."""
    e = model.entity_len
    model.eval()
    out = []
    with torch.no_grad():
        for row in seq.tolist():
            prefix, tail = row[: e + 2], row[e + 2 :]

            def score(c: list[int], prefix: list[int] = prefix) -> float:
                total = 0.0
                for j in range(e):
                    logits = reference_logits(model, prefix + c[:j] + [model.m_id] * (e - j))
                    total += float(torch.log_softmax(logits[e + 2 + j], -1)[c[j]])
                return total

            out.append(([score(c) for c in table], score(tail), tail))
    return out


def rank_bounds(scores, target, tail, table, tol):
    """1 + #candidates above the tail by more than tol; and counting those within tol too."""
    others = [s for s, c in zip(scores, table) if c != tail]
    return 1 + sum(s - target > tol for s in others), 1 + sum(s - target >= -tol for s in others)


def our_ranks(model: MlmU, seq: torch.Tensor, max_rows=None, prune=True) -> torch.Tensor:
    """Per-item ranks through the evaluator's own steps (evaluate_split sums them)."""
    model.eval()
    with torch.no_grad():
        trie, nodes = model.entity_setup(seq)
        logits, _ = model.chain_logits(seq)
        return 1 + model.entity_rank_counts(seq, logits, trie, nodes, max_rows, prune)


# ----------------------------------------------------------------------------- the masking rule


def test_mask_draw_is_the_rule_on_torchs_generator_and_has_its_distribution():
    torch.manual_seed(123)
    got = draw_masks(6, 5)
    torch.manual_seed(123)  # the rule by hand, from the same generator
    rate = 1.0 - torch.rand(6)
    u = torch.rand(6, 5)
    for i in range(6):
        first = min(range(5), key=lambda j: float(u[i, j]))
        want = [bool(u[i, j] < rate[i]) or j == first for j in range(5)]
        assert got[i].tolist() == want
    # the distribution: E[#masked] = P/2 + 1/(P + 1), P(all masked) = 1/(P + 1), and each
    # count k >= 2 of P = 5 positions has probability C(5, k) B(k + 1, 6 - k) = 1/6
    torch.manual_seed(0)
    n = 200_000
    counts = draw_masks(n, 5).sum(1)
    assert int(counts.min()) == 1
    assert float(counts.double().mean()) == pytest.approx(expected_masked(5), abs=0.01)
    assert expected_masked(5) == pytest.approx(2.5 + 1 / 6)
    share = torch.bincount(counts, minlength=6).double() / n
    # k = 1: its own 1/6 plus the forced one when none is drawn (1/6)
    assert share[1:].tolist() == pytest.approx([2 / 6, 1 / 6, 1 / 6, 1 / 6, 1 / 6], abs=0.005)
    # every position equally often
    pos = draw_masks(n, 5).double().mean(0)
    assert pos.tolist() == pytest.approx([expected_masked(5) / 5] * 5, abs=0.005)


@pytest.mark.parametrize("e", [1, 2])
def test_training_masks_spare_the_template_slot_and_eval_draws_nothing(e):
    model = random_model(e, 0)
    torch.manual_seed(5)
    masks = model.training_masks(4000)
    assert not masks[:, e + 1].any() and bool((masks.sum(1) >= 1).all())
    assert masks[:, [i for i in range(2 * e + 2) if i != e + 1]].any(0).all()
    seq = hand_items(HAND_TABLES[e], 20, 1, [4] * e)
    kind = torch.full((20,), KIND_ID["test"])
    model.eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        _, plan, _ = model.prepare(seq, kind)
    assert plan[: seq.numel()].view(seq.shape).bool().equal(model.tail_masks(20))
    model.set_entity_table(torch.tensor(HAND_TABLES[e]))
    model.evaluate_split(Split(seq, kind), 7, per_layer=True, entity_mrr=True)
    assert torch.equal(torch.get_rng_state(), state)  # evaluation never shifts the stream


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("e", [1, 2])
@pytest.mark.parametrize("tie", [True, False])
def test_loss_is_the_cross_entropy_at_the_masked_tokens(e, tie):
    """Training mode (dropout 0): the mask is the generator's next draw; the `mlm` sum and
    count equal the float64 reference forward of each [M]-filled row, and the fixed-shape
    plan (torch.compile's) gives the same sum and count."""
    model = random_model(e, 3, tie=tie, dropout=0.0)
    seq = hand_items(HAND_TABLES[e], 12, 2, [4] * e)
    kind = torch.full((12,), KIND_ID["train"])
    torch.manual_seed(9)
    out = model(seq, kind)
    torch.manual_seed(9)
    masked = torch.zeros(seq.shape, dtype=torch.bool)
    masked[:, model.maskable] = draw_masks(12, 2 * e + 1)
    total, count = 0.0, 0
    for row, m in zip(seq.tolist(), masked.tolist()):
        ids = [M_ID if mk else t for t, mk in zip(row, m)]
        with torch.no_grad():
            lp = torch.log_softmax(reference_logits(model, ids), -1)
        for j, (t, mk) in enumerate(zip(row, m)):
            if mk:
                total -= float(lp[j, t])
                count += 1
    assert float(out.counts["mlm"]) == count
    assert out.sums["mlm"].item() == pytest.approx(total, rel=1e-5)
    fixed = model.losses(*model.plan_masks(seq, masked, fixed_shapes=True))
    assert float(fixed.counts["mlm"]) == count
    assert fixed.sums["mlm"].item() == pytest.approx(total, rel=1e-5)
    # the objective: the mean over masked tokens, weight 1 (mlm has no weight field)
    assert ObjectiveConfig().total({"mlm": out.sums["mlm"] / count}) == out.sums["mlm"] / count
    out.sums["mlm"].backward()
    assert model.lm.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not HF5, reason="transformers < 5 ignores config.is_causal")
def test_our_encoder_is_hugging_faces_forward_with_is_causal_false():
    model = random_model(2, 4, dropout=0.0).eval()
    seq = hand_items(HAND_TABLES[2], 9, 3, [4, 4])
    with torch.no_grad():
        h, _ = model.encode(seq)
        ours = model.lm.transformer.ln_f(h) @ model.lm.lm_head.weight.T
        hf = model.lm(seq).logits
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-5)
    # and it is bidirectional: the first position sees the last token
    other = seq.clone()
    other[:, -1] = (other[:, -1] + 1) % N_TOKENS
    with torch.no_grad():
        assert not torch.allclose(model.lm(other).logits[:, 0], hf[:, 0])


def test_step_cost_counts_one_row_per_item_and_the_expected_masked_positions():
    model = random_model(2, 0)
    cost = model.step_cost(torch.zeros(32, dtype=torch.long))
    v = VOCAB.size
    # by hand: 2 layers of d = 32 over 32 rows of 6 tokens, the head at 32 x (5/2 + 1/6) rows
    tokens, d, scored = 32 * 6, 32, 32 * (2.5 + 1 / 6)
    forward = 2 * (2 * tokens * 12 * d * d + 4 * 32 * 36 * d) + 2 * scored * d * v
    assert cost.tokens == 192 and cost.flops == pytest.approx(3 * forward, rel=1e-12)
    assert cost.flops == train_step_flops(2, 32, 32, 6, scored, v)


def test_real_compile_matches_eager_and_compiles_once(small_dir):
    """The torch.compile path (CPU inductor here; CUDA graphs on a GPU): the fixed-shape plan
    (the LM head at every maskable position, the unmasked ones weighted 0) gives the eager
    loss and gradients for the same draw, and batches with different masked counts reuse one
    graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from revjepa.compiled import compile_model
    from revjepa.data import Batch
    from revjepa.step import StepContext, forward_losses

    ds = load_dataset(small_dir)
    torch.manual_seed(0)
    oc = ObjectiveConfig()
    mc = ModelConfig(family="mlm_u", n_layer=1, n_embd=32, n_head=2, dropout=0.0)
    model = build_model(mc, oc, ds.vocab, ds.entity_len).train()
    torch._dynamo.reset()
    counters.clear()
    compiled = compile_model(model, cuda_graphs=False)
    cpu = torch.device("cpu")

    def loss_and_grads(run_model, seq, kind, seed):
        torch.manual_seed(seed)  # the same draw for both
        ctx = StepContext(run_model, None, None, [], oc, "fp32", cpu, 1, 0.0)
        out, loss, _ = forward_losses(ctx, Batch(seq, kind, None))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return torch.stack([loss.detach(), out.counts["mlm"]]), grads

    counts = []
    for i in range(3):
        idx = torch.randperm(len(ds.train.seq), generator=torch.Generator().manual_seed(i))[:48]
        seq, kind = ds.train.seq[idx], ds.train.kind[idx]
        eager, ge = loss_and_grads(model, seq, kind, 100 + i)
        comp, gc = loss_and_grads(compiled, seq, kind, 100 + i)
        assert comp[1] == eager[1]  # the same masked tokens
        counts.append(int(eager[1]))
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
        assert ge.keys() == gc.keys() and len(ge) > 5
        for name in ge:
            diff = (gc[name] - ge[name]).abs().max().item()
            assert diff <= 1e-5 * ge[name].abs().max().item(), (name, diff)
    assert len(set(counts)) > 1  # the batches really had different masked counts
    assert counters["stats"]["unique_graphs"] == 1


# ----------------------------------------------------------------------------- entity ranks


@pytest.mark.parametrize("e", [1, 2, 3])
@pytest.mark.parametrize("kind", ["flat_tied", "sharp_untied"])
def test_entity_ranks_match_the_slow_loop(e, kind):
    """Random models (dropout on: the evaluation must switch it off), every chunking of the
    candidate passes, pruned or not: each rank within the loop's bounds under the float
    tolerance, and for almost every item exactly the loop's rank. The sharp model (LM head
    x 8, like a trained one) puts candidate prefixes near the pruning threshold."""
    table = HAND_TABLES[e]
    flat = kind == "flat_tied"
    model = random_model(e, seed=10 * e, tie=flat)
    if not flat:
        with torch.no_grad():
            model.lm.lm_head.weight.mul_(8.0)
    model.set_entity_table(torch.tensor(table))
    seq = hand_items(table, 30, seed=e, outside=[4] * e)
    assert [4] * e not in table
    ref = loop_scores(model, seq, table)
    exact = 0
    for max_rows, prune in ((None, True), (1, True), (3, True), (None, False)):
        got = our_ranks(model, seq, max_rows, prune).tolist()
        for rank, (scores, target, tail) in zip(got, ref):
            lo, hi = rank_bounds(scores, target, tail, table, TOL)
            assert lo <= rank <= hi, (max_rows, prune, rank, lo, hi)
            exact += lo == hi
    assert exact >= 0.9 * 4 * len(ref)
    # evaluate_split: its entity metrics are the means of these ranks, and its token metrics
    # read the loop's factors teacher-forced on the true tail
    model.train()
    split = Split(seq, torch.full((len(seq),), KIND_ID["test"]))
    res = model.evaluate_split(split, len(seq), entity_mrr=True)
    assert model.training
    ranks = our_ranks(model, seq).double()
    assert res["entity_mrr"] == pytest.approx(float((1 / ranks).mean()), abs=1e-12)
    assert res["entity_acc"] == pytest.approx(float((ranks == 1).double().mean()), abs=1e-12)
    assert res["num_entities"] == len(table)
    rr1, rr2, nll, factors = [], [], 0.0, []
    with torch.no_grad():
        for row in seq.tolist():
            prefix, tail = row[: e + 2], row[e + 2 :]
            lps = []
            for j in range(e):
                ids = prefix + tail[:j] + [M_ID] * (e - j)
                lps.append(reference_logits(model.eval(), ids)[e + 2 + j])
            factors.append(torch.stack(lps))
            ranks_j = [1 + int((lp > lp[t]).sum()) for lp, t in zip(lps, tail)]
            rr1.append(1 / ranks_j[0])
            rr2.append(1 / ranks_j[min(1, e - 1)])  # token 2 (token 1 again for E = 1)
            nll -= sum(float(torch.log_softmax(lp, -1)[t]) for lp, t in zip(lps, tail))
        ours, _ = model.chain_logits(seq)
    torch.testing.assert_close(ours.double(), torch.stack(factors), rtol=0, atol=1e-5)
    assert res["mrr_token1"] == pytest.approx(sum(rr1) / len(rr1), abs=1e-12)
    assert res["mrr_token2"] == pytest.approx(sum(rr2) / len(rr2), abs=1e-12)
    assert res["tail_loss"] == pytest.approx(nll / (len(seq) * e), rel=1e-5)
    if e <= 2:  # joint metrics are over the first two tokens
        assert res["joint_nll"] == pytest.approx(nll / len(seq), rel=1e-5)
    # opt-in at this level; the batch size changes nothing
    other = model.evaluate_split(split, 7)
    assert not {"entity_mrr", "entity_acc", "num_entities"} & set(other)
    assert other["mrr"] == pytest.approx(res["mrr"], abs=1e-12)


def exact_model(e: int, values: list[float]) -> MlmU:
    """A model whose logits are `values` (per token) at every position of every pass, exactly:
    the final LayerNorm's weight is 0 and its bias e_0, so ln_f(h) = e_0 and logit_t = W[t, 0]
    (products with 0 are exact in any order). Untied: the input side stays random, so every
    pass is a different computation reaching the same logits; equal values on several tokens
    (duplicated head weights) make exactly equal scores."""
    model = random_model(e, 0, tie=False)
    v = model.lm.config.vocab_size
    with torch.no_grad():
        ln = model.lm.transformer.ln_f
        ln.weight.zero_()
        ln.bias.zero_()
        ln.bias[0] = 1.0
        z = torch.full((v,), -3.0)
        z[: len(values)] = torch.tensor(values)
        model.lm.lm_head.weight[:, 0] = z
    return model


SIDON = [0, 1, 4, 13, 32]  # distinct pairwise and triple sums unless the multisets are equal


@pytest.mark.parametrize("e", [1, 2, 3])
@pytest.mark.parametrize("case", ["sidon_with_ties", "all_equal"])
def test_strict_rank_rule_with_exact_ties(e, case):
    """rank = 1 + #{c: sum z[c] > sum z[t]} exactly (the log-normaliser is the same in every
    pass): candidates tying the true tail are never counted."""
    if case == "all_equal":
        values = [2.0] * N_TOKENS
    else:  # tokens 0 and 1 share a value, as do 5 and 6: ties across first tokens and passes
        values = [SIDON[2], SIDON[2], SIDON[0], SIDON[3], SIDON[1], SIDON[4], SIDON[4], 0.0]
    table = HAND_TABLES[e]
    model = exact_model(e, values)
    model.set_entity_table(torch.tensor(table))
    seq = hand_items(table, 40, seed=7 + e, outside=[4] * e)
    got = our_ranks(model, seq).tolist()
    ties = 0
    for rank, row in zip(got, seq.tolist()):
        tail = row[e + 2 :]
        t = sum(values[x] for x in tail)
        assert rank == 1 + sum(sum(values[x] for x in c) > t for c in table), tail
        ties += sum(sum(values[x] for x in c) == t and c != tail for c in table)
    assert ties > 0
    if case == "all_equal":
        assert got == [1] * len(got)
    for rank, (scores, target, tail) in zip(got, loop_scores(model, seq, table)):
        lo, hi = rank_bounds(scores, target, tail, table, TOL)
        assert lo <= rank <= hi


def test_entity_metrics_need_a_table_and_the_config_is_checked():
    model = random_model(2, 0)
    split = Split(hand_items(HAND_TABLES[2], 4, 0, [4, 4]), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UserError, match="no entity table"):
        model.evaluate_split(split, 4, entity_mrr=True)
    with pytest.raises(UserError, match="does not fit"):
        model.set_entity_table(torch.tensor(HAND_TABLES[3]))
    config = RunConfig(model=ModelConfig(family="mlm_u", position_embeddings=False))
    with pytest.raises(UserError, match="needs position embeddings"):
        config.validate()
    with pytest.raises(UserError, match="n_positions 5 is shorter"):
        MlmU(ModelConfig(n_positions=5), ObjectiveConfig(), VOCAB, 2)
    # the flags only some families read: mlm_u reads the GPT-2 sizes, not the JEPA flags
    assert foreign_fields({"model": {"n_layer": 2, "tie_embeddings": False}}, "mlm_u") == []
    assert foreign_fields({"model": {"n_layer": 2}}, "gpt2_jepa") == []
    assert foreign_fields({"model": {"n_layer": 2}}, "concept_jepa") == ["n_layer"]
    flags = {"objective": {"k_pred_tok": 2, "loss_dropout": 0.1, "use_jepa": False}}
    assert foreign_fields(flags, "mlm_u") == ["k_pred_tok", "loss_dropout", "use_jepa"]
    assert foreign_fields(flags, "concept_jepa") == ["k_pred_tok"]


# ----------------------------------------------------------------------------- end to end

ARGS = [
    *("--model_family", "mlm_u", "--n_layer", "1", "--n_embd", "32", "--n_head", "2"),
    *("--batch_size", "16", "--learning_rate", "3e-3", "--seed", "4", "--device", "cpu"),
    *("--dropout", "0.1", "--log_interval", "2", "--eval_steps", "4", "--save_steps", "4"),
    *("--save_step_dense", "0"),
]
SPEED = ("steps_per_s", "tokens_per_s", "mfu")


def _train(data_dir: Path, run: Path, *extra: str) -> None:
    argv = ["train", "--data_dir", str(data_dir), "--output_dir", str(run), *ARGS, *extra]
    assert main(argv) == 0


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(small_dir, tmp_path_factory):
    """An 8-step run, and the same cut at 6 and resumed to 8."""
    root = tmp_path_factory.mktemp("mlmu")
    _train(small_dir, root / "full", "--max_steps", "8")
    _train(small_dir, root / "cut", "--max_steps", "6")
    _train(small_dir, root / "cut", "--max_steps", "8", "--resume_from", "latest")
    return root


def test_resume_is_bit_identical(runs):
    full, cut = _records(runs / "full"), _records(runs / "cut")

    def training(records: list[dict]) -> list[dict]:
        return [
            {k: v for k, v in r.items() if k not in SPEED and "eval_" not in k} for r in records
        ]

    assert training(full) == training(cut)
    assert full[-1] == {**cut[-1], **{k: full[-1][k] for k in SPEED}}
    ends = [torch.load(runs / r / "checkpoints" / "checkpoint_step_8.pt", weights_only=True)
            for r in ("full", "cut")]  # fmt: skip
    assert ends[0]["model_state_dict"].keys() == ends[1]["model_state_dict"].keys()
    assert all(torch.equal(v, ends[1]["model_state_dict"][k])
               for k, v in ends[0]["model_state_dict"].items())  # fmt: skip
    logs = [r for r in full if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4, 6, 8]
    assert all(r["loss"] == r["mlm_loss"] > 0 for r in logs)  # weight 1 x the one term
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in logs)
    assert [r["step"] for r in full if "eval_test_mrr" in r] == [4, 8]
    args = json.loads((runs / "full" / "training_args.json").read_text())["resolved"]
    assert args["loss_terms"] == ["mlm"] and args["headline_metric"] == "mrr"
    assert args["comparable_metric"] == "entity_mrr"


def test_checkpoint_evaluate_status_and_the_stored_table(runs, small_dir, tmp_path, capsys):
    ds = load_dataset(small_dir)
    ckpt = runs / "full" / "checkpoints" / "checkpoint_step_8.pt"
    state = load_checkpoint(ckpt)
    assert state["family"] == "mlm_u"
    assert torch.equal(state["entities"], entity_table(ds.train.seq, ds.entity_len))
    model, _ = model_from_checkpoint(state)  # no data: the table comes with the checkpoint
    assert set(state["model_state_dict"]) == set(model.lm.state_dict())
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["family"] == "mlm_u"
    n = len(state["entities"])
    assert f"rank among all {n} entities (chance {chance_mrr(n):.4f})" in table
    assert table == format_table(result) + "\n" or format_table(result) in table
    for name in KINDS:
        want = model.evaluate_split(ds.valid[name], 64, entity_mrr=True)
        got = result["splits"][name]
        assert got["entity_mrr"] == pytest.approx(want["entity_mrr"], abs=1e-12)
        assert got["mrr"] == pytest.approx(want["mrr"], abs=1e-12)
        assert 0 < got["entity_mrr"] <= 1 and got["num_entities"] == n
    # the evaluation during training at step 8 is this checkpoint's (same weights and path)
    rec = [r for r in _records(runs / "full") if "eval_test_mrr" in r][-1]
    assert rec["eval_test_mrr"] == pytest.approx(result["splits"]["test"]["mrr"], abs=1e-12)
    assert rec["eval_test_tail_loss"] == pytest.approx(
        result["splits"]["test"]["tail_loss"], rel=1e-6
    )
    # per-item ranks against the slow loop on a few test items (2-token entities, the
    # run's whole table)
    seq = ds.valid["test"].seq[:3]
    scores = loop_scores(model, seq, model.entities.tolist())
    for rank, (s, target, tail) in zip(our_ranks(model, seq).tolist(), scores):
        lo, hi = rank_bounds(s, target, tail, model.entities.tolist(), TOL)
        assert lo <= rank <= hi
    status = collect_status([runs / "full"])[0]
    assert status["family"] == "mlm_u" and status["headline"] == "mrr"
    assert status["state"] == "finished"
    assert status["best_eval"][status["headline"]]["test"] == pytest.approx(
        max(r["eval_test_mrr"] for r in _records(runs / "full") if "eval_test_mrr" in r)
    )


@pytest.mark.skipif(not HF5, reason="transformers < 5 ignores config.is_causal")
def test_export_loads_in_transformers_and_runs_bidirectionally(runs, small_dir, tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    ckpt = runs / "full" / "checkpoints" / "checkpoint_step_8.pt"
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), str(out)]) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert config["is_causal"] is False
    meta = json.loads((out / "revjepa.json").read_text())
    assert meta["family"] == "mlm_u" and meta["step"] == 8
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    model, _ = model_from_checkpoint(load_checkpoint(ckpt))
    model.eval()
    seq = load_dataset(small_dir, with_train=False).valid["test"].seq[:32]
    e = model.entity_len
    with torch.no_grad():
        ours, _ = model.chain_logits(seq)
        first = hf(model.query_ids(seq, 0)).logits[:, e + 2]
        second = hf(model.query_ids(seq, 1)).logits[:, e + 3]
    torch.testing.assert_close(torch.stack([first, second], 1), ours, rtol=0, atol=1e-5)


def test_sweep_with_an_mlm_u_variant_runs_and_reports(tmp_path):
    """A real sweep: a gpt2_jepa NTP variant beside an mlm_u one (the base's n_layer reaches
    both), every checkpoint evaluated, the report's entity column for both families."""
    spec = {
        "name": "mlmu",
        "data": {"num_ga_entities": 200, "gb_ratio": 0.5, "num_rel_pairs": 2, "test_size": 20},
        "base": {
            "n_layer": 1, "n_embd": 32, "n_head": 2, "max_steps": 20, "batch_size": 16,
            "learning_rate": 1e-3, "dropout": 0, "eval_steps": 10, "save_steps": 10,
            "save_step_dense": 0, "save_step_dense_interval": 10, "log_interval": 10,
            "eval_batch_size": 64,
        },
        "variants": {"ntp": {"no_jepa": True}, "mlmu": {"model_family": "mlm_u"}},
        "seeds": [0],
    }  # fmt: skip
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "revjepa"]
    proc = subprocess.run([*cmd, "sweep", str(spec_file), "--out", str(out), "--parallel", "2"],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = {r["variant"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert plan["mlmu"]["family"] == "mlm_u" and plan["mlmu"]["config"]["model"]["n_layer"] == 1
    records = read_jsonl(out / "runs" / "mlmu-seed0" / "eval_all.jsonl")
    assert [r["step"] for r in records] == [10, 20]
    assert all("entity_mrr" in r["splits"][s] for r in records for s in KINDS)
    proc = subprocess.run([*cmd, "report", str(out), "--format", "json"], capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {r["group"]: r for r in json.loads(proc.stdout)}
    assert rows["mlmu"]["family"] == "mlm_u" and rows["mlmu"]["metric"] == "entity_mrr"
    best = max(records, key=lambda r: (r["splits"]["test"]["entity_mrr"], -r["step"]))
    assert rows["mlmu"]["test_best"]["mean"] == pytest.approx(
        best["splits"]["test"]["entity_mrr"], abs=1e-12
    )
    text = subprocess.run([*cmd, "report", str(out)], capture_output=True, text=True,
                          timeout=300, env=env).stdout  # fmt: skip
    assert "| mlmu | mlm_u |" in text and "`entity_mrr` (mlm_u)" in text
    # a flag mlm_u does not read, or a configuration it cannot train, is refused up front
    for bad, message in (
        ({"model_family": "mlm_u", "k_pred_tok": 2}, "k_pred_tok: not a flag of model family"),
        ({"model_family": "mlm_u", "no_position_embeddings": True}, "needs position embed"),
    ):
        spec["variants"] = {"bad": bad}
        spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
        proc = subprocess.run([*cmd, "sweep", str(spec_file), "--out", str(tmp_path / "o2")],
                              capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert not (tmp_path / "o2").exists()


def test_two_processes_mask_as_one_process_does(tmp_path):
    """torchrun (gloo, 2 ranks x 8 items) against one process with the global batch of 16:
    every rank takes its slice of the global batch's mask draw, so the logged losses agree to
    float rounding and the weights to DDP's tolerance (see test_distributed.DDP_ATOL)."""
    data = tmp_path / "data"
    write_generated(generate(GenConfig(num_ga_entities=200, num_rel_pairs=2, test_size=40)), data)
    script = str(Path(__file__).resolve().parents[1] / "train_jepa.py")  # == revjepa train
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    common = [
        "--data_dir", str(data), "--model_family", "mlm_u", "--n_layer", "1", "--n_embd", "32",
        "--n_head", "2", "--learning_rate", "1e-3", "--dropout", "0", "--seed", "5",
        "--device", "cpu", "--max_steps", "6", "--save_step_dense", "0", "--save_steps", "6",
        "--eval_steps", "6", "--log_interval", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("REVJEPA_CRASH", None)
    one = subprocess.run([sys.executable, script, *common, "--output_dir", str(tmp_path / "one"),
                          "--batch_size", "16"], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", script, *common,
                          "--output_dir", str(tmp_path / "two"), "--batch_size", "8"],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == [2, 4, 6]
    for a, b in zip(r1, r2):
        assert a["mlm_loss"] == pytest.approx(b["mlm_loss"], rel=1e-5)
    w1, w2 = (torch.load(tmp_path / r / "checkpoints/checkpoint_step_6.pt", weights_only=True)
              ["model_state_dict"] for r in ("one", "two"))  # fmt: skip
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


def test_the_family_is_registered():
    assert FAMILIES["mlm_u"] is MlmU
    model = build_model(ModelConfig(family="mlm_u"), ObjectiveConfig(), VOCAB, 2)
    assert isinstance(model, MlmU) and model.lm.config.is_causal is False
    assert model.entities.shape == (0, 2)
