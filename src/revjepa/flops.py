"""Analytic FLOPs of a training step (forward + backward), for throughput and MFU.

Only the matrix products are counted (the work that bounds a step on any device); embedding
lookups, LayerNorm, softmax, GELU, the loss and AdamW are elementwise and left out. The
backward pass costs two products per forward product (input and weight gradients), so a
step is 3 x its forward.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .data import KIND_ID


def blocks_forward_flops(n_layer: int, d: int, rows: int, row_len: int) -> float:
    """Forward FLOPs of `n_layer` GPT-2 blocks over `rows` sequences of `row_len` tokens.

    With N = rows * row_len tokens: per layer the weight products 2 * N * 12 d^2 (qkv 3 d^2,
    attention output d^2, MLP 4 d^2 + 4 d^2 multiply-adds per token) and the attention
    2 * 2 * rows * row_len^2 * d (Q K^T and softmax V over all heads; masks are applied
    densely, so the full T x T products are computed).
    """
    tokens = rows * row_len
    return n_layer * (2 * tokens * 12 * d * d + 2 * 2 * rows * row_len * row_len * d)


def extension_flops(n_layer: int, d: int, context: int, new: int, vocab: int) -> float:
    """Forward FLOPs of `new` tokens run after `context` cached ones, then the LM head at the
    last of them: per layer and new token the weight products 2 * 12 d^2 and the attention
    2 * 2 * (context + new) * d (an upper bound), then the head 2 * d * V (every vocabulary
    entry: a log-softmax needs them all)."""
    return n_layer * new * (24 * d * d + 4 * (context + new) * d) + 2 * d * vocab


def train_step_flops(
    n_layer: int, n_embd: int, n_rows: int, row_len: int, n_scored: int, vocab: int
) -> float:
    """Analytic FLOPs of one training step (forward + backward) of the packed GPT-2 pass.

    With d = n_embd, R = n_rows, T = row_len (tokens per packed row), N = R * T tokens:

      per layer, the weight matmuls:  2 * N * 12 d^2
          qkv projection 3 d^2 + attention output projection d^2 + MLP 4d -> d and d -> 4d
          8 d^2 = 12 d^2 multiply-adds per token, 2 FLOPs per multiply-add;
      per layer, the attention:       2 * 2 * R * T^2 * d
          Q K^T and (softmax) V, each R * T * T * d multiply-adds over all heads (the
          block-causal mask is applied densely, so the full T x T products are computed);
      the LM head, only at the scored positions:  2 * n_scored * d * V.

    forward = n_layer * (24 N d^2 + 4 R T^2 d) + 2 n_scored d V, and the step is 3 x forward
    (the backward pass costs two matmuls per forward matmul: input and weight gradients).
    Embedding lookups, LayerNorm, softmax, GELU, the loss and AdamW are elementwise and left out.
    """
    forward = blocks_forward_flops(n_layer, n_embd, n_rows, row_len)
    return 3.0 * (forward + 2 * n_scored * n_embd * vocab)


def batch_shape(kind: torch.Tensor, seq_len: int, entity_len: int, jepa: bool, k: int):
    """(rows, row_len, n_scored) of the packed pass of one batch (see families/gpt2_jepa.py's packing).

    JEPA rows (items of kind train when JEPA is on) hold one item each, every other item is
    packed two per row; both row types are 2 * seq_len + k tokens long. The LM head scores
    entity_len positions per item.
    """
    b = int(kind.numel())
    k = k if jepa else 0
    n_j = int((kind == KIND_ID["train"]).sum()) if jepa else 0
    rows = n_j + math.ceil((b - n_j) / 2)
    return rows, 2 * seq_len + k, b * entity_len


@dataclass
class StepCost:
    """What one training step of a batch processes: tokens through the network, and FLOPs."""

    tokens: int
    flops: float


# Dense datasheet peaks (TFLOP/s) of known GPUs: bf16/fp16 tensor cores, fp32 without TF32
# (PyTorch's default matmul precision). Matched against torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
}


def matmul_rates(
    device: torch.device, dtype: torch.dtype, n: int, repeats: int, iters: int
) -> list[float]:
    """FLOP/s of `repeats` timed repeats of `iters` n x n @ n x n matmuls (2 n^3 FLOPs each),
    after two untimed ones, into one output buffer."""
    gen = torch.Generator().manual_seed(0)  # never the global RNG: a run must not notice this
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda _device: None
    for _ in range(2):
        torch.mm(a, b, out=out)
    rates = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        sync(device)
        rates.append(2.0 * n**3 * iters / max(time.perf_counter() - t0, 1e-9))
    return rates


def measured_matmul_flops(device: torch.device, precision: str, n: int = 1024) -> float:
    """FLOP/s of a square matmul in the run's precision on this device (best of a few)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return max(matmul_rates(device, dtype, n, repeats=4, iters=1))


def peak_flops(
    device: torch.device, precision: str, peak_tflops: float | None
) -> tuple[float, str]:
    """The peak FLOP/s that MFU is measured against, and where it comes from: --peak_tflops,
    the datasheet figure of a known GPU, or (CPU, unknown GPU) a matmul measured now."""
    if peak_tflops is not None:
        return peak_tflops * 1e12, "--peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_TFLOPS.items():
            if key in name and peaks.get(precision):
                return peaks[precision] * 1e12, f"datasheet {key} {precision}"
    return measured_matmul_flops(device, precision), f"measured {precision} matmul"
