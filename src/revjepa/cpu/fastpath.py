"""The fused CPU ops of the eager training step (`--cpu_kernels on`), each checked against
torch's own op in the tests.

A model gets these once, at set-up, from `revjepa.cpu.use_cpu_kernels`, which first loads the
C kernels of `kernels.py`; they are never chosen per call from the machine's state, and they
are only given to eager CPU models (torch.compile fuses the plain ops itself, and CUDA has its
own kernels). Attention, c_fc's bias + GELU, the residual add + c_proj's bias + dropout, the
softmax cross-entropy and the dropout draws run in C for float32 (and for the bf16 GEMM
outputs of autocast, taken in float32); other dtypes take torch's ops. The tied LM head and
its cross-entropy are one function over a reused logits buffer (float32 without autocast).
The torch parts (mask thresholds, the in-place cross-entropy backward, the tied head) are
`revjepa.ops`'s eager CPU ops; this module gives them the C passes.
"""

from __future__ import annotations

import torch

from .. import ops as torch_ops
from ..ops import StepOps, keep_threshold
from . import kernels


def _lib():
    """The loaded C library (loaded by `use_cpu_kernels` before any of these ops runs)."""
    return kernels.loaded()


def _fits(x: torch.Tensor) -> bool:
    """Whether the C kernels take x: float32, or bf16 under autocast (a bf16 GEMM's output:
    the kernel then takes it in float32, one conversion pass, and computes in float32)."""
    return x.dtype == torch.float32 or (
        x.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    )


def _c_args(*tensors: torch.Tensor | None) -> None:
    """The C kernels read raw float32 host memory: refuse anything else rather than read past
    it (a CUDA tensor, another dtype, a strided view)."""
    for t in tensors:
        if t is not None and (
            t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
        ):
            raise TypeError(
                f"C kernel argument must be a contiguous float32 CPU tensor, got {t.dtype} on "
                f"{t.device}"
            )


def _uniform16(shape: tuple[int, ...]) -> torch.Tensor:
    """int16 uniforms on [-32768, 32767] from the C kernel's counter-based generator (~10x
    faster than torch's Mersenne twister), seeded by one 64-bit draw of torch's CPU generator:
    seeds and checkpointed RNG state keep working."""
    n = 1
    for size in shape:
        n *= size
    seed = int(torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64)) % 2**64
    out = torch.empty(shape, dtype=torch.int16)
    _lib().uniform16(seed, _ptr(out), n, torch.get_num_threads())
    return out


