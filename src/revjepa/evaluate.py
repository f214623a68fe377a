"""Evaluation of a checkpoint or of a whole run: rebuild the model from a checkpoint, run
its family's metrics on the splits, print its family's table, sweep a run's checkpoints.
The metric definitions are in `metrics.py` (token-level) and in each family.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import list_checkpoints, load_checkpoint
from .data import KINDS, Dataset, Split
from .errors import UserError
from .families import FAMILIES, model_from_checkpoint
from .flops import peak_flops
from .progress import NO_PROGRESS, Bar, Progress
from .runlog import append_jsonl, read_jsonl

ENTITY_MRR_CHOICES = ("auto", "on", "off")
ENTITY_MRR_BUDGET_S = 60.0  # `auto` computes entity_mrr when the whole call is estimated below
# The share of the device's matmul peak that entity_mrr's candidate passes reach (small GEMMs,
# a log-softmax over the vocabulary per pass): measured on CPU (BENCHMARKS.md), used for GPUs
# too, where it overstates the time (their datasheet peak is far from small GEMMs as well).
ENTITY_PASS_EFFICIENCY = 0.5


@dataclass
class EntityMrrPlan:
    """Whether one evaluation call computes gpt2_jepa's entity_mrr, and why. `auto` decides
    once per call, before the work, from the family's FLOP count (`entity_metric_flops`, no
    pruning assumed) over the device's matmul peak (`flops.peak_flops`) x ENTITY_PASS_EFFICIENCY."""

    mode: str = "on"
    budget_s: float = ENTITY_MRR_BUDGET_S
    compute: bool | None = None  # decided by `decide`, then shared by every checkpoint
    estimate: dict[str, Any] = field(default_factory=dict)

    def decide(self, model: Any, n_items: int, device: str, evaluations: int = 1) -> bool:
        """Decide (once) for `evaluations` checkpoints of `n_items` items each; `auto` prints
        one line on stderr when it skips."""
        if self.compute is not None:
            return self.compute
        if self.mode not in ENTITY_MRR_CHOICES:
            raise UserError(f"--entity_mrr must be one of {ENTITY_MRR_CHOICES}, got {self.mode!r}")
        if self.mode != "auto":
            self.compute = self.mode == "on"
            return self.compute
        flops = model.entity_metric_flops(n_items)
        if flops is None:
            self.compute = False
            self.estimate = {"reason": "the model has no entity table"}
            print("entity_mrr skipped (--entity_mrr auto): the model has no entity table",
                  file=sys.stderr)  # fmt: skip
            return False
        flops *= evaluations
        rate, source = (1.0, "none needed")
        if flops > 0:
            peak, source = peak_flops(torch.device(device), "fp32", None)
            rate = peak * ENTITY_PASS_EFFICIENCY
        seconds = flops / rate
        self.estimate = dict(
            seconds=seconds, flops=flops, flops_per_s=rate, source=source, budget_s=self.budget_s
        )
        self.compute = seconds <= self.budget_s
        if not self.compute:
            print(self.skip_line(n_items * evaluations), file=sys.stderr)
        return self.compute

    def skip_line(self, items: int) -> str:
        est = self.estimate
        return (
            f"entity_mrr skipped (--entity_mrr auto): about {duration(est['seconds'])} estimated "
            f"for {items:,} items ({est['flops']:.2g} FLOPs, no pruning assumed, at "
            f"{est['flops_per_s'] / 1e9:.3g} GFLOP/s: {est['source']} x "
            f"{ENTITY_PASS_EFFICIENCY}), over the {duration(self.budget_s)} budget; "
            "--entity_mrr on computes it"
        )

    def record(self) -> dict[str, Any]:
        """What a result records: computed or not, and the estimate `auto` decided from."""
        out: dict[str, Any] = {"entity_mrr_computed": bool(self.compute)}
        if self.estimate:
            out["entity_mrr_estimate"] = dict(self.estimate, mode=self.mode)
        return out


def duration(seconds: float) -> str:
    """1.2 h, 3.4 min, 5.6 s."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    split: Split,
    batch_size: int,
    per_layer: bool = False,
    entity_mrr: bool = False,
    progress: Bar | None = None,
) -> dict[str, Any]:
    """All metrics of one split, as the model's family defines them (float32, eval mode).
    `entity_mrr`: gpt2_jepa's entity-level rank metrics too (concept_jepa always computes its
    own, `concept_mrr_full`). `progress`: a bar advanced by the items done."""
    return model.evaluate_split(
        split, batch_size, per_layer, entity_mrr=entity_mrr, progress=progress
    )


# ----------------------------------------------------------------------------- checkpoints


def evaluate_checkpoint(
    path: Path,
    dataset: Dataset,
    batch_size: int,
    splits: tuple[str, ...] = KINDS,
    per_layer: bool = False,
    device: str = "cpu",
    entity_mrr: EntityMrrPlan | None = None,
    progress: Progress = NO_PROGRESS,
    evaluations: int = 1,
) -> dict[str, Any]:
    """The metrics of one checkpoint on the splits (entity_mrr as `entity_mrr` decides, on by
    default; `evaluations`: the checkpoints of this call, for its estimate)."""
    state = load_checkpoint(path)
    model, config = model_from_checkpoint(state, dataset, str(path))
    model.to(device)
    plan = entity_mrr or EntityMrrPlan()
    n_items = sum(len(dataset.valid[name]) for name in splits)
    entity = plan.decide(model, n_items, device, evaluations)
    results = {
        "checkpoint": str(path),
        "step": int(state.get("step", 0)),
        "config": config.to_dict(),
        "family": config.model.family,
        "eval_batch_size": batch_size,
        **plan.record(),
        "splits": {},
    }
    for name in splits:
        split = dataset.valid[name]
        desc = f"{name} (+entity_mrr)" if entity and plan.estimate.get("flops", 1) else name
        with progress.bar(len(split), desc, leave=False) as bar:
            results["splits"][name] = evaluate_split(
                model, split, batch_size, per_layer, entity, bar
            )
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
    entity_mrr: EntityMrrPlan | None = None,
    progress: Progress = NO_PROGRESS,
) -> list[dict[str, Any]]:
    """Evaluate every checkpoint of a run in step order; resumable through eval_all.jsonl.
    `entity_mrr` decides once for all the checkpoints still to evaluate."""
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
    plan = entity_mrr or EntityMrrPlan()
    pending = sum(step not in done for step, _ in checkpoints)
    records = []
    with progress.bar(len(checkpoints), "checkpoints", unit="ckpt") as bar:
        for step, path in checkpoints:
            if step in done:
                records.append(done[step])
                bar.update(1)
                continue
            try:
                result = evaluate_checkpoint(
                    path, dataset, batch_size, per_layer=per_layer, device=device,
                    entity_mrr=plan, progress=progress, evaluations=pending,
                )  # fmt: skip
            except UserError as exc:
                print(f"skipping: {exc}", file=sys.stderr)
                bar.update(1)
                continue
            result.pop("config")
            append_jsonl(record_path, result)
            records.append(result)
            log(format_table(result))
            bar.update(1)
    return records


def best_steps(records: list[dict[str, Any]]) -> dict[str, tuple[int, float]]:
    best: dict[str, tuple[int, float]] = {}
    for r in records:
        for name, m in r["splits"].items():
            if name not in best or m["mrr"] > best[name][1]:
                best[name] = (r["step"], m["mrr"])
    return best
