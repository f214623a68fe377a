"""Tests for the inversion dataset generator (`generate`, `write_generated`) and loader."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from revjepa.cli import main
from revjepa.data import (
    KINDS,
    GenConfig,
    Generated,
    generate,
    load_dataset,
    summarize,
    vocab_from_mapping,
    write_generated,
)
from revjepa.errors import UserError

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference-data" / "inversionidcomb10.50000.30000"
PYTHON = str(REPO / ".venv" / "bin" / "python")
FILES = ("train.json", "valid.json", "vocab.json")
KIND_ID = {"train": 0, "atomic": 1, "test": 2}

needs_reference = pytest.mark.skipif(
    not (REFERENCE / "valid.json").is_file() or not (REFERENCE / "vocab.json").is_file(),
    reason=f"reference data not present at {REFERENCE}",
)


# ----------------------------------------------------------------------------- independent helpers


def rowset(a: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(r) for r in np.asarray(a).tolist()}


def inverse_table(vocab: dict[str, int]) -> np.ndarray:
    """relation id -> inverse relation id, built here from the token names (-1 elsewhere)."""
    inv = np.full(len(vocab), -1, dtype=np.int64)
    i = 0
    while f"<r_{i}>" in vocab:
        fwd, bwd = vocab[f"<r_{i}>"], vocab[f"<r_{i}_inv>"]
        inv[fwd], inv[bwd] = bwd, fwd
        i += 1
    return inv


def reverse(seq: np.ndarray, e: int, inv: np.ndarray) -> np.ndarray:
    """(e1 r mask e2) -> (e2 r_inv mask e1)."""
    rel = inv[seq[:, e]]
    assert (rel >= 0).all()
    return np.concatenate([seq[:, e + 2 :], rel[:, None], seq[:, e + 1 : e + 2], seq[:, :e]], 1)


def entities_of(seq: np.ndarray, e: int) -> set[tuple[int, ...]]:
    return rowset(seq[:, :e]) | rowset(seq[:, e + 2 :])


def item(row: list[int], e: int, kind: str) -> dict:
    return {
        "input_text": [row[:e], [row[e]], [row[e + 1]]],
        "target_text": [row[e + 2 :]],
        "type": kind,
    }


def expected_files(gen: Generated) -> dict[str, str]:
    """The three files' text, serialized here independently of data.py."""
    e = gen.entity_len
    train = [item(r, e, KINDS[k]) for r, k in zip(gen.train_seq.tolist(), gen.train_kind.tolist())]
    valid = {s: [item(r, e, s) for r in gen.valid[s].tolist()] for s in ("train", "atomic", "test")}
    return {
        "train.json": json.dumps(train),
        "valid.json": json.dumps(valid),
        "vocab.json": json.dumps(gen.vocab),
    }


def parse_items(items: list[dict]) -> tuple[list[list[int]], list[str]]:
    rows = [
        it["input_text"][0] + it["input_text"][1] + it["input_text"][2] + it["target_text"][0]
        for it in items
    ]
    return rows, [it["type"] for it in items]


def file_bytes(d: Path) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in FILES}


SMALL_COMB = dict(
    num_ga_entities=1000, gb_ratio=0.6, num_rel_pairs=3, comb=10, test_size=100, seed=7
)


def gen_args(out: Path, **over) -> list[str]:
    """gen-data arguments for the conftest's small comb dataset, with some flags changed."""
    params = {**SMALL_COMB, **over}
    args = ["gen-data", "--output_dir", str(out)]
    for k, v in params.items():
        args += [f"--{k}", str(v)]
    return args


# ----------------------------------------------------------------------------- default dataset


@pytest.fixture(scope="module")
def default_gen() -> Generated:
    return generate(GenConfig())  # the full default dataset, in memory only (~0.3 s)


def test_default_dataset_counts(default_gen):
    g, e = default_gen, 2
    assert g.entity_len == e
    assert g.train_seq.shape == (390_000, 6) and g.train_seq.dtype == np.int64
    assert Counter(g.train_kind.tolist()) == {KIND_ID["train"]: 300_000, KIND_ID["atomic"]: 90_000}
    assert len(g.vocab) == 16_015
    assert g.vocab["<mask>"] == 16_000
    assert g.vocab["<r_0>"] == 16_001
    assert g.vocab["<r_0_inv>"] == 16_002
    assert g.vocab["<r_5_inv>"] == 16_012
    assert g.vocab["<pad>"] == 16_013
    assert g.vocab["<PRED>"] == 16_014
    assert {s: a.shape for s, a in g.valid.items()} == {s: (3000, 6) for s in KINDS}
    # the held-out test facts are the reverses of the atomic facts: 90,000 distinct, none trained
    atomic = g.train_seq[g.train_kind == KIND_ID["atomic"]]
    test = rowset(reverse(atomic, e, inverse_table(g.vocab)))
    assert len(test) == 90_000
    trained = rowset(g.train_seq)
    assert len(trained) == 390_000
    assert not test & trained
    assert rowset(g.valid["test"]) <= test
    assert GenConfig().default_dir() == "data/inversionidcomb10.50000.30000"
    assert GenConfig(comb=0).default_dir() == "data/inversionid.50000.30000"


