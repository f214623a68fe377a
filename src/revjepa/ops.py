"""The ops of GPT-2's blocks and of the LM head that the model families call, as one set.

A model holds its set in `model.ops`, chosen once when the model is set up (`step_ops`),
never re-decided per call. Both sets here are plain torch, so a default run does not depend
on the machine's compiler:

* `TORCH_OPS`: torch's own ops, on every device and under torch.compile (which fuses them).
* `EAGER_CPU_OPS`: for an eager CPU step, the same functions with fewer passes over memory:
  dropout masks from 16-bit draws (one int64 draw of torch's generator per four elements,
  where `F.dropout` draws one per element), h + dropout(y) as one addcmul, a softmax
  cross-entropy whose backward writes the gradient into its saved softmax, and a tied LM
  head whose logits live in one (n, V) buffer reused from step to step and whose weight
  gradient is added by the embedding's backward. With dropout > 0 its masks are another
  draw than `F.dropout`'s, the same on every machine (torch's CPU generator, seeded).

`revjepa.cpu.use_cpu_kernels` swaps in fused C versions for `--cpu_kernels on`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
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


def plain_residual_dropout(
    h: torch.Tensor, y: torch.Tensor, p: float, training: bool
) -> torch.Tensor:
    """`h + dropout(y, p)`."""
    return h + dropout(y, p, training)


ResidualDropout = Callable[[torch.Tensor, torch.Tensor, float, bool], torch.Tensor]


def residual_linear_dropout(
    h: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    p: float,
    training: bool,
    add: ResidualDropout = plain_residual_dropout,
) -> torch.Tensor:
    """`h + F.dropout(x @ weight + bias, p)`: a residual branch through GPT-2's c_proj (an HF
    Conv1D with its (in, out) weight); `add` is the residual add with dropout."""
    y = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(h.shape)
    return add(h, y, p, training)


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of (n, V) logits, in float32 whatever their dtype."""
    return F.cross_entropy(logits.float(), target, reduction="sum")


# ----------------------------------------------------------------------------- eager CPU


def uniform16(shape: tuple[int, ...]) -> torch.Tensor:
    """int16 uniforms on [-32768, 32767]: int64 draws of torch's CPU generator cut into four
    (a serial generator: the same values on every machine for the same seed)."""
    n = 1
    for size in shape:
        n *= size
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    return bits.view(torch.int16)[:n].view(shape)


def keep_threshold(p: float) -> tuple[int, float]:
    """(t, scale): a uniform int16 r keeps its element when r < t, with probability
    round((1 - p) * 2**16) / 2**16 (p rounded to 1/65536); kept values are scaled by the exact
    inverse of that probability, so the output's expectation is the input, as with F.dropout."""
    keep_count = round((1.0 - p) * 65536)
    return keep_count - 32768, 65536.0 / max(keep_count, 1)


Uniform16 = Callable[[tuple[int, ...]], torch.Tensor]


def keep_mask(
    x: torch.Tensor, p: float, dtype: torch.dtype = torch.bool, draw: Uniform16 = uniform16
) -> tuple[torch.Tensor, float]:
    """Keep-mask shaped like x (0/1 in `dtype`) and the scale of kept values: one 16-bit draw
    of `draw` per element (see `keep_threshold`)."""
    threshold, scale = keep_threshold(p)
    # the comparison writes `dtype` directly: a bool mask converted afterwards is one more pass
    keep = torch.empty(x.shape, dtype=dtype)
    torch.lt(draw(tuple(x.shape)), threshold, out=keep)
    return keep, scale


def masked_dropout(
    x: torch.Tensor, p: float, training: bool, draw: Uniform16 = uniform16
) -> torch.Tensor:
    """`F.dropout` with its mask from 16-bit draws (`keep_mask`)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return F.dropout(x, p, training=True)
    keep, scale = keep_mask(x, p, draw=draw)
    # x * mask (the bool promotes to x's dtype on the fly) is twice as fast as where(mask, x, 0)
    return (x * keep).mul_(scale)


def residual_dropout(
    h: torch.Tensor, y: torch.Tensor, p: float, training: bool, draw: Uniform16 = uniform16
) -> torch.Tensor:
    """`h + masked_dropout(y, p)` as one addcmul with the mask in y's dtype, one pass over
    memory fewer each way. For float32 it is bit for bit `h + masked_dropout(y)`; for a bf16 y
    under autocast the scaled value is added in h's float32 without being rounded to bf16."""
    if not training or p == 0.0:
        return h + y
    if p >= 1.0:
        return h + F.dropout(y, p, training=True)
    keep, scale = keep_mask(y, p, y.dtype, draw)
    return torch.addcmul(h, y, keep, value=scale)


def saved_once(ctx: Any, what: str) -> tuple[torch.Tensor, ...]:
    """The saved tensors of a cross-entropy backward that turns its saved softmax into the
    gradient in place: a second backward through the same graph would be wrong, so refuse it."""
    if ctx.used:
        raise RuntimeError(f"{what}: backward through the graph a second time")
    ctx.used = True
    return ctx.saved_tensors


def minus_one_hot_(prob: torch.Tensor, target: torch.Tensor) -> None:
    """softmax - one_hot(target), in place: the cross-entropy's gradient w.r.t. the logits."""
    prob[torch.arange(prob.shape[0], device=prob.device), target] -= 1.0


