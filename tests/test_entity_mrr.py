"""gpt2_jepa's entity_mrr / entity_acc: the rank of the true tail among the run's entity table,
scored by the chain rule log p(c1) + log p(c2 | c1) + ... (each candidate teacher-forced on its
own tokens), rank = 1 + #entities with a strictly larger score.

Checked against a slow explicit loop (per item, per candidate, per token: Hugging Face's own
forward of the whole sequence), on hand-built datasets with 1-, 2- and 3-token entities; the
strict rank rule on a model whose scores are exact by construction (with ties: equal scores
across first tokens, across passes, and with the true tail); and end to end: training records,
checkpoints (the stored entity table), evaluate_checkpoint, the CLI, a model rebuilt from a
checkpoint and the checkpoints made before the table was stored.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from revjepa.checkpoint import load_checkpoint, save_checkpoint
from revjepa.cli import main
from revjepa.config import ModelConfig, ObjectiveConfig
from revjepa.data import KIND_ID, KINDS, Split, entity_table, load_dataset, vocab_from_mapping
from revjepa.errors import UserError
from revjepa.evaluate import evaluate_checkpoint, format_table
from revjepa.families import build_model, model_from_checkpoint
from revjepa.families.gpt2_jepa import GPT2Jepa
from revjepa.metrics import chance_mrr, entity_trie

ENTITY_KEYS = {"entity_mrr", "entity_acc", "num_entities"}
N_TOKENS = 8  # entity tokens <a0>..<a7> of the hand-built vocabulary
TOL = 1e-4  # |our score - the loop's score|: float32 log-probabilities of ~-10 on other paths


# ----------------------------------------------------------------------------- hand-built data


def hand_vocab():
    names = [f"<a{i}>" for i in range(N_TOKENS)] + ["<mask>", "<r_0>", "<r_0_inv>", "<pad>"]
    return vocab_from_mapping({t: i for i, t in enumerate(names + ["<PRED>"])}, "hand")


HAND_TABLES = {
    1: [[0], [1], [2], [3], [5], [6]],
    2: [[0, 1], [0, 2], [0, 3], [1, 0], [1, 4], [2, 5], [3, 3], [5, 0], [5, 1], [6, 6], [7, 2]],
    3: [
        [0, 1, 2],
        [0, 1, 3],
        [0, 2, 2],
        [1, 0, 0],
        [1, 0, 2],
        [1, 4, 4],
        [3, 3, 3],
        [5, 0, 1],
        [5, 1, 7],
        [6, 1, 7],
    ],  # fmt: skip
}


def hand_items(table: list[list[int]], n: int, seed: int, outside: list[int]) -> torch.Tensor:
    """n items `head r <mask> tail` over the table, the last one with a tail outside it."""
    rng = random.Random(seed)
    vocab = hand_vocab()
    rel = [vocab.token_to_id["<r_0>"], vocab.token_to_id["<r_0_inv>"]]
    rows = [
        rng.choice(table) + [rng.choice(rel), vocab.mask_id] + rng.choice(table)
        for _ in range(n - 1)
    ]
    rows.append(table[0] + [rel[0], vocab.mask_id] + outside)
    return torch.tensor(rows)


def random_model(
    e: int, seed: int, tie: bool = True, dropout: float = 0.1, positions: bool = True
) -> GPT2Jepa:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        n_layer=2, n_embd=32, n_head=4, dropout=dropout, tie_embeddings=tie,
        position_embeddings=positions,
    )  # fmt: skip
    return GPT2Jepa(cfg, ObjectiveConfig(), hand_vocab(), e)


def our_ranks(model: GPT2Jepa, seq: torch.Tensor, max_rows: int | None = None) -> torch.Tensor:
    """Per-item ranks through the evaluator's own steps (evaluate_split sums them)."""
    model.eval()
    kind = torch.full((seq.shape[0],), KIND_ID["test"])
    with torch.no_grad():
        trie, nodes = model.entity_setup(seq)
        logits = model(seq, kind, with_logits=True).logits
        return 1 + model.entity_rank_counts(seq, logits, trie, nodes, max_rows=max_rows)