@needs_reference
def test_default_vocab_matches_reference(default_gen):
    ref = json.loads((REFERENCE / "vocab.json").read_text())
    assert set(default_gen.vocab) == set(ref)  # same token names (<f_i>, <l_j>, specials)
    special = {t: i for t, i in ref.items() if not t.startswith(("<f_", "<l_"))}
    assert {t: default_gen.vocab[t] for t in special} == special


# ----------------------------------------------------------------------------- structure


def test_group_a_facts_in_both_directions(small_cfg, small_gen):
    g, e = small_gen, small_gen.entity_len
    inv = inverse_table(g.vocab)
    train = g.train_seq[g.train_kind == KIND_ID["train"]]
    assert len(train) == small_cfg.num_rel_pairs * small_cfg.num_ga_entities
    assert len(rowset(train)) == len(train)
    assert rowset(reverse(train, e, inv)) == rowset(train)
    # per relation pair, the forward facts pair every group-A entity exactly once
    group_a = None
    for r in range(small_cfg.num_rel_pairs):
        fwd = train[train[:, e] == g.vocab[f"<r_{r}>"]]
        bwd = train[train[:, e] == g.vocab[f"<r_{r}_inv>"]]
        assert len(fwd) == len(bwd) == small_cfg.num_ga_entities // 2
        assert rowset(reverse(fwd, e, inv)) == rowset(bwd)
        ents = fwd[:, :e].tolist() + fwd[:, e + 2 :].tolist()
        assert len({tuple(x) for x in ents}) == small_cfg.num_ga_entities
        group_a = group_a or {tuple(x) for x in ents}
        assert {tuple(x) for x in ents} == group_a


def test_atomic_reverse_is_test_and_never_trained(small_cfg, small_gen):
    g, e = small_gen, small_gen.entity_len
    inv = inverse_table(g.vocab)
    train = g.train_seq[g.train_kind == KIND_ID["train"]]
    atomic = g.train_seq[g.train_kind == KIND_ID["atomic"]]
    n_b = small_cfg.num_gb_entities
    assert n_b == 600
    assert len(atomic) == small_cfg.num_rel_pairs * n_b // 2
    group_a, group_b = entities_of(train, e), entities_of(atomic, e)
    assert len(group_a) == small_cfg.num_ga_entities and len(group_b) == n_b
    assert not group_a & group_b
    # entities are assigned to the groups at random, not by name: group A uses nearly all of
    # the 160 first names (in name order it would take exactly 100 of them, 10 entities each)
    assert len({a for a, _ in group_a}) > 150 and len({b for b, _ in group_b}) > 150
    test = reverse(atomic, e, inv)
    trained = rowset(g.train_seq)
    assert not rowset(test) & trained
    assert rowset(g.valid["test"]) <= rowset(test)
    assert not rowset(g.valid["test"]) & trained
    # one direction per group-B pair, chosen at random: both r and r_inv occur among atomic facts
    for r in range(small_cfg.num_rel_pairs):
        rel, rinv = g.vocab[f"<r_{r}>"], g.vocab[f"<r_{r}_inv>"]
        part = atomic[(atomic[:, e] == rel) | (atomic[:, e] == rinv)]
        assert len(part) == n_b // 2
        assert len(entities_of(part, e)) == n_b  # each group-B entity in exactly one fact
        assert 0 < int((part[:, e] == rel).sum()) < len(part)


def test_validation_splits(small_cfg, small_gen, small_dir):
    g = small_gen
    train = rowset(g.train_seq[g.train_kind == KIND_ID["train"]])
    atomic = rowset(g.train_seq[g.train_kind == KIND_ID["atomic"]])
    for s in KINDS:
        assert g.valid[s].shape == (small_cfg.test_size, 6)
        assert len(rowset(g.valid[s])) == small_cfg.test_size  # sampled without replacement
    assert rowset(g.valid["train"]) <= train
    assert rowset(g.valid["atomic"]) <= atomic
    raw = json.loads((small_dir / "valid.json").read_text())
    assert list(raw) == ["train", "atomic", "test"]
    for s in KINDS:
        assert len(raw[s]) == small_cfg.test_size
        assert {it["type"] for it in raw[s]} == {s}


@pytest.mark.parametrize("comb", [1, 4, 10, 40])
def test_name_multiplicity(comb):
    cfg = GenConfig(num_ga_entities=1000, gb_ratio=0.6, num_rel_pairs=2, comb=comb, test_size=10)
    g = generate(cfg)
    n, m = 1600, 1600 // comb
    e = g.entity_len
    assert e == 2
    names = {i: t for t, i in g.vocab.items()}
    ents = np.array(sorted(entities_of(g.train_seq, e)))
    assert len(ents) == n  # every entity occurs, and no two share a (first, last) pair
    assert all(names[i].startswith("<f_") for i in ents[:, 0].tolist())
    assert all(names[i].startswith("<l_") for i in ents[:, 1].tolist())
    assert set(Counter(ents[:, 0].tolist()).values()) == {comb}
    assert set(Counter(ents[:, 1].tolist()).values()) == {comb}
    assert len(set(ents[:, 0].tolist())) == len(set(ents[:, 1].tolist())) == m
    entity_names = {t for t in g.vocab if t.startswith(("<f_", "<l_"))}
    assert entity_names == {f"<f_{i}>" for i in range(m)} | {f"<l_{i}>" for i in range(m)}
    assert len(g.vocab) == 2 * m + 1 + 2 * cfg.num_rel_pairs + 2


