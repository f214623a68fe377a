"""gen-data --identity_bridge (Ma et al. 2026): one `e <r_id> e` fact per entity, nothing else moves."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from revjepa.cli import main
from revjepa.data import (
    IDENTITY,
    KIND_ID,
    GenConfig,
    generate,
    load_dataset,
    summarize,
    vocab_from_mapping,
    write_generated,
)
from revjepa.errors import UserError
from revjepa.spec import _data_config, data_key

TINY = dict(num_ga_entities=200, gb_ratio=0.6, num_rel_pairs=2, comb=10, test_size=40, seed=9)
RUN = [
    *("--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--batch_size", "32"),
    *("--max_steps", "4", "--eval_steps", "4", "--log_interval", "2", "--seed", "1"),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """The same dataset written without and with the bridge (same seed)."""
    root = tmp_path_factory.mktemp("bridge")
    plain, bridged = root / "plain", root / "bridged"
    write_generated(generate(GenConfig(**TINY)), plain)
    write_generated(generate(GenConfig(**TINY, identity_bridge=True)), bridged)
    return plain, bridged


def read(path: Path):
    return json.loads(path.read_text())


def test_one_identity_fact_per_entity_with_the_right_tokens(pair):
    plain, bridged = pair
    vocab = read(bridged / "vocab.json")
    items = [it for it in read(bridged / "train.json") if it["type"] == "identity"]
    rid, mask = vocab[IDENTITY], vocab["<mask>"]
    for it in items:
        (head, rel, m), (tail,) = it["input_text"], it["target_text"]
        assert rel == [rid] and m == [mask] and head == tail and len(head) == 2
    # every entity of the plain dataset (heads and tails of its facts) exactly once
    facts = read(plain / "train.json")
    entities = {tuple(it["input_text"][0]) for it in facts}
    entities |= {tuple(it["target_text"][0]) for it in facts}
    heads = [tuple(it["input_text"][0]) for it in items]
    assert len(heads) == len(set(heads)) == len(entities) == 320
    assert set(heads) == entities


def test_valid_vocab_and_other_items_are_as_without_the_bridge(pair):
    plain, bridged = pair
    assert (bridged / "valid.json").read_bytes() == (plain / "valid.json").read_bytes()
    items = read(bridged / "train.json")
    assert [it for it in items if it["type"] != "identity"] == read(plain / "train.json")
    assert all(it["type"] == "identity" for it in items[len(read(plain / "train.json")) :])
    v_plain, v_bridged = read(plain / "vocab.json"), read(bridged / "vocab.json")
    assert v_bridged == {**v_plain, IDENTITY: len(v_plain)}  # appended: no id moves


def test_loader_maps_identity_to_atomic_and_the_summary_records_it(pair):
    plain, bridged = pair
    ds, base = load_dataset(bridged), load_dataset(plain)
    rid = ds.vocab.token_to_id[IDENTITY]
    assert int(ds.vocab.inverse[rid]) == rid  # its own inverse
    assert torch.equal(ds.vocab.inverse[: base.vocab.size], base.vocab.inverse)
    n = len(base.train)
    assert torch.equal(ds.train.seq[:n], base.train.seq)
    assert torch.equal(ds.train.kind[:n], base.train.kind)
    assert (ds.train.kind[n:] == KIND_ID["atomic"]).all()
    assert (ds.train.seq[n:, 2] == rid).all()
    for name, split in base.valid.items():
        assert torch.equal(ds.valid[name].seq, split.seq)
    got, want = summarize(ds), summarize(base)
    assert got["identity_bridge"] is True and want["identity_bridge"] is False
    assert got["train_identity"] == 320 and want["train_identity"] == 0
    for key in ("train_kind_train", "train_kind_atomic", "valid_test"):
        assert got[key] == want[key]
    assert got["relations"] == want["relations"] + 1


def _retype(items: list, index: int, **changes) -> list:
    items[index] = {**items[index], **changes}
    return items


@pytest.mark.parametrize(
    "case",
    ["identity type on a plain fact", "r_id in a train item", "head differs from tail"],
)
def test_identity_items_are_checked_on_load(pair, tmp_path, case):
    shutil.copytree(pair[1], tmp_path / "ds")
    path = tmp_path / "ds" / "train.json"
    items = read(path)
    last = items[-1]
    if case == "identity type on a plain fact":
        _retype(items, 0, type="identity")
    elif case == "r_id in a train item":
        _retype(items, len(items) - 1, type="train")
    else:
        other = items[-2]["input_text"][0]
        _retype(items, len(items) - 1, target_text=[other])
        assert other != last["input_text"][0]
    path.write_text(json.dumps(items))
    with pytest.raises(UserError, match="exactly the items of type 'identity'") as info:
        load_dataset(tmp_path / "ds")
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_vocab_refuses_an_inverse_of_the_identity():
    raw = {"<e_0>": 0, "<mask>": 1, "<r_0>": 2, "<r_0_inv>": 3, "<pad>": 4, "<PRED>": 5}
    vocab = vocab_from_mapping({**raw, IDENTITY: 6}, "v")
    assert int(vocab.inverse[6]) == 6 and vocab.relation_ids.tolist() == [2, 3, 6]
    with pytest.raises(UserError, match="its own inverse, there is no <r_id_inv>"):
        vocab_from_mapping({**raw, IDENTITY: 6, "<r_id_inv>": 7}, "v")


def test_gen_data_flag_default_dir_and_summary(tmp_path, capsys):
    cfg = GenConfig(**TINY, identity_bridge=True)
    assert cfg.default_dir() == "data/inversionidcomb10.200.120.idbridge"
    args = [f"--{k}={v}" for k, v in TINY.items()]
    assert main(["gen-data", *args, "--identity_bridge", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("\n{") :])
    assert summary["identity_bridge"] is True and summary["train_identity"] == 320


def test_training_and_evaluation_on_the_bridge(pair, tmp_path):
    """A few steps train on the bridged data; the evaluation has the same form as without."""
    records = {}
    for name, data in zip(("plain", "bridged"), pair):
        out = tmp_path / name
        assert main(["train", "--data_dir", str(data), "--output_dir", str(out), *RUN]) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        result = tmp_path / f"{name}.json"
        ckpt = out / "checkpoints" / "checkpoint_step_4.pt"
        assert main(["evaluate", "--checkpoint", str(ckpt), "--output", str(result)]) == 0
        records[name] = (rows, read(result))
    (rows_a, eval_a), (rows_b, eval_b) = records["plain"], records["bridged"]
    assert [sorted(r) for r in rows_a] == [sorted(r) for r in rows_b]
    assert sorted(eval_a["splits"]) == sorted(eval_b["splits"]) == ["atomic", "test", "train"]
    for split in eval_a["splits"]:
        assert sorted(eval_a["splits"][split]) == sorted(eval_b["splits"][split])


def test_sweep_data_blocks_take_the_flag_and_keep_old_keys():
    flags = _data_config(dict(TINY), "spec data")
    assert "identity_bridge" not in flags  # the content digest of older sweeps' data
    assert flags == {k: v for k, v in dataclasses.asdict(GenConfig(**TINY)).items() if k in flags}
    on = _data_config({**TINY, "identity_bridge": True}, "spec data")
    assert on["identity_bridge"] is True
    assert data_key(on) != data_key(flags) and ".idbridge-" in data_key(on)
    with pytest.raises(UserError, match="identity_bridge: expected true or false"):
        _data_config({"identity_bridge": 1}, "spec data")
