"""The ops of GPT-2's blocks and of the LM head that the model families call, as one set.

A model holds its set in `model.ops`, chosen once when the model is set up, never re-decided
per call. The default, `TORCH_OPS`, is plain torch on every device (the same ops on CUDA,
under torch.compile and on the CPU, so a default run does not depend on the machine's
compiler). `revjepa.cpu.use_cpu_kernels` swaps in fused CPU versions for `--cpu_kernels on`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def attention(
    qkv: torch.Tensor, mask: torch.Tensor | None, n_head: int, p: float, training: bool
) -> torch.Tensor:
    """GPT-2's attention from the (R, T, 3d) c_attn output to the (R, T, d) input of c_proj:
    `mask` (R or 1, 1, T, T) bool, True = attend (None: causal); dropout p on the attention
    weights when training."""
    rows, t, three_d = qkv.shape
    p = p if training else 0.0
    d = three_d // 3
    shape = (rows, t, n_head, d // n_head)
    q, k, v = (x.view(shape).transpose(1, 2) for x in qkv.split(d, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, mask, dropout_p=p, is_causal=mask is None)
    return y.transpose(1, 2).reshape(rows, t, d)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x @ weight + bias, approximate="tanh")` (GPT-2's c_fc, an HF Conv1D with its
    (in, out) weight, then gelu_new)."""
    y = F.gelu(torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight), approximate="tanh")
    return y.view(*x.shape[:-1], weight.shape[1])


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout` (x itself when not training or p = 0)."""
    if not training or p == 0.0:
        return x
    return F.dropout(x, p, training=True)


def residual_linear_dropout(
    h: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    p: float,
    training: bool,
) -> torch.Tensor:
    """`h + F.dropout(x @ weight + bias, p)`: a residual branch through GPT-2's c_proj (an HF
    Conv1D with its (in, out) weight)."""
    y = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(h.shape)
    return h + dropout(y, p, training)


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of (n, V) logits, in float32 whatever their dtype."""
    return F.cross_entropy(logits.float(), target, reduction="sum")


class TiedHead:
    """The token embedding and the LM head of one forward pass, sharing one (V, d) matrix."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """`F.embedding(ids, weight)`."""
        return F.embedding(ids, self.weight)

    def cross_entropy_sum(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`cross_entropy_sum(x @ weight.T, target)` for (n, d) x, in float32."""
        return cross_entropy_sum(x @ self.weight.T, target)


@dataclass(frozen=True)
class StepOps:
    """One implementation of each op a model family calls (signatures as in this module)."""

    name: str
    attention: Callable[..., torch.Tensor]
    linear_gelu: Callable[..., torch.Tensor]
    residual_linear_dropout: Callable[..., torch.Tensor]
    dropout: Callable[..., torch.Tensor]
    cross_entropy_sum: Callable[..., torch.Tensor]
    tied_head: Callable[[torch.Tensor], Any]  # weight -> an object like TiedHead


TORCH_OPS = StepOps(
    name="torch",
    attention=attention,
    linear_gelu=linear_gelu,
    residual_linear_dropout=residual_linear_dropout,
    dropout=dropout,
    cross_entropy_sum=cross_entropy_sum,
    tied_head=TiedHead,
)