def test_abstract_setting(abstract_cfg, abstract_gen, abstract_dir):
    g = abstract_gen
    n = abstract_cfg.num_ga_entities + abstract_cfg.num_gb_entities
    assert g.entity_len == 1
    assert g.train_seq.shape[1] == 4
    assert all(a.shape == (abstract_cfg.test_size, 4) for a in g.valid.values())
    entity_names = sorted(t for t in g.vocab if t.startswith("<e_"))
    assert len(entity_names) == n
    assert set(entity_names) == {f"<e_{i}>" for i in range(n)}
    assert len(g.vocab) == n + 1 + 2 * abstract_cfg.num_rel_pairs + 2
    assert len(entities_of(g.train_seq, 1)) == n  # one token per entity, all used
    inv = inverse_table(g.vocab)
    train = g.train_seq[g.train_kind == KIND_ID["train"]]
    assert rowset(reverse(train, 1, inv)) == rowset(train)
    ds = load_dataset(abstract_dir)
    assert ds.entity_len == 1 and ds.seq_len == 4
    assert ds.train.seq.shape == (len(g.train_seq), 4)
    assert all(s.seq.shape == (abstract_cfg.test_size, 4) for s in ds.valid.values())
    assert torch.equal(ds.train.seq, torch.from_numpy(g.train_seq))
    assert json.loads((abstract_dir / "valid.json").read_text())["test"][0]["input_text"][0] == [
        int(g.valid["test"][0, 0])
    ]


def test_vocab_layout(small_gen, small_cfg):
    v = small_gen.vocab
    by_id = sorted(v, key=v.get)
    m2 = 2 * 1600 // small_cfg.comb
    assert [v[t] for t in by_id] == list(range(len(v)))
    assert all(t.startswith(("<f_", "<l_")) for t in by_id[:m2])
    assert by_id[:m2] != sorted(by_id[:m2])  # entity tokens are in random id order
    rels = [f"<r_{r}{s}>" for r in range(small_cfg.num_rel_pairs) for s in ("", "_inv")]
    assert by_id[m2:] == ["<mask>", *rels, "<pad>", "<PRED>"]


def test_relation_table_derived_by_name(small_dir, small_gen):
    ds = load_dataset(small_dir, with_train=False)
    v = small_gen.vocab
    assert ds.vocab.size == len(v)
    assert (ds.vocab.mask_id, ds.vocab.pad_id, ds.vocab.pred_id) == (
        v["<mask>"],
        v["<pad>"],
        v["<PRED>"],
    )
    assert ds.vocab.inverse.tolist() == inverse_table(v).tolist()
    expected_entity = [t.startswith(("<f_", "<l_")) for t in sorted(v, key=v.get)]
    assert ds.vocab.is_entity.tolist() == expected_entity
    # relation tokens in any order and with any name: the pairing goes by name, not by id
    raw = {"<r_likes_inv>": 0, "<a>": 1, "<PRED>": 2, "<r_7>": 3, "<mask>": 4}
    raw |= {"<r_likes>": 5, "<pad>": 6, "<r_7_inv>": 7, "<b>": 8}
    voc = vocab_from_mapping(raw, "hand-made")
    assert voc.inverse.tolist() == [5, -1, -1, 7, -1, 0, -1, 3, -1]
    assert voc.relation_ids.tolist() == [0, 3, 5, 7]
    assert voc.is_entity.tolist() == [False, True, False, False, False, False, False, False, True]
    assert (voc.mask_id, voc.pad_id, voc.pred_id, voc.size) == (4, 6, 2, 9)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_different_seed_different(tmp_path, capsys):
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    assert main(gen_args(dirs[0])) == 0
    assert main(gen_args(dirs[1])) == 0
    assert main(gen_args(dirs[2], seed=8)) == 0
    out = capsys.readouterr().out
    assert '"train_items": 3900' in out and '"valid_test": 100' in out
    a, b, c = (file_bytes(d) for d in dirs)
    assert a == b
    for name in FILES:
        assert a[name] != c[name], name
    for d in dirs:  # the atomic writes leave no temporary files behind
        assert sorted(os.listdir(d)) == sorted(FILES)


def test_generate_is_deterministic_in_memory(small_cfg, small_gen):
    again = generate(GenConfig(**SMALL_COMB))
    assert again.vocab == small_gen.vocab
    assert np.array_equal(again.train_seq, small_gen.train_seq)
    assert np.array_equal(again.train_kind, small_gen.train_kind)
    assert all(np.array_equal(again.valid[s], small_gen.valid[s]) for s in KINDS)
    other = generate(GenConfig(**{**SMALL_COMB, "seed": 8}))
    assert not np.array_equal(other.train_seq, small_gen.train_seq)


