"""Evaluation of a checkpoint or of a whole run: rebuild the model from a checkpoint, run
its family's metrics on the splits, print its family's table, sweep a run's checkpoints.
The metric definitions are in `metrics.py` (token-level) and in each family.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoint import list_checkpoints, load_checkpoint
from .data import KINDS, Dataset, Split
from .errors import UserError
from .families import FAMILIES, model_from_checkpoint
from .runlog import append_jsonl, read_jsonl


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    split: Split,
    batch_size: int,
    per_layer: bool = False,
    entity_mrr: bool = False,
) -> dict[str, Any]:
    """All metrics of one split, as the model's family defines them (float32, eval mode).
    `entity_mrr`: gpt2_jepa's entity-level rank metrics too (concept_jepa always computes its
    own, `concept_mrr_full`)."""
    return model.evaluate_split(split, batch_size, per_layer, entity_mrr=entity_mrr)


# ----------------------------------------------------------------------------- checkpoints


def evaluate_checkpoint(
    path: Path,
    dataset: Dataset,
    batch_size: int,
    splits: tuple[str, ...] = KINDS,
    per_layer: bool = False,
    device: str = "cpu",
    entity_mrr: bool = True,
) -> dict[str, Any]:
    """The metrics of one checkpoint on the splits (with `entity_mrr` by default)."""
    state = load_checkpoint(path)
    model, config = model_from_checkpoint(state, dataset, str(path))
    model.to(device)
    results = {
        "checkpoint": str(path),
        "step": int(state.get("step", 0)),
        "config": config.to_dict(),
        "family": config.model.family,
        "eval_batch_size": batch_size,
        "splits": {
            name: evaluate_split(model, dataset.valid[name], batch_size, per_layer, entity_mrr)
            for name in splits
        },
    }
    return results


def format_table(results: dict[str, Any]) -> str:
    """The evaluation table of a result, as its model family prints it."""
    return FAMILIES[results["family"]].format_table(results)


def sweep_directory(
    ckpt_dir: Path,
    dataset: Dataset,
    batch_size: int,
    per_layer: bool,
    device: str,
    log=print,
    entity_mrr: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate every checkpoint of a run in step order; resumable through eval_all.jsonl."""
    checkpoints = list_checkpoints(ckpt_dir)
    if not checkpoints:
        raise UserError(f"{ckpt_dir}: no checkpoint_step_*.pt files")
    run_dir = ckpt_dir.parent if ckpt_dir.name == "checkpoints" else ckpt_dir
    record_path = run_dir / "eval_all.jsonl"
    done = {r["step"]: r for r in read_jsonl(record_path)}
    if record_path.is_file() and record_path.stat().st_size:
        with open(record_path, "rb+") as fh:
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":  # a killed sweep's half line: end it (read_jsonl skips it)
                fh.write(b"\n")
    records = []
    for step, path in checkpoints:
        if step in done:
            records.append(done[step])
            continue
        try:
            result = evaluate_checkpoint(
                path, dataset, batch_size, per_layer=per_layer, device=device,
                entity_mrr=entity_mrr,
            )  # fmt: skip
        except UserError as exc:
            print(f"skipping: {exc}", file=sys.stderr)
            continue
        result.pop("config")
        append_jsonl(record_path, result)
        records.append(result)
        log(format_table(result))
    return records


def best_steps(records: list[dict[str, Any]]) -> dict[str, tuple[int, float]]:
    best: dict[str, tuple[int, float]] = {}
    for r in records:
        for name, m in r["splits"].items():
            if name not in best or m["mrr"] > best[name][1]:
                best[name] = (r["step"], m["mrr"])
    return best