def loop_scores(model: GPT2Jepa, seq: torch.Tensor, table: list[list[int]]):
    """The definition, one item, one candidate, one token at a time: the score of every table
    entity and of the true tail, each log-probability from HF's forward of the whole prefix."""
    e = model.entity_len
    model.eval()
    out = []
    with torch.no_grad():
        for row in seq.tolist():
            prefix, tail = row[: e + 2], row[e + 2 :]

            def score(entity: list[int], prefix: list[int] = prefix) -> float:
                total = 0.0
                for j in range(e):
                    logits = model.lm(torch.tensor([prefix + entity[:j]])).logits[0, -1]
                    total += float(torch.log_softmax(logits.float(), -1)[entity[j]])
                return total

            out.append(([score(c) for c in table], score(tail), tail))
    return out


def batched_loop_scores(model: GPT2Jepa, seq: torch.Tensor, table: torch.Tensor):
    """`loop_scores` for large tables: still one item at a time, each log-probability from
    HF's forward of the whole prefix, but the candidates of an item in one HF batch."""
    e = model.entity_len
    model.eval()
    out = []
    with torch.no_grad():
        for row in seq:
            prefix, tail = row[: e + 2], row[e + 2 :]
            cands = torch.cat([table, tail[None]])
            total = torch.zeros(cands.shape[0], dtype=torch.float64)
            for j in range(e):
                ids = torch.cat([prefix.expand(cands.shape[0], -1), cands[:, :j]], 1)
                lp = torch.log_softmax(model.lm(ids).logits[:, -1].float(), -1)
                total += lp.gather(1, cands[:, j : j + 1]).squeeze(1).double()
            out.append((total[:-1].tolist(), float(total[-1]), tail.tolist()))
    return out


def rank_bounds(scores: list[float], target: float, tail: list[int], table, tol: float):
    """1 + #candidates above the tail by more than tol; and counting those within tol too."""
    others = [s for s, c in zip(scores, table) if c != tail]
    lo = 1 + sum(s - target > tol for s in others)
    hi = 1 + sum(s - target >= -tol for s in others)
    return lo, hi


# ----------------------------------------------------------------------------- pure pieces


def test_chance_mrr_is_the_mean_over_all_rankings():
    for n in range(1, 7):  # every ranking of n candidates: the target's rank is uniform
        perms = list(itertools.permutations(range(n)))
        want = sum(1.0 / (p.index(0) + 1) for p in perms) / len(perms)
        assert chance_mrr(n) == pytest.approx(want, rel=1e-12)
    assert chance_mrr(1) == 1.0 and chance_mrr(2) == 0.75
    n = 80_000
    assert chance_mrr(n) == pytest.approx((math.log(n) + 0.5772156649) / n, rel=1e-6)
    with pytest.raises(ValueError):
        chance_mrr(0)


@pytest.mark.parametrize("e", [1, 2, 3])
def test_entity_trie_against_prefix_sets(e):
    table = torch.tensor(HAND_TABLES[e])
    trie = entity_trie(table[torch.randperm(len(table))])  # any row order
    assert trie.depth == e and trie.size == len(table)
    for j in range(e + 1):
        prefixes = sorted({tuple(r[:j]) for r in HAND_TABLES[e]})
        assert [tuple(r) for r in trie.nodes[j].tolist()] == prefixes
    for j in range(e):
        for k, node in enumerate(trie.nodes[j].tolist()):
            s, c = int(trie.start[j][k]), int(trie.count[j][k])
            children = [r for r in trie.nodes[j + 1].tolist() if r[:j] == node]
            assert trie.nodes[j + 1][s : s + c].tolist() == children


# ----------------------------------------------------------------------------- vs the slow loop


