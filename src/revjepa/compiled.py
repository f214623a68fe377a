"""torch.compile of a model family's device half, and the probe that falls back to eager."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from .data import Batch
from .errors import one_line
from .step import StepContext, forward_losses

log = logging.getLogger("revjepa.train")


class CompiledLosses(torch.nn.Module):
    """A model family run with its device half (`losses`) under torch.compile; the host half
    (`prepare`: packing plans) stays eager, outside the compiled graph. Batches are prepared
    with fixed shapes, so the graph is compiled once, for static shapes, and never guards on a
    count; with `cuda_graphs` (mode reduce-overhead) every step replays one recorded CUDA
    graph for the forward and one for the backward instead of issuing ~300 kernels."""

    def __init__(self, model: torch.nn.Module, cuda_graphs: bool) -> None:
        super().__init__()
        # Inductor's coalescing tile analysis (Triton backend) failed on this model under
        # dynamic shapes (torch 2.11 on an H200: AssertionError in
        # tiling_utils.get_pw_red_splits); the shapes are static now, but keep the setting
        # that is known to work.
        import torch._inductor.config as inductor_config

        inductor_config.triton.coalesce_tiling_analysis = False
        self.model, self.cuda_graphs = model, cuda_graphs
        mode = "reduce-overhead" if cuda_graphs else None
        self.compiled_losses = torch.compile(model.losses, mode=mode, dynamic=False)

    def forward(
        self, seq: torch.Tensor, kind: torch.Tensor, jepa_keep: torch.Tensor | None = None
    ) -> Any:
        prepared = self.model.prepare(seq, kind, jepa_keep, fixed_shapes=True)
        if self.cuda_graphs:
            # a new step: the previous step's graph outputs may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
        return self.compiled_losses(*prepared)


def compile_model(model: torch.nn.Module, cuda_graphs: bool) -> torch.nn.Module:
    """The module that trains `model` compiled (see CompiledLosses)."""
    return CompiledLosses(model, cuda_graphs)


def compiled_or_eager(
    ctx: StepContext, eager: torch.nn.Module, batch: Batch, warn, probe_steps: int = 1
) -> torch.nn.Module:
    """Compilation is lazy, so a platform where it fails only says so at the first step: run
    `probe_steps` forward + backward passes of `ctx.run_model` (compiled) on `batch` and
    return it if that works, else warn and return `eager`. Leaves no trace: the RNG states are
    restored and the gradients dropped, so the run continues exactly as it would have
    without the probe."""
    device = ctx.device
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    t0 = time.perf_counter()
    try:
        for _ in range(probe_steps):
            _, loss, _ = forward_losses(ctx, batch)
            loss.backward()
            # as train_step does: under CUDA graphs the gradients are graph outputs that the
            # next replay overwrites, so a second backward must not accumulate into them
            for p in eager.parameters():
                p.grad = None
        chosen = ctx.run_model
        log.info(f"torch.compile: the first step compiled in {time.perf_counter() - t0:.0f} s")
    except Exception as exc:  # any failure here means: do not use the compiled model
        warn(f"torch.compile failed ({one_line(exc)}): running eagerly")
        chosen = eager
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        for p in eager.parameters():
            p.grad = None
    return chosen


def with_model(ctx: StepContext, run_model: torch.nn.Module) -> StepContext:
    return dataclasses.replace(ctx, run_model=run_model)