def log_softmax_cross_entropy_(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropies of (n, V) float32 logits, which become their softmax in
    place (ATen's last-dim log-softmax reads each row whole before writing it; a test pins
    the in-place result against torch.log_softmax)."""
    torch._log_softmax(logits, 1, False, out=logits)
    loss = -logits.gather(1, target[:, None]).sum()
    logits.exp_()
    return loss


SoftmaxCE = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _SoftmaxCrossEntropySum(torch.autograd.Function):
    """Sum of cross-entropies in two passes over a float32 copy of the logits: the forward
    keeps their softmax for the backward, whose gradient is that softmax minus the one-hot
    target, written in place. `softmax_ce_` is the in-place pass (torch's or a C kernel)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, softmax_ce_: SoftmaxCE):
        prob = logits.to(torch.float32, copy=True).contiguous()  # the caller's logits stay
        loss = softmax_ce_(prob, target)
        ctx.save_for_backward(prob, target)
        ctx.in_dtype, ctx.used = logits.dtype, False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        prob, target = saved_once(ctx, "cross_entropy_sum")
        minus_one_hot_(prob, target)
        return prob.mul_(grad_loss).to(ctx.in_dtype), None, None


def softmax_cross_entropy_sum(
    logits: torch.Tensor,
    target: torch.Tensor,
    softmax_ce_: SoftmaxCE = log_softmax_cross_entropy_,
) -> torch.Tensor:
    """`cross_entropy_sum` whose backward needs no new (n, V) tensor (`_SoftmaxCrossEntropySum`);
    without a gradient to take (evaluation) `cross_entropy_sum` itself, so an evaluation gives
    the same figures whichever ops the model trains with."""
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return cross_entropy_sum(logits, target)
    return _SoftmaxCrossEntropySum.apply(logits, target, softmax_ce_)


# (n, V) logits buffers handed from one step's backward to the next step's forward. On the
# CPU a fresh 33 MB buffer made the LM head's GEMM ~40% slower than a reused one (profile,
# bench configuration: 20 vs 14 ms). A buffer is taken out while a graph uses it, so two
# live graphs never share one; a graph dropped without backward just costs a new buffer.
LOGITS_BUFFERS: dict[tuple[int, int], torch.Tensor] = {}


class _LinearCrossEntropySum(torch.autograd.Function):
    """`cross_entropy_sum(x @ weight.T, target)` in float32 with one (n, V) buffer: the
    logits become the softmax (`tie.softmax_ce_`), then the gradient, all in place, and the
    backward's GEMMs take the upstream gradient on their small operands."""

    @staticmethod
    def forward(ctx, x, weight, target, tie: TiedLMHead) -> torch.Tensor:
        shape = (x.shape[0], weight.shape[0])
        buf = LOGITS_BUFFERS.pop(shape, None)
        if buf is None:
            buf = torch.empty(shape, dtype=torch.float32)
        torch.mm(x, weight.T, out=buf)
        loss = tie.softmax_ce_(buf, target)
        ctx.save_for_backward(x, weight, buf, target)
        ctx.tie, ctx.used = tie, False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        x, weight, prob, target = saved_once(ctx, "TiedLMHead.cross_entropy_sum")
        minus_one_hot_(prob, target)  # d(loss)/d(logits), still without the upstream factor
        grad_x = (prob @ weight).mul_(grad_loss) if ctx.needs_input_grad[0] else None
        grad_w = prob.T @ (x * grad_loss) if ctx.needs_input_grad[1] else None
        LOGITS_BUFFERS[tuple(prob.shape)] = prob
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


class TiedLMHead(TiedHead):
    """`TiedHead` for an eager CPU step. In float32 without autocast, `cross_entropy_sum` is
    one function over one reused (n, V) buffer, and its weight gradient is not returned to
    autograd but handed to the embedding's backward, which runs later (the embedding is
    upstream of the head) and adds its rows in place: the zero-filled (V, d) embedding
    gradient and the sum of two (V, d) gradients, each a pass over 16 MB at the bench size,
    are saved. Elsewhere (autocast, no grad, other dtypes) F.embedding and
    `softmax_cross_entropy_sum`. `softmax_ce_`: the in-place softmax cross-entropy pass."""

    softmax_ce_: SoftmaxCE = staticmethod(log_softmax_cross_entropy_)

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        self.fast = (
            weight.device.type == "cpu"
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
            return softmax_cross_entropy_sum(x @ self.weight.T, target, self.softmax_ce_)
        return _LinearCrossEntropySum.apply(x, self.weight, target, self)


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

# torch's attention and c_fc + GELU, the rest with fewer passes over memory
EAGER_CPU_OPS = replace(
    TORCH_OPS,
    name="torch_eager_cpu",
    residual_linear_dropout=partial(residual_linear_dropout, add=residual_dropout),
    dropout=masked_dropout,
    cross_entropy_sum=softmax_cross_entropy_sum,
    tied_head=TiedLMHead,
)


def step_ops(device: torch.device, compiled: bool) -> StepOps:
    """The default ops of a model that trains on `device`: `EAGER_CPU_OPS` for an eager CPU
    step, else `TORCH_OPS` (CUDA has its own fused kernels, and torch.compile fuses the plain
    ops itself and cannot trace the in-place tricks of the eager set)."""
    return EAGER_CPU_OPS if device.type == "cpu" and not compiled else TORCH_OPS
