"""One optimizer update, shared by the trainer and `revjepa bench`: precision, the AdamW
parameter groups, the forward losses normalised by global counts, and `train_step`."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .config import ObjectiveConfig
from .data import Batch
from .faults import crash, crash_requested


def resolve_precision(precision: str, device: torch.device, notice) -> str:
    """The precision that will run: an unsupported request falls back to float32 with a notice."""
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            notice("bf16 is not supported on this GPU: training in float32")
            return "fp32"
        if device.type == "cpu" and not cpu_has_bf16():
            notice("this CPU has no native bf16 support: training in float32")
            return "fp32"
    if precision == "fp16" and device.type != "cuda":
        notice("fp16 autocast needs CUDA: training in float32")
        return "fp32"
    return precision


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (attention/MLP weights and the embeddings), not on biases/LayerNorm."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float):
    return torch.optim.AdamW(
        param_groups(model, weight_decay),
        lr=learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
        fused=True,  # one kernel for all parameters; also lets a non-finite step be skipped
    )


@dataclass
class StepContext:
    """What an update needs besides its batch and learning rate."""

    run_model: torch.nn.Module  # the model, or its compiled / DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    params: list[torch.nn.Parameter]
    objective: ObjectiveConfig
    precision: str
    device: torch.device
    world: int
    max_grad_norm: float


@dataclass
class StepResult:
    out: Any  # the model's LossOutput
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]  # the mean of each of the family's named loss terms
    grad_norm: torch.Tensor
    bad: torch.Tensor  # True when the update was skipped (non-finite)


def forward_losses(ctx: StepContext, batch: Batch):
    """The forward half of a step: (model output, total loss, the mean of each named loss
    term), the means normalised by the GLOBAL counts so that gradients are equal whatever the
    world size."""
    with autocast(ctx.device, ctx.precision):
        out = ctx.run_model(batch.seq, batch.kind, batch.keep)
    names = list(out.sums)  # the family's terms; counts are looked up by name, not by order
    counts = torch.stack([out.counts[name] for name in names]).float()
    if ctx.world > 1:
        dist.all_reduce(counts)
    means = {name: out.sums[name] / counts[i].clamp(min=1) for i, name in enumerate(names)}
    return out, ctx.objective.total(means), means


def train_step(ctx: StepContext, batch: Batch, lr: float, step_index: int = -1) -> StepResult:
    """One optimizer update; no host synchronisation."""
    optimizer = ctx.optimizer
    for group in optimizer.param_groups:
        group["lr"] = lr
    out, loss, means = forward_losses(ctx, batch)
    ctx.scaler.scale(loss * ctx.world).backward()  # DDP averages gradients over ranks
    if crash_requested("step", step_index):
        crash()
    ctx.scaler.unscale_(optimizer)
    clip = ctx.max_grad_norm if ctx.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(ctx.params, clip, foreach=True)
    # grad_norm is the same on every rank (gradients are all-reduced); a NaN/inf loss gives a
    # NaN/inf norm, so this one flag covers both and all ranks skip the same steps.
    bad = ~torch.isfinite(grad_norm)
    if ctx.precision == "fp16":
        ctx.scaler.step(optimizer)  # the scaler skips inf/NaN steps itself
        ctx.scaler.update()
    else:
        optimizer.found_inf = bad.float()  # the fused AdamW skips the update when set
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    terms = {name: mean.detach() for name, mean in means.items()}
    return StepResult(out, loss.detach(), terms, grad_norm, bad)
