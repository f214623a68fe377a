"""The C kernels of `--cpu_kernels on` (attention, tanh-GELU with its bias, softmax
cross-entropy, dropout draws) against float64 references written with plain torch ops, and the
build: cache, and what happens where they cannot be built."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import revjepa.cpu.fastpath as fastpath
import revjepa.cpu.kernels as cpu_kernels
from revjepa.cpu.fastpath import TiedLMHead, attention, linear_gelu, residual_linear_dropout
from revjepa.cpu.hostmem import tune_glibc_malloc
from revjepa.ops import keep_threshold

needs_kernels = pytest.mark.skipif(
    cpu_kernels.library() is None, reason="no C compiler: the kernels could not be built"
)


def _gelu64(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's gelu_new, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), in float64
    as x * sigmoid(2u): the same function, without the cancellation of 1 + tanh(u) for u << 0
    (which float64 suffers too, from u ~ -18)."""
    x = x.double()
    return x * torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))


EPS32 = torch.finfo(torch.float32).eps


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """|actual - expected| <= rel * max|expected| everywhere: a float32 computation (GEMMs, sums,
    the kernels' vectorised exp) against float64 is off by rounding that follows the magnitudes
    it was computed from, not each element's own (an element near zero carries the rounding of
    the large terms that cancelled in it), and by how much depends on the BLAS and vector width
    (an elementwise atol of 1e-6 to 1e-5 was up to 47% used with ATen / MKL limited to AVX2 or
    scalar code)."""
    assert actual.shape == expected.shape
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel:g} x max |expected| {scale:.3g}"


# ----------------------------------------------------------------------------- GELU


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """gelu(x) through linear_gelu: x as a column times a weight of 1 plus a bias of 0 (exact)."""
    one, zero = torch.ones(1, 1, dtype=x.dtype), torch.zeros(1, dtype=x.dtype)
    return linear_gelu(x[:, None], one, zero)[:, 0]


@needs_kernels
def test_gelu_forward_and_backward_match_float64_within_a_few_ulps():
    x = torch.cat([torch.linspace(-12.0, 12.0, 40_001), torch.randn(100_000) * 3]).requires_grad_()
    y = gelu_tanh(x)
    g = torch.randn_like(x)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    y64 = _gelu64(x64)
    y64.backward(g.double())
    # errors measured in units of the float32 spacing at each value (floor: the smallest normal)
    ulp_y = torch.finfo(torch.float32).eps * y64.detach().abs().clamp_min(1.0)
    ulp_g = torch.finfo(torch.float32).eps * x64.grad.abs().clamp_min(1.0)
    assert ((y.double() - y64.detach()).abs() / ulp_y).max() < 4
    assert ((x.grad.double() - x64.grad).abs() / ulp_g).max() < 4
    # the far negative tail, where 1 + tanh underflows if computed from tanh: relative error
    tail = (x.detach() < -4) & (y64.detach().abs() > 1e-30)
    rel = ((y.double() - y64.detach()) / y64.detach())[tail].abs().max()
    assert rel < 2e-5  # float32's own: the error of u, times |2u| ~ 100


@needs_kernels
def test_gelu_hand_values():
    x = torch.tensor([0.0, 1.0, -1.0, 3.0], requires_grad=True)
    # 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))) by hand for x = 1: tanh(0.8333) = 0.68238
    y = gelu_tanh(x)
    assert y.tolist() == pytest.approx([0.0, 0.8411920, -0.1588080, 2.9963627], abs=2e-6)
    y.sum().backward()
    assert x.grad[0].item() == pytest.approx(0.5, abs=1e-7)  # slope at 0 is exactly 1/2


@needs_kernels
def test_linear_gelu_gradients_of_input_weight_and_bias_match_float64():
    torch.manual_seed(3)
    x = torch.randn(37, 16, requires_grad=True)
    w = (torch.randn(16, 24) / 4).requires_grad_()
    b = torch.randn(24, requires_grad=True)
    g = torch.randn(37, 24)
    linear_gelu(x, w, b).backward(g)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    x64, w64, b64 = leaves64
    y64 = _gelu64(x64 @ w64 + b64)
    y64.backward(g.double())
    y = linear_gelu(x, w, b)
    assert_close_to_scale(y, y64, 1e-5)
    for ours, ref in zip((x, w, b), leaves64):
        assert_close_to_scale(ours.grad, ref.grad, 1e-5)


