"""--reverse_training (Golovneva et al. 2024): reversals, the doubled pool, no held-out fact in
the batch stream, determinism, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import revjepa.train
from revjepa.checkpoint import load_checkpoint, save_checkpoint
from revjepa.cli import main
from revjepa.data import (
    KIND_ID,
    BatchSampler,
    GenConfig,
    Split,
    generate,
    reverse_sequences,
    training_pool,
    write_generated,
)

# 200 + 120 entities, 2 relation pairs: 400 train items + 120 atomic = 520, a pool of 1040 under
# reverse training = 26 batches of 40. test_size = every held-out fact (120 atomic facts).
DATA = dict(num_ga_entities=200, gb_ratio=0.6, num_rel_pairs=2, comb=10, test_size=120, seed=5)
TINY = [
    *("--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--batch_size", "40"),
    *("--log_interval", "5", "--eval_steps", "1000", "--seed", "2", "--dropout", "0"),
]
F1, L1, R, M, F2, L2 = 11, 12, 7, 3, 21, 22  # hand-written token ids


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("reverse") / "data"
    write_generated(generate(GenConfig(**DATA)), d)
    return d


def train(data_dir: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data_dir", str(data_dir), "--output_dir", str(out), *TINY, *extra])


def json_rows(items: list[dict]) -> set[tuple[int, ...]]:
    """Sequences of JSON items, read here without the package's loader."""
    return {
        tuple(
            it["input_text"][0] + it["input_text"][1] + it["input_text"][2] + it["target_text"][0]
        )
        for it in items
    }


# ----------------------------------------------------------------------------- the reversals


def test_both_reversals_of_a_hand_written_item():
    item = torch.tensor([[F1, L1, R, M, F2, L2]])
    assert reverse_sequences(item, 2, "entity").tolist() == [[F2, L2, R, M, F1, L1]]
    assert reverse_sequences(item, 2, "token").tolist() == [[L2, F2, R, M, L1, F1]]
    one = torch.tensor([[F1, R, M, F2]])  # one-token entities: the two coincide
    assert reverse_sequences(one, 1, "entity").tolist() == [[F2, R, M, F1]]
    assert reverse_sequences(one, 1, "token").tolist() == [[F2, R, M, F1]]
    with pytest.raises(ValueError):
        reverse_sequences(item, 2, "none")


RINV = 8  # the inverse of R in the hand-written items


@pytest.mark.parametrize(
    "how, reversed_rows",
    [
        ("entity", [[F2, L2, R, M, F1, L1], [F1, L1, RINV, M, F2, L2]]),
        ("token", [[L2, F2, R, M, L1, F1], [L1, F1, RINV, M, L2, F2]]),
    ],
)
def test_pool_of_a_train_pair(how, reversed_rows):
    """A train pair `X r Y`, `Y r_inv X`: each reversed, same relation token, kind train; the
    JEPA partner of a reversed item (swap, r -> r_inv) is the reversal of the pair's other item."""
    pair = Split(
        torch.tensor([[F1, L1, R, M, F2, L2], [F2, L2, RINV, M, F1, L1]]),
        torch.tensor([KIND_ID["train"]] * 2),
    )
    pool = training_pool(pair, 2, how)
    assert pool.seq.tolist() == pair.seq.tolist() + reversed_rows
    assert pool.kind.tolist() == [KIND_ID["train"]] * 4
    inverse = {R: RINV, RINV: R}
    for row, other in ((reversed_rows[0], reversed_rows[1]), (reversed_rows[1], reversed_rows[0])):
        partner = row[4:] + [inverse[row[2]], M] + row[:2]
        assert partner == other


@pytest.mark.parametrize(
    "how, reversed_row", [("entity", [F2, L2, R, M, F1, L1]), ("token", [L2, F2, R, M, L1, F1])]
)
def test_pool_of_an_atomic_item(how, reversed_row):
    """An atomic fact `X r Y` (its held-out test fact is `Y r_inv X`): reversed to `Y r X`,
    kind atomic (no JEPA row) - the relation token tells it from the test fact."""
    atomic = Split(torch.tensor([[F1, L1, R, M, F2, L2]]), torch.tensor([KIND_ID["atomic"]]))
    pool = training_pool(atomic, 2, how)
    assert pool.seq.tolist() == [[F1, L1, R, M, F2, L2], reversed_row]
    assert pool.kind.tolist() == [KIND_ID["atomic"]] * 2
    assert reversed_row != [F2, L2, RINV, M, F1, L1]


def test_none_leaves_the_training_split_as_it_is():
    split = Split(torch.tensor([[F1, L1, R, M, F2, L2]]), torch.tensor([0]))
    assert training_pool(split, 2, "none") is split


# ----------------------------------------------------------------------------- the batch stream


