"""CPU fast paths for the eager training step, each checked against torch's own op in the tests.

On CUDA, and under torch.compile (which fuses these ops itself), the plain torch ops are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _plain(x: torch.Tensor) -> bool:
    return x.device.type != "cpu" or torch.compiler.is_compiling()


def _keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Bool keep-mask shaped like x and the scale of kept values.

    `bernoulli_` draws one random number per element; here each int64 draw is cut into four
    16-bit uniforms r, and an element is kept when r < round((1 - p) * 2**16). The keep
    probability is that count / 2**16 (p rounded to 1/65536) and kept values are scaled by its
    exact inverse, so the output's expectation is x, as with F.dropout.
    """
    keep_count = round((1.0 - p) * 65536)
    n = x.numel()
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    r = bits.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
    return r < keep_count - 32768, 65536.0 / max(keep_count, 1)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout` whose CPU mask costs one 64-bit random draw per 4 elements (`_keep_mask`)."""
    if not training or p == 0.0:
        return x
    if _plain(x) or p >= 1.0:
        return F.dropout(x, p, training=True)
    keep, scale = _keep_mask(x, p)
    # x * mask (the bool promotes to x's dtype on the fly) is twice as fast as where(mask, x, 0)
    return (x * keep).mul_(scale)


def residual_dropout(h: torch.Tensor, y: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`h + F.dropout(y, p)`: on CPU one addcmul with the mask in y's dtype, one pass over memory
    fewer each way. For float32 it is bit for bit `h + dropout(y)`; for a bf16 y under autocast
    the scaled value is added in h's float32 without being rounded to bf16 first."""
    if not training or p == 0.0:
        return h + y
    if _plain(y) or p >= 1.0:
        return h + F.dropout(y, p, training=True)
    keep, scale = _keep_mask(y, p)
    return torch.addcmul(h, y, keep.to(y.dtype), value=scale)


class _SoftmaxCrossEntropySum(torch.autograd.Function):
    """Sum of cross-entropies with one exp pass: the forward keeps the softmax for the backward,
    whose gradient is that softmax minus the one-hot target, written in place."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        picked = x.gather(1, target[:, None])
        m = x.amax(1, keepdim=True)
        prob = x.sub(m) if x is logits else x.sub_(m)  # never write into the caller's logits
        prob.exp_()
        total = prob.sum(1, keepdim=True)
        loss = (total.log() + m - picked).sum()
        prob.div_(total)
        ctx.save_for_backward(prob, target)
        ctx.in_dtype = logits.dtype
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.used:  # the saved softmax became the gradient: a second backward would be wrong
            raise RuntimeError("cross_entropy_sum: backward through the graph a second time")
        ctx.used = True
        prob, target = ctx.saved_tensors
        rows = torch.arange(prob.shape[0], device=prob.device)
        prob[rows, target] -= 1.0
        return prob.mul_(grad_loss).to(ctx.in_dtype), None


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(logits.float(), target, reduction="sum")` for (n, V) logits, computed in
    float32 whatever the logits' dtype."""
    if _plain(logits):
        return F.cross_entropy(logits.float(), target, reduction="sum")
    return _SoftmaxCrossEntropySum.apply(logits, target)