# ----------------------------------------------------------------------------- file format


@pytest.mark.parametrize("which", ["small", "abstract"])
def test_written_files_match_independent_serialization(which, request):
    gen = request.getfixturevalue(f"{which}_gen")
    d = request.getfixturevalue(f"{which}_dir")
    expected = expected_files(gen)
    for name in FILES:
        text = (d / name).read_text()
        assert text == expected[name], name
        assert json.dumps(json.loads(text)) == text  # default separators ", " and ": "
    first = json.loads((d / "train.json").read_text())[0]
    assert list(first) == ["input_text", "target_text", "type"]
    assert (d / "valid.json").read_text().startswith('{"train": [{"input_text": [[')


@needs_reference
def test_reference_format_is_ours(small_dir):
    for name in ("valid.json", "vocab.json"):
        text = (REFERENCE / name).read_text()
        assert json.dumps(json.loads(text)) == text, name

    def shape(it: dict):
        return [
            list(it),
            [len(x) for x in it["input_text"]],
            [len(x) for x in it["target_text"]],
            type(it["type"]).__name__,
        ]

    ref = json.loads((REFERENCE / "valid.json").read_text())
    ours = json.loads((small_dir / "valid.json").read_text())
    assert list(ref) == list(ours) == ["train", "atomic", "test"]
    for s in KINDS:
        assert (
            shape(ref[s][0])
            == shape(ours[s][0])
            == [
                ["input_text", "target_text", "type"],
                [2, 1, 1],
                [2],
                "str",
            ]
        )


@needs_reference
def test_reference_loads(tmp_path):
    ds = load_dataset(REFERENCE, with_train=False)
    assert ds.train is None
    assert ds.vocab.size == 16_015
    assert (ds.vocab.mask_id, ds.vocab.pad_id, ds.vocab.pred_id) == (16_000, 16_013, 16_014)
    assert ds.vocab.relation_ids.tolist() == list(range(16_001, 16_013))
    r0, r0inv = ds.vocab.token_to_id["<r_0>"], ds.vocab.token_to_id["<r_0_inv>"]
    assert (r0, r0inv) == (16_001, 16_002)
    assert int(ds.vocab.inverse[r0]) == r0inv and int(ds.vocab.inverse[r0inv]) == r0
    assert int(ds.vocab.is_entity.sum()) == 16_000
    assert ds.entity_len == 2 and ds.seq_len == 6
    raw = json.loads((REFERENCE / "valid.json").read_text())
    for s in KINDS:
        split = ds.valid[s]
        assert split.seq.shape == (3000, 6) and split.seq.dtype == torch.int64
        assert split.kind.tolist() == [KIND_ID[s]] * 3000
        first = raw[s][0]
        (e1, (r,), (mask,)), (e2,) = first["input_text"], first["target_text"]
        assert split.seq[0].tolist() == [e1[0], e1[1], r, mask, e2[0], e2[1]]
        assert mask == 16_000
        rows, _ = parse_items(raw[s])
        assert split.seq.tolist() == rows
    # data.py's writer reproduces the reference files byte for byte
    gen = Generated(
        ds.vocab.token_to_id,
        np.zeros((0, 6), dtype=np.int64),
        np.zeros(0, dtype=np.int64),
        {s: ds.valid[s].seq.numpy() for s in KINDS},
        2,
    )
    write_generated(gen, tmp_path / "out")
    for name in ("valid.json", "vocab.json"):
        assert (tmp_path / "out" / name).read_bytes() == (REFERENCE / name).read_bytes(), name


# ----------------------------------------------------------------------------- loader tensors


