"""The shipped reproduction spec, reduced (tiny data and models, one seed, a few steps), run end
to end: every variant trains and is evaluated, and every value of `revjepa report` equals the
runs' own evaluation records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from revjepa.metrics import chance_mrr
from revjepa.runlog import read_jsonl

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "ntp",
    "ntp_abstract",
    "llm_jepa_cosine",
    "llm_jepa_infonce",
    "concept",
    "concept_memory",
}
TINY_BUDGET = {
    "n_layer": 1, "n_embd": 32, "n_head": 2, "batch_size": 16, "max_steps": 20,
    "save_step_dense_interval": 10, "save_steps": 10, "eval_steps": 10, "log_interval": 10,
    "eval_batch_size": 64,
}  # fmt: skip


def reduced(spec: dict) -> dict:
    """The same variants and flags on tiny data, a tiny width and a few steps, one seed."""
    spec = json.loads(json.dumps(spec))
    spec["data"].update(num_ga_entities=200, test_size=20, num_rel_pairs=2)
    spec["variants"]["ntp_abstract"]["data"].update(num_ga_entities=200)
    spec["base"].update(TINY_BUDGET)
    spec["seeds"] = [0]
    return spec


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory) -> Path:
    spec = yaml.safe_load((REPO / "sweeps" / "reproduce_cpu.yaml").read_text())
    assert set(spec["variants"]) == VARIANTS and len(spec["seeds"]) >= 3
    root = tmp_path_factory.mktemp("reproduce")
    spec_file = root / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(reduced(spec), sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "revjepa", "sweep", str(spec_file), "--out", str(root / "out"),
         "--parallel", "2"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "out"


def test_reduced_reproduction_reports_every_variant_from_its_records(reproduction):
    proc = subprocess.run(
        [sys.executable, "-m", "revjepa", "report", str(reproduction), "--format", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {r["group"]: r for r in json.loads(proc.stdout)}
    assert set(rows) == VARIANTS
    for name, row in rows.items():
        family = "concept_jepa" if name.startswith("concept") else "gpt2_jepa"
        metric = "concept_mrr_full" if family == "concept_jepa" else "entity_mrr"
        assert (row["family"], row["metric"], row["n"]) == (family, metric, 1)
        records = read_jsonl(reproduction / "runs" / f"{name}-seed0" / "eval_all.jsonl")
        assert [r["step"] for r in records] == [10, 20]
        best = max(records, key=lambda r: (r["splits"]["test"][metric], -r["step"]))
        for split in ("train", "atomic", "test"):
            assert row[f"{split}_best"]["mean"] == best["splits"][split][metric]
            assert row[f"{split}_last"]["mean"] == records[-1]["splits"][split][metric]
        n = best["splits"]["test"]["num_entities"]
        assert row["num_entities"] == n and row["chance"] == chance_mrr(n)
    # the abstract setting has its own, one-token data
    abstract = json.loads((reproduction / "runs/ntp_abstract-seed0/training_args.json").read_text())
    assert "inversionid.200." in abstract["train"]["data_dir"]
    assert abstract["model"]["position_embeddings"] is False
    memory = json.loads((reproduction / "runs/concept_memory-seed0/training_args.json").read_text())
    assert memory["model"]["memory_layer"] is True and memory["model"]["family"] == "concept_jepa"