def test_no_held_out_fact_is_ever_trained(data_dir, tmp_path, monkeypatch):
    """Every batch the trainer trains on over a whole epoch of the doubled pool: no sequence is a
    held-out test fact, nor is any JEPA partner block (computed here from the token names)."""
    vocab = json.loads((data_dir / "vocab.json").read_text())
    train_items = json.loads((data_dir / "train.json").read_text())
    test = json_rows(json.loads((data_dir / "valid.json").read_text())["test"])
    inv = {vocab[f"<r_{i}>"]: vocab[f"<r_{i}_inv>"] for i in range(DATA["num_rel_pairs"])}
    inv.update({b: a for a, b in list(inv.items())})
    # independently: the held-out fact of every atomic fact `X r Y` is `Y r_inv X`
    held_out = {row[4:] + (inv[row[2]], row[3]) + row[:2] for row in
                json_rows([it for it in train_items if it["type"] == "atomic"])}  # fmt: skip
    assert held_out == test  # test_size = all of them: valid.json's test split is complete
    plain = json_rows(train_items)
    for how in ("entity", "token"):
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        real_step = revjepa.train.train_step

        def recording_step(ctx, batch, lr, step, seen=seen, real_step=real_step):
            seen.append((batch.seq.clone(), batch.kind.clone()))
            return real_step(ctx, batch, lr, step)

        monkeypatch.setattr(revjepa.train, "train_step", recording_step)
        assert train(data_dir, tmp_path / how, "--max_steps", "26", "--reverse_training", how) == 0
        seq = torch.cat([s for s, _ in seen])
        kind = torch.cat([k for _, k in seen])
        rows = [tuple(r) for r in seq.tolist()]
        assert len(seen) == 26 and len(set(rows)) == len(rows) == 2 * len(plain)  # one epoch
        assert set(rows) >= plain  # the originals, and as many reversed items
        assert not set(rows) & test
        partners = {r[4:] + (inv[r[2]], r[3]) + r[:2] for r, k in zip(rows, kind.tolist())
                    if k == KIND_ID["train"]}  # fmt: skip
        assert not partners & test
        if how == "entity":  # the reversal of an atomic fact differs from its test fact in r
            flipped = {(t[4], t[5], inv[t[2]], t[3], t[0], t[1]) for t in test}
            assert flipped <= set(rows)


def test_same_seed_and_step_give_the_same_batch(data_dir):
    from revjepa.data import load_dataset

    ds = load_dataset(data_dir)
    pool = training_pool(ds.train, ds.entity_len, "token")

    def sampler(seed: int) -> BatchSampler:
        return BatchSampler(
            pool, seed=seed, batch_size=40, rank=0, world=1, steps_per_epoch=26,
            loss_dropout=0.0, device=torch.device("cpu"),
        )  # fmt: skip

    a, b, other = sampler(2), sampler(2), sampler(3)
    for step in (0, 7, 25, 26, 60):
        assert torch.equal(a.batch(step).seq, b.batch(step).seq)
        assert torch.equal(a.batch(step).kind, b.batch(step).kind)
    assert torch.equal(a.batch(7).seq, a.batch(7).seq)  # called twice
    assert not torch.equal(a.batch(7).seq, other.batch(7).seq)


# ----------------------------------------------------------------------------- runs and resume


def test_epoch_is_the_doubled_pool_and_the_flag_is_recorded(data_dir, tmp_path):
    out = tmp_path / "run"
    assert train(data_dir, out, "--max_steps", "3", "--reverse_training", "entity") == 0
    args = json.loads((out / "training_args.json").read_text())
    assert args["train"]["reverse_training"] == "entity"
    assert args["resolved"]["steps_per_epoch"] == 2 * 520 // 40
    state = load_checkpoint(out / "checkpoints" / "checkpoint_step_3.pt")
    assert state["config"]["train"]["reverse_training"] == "entity"


def test_resume_with_another_reverse_training_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(data_dir, out, "--max_steps", "2", "--reverse_training", "entity") == 0
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    capsys.readouterr()
    resume = ["train", "--output_dir", str(out), "--resume_from", "latest", "--max_steps", "4"]
    assert main([*resume, "--reverse_training", "token"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reverse_training token (checkpoint: entity)" in err[0]
    assert before == {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    assert main([*resume, "--reverse_training", "entity"]) == 0


def test_checkpoint_without_the_field_resumes_as_none(data_dir, tmp_path, capsys):
    """A checkpoint (and a training_args.json) written before the flag existed: `none`."""
    out = tmp_path / "old"
    assert train(data_dir, out, "--max_steps", "2") == 0
    path = out / "checkpoints" / "checkpoint_step_2.pt"
    state = load_checkpoint(path)
    del state["config"]["train"]["reverse_training"]
    save_checkpoint(path, {k: v for k, v in state.items() if k not in ("format", "checksum")})
    args = json.loads((out / "training_args.json").read_text())
    del args["train"]["reverse_training"]
    (out / "training_args.json").write_text(json.dumps(args))
    resume = ["train", "--output_dir", str(out), "--resume_from", "latest", "--max_steps", "4"]
    assert main([*resume, "--reverse_training", "entity"]) == 2
    assert "(checkpoint: none)" in capsys.readouterr().err
    assert main(resume) == 0
    assert json.loads((out / "training_args.json").read_text())["train"]["reverse_training"] == (
        "none"
    )
    again = tmp_path / "from_args"
    assert main(["train", "--config", str(out / "training_args.json"), "--output_dir",
                 str(again), "--max_steps", "1"]) == 0  # fmt: skip


def test_concept_family_trains_on_token_reversals(data_dir, tmp_path):
    out = tmp_path / "concept"
    flags = ["--model_family", "concept_jepa", "--max_steps", "3", "--reverse_training", "token"]
    assert train(data_dir, out, *flags) == 0
    assert (out / "checkpoints" / "checkpoint_step_3.pt").is_file()