def test_loader_tensors_match_json(small_cfg, small_gen, small_dir):
    ds = load_dataset(small_dir)
    assert ds.entity_len == 2 and ds.seq_len == 6
    n_train = small_cfg.num_rel_pairs * (small_cfg.num_ga_entities + small_cfg.num_gb_entities // 2)
    assert ds.train.seq.shape == (n_train, 6) and ds.train.seq.dtype == torch.int64
    assert ds.train.kind.dtype == torch.int64
    assert set(ds.train.kind.tolist()) == {KIND_ID["train"], KIND_ID["atomic"]}
    with open(small_dir / "train.json") as fh:
        items = json.load(fh)
    rows, types = parse_items(items)
    assert ds.train.seq[:5].tolist() == rows[:5]
    assert ds.train.seq.tolist() == rows
    assert ds.train.kind.tolist() == [KIND_ID[t] for t in types]
    assert torch.equal(ds.train.seq, torch.from_numpy(small_gen.train_seq))
    with open(small_dir / "valid.json") as fh:
        valid = json.load(fh)
    for s in KINDS:
        rows, types = parse_items(valid[s])
        assert ds.valid[s].seq.tolist() == rows
        assert ds.valid[s].kind.tolist() == [KIND_ID[t] for t in types] == [KIND_ID[s]] * len(rows)
        assert len(ds.valid[s]) == small_cfg.test_size
    assert summarize(ds) == {
        "vocab_size": len(small_gen.vocab),
        "entity_tokens": 320,
        "relations": 6,
        "tokens_per_entity": 2,
        "mask_id": small_gen.vocab["<mask>"],
        "pad_id": small_gen.vocab["<pad>"],
        "pred_id": small_gen.vocab["<PRED>"],
        "identity_bridge": False,
        "train_items": n_train,
        "train_kind_train": 3000,
        "train_kind_atomic": 900,
        "train_identity": 0,
        "valid_train": 100,
        "valid_atomic": 100,
        "valid_test": 100,
    }


def test_load_without_train_needs_no_train_file(small_copy):
    (small_copy / "train.json").unlink()
    ds = load_dataset(small_copy, with_train=False)
    assert ds.train is None
    assert set(ds.valid) == set(KINDS)
    assert "train_items" not in summarize(ds)


def test_load_tolerates_whitespace_formatting(small_copy):
    """Any valid JSON layout of the same content loads to the same tensors."""
    before = load_dataset(small_copy)
    for name in FILES:
        p = small_copy / name
        p.write_text("\n " + json.dumps(json.loads(p.read_text()), indent=2) + "\n")
    after = load_dataset(small_copy)
    assert torch.equal(before.train.seq, after.train.seq)
    assert torch.equal(before.train.kind, after.train.kind)
    assert all(torch.equal(before.valid[s].seq, after.valid[s].seq) for s in KINDS)


# ----------------------------------------------------------------------------- bad input: loader


def _edit(name: str, fn):
    def mutate(d: Path) -> None:
        p = d / name
        obj = json.loads(p.read_text())
        res = fn(obj)
        p.write_text(json.dumps(obj if res is None else res))

    return mutate


def _write(name: str, text: str | bytes):
    def mutate(d: Path) -> None:
        p = d / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())

    return mutate


def _unlink(name: str):
    return lambda d: (d / name).unlink()


def _truncate(name: str):
    def mutate(d: Path) -> None:
        p = d / name
        p.write_bytes(p.read_bytes()[:-7])

    return mutate


def _set(path: tuple, value):
    """Set obj[path[0]][path[1]]... = value."""

    def fn(obj):
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value

    return fn


def _delete(path: tuple):
    def fn(obj):
        for k in path[:-1]:
            obj = obj[k]
        del obj[path[-1]]

    return fn


def _rename_token(tok: str, new: str):
    def fn(vocab):
        return {(new if t == tok else t): i for t, i in vocab.items()}

    return fn


def _shift_last_id(vocab):
    last = max(vocab, key=vocab.get)
    vocab[last] += 1


def _duplicate_id(vocab):
    vocab["<PRED>"] = vocab["<pad>"]


def _no_relations(vocab):
    return {(t.replace("<r_", "<q_") if t.startswith("<r_") else t): i for t, i in vocab.items()}


V = 2 * 160 + 1 + 6 + 2  # vocabulary size of the small comb dataset

