"""CPU fast paths for the eager training step, each checked against torch's own op in the tests.

On CUDA, and under torch.compile (which fuses these ops itself), the plain torch ops are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _plain(x: torch.Tensor) -> bool:
    return x.device.type != "cpu" or torch.compiler.is_compiling()


def _keep_mask(
    x: torch.Tensor, p: float, dtype: torch.dtype = torch.bool
) -> tuple[torch.Tensor, float]:
    """Keep-mask shaped like x (0/1 in `dtype`) and the scale of kept values.

    `bernoulli_` draws one random number per element; here each int64 draw is cut into four
    16-bit uniforms r, and an element is kept when r < round((1 - p) * 2**16). The keep
    probability is that count / 2**16 (p rounded to 1/65536) and kept values are scaled by its
    exact inverse, so the output's expectation is x, as with F.dropout.
    """
    keep_count = round((1.0 - p) * 65536)
    n = x.numel()
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    r = bits.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
    # the comparison writes `dtype` directly: a bool mask converted afterwards is one more pass
    keep = torch.empty(x.shape, dtype=dtype)
    torch.lt(r, keep_count - 32768, out=keep)
    return keep, 65536.0 / max(keep_count, 1)


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
    keep, scale = _keep_mask(y, p, y.dtype)
    return torch.addcmul(h, y, keep, value=scale)


def _saved_once(ctx, what: str) -> tuple[torch.Tensor, ...]:
    """The saved tensors of a cross-entropy backward that turns its saved softmax into the
    gradient in place: a second backward through the same graph would be wrong, so refuse it."""
    if ctx.used:
        raise RuntimeError(f"{what}: backward through the graph a second time")
    ctx.used = True
    return ctx.saved_tensors


def _minus_one_hot_(prob: torch.Tensor, target: torch.Tensor) -> None:
    """softmax - one_hot(target), in place: the cross-entropy's gradient w.r.t. the logits."""
    prob[torch.arange(prob.shape[0], device=prob.device), target] -= 1.0


class _SoftmaxCrossEntropySum(torch.autograd.Function):
    """Sum of cross-entropies in two passes over the logits: the forward keeps the softmax
    (exp of the log-softmax, in place) for the backward, whose gradient is that softmax minus
    the one-hot target, written in place."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), 1)  # a new tensor: the caller's logits stay
        loss = -logp.gather(1, target[:, None]).sum()
        prob = logp.exp_()
        ctx.save_for_backward(prob, target)
        ctx.in_dtype = logits.dtype
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        prob, target = _saved_once(ctx, "cross_entropy_sum")
        _minus_one_hot_(prob, target)
        return prob.mul_(grad_loss).to(ctx.in_dtype), None


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(logits.float(), target, reduction="sum")` for (n, V) logits, computed in
    float32 whatever the logits' dtype."""
    if _plain(logits):
        return F.cross_entropy(logits.float(), target, reduction="sum")
    return _SoftmaxCrossEntropySum.apply(logits, target)


# (n, V) logits buffers handed from one step's backward to the next step's forward. On the
# CPU a fresh 33 MB buffer made the LM head's GEMM ~40% slower than a reused one (profile,
# bench configuration: 20 vs 14 ms). A buffer is taken out while a graph uses it, so two
# live graphs never share one; a graph dropped without backward just costs a new buffer.
_logits_buffers: dict[tuple[int, int], torch.Tensor] = {}


class _LinearCrossEntropySum(torch.autograd.Function):
    """`cross_entropy_sum(x @ weight.T, target)` in float32 with one (n, V) buffer: the
    logits become the log-softmax, then the softmax, then the gradient, all in place, and
    the backward's GEMMs take the upstream gradient on their small operands."""

    @staticmethod
    def forward(ctx, x, weight, target, tie: TiedLMHead) -> torch.Tensor:
        shape = (x.shape[0], weight.shape[0])
        buf = _logits_buffers.pop(shape, None)
        if buf is None:
            buf = torch.empty(shape, dtype=torch.float32)
        torch.mm(x, weight.T, out=buf)
        # in place: ATen's last-dim kernel reads each row whole before writing it (a test
        # pins the result against torch.log_softmax)
        torch._log_softmax(buf, 1, False, out=buf)
        loss = -buf.gather(1, target[:, None]).sum()
        prob = buf.exp_()
        ctx.save_for_backward(x, weight, prob, target)
        ctx.tie, ctx.used = tie, False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        x, weight, prob, target = _saved_once(ctx, "TiedLMHead.cross_entropy_sum")
        _minus_one_hot_(prob, target)  # d(loss)/d(logits), still without the upstream factor
        grad_x = (prob @ weight).mul_(grad_loss) if ctx.needs_input_grad[0] else None
        grad_w = prob.T @ (x * grad_loss) if ctx.needs_input_grad[1] else None
        _logits_buffers[tuple(prob.shape)] = prob
        tie = ctx.tie
        if grad_w is not None and tie.embedded:  # the embedding's backward adds to it
            tie.head_grad = grad_w if tie.head_grad is None else tie.head_grad.add_(grad_w)
            grad_w = None
        return grad_x, grad_w, None, None


class _TiedEmbedding(torch.autograd.Function):
    """`F.embedding` whose backward adds its rows into the LM head's weight gradient (handed
    over through the TiedLMHead) instead of into a zero-filled (V, d) gradient of its own."""

    @staticmethod
    def forward(ctx, ids, weight, tie: TiedLMHead) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.tie, ctx.weight_shape = tie, weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (ids,) = ctx.saved_tensors
        grad, ctx.tie.head_grad = ctx.tie.head_grad, None
        if grad is None:  # the head was not in this loss, or took the plain path
            grad = grad_out.new_zeros(ctx.weight_shape)
        grad.index_add_(0, ids.flatten(), grad_out.reshape(-1, grad_out.shape[-1]))
        return None, grad, None


class TiedLMHead:
    """The token embedding and the LM head of one forward pass, sharing one (V, d) matrix.

    On the CPU in float32 without autocast, `cross_entropy_sum` is one function over one
    reused (n, V) buffer, and its weight gradient is not returned to autograd but handed to
    the embedding's backward, which runs later (the embedding is upstream of the head) and
    adds its rows in place: the zero-filled (V, d) embedding gradient and the sum of two
    (V, d) gradients, each a pass over 16 MB at the bench size, are saved. Elsewhere (CUDA,
    torch.compile, autocast, no grad) these are the plain ops.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.fast = (
            not _plain(weight)
            and weight.dtype == torch.float32
            and weight.requires_grad
            and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
        )
        self.embedded = False  # an embedding of this pass will take the head's gradient
        self.head_grad: torch.Tensor | None = None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """`F.embedding(ids, weight)`."""
        if not self.fast:
            return F.embedding(ids, self.weight)
        self.embedded = True
        return _TiedEmbedding.apply(ids, self.weight, self)

    def cross_entropy_sum(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`cross_entropy_sum(x @ weight.T, target)` for (n, d) x, in float32."""
        if not self.fast or x.dtype != torch.float32:
            return cross_entropy_sum(x @ self.weight.T, target)
        return _LinearCrossEntropySum.apply(x, self.weight, target, self)