@pytest.mark.parametrize("e", [1, 2, 3])
@pytest.mark.parametrize("kind", ["flat_tied", "sharp_untied"])
def test_entity_ranks_match_slow_loop(e, kind):
    """Random models (dropout on: the evaluation must switch it off), every chunking of the
    candidate passes: each rank within the loop's bounds under the float tolerance, and for
    almost every item exactly the loop's rank. A random GPT-2's next-token distributions are
    nearly uniform; the sharp one (LM head x 8, like a trained model's) puts candidate
    prefixes near the pruning threshold, where a wrong prune would lose candidates (and it
    has no position embeddings, as in Wang & Sun's setting)."""
    table = HAND_TABLES[e]
    outside = [4] * e if e > 1 else [4]
    assert outside not in table
    flat = kind == "flat_tied"
    model = random_model(e, seed=10 * e, tie=flat, positions=flat)  # sharp: no positions
    if not flat:
        with torch.no_grad():
            model.lm.lm_head.weight.mul_(8.0)
    model.set_entity_table(torch.tensor(table))
    seq = hand_items(table, 30, seed=e, outside=outside)
    ref = loop_scores(model, seq, table)
    exact = 0
    for max_rows in (None, 1, 3):
        got = our_ranks(model, seq, max_rows).tolist()
        for rank, (scores, target, tail) in zip(got, ref):
            lo, hi = rank_bounds(scores, target, tail, table, TOL)
            assert lo <= rank <= hi, (max_rows, rank, lo, hi)
            exact += lo == hi
    assert exact >= 0.9 * 3 * len(ref)
    # evaluate_split's entity metrics are the means of these ranks
    model.train()
    split = Split(seq, torch.full((len(seq),), KIND_ID["test"]))
    res = model.evaluate_split(split, len(seq), entity_mrr=True)  # our_ranks' batch: same path
    assert model.training
    ranks = our_ranks(model, seq).double()
    assert res["entity_mrr"] == pytest.approx(float((1 / ranks).mean()), abs=1e-12)
    assert res["entity_acc"] == pytest.approx(float((ranks == 1).double().mean()), abs=1e-12)
    assert res["num_entities"] == len(table)
    assert not ENTITY_KEYS & set(model.evaluate_split(split, 7))  # opt-in at this level


@pytest.mark.parametrize("e", [2, 3])
def test_pruning_is_exact(e):
    """The pruned search against the exhaustive one (every prefix expanded), one pair per
    pass so that both compute every shared distribution identically: the counts must be
    equal, bit for bit, on large random tables and sharp models (trained-like: many prefixes
    near the threshold)."""
    g = torch.Generator().manual_seed(e)
    every = torch.cartesian_prod(*[torch.arange(N_TOKENS)] * e)
    table = every[torch.randperm(len(every), generator=g)[: 40 if e == 2 else 120]]
    model = random_model(e, seed=e, tie=False, dropout=0.0)
    model.set_entity_table(table)
    seq = hand_items(table.tolist(), 16, seed=e, outside=[N_TOKENS - 1] * e)
    kind = torch.full((len(seq),), KIND_ID["test"])
    pruned = 0
    for sharpness in (8.0, 30.0):
        with torch.no_grad():
            model.lm.lm_head.weight.mul_(sharpness)
            trie, nodes = model.entity_setup(seq)
            logits = model.eval()(seq, kind, with_logits=True).logits
            a = model.entity_rank_counts(seq, logits, trie, nodes, max_rows=1)
            b = model.entity_rank_counts(seq, logits, trie, nodes, max_rows=1, prune=False)
            model.lm.lm_head.weight.div_(sharpness)
        assert torch.equal(a, b), sharpness
        pruned += int((a < len(table) - 1).sum())
    assert pruned > 0


# ----------------------------------------------------------------------------- exact ties

# Token values with all pairwise (and triple) sums distinct unless the multisets are equal,
# so the exact ordering of scores is known; equal values on several tokens make ties.
SIDON = [0, 1, 4, 13, 32]