BAD_INPUTS = {
    # missing files / directory
    "missing vocab.json": (_unlink("vocab.json"), "vocab.json"),
    "missing valid.json": (_unlink("valid.json"), "valid.json"),
    "missing train.json": (_unlink("train.json"), "train.json"),
    "vocab.json is a directory": (
        lambda d: ((d / "vocab.json").unlink(), (d / "vocab.json").mkdir()),
        "vocab.json",
    ),
    # malformed JSON
    "malformed vocab.json": (_truncate("vocab.json"), "vocab.json"),
    "malformed valid.json": (_truncate("valid.json"), "valid.json"),
    "malformed train.json": (_truncate("train.json"), "train.json"),
    "malformed train.json item": (
        _write("train.json", '[{"input_text": [[1, 2], [}]'),
        "train.json",
    ),
    "train.json missing comma": (
        lambda d: (d / "train.json").write_text(
            (d / "train.json").read_text().replace("}, {", "} {", 1)
        ),
        "train.json",
    ),
    "train.json trailing data": (
        lambda d: (d / "train.json").write_text((d / "train.json").read_text() + " []"),
        "train.json",
    ),
    "empty train.json": (_write("train.json", ""), "train.json"),
    "train.json not utf-8": (_write("train.json", b'[\xff\xfe"'), "train.json"),
    "vocab.json not utf-8": (_write("vocab.json", b'{"\xff": 0}'), "vocab.json"),
    "train.json is an object": (_write("train.json", '{"train": []}'), "train.json"),
    "train.json empty array": (_write("train.json", "[ ]"), "train.json"),
    "valid.json is a list": (_edit("valid.json", lambda v: v["train"]), "valid.json"),
    "vocab.json is a list": (_write("vocab.json", '["<mask>", "<pad>"]'), "vocab.json"),
    "vocab.json empty object": (_write("vocab.json", "{}"), "vocab.json"),
    # splits
    "missing split train": (_edit("valid.json", _delete(("train",))), "valid.json"),
    "missing split atomic": (_edit("valid.json", _delete(("atomic",))), "valid.json"),
    "missing split test": (_edit("valid.json", _delete(("test",))), "valid.json"),
    "split not a list": (_edit("valid.json", _set(("test",), {"a": 1})), "valid.json"),
    "empty split": (_edit("valid.json", _set(("atomic",), [])), "valid.json"),
    # item shape
    "flat input_text": (
        _edit("valid.json", _set(("test", 3, "input_text"), [1, 2, 326, 320])),
        "valid.json",
    ),
    "flat target_text": (
        _edit("valid.json", _set(("test", 3, "target_text"), [1, 2])),
        "valid.json",
    ),
    "input_text of two parts": (
        _edit("valid.json", _set(("atomic", 0, "input_text"), [[1, 2], [321]])),
        "valid.json",
    ),
    "two relation tokens": (
        _edit("valid.json", _set(("atomic", 0, "input_text", 1), [321, 322])),
        "valid.json",
    ),
    "extra target entity": (
        _edit("valid.json", _set(("atomic", 0, "target_text"), [[1, 2], [3, 4]])),
        "valid.json",
    ),
    "head of one token": (
        _edit("valid.json", _set(("atomic", 5, "input_text", 0), [7])),
        "valid.json",
    ),
    "tail of three tokens": (
        _edit("valid.json", _set(("test", 5, "target_text", 0), [7, 8, 9])),
        "valid.json",
    ),
    "empty entities": (
        _edit(
            "valid.json",
            lambda v: v["train"][0].update(input_text=[[], [321], [320]], target_text=[[]]),
        ),
        "valid.json",
    ),
    "train.json entity length differs from valid.json": (
        _edit("train.json", _set((10, "target_text", 0), [5])),
        "train.json",
    ),
    "entity is an object": (
        _edit("valid.json", _set(("train", 0, "input_text", 0), {"a": 1, "b": 2})),
        "valid.json",
    ),
    "item is a list": (
        _edit("valid.json", _set(("test", 1), [[1, 2], [321], [320]])),
        "valid.json",
    ),
    "item is null": (_edit("train.json", _set((4,), None)), "train.json"),
    "missing input_text": (_edit("valid.json", _delete(("train", 2, "input_text"))), "valid.json"),
    "missing target_text": (_edit("train.json", _delete((2, "target_text"))), "train.json"),
    "missing type": (_edit("valid.json", _delete(("test", 0, "type"))), "valid.json"),
    "nested id": (_edit("valid.json", _set(("test", 0, "input_text", 0, 1), [3])), "valid.json"),
    # ids
    "negative id": (_edit("valid.json", _set(("test", 9, "input_text", 0, 0), -1)), "valid.json"),
    "id equal to vocab size": (
        _edit("valid.json", _set(("test", 9, "target_text", 0, 1), V)),
        "valid.json",
    ),
    "id too large": (_edit("train.json", _set((9, "input_text", 0, 0), 10**6)), "train.json"),
    "id beyond int64": (
        _edit("valid.json", _set(("train", 9, "input_text", 0, 0), 2**64)),
        "valid.json",
    ),
    "id below int64": (_edit("train.json", _set((9, "target_text", 0, 0), -(2**70))), "train.json"),
    "float id": (_edit("valid.json", _set(("atomic", 9, "input_text", 0, 1), 3.0)), "valid.json"),
    "string id": (_edit("train.json", _set((9, "input_text", 0, 1), "3")), "train.json"),
    "bool id": (_edit("valid.json", _set(("test", 9, "input_text", 0, 1), True)), "valid.json"),
    "null id": (_edit("valid.json", _set(("test", 9, "input_text", 0, 1), None)), "valid.json"),
    "mask in an entity position": (
        _edit("valid.json", _set(("test", 9, "input_text", 0, 0), 320)),
        "valid.json",
    ),
    "relation in an entity position": (
        _edit("train.json", _set((9, "target_text", 0, 1), 321)),
        "train.json",
    ),
    "entity in the relation position": (
        _edit("valid.json", _set(("atomic", 9, "input_text", 1, 0), 5)),
        "valid.json",
    ),
    "pad in the relation position": (
        _edit("train.json", _set((9, "input_text", 1, 0), V - 2)),
        "train.json",
    ),
    "mask position not mask": (
        _edit("valid.json", _set(("train", 9, "input_text", 2, 0), 321)),
        "valid.json",
    ),
    # type
    "unknown type": (_edit("valid.json", _set(("train", 9, "type"), "foo")), "valid.json"),
    "unknown type in train.json": (_edit("train.json", _set((9, "type"), "valid")), "train.json"),
    "type of another split": (
        _edit("valid.json", _set(("test", 9, "type"), "atomic")),
        "valid.json",
    ),
    "test item in train.json": (_edit("train.json", _set((9, "type"), "test")), "train.json"),
    "type is a list": (_edit("valid.json", _set(("test", 9, "type"), ["test"])), "valid.json"),
    "type is null": (_edit("train.json", _set((9, "type"), None)), "train.json"),
    # vocabulary
    "relation without inverse": (
        _edit("vocab.json", _rename_token("<r_1_inv>", "<zz>")),
        "vocab.json",
    ),
    "inverse without relation": (_edit("vocab.json", _rename_token("<r_2>", "<zz>")), "vocab.json"),
    "no relations": (_edit("vocab.json", _no_relations), "vocab.json"),
    "vocab lacks <mask>": (_edit("vocab.json", _rename_token("<mask>", "<MASK>")), "vocab.json"),
    "vocab lacks <pad>": (_edit("vocab.json", _rename_token("<pad>", "<PAD>")), "vocab.json"),
    "vocab lacks <PRED>": (_edit("vocab.json", _rename_token("<PRED>", "<pred>")), "vocab.json"),
    "vocab ids with a gap": (_edit("vocab.json", _shift_last_id), "vocab.json"),
    "vocab ids duplicated": (_edit("vocab.json", _duplicate_id), "vocab.json"),
    "vocab ids from 1": (
        _edit("vocab.json", lambda v: {t: i + 1 for t, i in v.items()}),
        "vocab.json",
    ),
    "vocab negative id": (_edit("vocab.json", _set(("<PRED>",), -1)), "vocab.json"),
    "vocab string id": (
        _edit("vocab.json", lambda v: {t: str(i) for t, i in v.items()}),
        "vocab.json",
    ),
    "vocab float id": (_edit("vocab.json", _set(("<mask>",), 320.0)), "vocab.json"),
}