@needs_kernels
@pytest.mark.parametrize(("p", "training"), [(0.0, True), (0.3, True), (0.3, False)])
def test_residual_linear_dropout_matches_float64_with_the_same_draw(p, training):
    torch.manual_seed(6)
    leaves = [torch.randn(5, 7, 24), torch.randn(5, 7, 16), torch.randn(16, 24), torch.randn(24)]
    h, x, w, b = (t.requires_grad_() for t in leaves)
    g = torch.randn(5, 7, 24)
    torch.manual_seed(9)
    out = residual_linear_dropout(h, x, w, b, p, training)
    out.backward(g)
    keep = torch.ones(35, 24, dtype=torch.float64)
    if p > 0 and training:
        torch.manual_seed(9)  # the mask is the kernel's first draw
        threshold, scale = keep_threshold(p)
        keep = (fastpath._uniform16((35, 24)) < threshold).double() * scale
        assert 0.6 < (keep > 0).double().mean().item() < 0.8
    h64, x64, w64, b64 = (t.detach().double().requires_grad_() for t in leaves)
    ref = h64 + (keep * (x64.reshape(35, 16) @ w64 + b64)).view(5, 7, 24)
    ref.backward(g.double())
    assert_close_to_scale(out, ref, 1e-5)
    for ours, theirs in zip((h, x, w, b), (h64, x64, w64, b64)):
        assert_close_to_scale(ours.grad, theirs.grad, 1e-5)


# ----------------------------------------------------------------------------- attention


def _attention64(qkv, mask, n_head, keep=None):
    """Masked multi-head attention with explicit ops in float64; keep (R, H, T, T) multiplies
    the softmax weights (dropout with a given mask and scale)."""
    r, t, three_d = qkv.shape
    d = three_d // 3
    hd = d // n_head
    q, k, v = (x.reshape(r, t, n_head, hd).transpose(1, 2) for x in qkv.double().split(d, 2))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)  # a query with nothing to attend to: zeros
    if keep is not None:
        w = w * keep
    return (w @ v).transpose(1, 2).reshape(r, t, d)