def _softmax_cross_entropy_(lib, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropies of (n, V) float32 logits, which become their softmax in place
    (one C pass: each row stays in cache between its max, exp and scaling)."""
    _c_args(logits)
    n, v = logits.shape
    target = target.long().contiguous()
    lo, hi = torch.aminmax(target) if target.numel() else (0, 0)
    if not 0 <= int(lo) <= int(hi) < v:  # the kernel indexes raw memory with these
        raise IndexError(f"cross-entropy target out of range [0, {v})")
    rows = logits.new_empty(n)
    lib.softmax_cross_entropy(_ptr(logits), _ptr(target), _ptr(rows), n, v, torch.get_num_threads())
    return rows.sum()


def _c_softmax_cross_entropy_(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`revjepa.ops.log_softmax_cross_entropy_` as one C pass."""
    return _softmax_cross_entropy_(_lib(), logits, target)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout` with its mask from the C generator's 16-bit draws."""
    return torch_ops.masked_dropout(x, p, training, _uniform16)


def residual_dropout(h: torch.Tensor, y: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`h + dropout(y, p)` as one addcmul (`revjepa.ops.residual_dropout`), C draws."""
    return torch_ops.residual_dropout(h, y, p, training, _uniform16)


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(logits.float(), target, reduction="sum")` for (n, V) logits, computed in
    float32 whatever the logits' dtype, its softmax in one C pass."""
    return torch_ops.softmax_cross_entropy_sum(logits, target, _c_softmax_cross_entropy_)


class TiedLMHead(torch_ops.TiedLMHead):
    """`revjepa.ops.TiedLMHead` whose softmax cross-entropy is one C pass."""

    softmax_ce_ = staticmethod(_c_softmax_cross_entropy_)


def _ptr(x: torch.Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def _c_grad(grad: torch.Tensor) -> torch.Tensor:
    """An upstream gradient as the C kernels read it: contiguous float32."""
    grad = grad.contiguous()
    _c_args(grad)
    return grad


class _Attention(torch.autograd.Function):
    """Multi-head attention with a boolean mask and dropout on the weights, from the packed
    (R, T, 3d) c_attn output to the (R, T, d) input of c_proj, in one C pass each way."""

    @staticmethod
    def forward(ctx, qkv, mask, n_head: int, p: float):
        rows, t, three_d = qkv.shape
        hd = three_d // 3 // n_head
        qkv, mask = qkv.contiguous(), mask.contiguous()
        _c_args(qkv)
        bits = _uniform16((rows, n_head, t, t)) if p > 0.0 else None
        threshold, scale = keep_threshold(p) if p > 0.0 else (0, 1.0)
        prob = qkv.new_empty((rows, n_head, t, t))
        y = qkv.new_empty((rows, t, three_d // 3))
        args = (rows, t, n_head, hd, hd**-0.5, torch.get_num_threads())
        _lib().attention_forward(
            _ptr(qkv), _ptr(mask), _ptr(bits), threshold, scale, _ptr(prob), _ptr(y), *args
        )
        ctx.save_for_backward(qkv, prob)
        ctx.bits, ctx.threshold, ctx.scale, ctx.args = bits, threshold, scale, args
        return y

    @staticmethod
    def backward(ctx, grad_y):
        qkv, prob = ctx.saved_tensors
        grad_y = _c_grad(grad_y)
        grad = torch.empty_like(qkv)
        _lib().attention_backward(
            _ptr(qkv),
            _ptr(prob),
            _ptr(ctx.bits),
            ctx.threshold,
            ctx.scale,
            _ptr(grad_y),
            _ptr(grad),
            *ctx.args,
        )
        return grad, None, None, None


def attention(
    qkv: torch.Tensor, mask: torch.Tensor | None, n_head: int, p: float, training: bool
) -> torch.Tensor:
    """GPT-2's attention from the (R, T, 3d) c_attn output to the (R, T, d) input of c_proj:
    `mask` (R or 1, 1, T, T) bool, True = attend (None: causal); dropout p on the attention
    weights when training. Torch's attention (`revjepa.ops.attention`) where the C kernel does
    not apply."""
    rows, t, _ = qkv.shape
    p_train = p if training else 0.0
    if _fits(qkv) and p_train < 1.0 and (mask is None or mask.dtype == torch.bool):
        if mask is None:
            mask = torch.ones(t, t, dtype=torch.bool).tril()
        mask = mask.expand(rows, 1, t, t).reshape(rows, t, t)
        return _Attention.apply(qkv.float(), mask, n_head, p_train)
    return torch_ops.attention(qkv, mask, n_head, p, training)


class _GeluBias(torch.autograd.Function):
    """GPT-2's tanh-GELU of x + bias, (rows, cols), in one C pass each way; the backward
    recomputes tanh from x and sums the bias gradient in the same pass."""

    @staticmethod
    def forward(ctx, x, bias):
        x = x.contiguous()
        _c_args(x, bias)
        y = torch.empty_like(x)
        shape = (x.shape[0], x.shape[1], torch.get_num_threads())
        _lib().gelu_forward(_ptr(x), _ptr(bias), _ptr(y), *shape)
        ctx.save_for_backward(x, bias)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, bias = ctx.saved_tensors
        grad_y = _c_grad(grad_y)
        grad = torch.empty_like(x)
        grad_bias, partial = None, None
        threads = torch.get_num_threads()
        if ctx.needs_input_grad[1]:
            grad_bias, partial = bias.new_empty(x.shape[1]), bias.new_empty(threads, x.shape[1])
        _lib().gelu_backward(
            _ptr(x), _ptr(bias), _ptr(grad_y), _ptr(grad), _ptr(grad_bias), _ptr(partial),
            x.shape[0], x.shape[1], threads,
        )  # fmt: skip
        return grad, grad_bias


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x @ weight + bias, approximate="tanh")` (GPT-2's c_fc, an HF Conv1D with its
    (in, out) weight, then gelu_new). With the C kernel the GEMM writes no bias and the bias
    gradient is summed in GELU's backward pass."""
    if not _fits(x) or bias.dtype != torch.float32:
        return torch_ops.linear_gelu(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    y = _GeluBias.apply((x2 @ weight).float(), bias)  # x @ weight is bf16 under autocast
    return y.view(*x.shape[:-1], weight.shape[1])


class _ResidualBiasDropout(torch.autograd.Function):
    """h + dropout(x + bias) for (rows, cols) h and x, in one C pass each way; the backward
    sums the bias gradient in the same pass."""

    @staticmethod
    def forward(ctx, h, x, bias, p: float):
        _c_args(h, x, bias)
        rows, cols = x.shape
        bits = _uniform16((rows, cols)) if p > 0.0 else None
        threshold, scale = keep_threshold(p) if p > 0.0 else (0, 1.0)
        out = torch.empty_like(h)
        _lib().residual_forward(
            _ptr(h), _ptr(x), _ptr(bias), _ptr(bits), threshold, scale, _ptr(out),
            rows, cols, torch.get_num_threads(),
        )  # fmt: skip
        ctx.bits, ctx.threshold, ctx.scale = bits, threshold, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_out = _c_grad(grad_out)
        rows, cols = grad_out.shape
        grad_x = grad_out if ctx.bits is None else torch.empty_like(grad_out)
        threads = torch.get_num_threads()
        grad_bias, partial = grad_out.new_empty(cols), grad_out.new_empty(threads, cols)
        _lib().residual_backward(
            _ptr(grad_out), _ptr(ctx.bits), ctx.threshold, ctx.scale,
            0 if ctx.bits is None else _ptr(grad_x), _ptr(grad_bias), _ptr(partial),
            rows, cols, threads,
        )  # fmt: skip
        return grad_out, grad_x, grad_bias, None


def residual_linear_dropout(
    h: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    p: float,
    training: bool,
) -> torch.Tensor:
    """`h + F.dropout(x @ weight + bias, p)`: a residual branch through GPT-2's c_proj (an HF
    Conv1D with its (in, out) weight). With the C kernel the GEMM writes no bias, and the add,
    the bias, the dropout mask and the bias gradient are one pass each way."""
    x2 = x.reshape(-1, x.shape[-1])
    p = p if training else 0.0
    if not _fits(x) or h.dtype != torch.float32 or bias.dtype != torch.float32 or p >= 1:
        y = torch.addmm(bias, x2, weight).view(h.shape)
        return residual_dropout(h, y, p, p > 0.0)
    pre = (x2 @ weight).float()  # bf16 under autocast
    out = _ResidualBiasDropout.apply(h.reshape(x2.shape[0], -1), pre, bias, p)
    return out.view(h.shape)


CPU_OPS = StepOps(
    name="cpu_kernels",
    attention=attention,
    linear_gelu=linear_gelu,
    residual_linear_dropout=residual_linear_dropout,
    dropout=dropout,
    cross_entropy_sum=cross_entropy_sum,
    tied_head=TiedLMHead,
)