SHAPE = "has the wrong shape"
NOT_INT = "not an integer"
OUTSIDE = "token id outside the vocabulary (size 329)"
# what each message must say (besides naming the file)
MESSAGE = {
    "missing vocab.json": "file not found",
    "missing valid.json": "file not found",
    "missing train.json": "file not found",
    "vocab.json is a directory": "file not found",
    "malformed vocab.json": "malformed JSON",
    "malformed valid.json": "malformed JSON",
    "malformed train.json": "malformed JSON",
    "malformed train.json item": "malformed JSON in array item 0",
    "train.json missing comma": "malformed JSON after array item 0",
    "train.json trailing data": "malformed JSON: unexpected data after the array",
    "empty train.json": "expected a JSON array",
    "train.json not utf-8": "cannot read",
    "vocab.json not utf-8": "cannot read",
    "train.json is an object": "expected a JSON array",
    "train.json empty array": "train.json is empty",
    "valid.json is a list": "expected an object with splits",
    "vocab.json is a list": "expected a non-empty JSON object",
    "vocab.json empty object": "expected a non-empty JSON object",
    "missing split train": "missing split 'train'",
    "missing split atomic": "missing split 'atomic'",
    "missing split test": "missing split 'test'",
    "split not a list": "split 'test' is not a list",
    "empty split": "split 'atomic' is empty",
    "flat input_text": "split 'test' item 3 " + SHAPE,
    "flat target_text": "split 'test' item 3 " + SHAPE,
    "input_text of two parts": "split 'atomic' item 0 " + SHAPE,
    "two relation tokens": "split 'atomic' item 0 " + SHAPE,
    "extra target entity": "split 'atomic' item 0 " + SHAPE,
    "head of one token": "split 'atomic' item 5 " + SHAPE,
    "tail of three tokens": "split 'test' item 5 " + SHAPE,
    "empty entities": "split 'train' item 0 " + SHAPE,
    "train.json entity length differs from valid.json": "train.json item 10 " + SHAPE,
    "entity is an object": "split 'train' item 0 " + SHAPE,
    "item is a list": "split 'test' item 1 " + SHAPE,
    "item is null": "train.json item 4 " + SHAPE,
    "missing input_text": "split 'train' item 2 " + SHAPE,
    "missing target_text": "train.json item 2 " + SHAPE,
    "missing type": "split 'test' item 0 " + SHAPE,
    "nested id": NOT_INT,
    "negative id": "split 'test' item 9 has a " + OUTSIDE,
    "id equal to vocab size": "split 'test' item 9 has a " + OUTSIDE,
    "id too large": "train.json item 9 has a " + OUTSIDE,
    "id beyond int64": OUTSIDE,
    "id below int64": OUTSIDE,
    "float id": NOT_INT,
    "string id": NOT_INT,
    "bool id": NOT_INT,
    "null id": NOT_INT,
    "mask in an entity position": "item 9: an entity position holds a non-entity token",
    "relation in an entity position": "item 9: an entity position holds a non-entity token",
    "entity in the relation position": "item 9: the relation position holds a non-relation token",
    "pad in the relation position": "item 9: the relation position holds a non-relation token",
    "mask position not mask": "item 9: the mask position does not hold <mask>",
    "unknown type": "item 9 has type 'foo', expected train",
    "unknown type in train.json": "item 9 has type 'valid', expected train/atomic/test/identity",
    "type of another split": "item 9 has type 'atomic', expected test",
    "test item in train.json": "contains items of type 'test'",
    "type is a list": "item 9 has type ['test'], expected test",
    "type is null": "item 9 has type None",
    "relation without inverse": "relation <r_1> has no inverse <r_1_inv>",
    "inverse without relation": "relation <r_2_inv> has no inverse <r_2>",
    "no relations": "no relation tokens",
    "vocab lacks <mask>": "lacks the required token <mask>",
    "vocab lacks <pad>": "lacks the required token <pad>",
    "vocab lacks <PRED>": "lacks the required token <PRED>",
    "vocab ids with a gap": "ids must be exactly 0..328, each once",
    "vocab ids duplicated": "ids must be exactly 0..328, each once",
    "vocab ids from 1": "ids must be exactly 0..328, each once",
    "vocab negative id": "ids must be exactly 0..328, each once",
    "vocab string id": "every id must be an integer",
    "vocab float id": "every id must be an integer",
}


