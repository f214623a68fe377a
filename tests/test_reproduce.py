"""The shipped reproduction and mitigation specs, reduced (tiny data and models, one seed, a few
steps), run end to end: every variant trains and is evaluated, and every value of
`revjepa report` equals the runs' own evaluation records."""

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
REPRODUCTION = {"ntp", "ntp_abstract", "llm_jepa_cosine", "llm_jepa_infonce", "concept",
                "concept_memory"}  # fmt: skip
SPECS = {
    "reproduce_cpu_quick.yaml": REPRODUCTION,
    "reproduce_cpu_long.yaml": REPRODUCTION,
    "mitigations_cpu.yaml": {
        "ntp", "reverse_entity", "reverse_token", "identity_bridge", "mlm_u", "ntp_wd1",
        "ntp_wd2", "llm_jepa_infonce", "concept", "concept_memory",
    },
}  # fmt: skip
FAMILY = {"concept": "concept_jepa", "concept_memory": "concept_jepa", "mlm_u": "mlm_u"}
TINY_BUDGET = {
    "n_layer": 1, "n_embd": 32, "n_head": 2, "batch_size": 16, "max_steps": 20,
    "save_step_dense_interval": 10, "save_steps": 10, "eval_steps": 10, "log_interval": 10,
    "eval_batch_size": 64,
}  # fmt: skip


def reduced(spec: dict) -> dict:
    """The same variants and flags on tiny data, a tiny width and a few steps, one seed."""
    spec = json.loads(json.dumps(spec))
    spec["data"].update(num_ga_entities=200, test_size=20, num_rel_pairs=2)
    for variant in spec["variants"].values():
        if "data" in variant and "num_ga_entities" in variant["data"]:
            variant["data"].update(num_ga_entities=200)
        for key in TINY_BUDGET:  # a variant's own budget is reduced too
            variant.pop(key, None)
    spec["base"].update(TINY_BUDGET)
    spec["seeds"] = [0]
    return spec


@pytest.fixture(scope="module", params=sorted(SPECS))
def reproduction(request, tmp_path_factory) -> tuple[str, Path]:
    spec = yaml.safe_load((REPO / "sweeps" / request.param).read_text())
    assert set(spec["variants"]) == SPECS[request.param] and len(spec["seeds"]) >= 3
    assert spec["entity_mrr"] == "on"  # the report compares on entity_mrr
    root = tmp_path_factory.mktemp("reproduce")
    spec_file = root / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(reduced(spec), sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "revjepa", "sweep", str(spec_file), "--out", str(root / "out"),
         "--parallel", "2"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return request.param, root / "out"


def test_reduced_reproduction_reports_every_variant_from_its_records(reproduction):
    name_of_spec, reproduction = reproduction
    proc = subprocess.run(
        [sys.executable, "-m", "revjepa", "report", str(reproduction), "--format", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {r["group"]: r for r in json.loads(proc.stdout)}
    assert set(rows) == SPECS[name_of_spec]
    for name, row in rows.items():
        family = FAMILY.get(name, "gpt2_jepa")
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

    def args(run: str) -> dict:
        return json.loads(
            (reproduction / "runs" / f"{run}-seed0" / "training_args.json").read_text()
        )

    if "ntp_abstract" in rows:  # the abstract setting has its own, one-token data
        abstract = args("ntp_abstract")
        assert "inversionid.200." in abstract["train"]["data_dir"]
        assert abstract["model"]["position_embeddings"] is False
    if "reverse_entity" in rows:  # each mitigation is what its name says
        assert args("reverse_entity")["train"]["reverse_training"] == "entity"
        assert args("reverse_token")["train"]["reverse_training"] == "token"
        assert ".idbridge" in args("identity_bridge")["train"]["data_dir"]
        assert args("ntp_wd2")["train"]["weight_decay"] == 2.0
        assert args("mlm_u")["model"]["family"] == "mlm_u"
    memory = args("concept_memory")
    assert memory["model"]["memory_layer"] is True and memory["model"]["family"] == "concept_jepa"