def exact_model(e: int, values: list[float], seed: int = 0) -> GPT2Jepa:
    """A model whose logits are `values` (per token) at every position, exactly: the final
    LayerNorm's weight is 0 and its bias e_0, so ln_f(h) = e_0 and logit_t = W[t, 0] (the
    products with 0 are exact whatever the summation order). Untied: the input side stays
    random, so every candidate pass is a different computation reaching the same logits."""
    model = random_model(e, seed, tie=False)
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


@pytest.mark.parametrize("e", [1, 2, 3])
@pytest.mark.parametrize("case", ["sidon_with_ties", "all_equal"])
def test_strict_rank_rule_with_exact_ties(e, case):
    """Ranks against integer arithmetic: score(c) - score(t) = sum z[c_j] - sum z[t_j] (the
    log-normaliser is the same at every position), so rank = 1 + #{c: sum z[c] > sum z[t]}
    exactly; entities with the same multiset of values tie exactly, also with the true tail,
    and are never counted."""
    if case == "all_equal":  # every score equal (a model with constant logits): all rank 1
        values = [2.0] * N_TOKENS
    else:  # tokens 0 and 1 share a value, as do 5 and 6: ties across first tokens and passes
        values = [SIDON[2], SIDON[2], SIDON[0], SIDON[3], SIDON[1], SIDON[4], SIDON[4], 0.0]
        sums = {}
        for combo in itertools.combinations_with_replacement(sorted(set(values)), e):
            assert sums.setdefault(sum(combo), combo) == combo  # distinct sums
    table = HAND_TABLES[e]
    model = exact_model(e, values)
    model.set_entity_table(torch.tensor(table))
    outside = [4] * e if e > 1 else [4]
    seq = hand_items(table, 40, seed=7 + e, outside=outside)
    got = our_ranks(model, seq).tolist()
    ties = 0
    for rank, row in zip(got, seq.tolist()):
        tail = row[e + 2 :]
        t = sum(values[x] for x in tail)
        want = 1 + sum(sum(values[x] for x in c) > t for c in table)
        ties += sum(sum(values[x] for x in c) == t and c != tail for c in table)
        assert rank == want, (tail, rank, want)
    assert ties > 0  # the case did contain ties with the true tail
    if case == "all_equal":
        assert got == [1] * len(got)
    # the loop reference agrees where it is unambiguous (it is a float path too)
    for rank, (scores, target, tail) in zip(got, loop_scores(model, seq, table)):
        lo, hi = rank_bounds(scores, target, tail, table, TOL)
        assert lo <= rank <= hi


def test_entity_metrics_need_a_table():
    model = random_model(2, 0)
    split = Split(hand_items(HAND_TABLES[2], 4, 0, [4, 4]), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UserError, match="no entity table"):
        model.evaluate_split(split, 4, entity_mrr=True)
    with pytest.raises(UserError, match="does not fit"):
        model.set_entity_table(torch.tensor(HAND_TABLES[3]))
    with pytest.raises(UserError, match="outside the vocabulary"):
        model.set_entity_table(torch.tensor([[0, 99]]))


# ----------------------------------------------------------------------------- end to end


def _train(data: Path, out: Path, *extra: str) -> Path:
    # fmt: off
    rc = main([
        "train", "--data_dir", str(data), "--output_dir", str(out), "--n_layer", "1",
        "--n_embd", "32", "--n_head", "2", "--batch_size", "32", "--max_steps", "6",
        "--save_step_dense", "6", "--save_step_dense_interval", "3", "--eval_steps", "3",
        "--log_interval", "3", "--dropout", "0", "--learning_rate", "1e-3", *extra,
    ])
    # fmt: on
    assert rc == 0
    return out


@pytest.fixture(scope="module", params=["two_token", "one_token"])
def trained(request, tmp_path_factory):
    data = request.getfixturevalue("small_dir" if request.param == "two_token" else "abstract_dir")
    run = _train(data, tmp_path_factory.mktemp("ent") / "R", "--eval_entity_mrr", "on")
    return data, run