def test_bad_input_table_is_consistent(small_cfg, small_gen):
    # gen_args makes the same dataset
    assert dataclasses.asdict(small_cfg) == {**SMALL_COMB, "identity_bridge": False}
    assert len(small_gen.vocab) == V
    assert (small_gen.vocab["<mask>"], small_gen.vocab["<r_0>"]) == (320, 321)
    assert small_gen.vocab["<pad>"] == V - 2
    assert set(MESSAGE) == set(BAD_INPUTS)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_user_error_naming_the_file(case, small_copy):
    mutate, culprit = BAD_INPUTS[case]
    load_dataset(small_copy)  # the untouched copy loads
    mutate(small_copy)
    with pytest.raises(UserError) as info:
        load_dataset(small_copy)
    msg = str(info.value)
    assert str(small_copy / culprit) in msg
    assert MESSAGE[case] in msg
    assert "\n" not in msg


def test_missing_data_directory(tmp_path):
    with pytest.raises(UserError, match="data directory not found") as info:
        load_dataset(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError):
        load_dataset(tmp_path / "file")


# ----------------------------------------------------------------------------- bad input: gen-data


BAD_FLAGS = {
    "odd --num_ga_entities": {"num_ga_entities": 999},
    "zero --num_ga_entities": {"num_ga_entities": 0},
    "negative --num_ga_entities": {"num_ga_entities": -2},
    "non-integer --num_ga_entities": {"num_ga_entities": "1e3"},
    "--comb does not divide": {"comb": 7},
    "--comb too large": {"comb": 50},  # divides 1600 but only 32 names: shifts must be distinct
    "negative --comb": {"comb": -1},
    "--test_size too big": {"test_size": 901},  # 3 x 300 atomic facts
    "--test_size above group-A facts": {
        "num_ga_entities": 2,
        "gb_ratio": 3,
        "comb": 0,
        "test_size": 7,
    },
    "zero --test_size": {"test_size": 0},
    "negative --test_size": {"test_size": -5},
    "zero --num_rel_pairs": {"num_rel_pairs": 0},
    "negative --gb_ratio": {"gb_ratio": -0.6},
    "odd group B": {"gb_ratio": 0.601},
    "nan --gb_ratio": {"gb_ratio": "nan"},
    "inf --gb_ratio": {"gb_ratio": "inf"},
    "negative --seed": {"seed": -1},
    "unknown flag": {"bogus": 1},
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_gen_data_bad_flags(case, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(gen_args(out, **BAD_FLAGS[case])) == 2
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in cap.err
    assert not out.exists()


def test_gen_data_output_dir_is_a_file(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("keep")
    assert main(gen_args(out)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(out) in err
    assert out.read_text() == "keep"


@pytest.mark.parametrize("present", [FILES, ("valid.json",)])
def test_gen_data_refuses_to_overwrite(present, small_dir, tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    for name in present:
        shutil.copy(small_dir / name, out / name)
    before = {n: (out / n).read_bytes() for n in present}
    assert main(gen_args(out, seed=8)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert str(out) in err and "--overwrite" in err
    assert sorted(os.listdir(out)) == sorted(present)
    assert {n: (out / n).read_bytes() for n in present} == before
    # with --overwrite the dataset is replaced by the requested one
    assert main([*gen_args(out, seed=8), "--overwrite"]) == 0
    capsys.readouterr()
    assert file_bytes(out) == {
        n: t.encode()
        for n, t in expected_files(generate(GenConfig(**{**SMALL_COMB, "seed": 8}))).items()
    }


@pytest.mark.parametrize(
    "comb, name", [(10, "inversionidcomb10.1000.600"), (0, "inversionid.1000.600")]
)
def test_gen_data_default_output_dir(comb, name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["gen-data", "--num_ga_entities", "1000", "--num_rel_pairs", "1", "--comb", str(comb)]
    assert main([*args, "--test_size", "20"]) == 0
    assert f"wrote data/{name}/" in capsys.readouterr().out
    ds = load_dataset(tmp_path / "data" / name)
    assert ds.entity_len == (2 if comb else 1)


@pytest.mark.parametrize(
    "extra, needs_existing",
    [
        (["--num_ga_entities", "7"], False),
        (["--comb", "7"], False),
        (["--test_size", "-1"], False),
        ([], True),  # an existing dataset without --overwrite
    ],
)
def test_gen_data_subprocess_exit_2(extra, needs_existing, small_dir, tmp_path):
    out = tmp_path / "ds"
    if needs_existing:
        shutil.copytree(small_dir, out)
    before = file_bytes(out) if needs_existing else None
    args = gen_args(out)[1:]
    proc = subprocess.run(
        [
            PYTHON if os.path.exists(PYTHON) else sys.executable,
            "-m",
            "revjepa",
            "gen-data",
            *args,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr
    if needs_existing:
        assert "--overwrite" in proc.stderr
        assert file_bytes(out) == before
    else:
        assert not out.exists()
