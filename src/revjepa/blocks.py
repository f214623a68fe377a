"""Building blocks shared by the model families: one Hugging Face `GPT2Block` applied through
the model's ops (`revjepa.ops`), so every family runs the same block code on the same weights."""

from __future__ import annotations

import torch
from torch import nn

from .ops import TORCH_OPS, StepOps


def gpt2_block(
    block: nn.Module,
    h: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    ops: StepOps = TORCH_OPS,
) -> torch.Tensor:
    """One HF `GPT2Block` on h (R, T, d): causal attention when `attn_mask` is None, else the
    given boolean mask (R or 1, 1, T, T; True = attend). Same math as HF's block, fewer ops;
    `ops` are the model's (see `revjepa.ops`)."""
    attn = block.attn
    y = ops.attention(
        attn.c_attn(block.ln_1(h)), attn_mask, attn.num_heads, attn.attn_dropout.p, attn.training
    )
    c_proj, p = attn.c_proj, attn.resid_dropout.p
    h = ops.residual_linear_dropout(h, y, c_proj.weight, c_proj.bias, p, attn.training)
    mlp = block.mlp
    # c_fc, then GPT-2's "gelu_new" as one op (HF's version is 8 elementwise ops)
    a = ops.linear_gelu(block.ln_2(h), mlp.c_fc.weight, mlp.c_fc.bias)
    c_proj, p = mlp.c_proj, mlp.dropout.p
    return ops.residual_linear_dropout(h, a, c_proj.weight, c_proj.bias, p, mlp.training)