def test_training_records_and_checkpoints_carry_the_entity_table(trained):
    data, run = trained
    ds = load_dataset(data)
    table = entity_table(ds.train.seq, ds.entity_len)
    args = json.loads((run / "training_args.json").read_text())
    assert args["train"]["eval_entity_mrr"] == "on"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_test_mrr" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert r["eval_test_num_entities"] == len(table)
        assert 0 < r["eval_test_entity_mrr"] <= 1
    state = load_checkpoint(run / "checkpoints" / "checkpoint_step_6.pt")
    assert torch.equal(state["entities"], table)
    # model_state_dict stays exactly a Hugging Face GPT-2's
    model, _ = model_from_checkpoint(state)
    assert set(state["model_state_dict"]) == set(model.lm.state_dict())
    # the record at step 6 is the checkpoint's own evaluation (same weights, same path)
    res = evaluate_checkpoint(run / "checkpoints" / "checkpoint_step_6.pt", ds, 256)
    assert res["splits"]["test"]["entity_mrr"] == pytest.approx(
        evals[-1]["eval_test_entity_mrr"], abs=1e-12
    )


def test_every_split_of_evaluate_checkpoint_and_a_rebuilt_model(trained):
    data, run = trained
    ds = load_dataset(data)
    ckpt = run / "checkpoints" / "checkpoint_step_6.pt"
    res = evaluate_checkpoint(ckpt, load_dataset(data, with_train=False), 64)
    # the same weights in a model built from the training data (the trainer's way)
    state = load_checkpoint(ckpt)
    fresh, config = model_from_checkpoint(state)
    built = build_model(config.model, config.objective, ds.vocab, ds.entity_len, ds.train.seq)
    built.load_hf_state_dict(state["model_state_dict"])
    assert torch.equal(built.entities, fresh.entities)
    for name in KINDS:
        m = res["splits"][name]
        assert ENTITY_KEYS <= set(m), name
        assert m["num_entities"] == len(built.entities)
        want = built.evaluate_split(ds.valid[name], 64, entity_mrr=True)
        assert m["entity_mrr"] == want["entity_mrr"] and m["entity_acc"] == want["entity_acc"]
        # the true tail is always in the table (every entity of the data is in train.json)
        assert m["entity_mrr"] >= m["entity_acc"] >= 0
    # entity ranks come from the candidate passes, not from the token metrics: compare with
    # the slow loop on a few items of the test split
    seq = ds.valid["test"].seq[:6]
    table = built.entities
    ref = batched_loop_scores(built, seq, table)
    for rank, (scores, target, tail) in zip(our_ranks(built, seq).tolist(), ref):
        lo, hi = rank_bounds(scores, target, tail, table.tolist(), TOL)
        assert lo <= rank <= hi


def test_cli_table_flag_and_checkpoints_without_a_table(trained, tmp_path, capsys):
    data, run = trained
    ckpt = run / "checkpoints" / "checkpoint_step_6.pt"
    out_on, out_off = tmp_path / "on.json", tmp_path / "off.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--output", str(out_on)]) == 0
    stdout = capsys.readouterr().out
    on = json.loads(out_on.read_text())
    n = on["splits"]["test"]["num_entities"]
    header = next(ln for ln in stdout.splitlines() if ln.startswith("split "))
    assert header.split()[-4:] == ["entity", "MRR", "entity", "acc"]
    row = next(ln for ln in stdout.splitlines() if ln.startswith("test "))
    values = [float(x) for x in row.split()[-2:]]
    assert values == pytest.approx(
        [on["splits"]["test"]["entity_mrr"], on["splits"]["test"]["entity_acc"]], abs=6e-5
    )
    assert f"entity MRR: rank among all {n} entities (chance {chance_mrr(n):.4f})" in stdout
    argv = ["evaluate", "--checkpoint", str(ckpt), "--entity_mrr", "off", "--output", str(out_off)]
    assert main(argv) == 0
    off = json.loads(out_off.read_text())
    for name in KINDS:
        assert not ENTITY_KEYS & set(off["splits"][name])
        assert {k: v for k, v in on["splits"][name].items() if k not in ENTITY_KEYS} == off[
            "splits"
        ][name]
    assert "-" in format_table(off).splitlines()[3].split()

    # a checkpoint from before the table was stored: the table of the data's train.json
    old = load_checkpoint(ckpt)
    del old["entities"], old["checksum"]
    legacy = tmp_path / "checkpoint_step_6.pt"
    save_checkpoint(legacy, old)
    out_old = tmp_path / "old.json"
    assert main(["evaluate", "--checkpoint", str(legacy), "--output", str(out_old)]) == 0
    assert json.loads(out_old.read_text())["splits"] == on["splits"]
    model, _ = model_from_checkpoint(load_checkpoint(legacy))  # no data: no table
    with pytest.raises(UserError, match="no entity table"):
        model.evaluate_split(load_dataset(data, with_train=False).valid["test"], 8, entity_mrr=True)
    capsys.readouterr()


