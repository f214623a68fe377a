"""The opt-in CPU fast path of the training step: `--cpu_kernels on`.

Fused C kernels (`kernels.c`, built on this machine by `kernels.py`), the ops that call them
(`fastpath.py`) and glibc malloc settings (`hostmem.py`). Importing this package builds,
loads and changes nothing. A model gets the fused ops in one swap, at set-up
(`use_cpu_kernels`: its `ops` become `fastpath.CPU_OPS`); the trainer's one call is
`setup_cpu_kernels`. The default (`--cpu_kernels off`) is plain torch ops (`revjepa.ops`).

The fused ops compute the same functions within float tolerance, but their dropout masks
come from another generator (a counter-based one seeded from torch's), so with dropout > 0
a run with them is a different, equally valid draw than a run without them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..distributed import Dist
from ..ops import TORCH_OPS
from . import kernels
from .fastpath import CPU_OPS
from .hostmem import tune_glibc_malloc
from .kernels import KernelsUnavailable

__all__ = [
    "KernelsUnavailable",
    "setup_cpu_kernels",
    "use_cpu_kernels",
    "uses_cpu_kernels",
]


def use_cpu_kernels(model: nn.Module) -> None:
    """Give `model` (a LossFamily) the fused CPU ops, building and loading the C kernels first.
    Raises KernelsUnavailable when they cannot be built or loaded here (the model is left as
    it was). Only for an eager model on the CPU: the C kernels read host memory, and
    torch.compile cannot trace them."""
    kernels.load()
    model.ops = CPU_OPS


def uses_cpu_kernels(model: nn.Module) -> bool:
    """Whether `model` runs the fused CPU ops."""
    return getattr(model, "ops", None) is CPU_OPS


def setup_cpu_kernels(
    model: nn.Module,
    requested: str,
    device: torch.device,
    compiled: bool,
    dist: Dist,
    warn: Callable[[str], None],
) -> bool:
    """The trainer's one call, at set-up: with `--cpu_kernels on`, the fused ops for `model`
    and glibc's malloc settings; where they cannot apply (another device, torch.compile, no
    working C compiler, or another process of the run that cannot use them) one `warn` line
    says why and the model keeps its torch ops (`revjepa.ops.step_ops`). Returns whether the
    kernels are on."""
    if requested != "on":
        return False
    why, previous = None, getattr(model, "ops", TORCH_OPS)
    if device.type != "cpu":
        why = f"the device is {device}, and they are CPU kernels"
    elif compiled:
        why = "torch.compile is on, and it fuses these ops itself"
    else:
        try:
            use_cpu_kernels(model)
        except KernelsUnavailable as exc:
            why = str(exc)
    # every process of a run computes with the same ops (collective: all ranks call it)
    if dist.any_rank(why is not None, device) and why is None:
        model.ops = previous
        why = "another process of this run cannot use them"
    if why is not None:
        warn(f"--cpu_kernels on does not apply here ({why}); training with torch's ops")
        return False
    tune_glibc_malloc()
    return True
