"""Pure functions of the step: checkpoint schedule, evaluation schedule, learning rate."""

from __future__ import annotations

import math


def should_save(
    step: int, save_steps: int, dense_until: int, dense_interval: int, final_step: int
) -> bool:
    """Checkpoint after `step` updates: dense early, sparse later, and always at the end."""
    if step <= 0:
        return False
    if step == final_step:
        return True
    if step <= dense_until:
        return step % dense_interval == 0
    return step % save_steps == 0


def checkpoint_steps(
    final_step: int, save_steps: int, dense_until: int, dense_interval: int
) -> list[int]:
    """Every step at which `should_save` is true, in order (for docs, tests and planning)."""
    dense = range(dense_interval, min(dense_until, final_step) + 1, dense_interval)
    first_sparse = (dense_until // save_steps + 1) * save_steps
    sparse = range(first_sparse, final_step + 1, save_steps)
    steps = sorted(set(dense) | set(sparse) | {final_step})
    return [s for s in steps if s > 0]


def should_eval(step: int, eval_steps: int, final_step: int) -> bool:
    return step > 0 and (step % eval_steps == 0 or step == final_step)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, scheduler: str) -> float:
    """Factor of the peak LR for the update with 0-based index `step` (Hugging Face's formulas)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if scheduler == "constant_with_warmup":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if scheduler == "linear":
        return max(0.0, 1.0 - progress)
    if scheduler == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown scheduler {scheduler!r}")