def test_training_default_is_off_and_flag_is_validated(small_dir, tmp_path, capfd):
    run = _train(small_dir, tmp_path / "R")
    args = json.loads((run / "training_args.json").read_text())
    assert args["train"]["eval_entity_mrr"] == "off"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_test_mrr" in r for r in records)
    assert not any("eval_test_entity_mrr" in r for r in records)
    capfd.readouterr()
    rc = main(["train", "--data_dir", str(small_dir), "--eval_entity_mrr", "maybe"])
    err = capfd.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "eval_entity_mrr" in err


# ----------------------------------------------------------------------------- auto, progress


def test_entity_metric_flops_by_hand():
    """The estimate `auto` decides from, written out for the hand table of 2-token entities:
    per item the cached pass over `e1 r <mask>` (4 tokens) and one extension pass for each of
    the 7 distinct first tokens (n_layer 2, d 32, V 13)."""
    model = random_model(2, 0)
    model.set_entity_table(torch.tensor(HAND_TABLES[2]))
    d, layers, v = 32, 2, 13
    cache = layers * (2 * 4 * 12 * d * d + 2 * 2 * 1 * 4 * 4 * d)
    extension = layers * 1 * (24 * d * d + 4 * (4 + 1) * d) + 2 * d * v
    assert model.entity_metric_flops(10) == 10 * (cache + 7 * extension)
    # an upper bound on the passes really run: without pruning every off-path prefix gets one
    seq = hand_items(HAND_TABLES[2], 10, 3, [4, 4])
    rows = []
    original = model.extension_logprobs
    model.extension_logprobs = lambda cache, r, tokens: (
        rows.append(r.numel()) or original(cache, r, tokens)
    )
    model.eval()
    with torch.no_grad():
        trie, nodes = model.entity_setup(seq)
        logits = model(seq, torch.zeros(10, dtype=torch.long), with_logits=True).logits
        model.entity_rank_counts(seq, logits, trie, nodes, prune=False)
    on_path = sum(tail[0] in {t[0] for t in HAND_TABLES[2]} for tail in seq[:, 4:].tolist())
    assert sum(rows) == 10 * 7 - on_path
    # no table: not computable; one-token entities: nothing extra to pay for
    assert random_model(2, 0).entity_metric_flops(10) is None
    one = random_model(1, 0)
    one.set_entity_table(torch.tensor(HAND_TABLES[1]))
    assert one.entity_metric_flops(10) == 10 * layers * (2 * 3 * 12 * d * d + 2 * 2 * 9 * d)