def _block_mask(rows: int, t: int, split: int) -> torch.Tensor:
    seg = torch.tensor([0] * split + [1] * (t - split))
    m = (seg[:, None] == seg[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    return m.expand(rows, t, t).clone()


def _grads(fn, qkv, g):
    x = qkv.clone().requires_grad_()
    y = fn(x)
    y.backward(g.to(y.dtype))
    return y.detach().double(), x.grad.double()


@needs_kernels
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_attention_matches_float64_reference_with_the_same_dropout_draw(p):
    torch.manual_seed(0)
    rows, t, heads, hd = 9, 13, 4, 16
    qkv = torch.randn(rows, t, 3 * heads * hd)
    mask = _block_mask(rows, t, 7)
    g = torch.randn(rows, t, heads * hd)
    torch.manual_seed(5)
    y, grad = _grads(lambda x: attention(x, mask[:, None], heads, p, True), qkv, g)
    keep = None
    if p > 0:
        torch.manual_seed(5)  # the kernel's draw is the first use of the generator
        threshold, scale = keep_threshold(p)
        keep = (fastpath._uniform16((rows, heads, t, t)) < threshold).double() * scale
        share = (keep > 0).double().mean().item()
        assert abs(share - (1 - p)) < 0.02
    y64, grad64 = _grads(lambda x: _attention64(x, mask, heads, keep), qkv.double(), g)
    assert_close_to_scale(y, y64, 1e-5)
    assert_close_to_scale(grad, grad64, 1e-5)


@needs_kernels
def test_attention_equals_sdpa_causal_and_eval_paths(monkeypatch):
    torch.manual_seed(1)
    rows, t, heads = 5, 11, 2
    qkv = torch.randn(rows, t, 3 * 2 * 8)
    g = torch.randn(rows, t, 16)
    fast = _grads(lambda x: attention(x, None, heads, 0.1, False), qkv, g)
    monkeypatch.setattr(fastpath, "_fits", lambda x: False)
    plain = _grads(lambda x: attention(x, None, heads, 0.1, False), qkv, g)
    for a, b in zip(fast, plain):
        assert_close_to_scale(a, b, 1e-5)


@needs_kernels
def test_attention_query_with_nothing_to_attend_gets_zeros_not_nan():
    rows, t, heads = 2, 4, 1
    qkv = torch.randn(rows, t, 3 * 8)
    mask = torch.ones(rows, t, t, dtype=torch.bool).tril()
    mask[1, 2] = False  # row 1, query 2 sees nothing
    y, grad = _grads(
        lambda x: attention(x, mask[:, None], heads, 0.0, True), qkv, torch.ones(2, 4, 8)
    )
    assert torch.isfinite(grad).all()
    assert torch.equal(y[1, 2], torch.zeros(8, dtype=torch.float64))
    assert torch.equal(grad[1, 2, :8], torch.zeros(8, dtype=torch.float64))  # its q gets nothing
    y64, grad64 = _grads(lambda x: _attention64(x, mask, heads), qkv.double(), torch.ones(2, 4, 8))
    assert torch.allclose(y, y64, atol=2e-6) and torch.allclose(grad, grad64, atol=2e-6)


def test_other_dtypes_and_autocast_take_torch_ops():
    qkv = torch.randn(3, 5, 24, dtype=torch.float64)
    assert not fastpath._fits(qkv)
    assert not fastpath._fits(qkv.bfloat16())  # bf16 outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 GEMM output under autocast
        assert fastpath._fits(qkv.bfloat16())
    y = attention(qkv, None, 2, 0.0, True)
    assert y.dtype == torch.float64
    assert torch.allclose(y, _attention64(qkv, torch.ones(3, 5, 5, dtype=torch.bool).tril(), 2))
    x = torch.randn(10, dtype=torch.float64)
    assert torch.allclose(gelu_tanh(x), _gelu64(x))


# ----------------------------------------------------------------------------- cross-entropy


@needs_kernels
def test_tied_head_cross_entropy_matches_float64_softmax():
    torch.manual_seed(4)
    x = (torch.randn(33, 8) * 3).requires_grad_()
    w = torch.randn(500, 8, requires_grad=True)
    target = torch.randint(0, 500, (33,))
    loss = TiedLMHead(w).cross_entropy_sum(x, target)
    loss.backward(torch.tensor(0.5))
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref = F.cross_entropy(x64 @ w64.T, target, reduction="sum")
    ref.backward(torch.tensor(0.5, dtype=torch.float64))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    # the softmax of float32 logits of magnitude M (~35 here) is known to about eps * M
    # relative (its log-sum-exp is rounded at M's scale): 16 times that of the largest gradient
    # (an elementwise atol 1e-6 / rtol 1e-5 was exceeded with MKL in its compatible mode)
    rel = 16 * EPS32 * (x64 @ w64.T).abs().max().item()
    assert_close_to_scale(x.grad, x64.grad, rel)
    assert_close_to_scale(w.grad, w64.grad, rel)
    with pytest.raises(IndexError, match="out of range"):
        TiedLMHead(w).cross_entropy_sum(x, torch.full((33,), 500))


# ----------------------------------------------------------------------------- dropout draws


@needs_kernels
def test_uniform16_is_uniform_seeded_and_independent_of_threads():
    torch.manual_seed(7)
    a = fastpath._uniform16((1_000_003,))
    torch.manual_seed(7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = fastpath._uniform16((1_000_003,))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)  # same seed, any thread count: the same draws
    assert not torch.equal(a, fastpath._uniform16((1_000_003,)))  # the next draw differs
    counts = torch.bincount((a.long() + 32768) >> 12, minlength=16).double()  # 16 bins
    expected = a.numel() / 16
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 50  # 15 degrees of freedom: p ~ 1e-5
    assert abs(a.double().mean().item() + 0.5) < 60  # mean of [-32768, 32767] is -0.5
    # neighbours are not correlated (the four int16 of one word, and across words)
    c = a.double() - a.double().mean()
    for lag in (1, 4, 5):
        corr = (c[:-lag] * c[lag:]).mean() / c.var()
        assert abs(corr.item()) < 0.01


# ----------------------------------------------------------------------------- build


@needs_kernels
def test_build_is_cached_by_content(tmp_path, monkeypatch):
    compiler = cpu_kernels._compiler()
    first = cpu_kernels.build(compiler, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build(compiler, tmp_path) == first
    assert first.stat().st_mtime_ns == stamp  # not rebuilt
    monkeypatch.setattr(cpu_kernels, "COMPILE_FLAGS", [*cpu_kernels.COMPILE_FLAGS, "-DREBUILD"])
    assert cpu_kernels.build(compiler, tmp_path) != first
    assert [p.suffix for p in tmp_path.iterdir()] == [".so", ".so"]  # no temporary left


_FALLBACK = """
import torch
from revjepa.cpu import kernels, setup_cpu_kernels, uses_cpu_kernels
from revjepa.distributed import Dist
assert kernels.library() is None and kernels.library() is None
said = []
model = torch.nn.Linear(2, 2)
assert not setup_cpu_kernels(model, "on", torch.device("cpu"), False, Dist(), said.append)
assert not uses_cpu_kernels(model) and len(said) == 1
print(said[0])
"""


@pytest.mark.parametrize(
    ("env", "why"),
    [({"CC": "/bin/false"}, "not built"), ({"CC": "/nonexistent/cc"}, "No such file")],
    ids=["failing-compiler", "no-compiler"],
)
def test_without_kernels_torch_ops_run_and_say_so_once(tmp_path, env, why):
    # not inherited: a suite run with CC set must still see the failed build
    inherited = {k: v for k, v in os.environ.items() if k != "CC"}
    full = {**inherited, "REVJEPA_KERNEL_CACHE": str(tmp_path), **env}
    out = subprocess.run(
        [sys.executable, "-c", _FALLBACK], env=full, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.strip().splitlines()  # the one warning, through the caller's logger
    assert line.startswith("--cpu_kernels on does not apply here") and why in line, line
    assert "torch's ops" in line
    assert out.stderr == ""  # nothing printed behind the caller's back
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- malloc


def test_malloc_settings_apply_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert tune_glibc_malloc() is True
    assert tune_glibc_malloc() is True  # idempotent
