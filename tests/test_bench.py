"""`revjepa bench`: the quick run end to end, and the analytic FLOP count."""

from __future__ import annotations

import json
import math

import torch

import revjepa.cpu.kernels as cpu_kernels
from revjepa.cli import main
from revjepa.data import KIND_ID
from revjepa.flops import batch_shape, train_step_flops


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_train_step_flops_by_hand():
    # 1 layer, d = 2, 3 rows of 4 tokens, 5 scored positions, V = 7
    n_layer, d, rows, t, scored, v = 1, 2, 3, 4, 5, 7
    matmuls = 2 * (rows * t) * 12 * d * d  # 2 * 12 * 4 * 12 = 1152
    attention = 2 * 2 * rows * t * t * d  # 4 * 3 * 16 * 2 = 384
    head = 2 * scored * d * v  # 140
    assert matmuls == 1152 and attention == 384 and head == 140
    assert train_step_flops(n_layer, d, rows, t, scored, v) == 3 * (1152 + 384 + 140)
    # layers multiply the transformer part only, not the LM head
    assert train_step_flops(2, d, rows, t, scored, v) == 3 * (2 * (1152 + 384) + 140)


def test_batch_shape_counts_packed_rows():
    train, atomic = KIND_ID["train"], KIND_ID["atomic"]
    kind = torch.tensor([train] * 5 + [atomic] * 3)  # 5 JEPA rows + ceil(3 / 2) pair rows
    assert batch_shape(kind, seq_len=6, entity_len=2, jepa=True, k=1) == (7, 13, 16)
    # without JEPA every item is paired and there are no <PRED> slots
    assert batch_shape(kind, seq_len=6, entity_len=2, jepa=False, k=1) == (4, 12, 16)


def test_bench_quick_writes_results(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--quick", "--repeats", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train cpu fp32 steps/s" in printed and f"wrote {out}" in printed

    report = json.loads(out.read_text())
    for key in ("date", "torch", "cpu_model", "threads", "config", "results"):
        assert key in report
    assert report["threads"] >= 1 and report["config"]["quick"] is True
    # which steps ran: always the default (torch ops), and --cpu_kernels on where the kernels
    # build (the library's file in the JSON, said in the table's header)
    lib = cpu_kernels.library()
    assert report["cpu_kernels"] == (None if lib is None else lib._name)
    assert "CPU training: the default step (torch ops)" in printed
    assert ("and --cpu_kernels on (C kernels)" in printed) == (lib is not None)
    r = report["results"]
    kern = r["train_cpu_kernels"]
    if lib is None:
        assert "not built" in kern["skipped"]
    else:
        assert "train cpu fp32 --cpu_kernels on steps/s" in printed
        for precision in ("fp32", "bf16"):
            tr, default = kern[precision], r["train_cpu"][precision]
            if "skipped" in default:
                assert tr == default
                continue
            assert tr["cpu_kernels"] is True and default["cpu_kernels"] is False
            assert tr["glibc_malloc_tuned"] in (True, False)
            for key in ("steps_per_s", "fraction_of_matmul", "speedup_over_default"):
                assert _positive(tr[key]), (precision, key)
            assert tr["tokens_per_step"] == default["tokens_per_step"]  # the same batches
    for key in ("gen_seconds", "write_seconds", "load_seconds", "train_items", "vocab_size"):
        assert _positive(r["data"][key]), key

    for precision in ("fp32", "bf16"):
        tr = r["train_cpu"][precision]
        if "skipped" in tr:
            assert precision == "bf16" and "skipped" in r["matmul_cpu"]["bf16"]
            continue
        for key in (
            "steps_per_s",
            "tokens_per_s",
            "items_per_s",
            "achieved_flops_per_s",
            "flops_per_step",
            "rows_per_step",
            "fraction_of_matmul",
        ):
            assert _positive(tr[key]), (precision, key)
        assert tr["row_len"] == 13  # 2 x (2 + 1 + 1 + 2) + one <PRED>
        assert tr["rows_per_step"] <= tr["batch_size"]
        assert math.isclose(tr["tokens_per_s"], tr["steps_per_s"] * tr["tokens_per_step"])
        assert _positive(r["matmul_cpu"][precision]["flops_per_s"])
    if "skipped" not in r["train_cpu"]["bf16"]:
        assert _positive(r["bf16_speedup"])

    assert r["eval"]["items"] == 3 * 200
    assert _positive(r["eval"]["items_per_s"]) and _positive(r["eval"]["total_seconds"])
    assert set(r["eval"]["splits"]) == {"train", "atomic", "test"}
    mem = r["memory"]
    assert _positive(mem["peak_rss_mib"])
    for probe in ("load_dataset", "json_load_train"):
        assert _positive(mem[probe]["peak_mib"]) and mem[probe]["delta_mib"] >= 0
    assert "skipped" in r["gpu"] or _positive(r["gpu"]["eager"]["steps_per_s"])