def test_auto_decides_from_the_estimate(trained, tmp_path, capfd, monkeypatch):
    """`--entity_mrr auto` against the budget, the clock replaced by a fixed rate: skipped
    metrics are absent (never 0), the JSON says so, one line on stderr names the way out."""
    import revjepa.evaluate as ev

    data, run = trained
    ckpt = run / "checkpoints" / "checkpoint_step_6.pt"
    monkeypatch.setattr(ev, "peak_flops", lambda device, precision, peak: (1e9, "test rate"))
    ds = load_dataset(data, with_train=False)
    model, _ = model_from_checkpoint(load_checkpoint(ckpt), ds)
    n_items = sum(len(s) for s in ds.valid.values())
    flops = model.entity_metric_flops(n_items)
    seconds = flops / (1e9 * ev.ENTITY_PASS_EFFICIENCY)
    assert seconds > 0  # one-token entities too: the cached pass over `e1 r <mask>`

    def evaluate(budget: float, name: str) -> tuple[dict, str]:
        out = tmp_path / name
        argv = ["evaluate", "--checkpoint", str(ckpt), "--output", str(out)]
        assert main([*argv, "--entity_mrr_budget_s", str(budget)]) == 0
        return json.loads(out.read_text()), capfd.readouterr().err

    on_path = tmp_path / "on.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--entity_mrr", "on", "--output",
                 str(on_path)]) == 0  # fmt: skip
    on = json.loads(on_path.read_text())
    assert on["entity_mrr_computed"] is True and "entity_mrr_estimate" not in on
    capfd.readouterr()
    below, err = evaluate(seconds * 1.01, "below.json")  # the estimate fits: computed
    assert err == "" and below["entity_mrr_computed"] is True
    assert below["splits"] == on["splits"]
    assert below["entity_mrr_estimate"]["seconds"] == pytest.approx(seconds, rel=1e-12)
    assert below["entity_mrr_estimate"]["flops"] == flops
    over, err = evaluate(seconds * 0.99, "over.json")
    assert over["entity_mrr_computed"] is False
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("entity_mrr skipped (--entity_mrr auto)")
    assert "--entity_mrr on" in lines[0] and f"{n_items:,} items" in lines[0]
    for name in KINDS:
        assert not ENTITY_KEYS & set(over["splits"][name])
        rest = {k: v for k, v in on["splits"][name].items() if k not in ENTITY_KEYS}
        assert over["splits"][name] == rest
    # a run directory's sweep decides once for all the checkpoints it still has to evaluate
    n_ckpts = len(list((run / "checkpoints").glob("checkpoint_step_*.pt")))
    plan = ev.EntityMrrPlan("auto", seconds * n_ckpts * 0.99)
    assert plan.decide(model, n_items, "cpu", evaluations=n_ckpts) is False
    plan = ev.EntityMrrPlan("auto", seconds * n_ckpts * 1.01)
    assert plan.decide(model, n_items, "cpu", evaluations=n_ckpts) is True
    capfd.readouterr()


def test_progress_bars_only_where_asked(trained, tmp_path, capfd, monkeypatch):
    """The bars go to stderr: none by default when stderr is not a terminal (as here), with
    --progress on one per split (items/s, ETA) and one over a run's checkpoints."""
    import revjepa.progress as progress

    data, run = trained
    ckpt = run / "checkpoints" / "checkpoint_step_6.pt"
    monkeypatch.setattr(progress, "DELAY_S", 0.0)  # show even the short evaluations here
    assert main(["evaluate", "--checkpoint", str(ckpt)]) == 0
    assert capfd.readouterr().err == ""
    assert main(["evaluate", "--checkpoint", str(ckpt), "--progress", "on"]) == 0
    err = capfd.readouterr().err
    for name in KINDS:
        assert re.search(rf"{name}( \(\+entity_mrr\))?: +\d+%.*(item/s|s/item)", err), err
    work = tmp_path / "R"
    shutil.copytree(run, work)
    (work / "eval_all.jsonl").unlink(missing_ok=True)
    argv = ["evaluate", "--checkpoint", str(work / "checkpoints"), "--progress", "on"]
    assert main(argv) == 0
    assert re.search(r"checkpoints: +\d+%.*(ckpt/s|s/ckpt)", capfd.readouterr().err)


def test_progress_auto_follows_the_terminal():
    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    from revjepa.progress import progress_enabled

    assert progress_enabled("auto", Stream(True)) is True
    assert progress_enabled("auto", Stream(False)) is False
    assert progress_enabled("on", Stream(False)) is True
    assert progress_enabled("off", Stream(True)) is False
