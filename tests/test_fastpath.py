"""The CPU ops of an eager step (dropout masks, fused cross-entropy, the tied LM head), both
sets: the torch ones of the default (`revjepa.ops.EAGER_CPU_OPS`) and the C ones of
`--cpu_kernels on`, and the row padding, give the same results as torch's plain ops."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import revjepa.cpu.fastpath as fastpath
import revjepa.cpu.kernels as cpu_kernels
import revjepa.families.gpt2_jepa as model_mod
import revjepa.ops as torch_ops
from revjepa.config import ModelConfig, ObjectiveConfig
from revjepa.cpu import use_cpu_kernels
from revjepa.data import KIND_ID, load_dataset
from revjepa.families.gpt2_jepa import GPT2Jepa
from revjepa.ops import LOGITS_BUFFERS

needs_kernels = pytest.mark.skipif(
    cpu_kernels.library() is None, reason="no C compiler: the kernels could not be built"
)
# the two implementations of each op: torch's (the default eager CPU step) and the C kernels'
IMPLS = {
    "torch": SimpleNamespace(
        dropout=torch_ops.masked_dropout,
        residual_dropout=torch_ops.residual_dropout,
        cross_entropy_sum=torch_ops.softmax_cross_entropy_sum,
        TiedLMHead=torch_ops.TiedLMHead,
    ),
    "c": SimpleNamespace(
        dropout=fastpath.dropout,
        residual_dropout=fastpath.residual_dropout,
        cross_entropy_sum=fastpath.cross_entropy_sum,
        TiedLMHead=fastpath.TiedLMHead,
    ),
}


@pytest.fixture(params=["torch", pytest.param("c", marks=needs_kernels)])
def ops(request) -> SimpleNamespace:
    if request.param == "c":
        cpu_kernels.load()
    return IMPLS[request.param]


EPS32 = torch.finfo(torch.float32).eps


def assert_softmax_grads_close(ours: torch.Tensor, ref: torch.Tensor, logits_max: float) -> None:
    """Gradients through a float32 softmax cross-entropy computed two ways (the C kernel or the
    fused head against torch's ops): within 16 eps * M of the gradient's largest element, M the
    largest |logit|. The probabilities of float32 logits of magnitude M are only known to about
    eps * M relative (the log-sum-exp is rounded at M's scale), each implementation rounding
    its own way; an elementwise atol 1e-6 / rtol 1e-5 was up to 61% used with other ATen / MKL
    kernel sets (logits up to ~16 here, ~60 in the tied-head cases)."""
    assert ours.shape == ref.shape
    tol = 16 * EPS32 * max(1.0, logits_max) * ref.abs().max().item()
    diff = (ours.double() - ref.double()).abs().max().item()
    assert diff <= tol, f"max |diff| {diff:.3g} > {tol:.3g}"


# ----------------------------------------------------------------------------- dropout


def test_dropout_keeps_the_right_share_and_scales_exactly(ops):
    torch.manual_seed(0)
    n, p = 1_000_003, 0.1  # odd size: the last int64 draw is only partly used
    x = torch.ones(n, requires_grad=True)
    y = ops.dropout(x, p, True)
    keep_prob = round(0.9 * 65536) / 65536
    kept = y != 0
    # the kept share is binomial(n, keep_prob): 6 standard deviations is ~0.0018
    share = kept.double().mean().item()
    assert abs(share - keep_prob) < 6 * math.sqrt(keep_prob * (1 - keep_prob) / n)
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / keep_prob))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(sum y)/dx = mask * scale = y for x = 1
    # expectation preserved: mean of y is 1 within sampling error
    assert abs(y.detach().double().mean().item() - 1.0) < 0.002


def test_torch_dropout_mask_is_the_documented_draw():
    """The default eager CPU step's mask: int64 draws of torch's generator cut into four int16
    uniforms, kept below round((1 - p) * 65536) - 32768 (the same on every machine)."""
    torch.manual_seed(5)
    y = torch_ops.masked_dropout(torch.ones(10), 0.25, True)
    torch.manual_seed(5)
    bits = torch.randint(-(2**63), 2**63 - 1, (3,), dtype=torch.int64)
    keep = bits.view(torch.int16)[:10] < 49152 - 32768
    assert torch.equal(y, keep.float() * (65536 / 49152))
    assert 0 < int(keep.sum()) < 10


def test_dropout_masks_are_independent_across_positions_and_calls(ops):
    torch.manual_seed(1)
    a = ops.dropout(torch.ones(200_000), 0.5, True) != 0
    b = ops.dropout(torch.ones(200_000), 0.5, True) != 0
    # neighbours (which share a 64-bit draw) and consecutive calls are uncorrelated
    for u, v in ((a[:-1], a[1:]), (a[:-4], a[4:]), (a, b)):
        both = (u & v).double().mean().item()
        assert abs(both - 0.25) < 0.006


def test_dropout_is_seeded_and_passes_through_when_off(ops):
    x = torch.randn(7, 13, 32)
    torch.manual_seed(3)
    y1 = ops.dropout(x, 0.2, True)
    torch.manual_seed(3)
    y2 = ops.dropout(x, 0.2, True)
    assert torch.equal(y1, y2)
    assert ops.dropout(x, 0.2, False) is x
    assert ops.dropout(x, 0.0, True) is x
    assert torch.equal(ops.dropout(x, 1.0, True), torch.zeros_like(x))
    xb = x.bfloat16()
    yb = ops.dropout(xb, 0.2, True)
    assert yb.dtype == torch.bfloat16
    kept = yb != 0
    # bf16 values scaled in float and rounded once, as F.dropout does
    scale = 65536 / round(0.8 * 65536)
    assert torch.equal(yb[kept], (xb.float() * scale).bfloat16()[kept])


def test_residual_dropout_is_h_plus_dropout_bit_for_bit_with_the_same_gradients(ops):
    shape = (9, 13, 32)
    g = torch.randn(shape)
    runs = []
    for fused in (True, False):
        h = torch.randn(shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
        y = torch.randn(shape, generator=torch.Generator().manual_seed(2)).requires_grad_()
        torch.manual_seed(4)
        out = ops.residual_dropout(h, y, 0.3, True) if fused else h + ops.dropout(y, 0.3, True)
        out.backward(g)
        runs.append((out.detach(), h.grad, y.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    out, h_grad, y_grad = runs[0]
    assert torch.equal(h_grad, g)
    scale = 65536 / round(0.7 * 65536)
    dropped = y_grad == 0
    assert 0.25 < dropped.double().mean().item() < 0.35
    assert torch.allclose(y_grad[~dropped], g[~dropped] * scale, rtol=1e-6, atol=0)
    h, y = torch.randn(shape), torch.randn(shape)
    assert torch.equal(ops.residual_dropout(h, y, 0.3, False), h + y)
    assert torch.equal(ops.residual_dropout(h, y, 0.0, True), h + y)
    assert torch.equal(ops.residual_dropout(h, y, 1.0, True), h)


# ----------------------------------------------------------------------------- cross-entropy


def test_cross_entropy_hand_example(ops):
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], requires_grad=True)
    loss = ops.cross_entropy_sum(logits, torch.tensor([0, 1]))
    # -log(1/2) - log(1/4)
    assert loss.item() == pytest.approx(math.log(2) + math.log(4), abs=1e-6)
    loss.backward()
    expected = torch.tensor([[-0.5, 0.5], [0.75, -0.75]])
    assert torch.allclose(logits.grad, expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch(ops, dtype):
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(37, 1001, generator=g) * 4).to(dtype)
    target = torch.randint(0, 1001, (37,), generator=g)
    a = base.clone().requires_grad_()
    b = base.clone().requires_grad_()
    ours = ops.cross_entropy_sum(a, target)
    ref = F.cross_entropy(b.float(), target, reduction="sum")
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    (ours * 0.5).backward()
    (ref * 0.5).backward()
    assert a.grad.dtype == dtype
    if dtype == torch.float32:
        assert_softmax_grads_close(a.grad, b.grad, base.float().abs().max().item())
    else:  # both in float32, the gradient rounded to bf16 (8 bits)
        assert torch.allclose(a.grad.float(), b.grad.float(), atol=1e-2, rtol=1e-2)
    assert torch.equal(a.detach(), base)  # the caller's logits are never modified


def test_cross_entropy_refuses_a_second_backward(ops):
    logits = torch.randn(3, 5, requires_grad=True)
    loss = ops.cross_entropy_sum(logits, torch.tensor([0, 1, 2]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


# ----------------------------------------------------------------------------- tied LM head


def _head_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(301, 16, generator=g)
    ids = torch.tensor([[3, 7, 3], [300, 0, 7]])  # repeated ids accumulate
    target = torch.randint(0, 301, (23,), generator=g)
    # x stands for the transformer's output: any function of the embeddings
    mix = torch.randn(23, 6, generator=g)
    return w, ids, target, mix


def _head_logits_max(w0, ids, mix, embed=True) -> float:
    """The largest |logit| of a _head_case (as _head_loss_and_grad computes x)."""
    x = (mix @ F.embedding(ids, w0).flatten(0, 1)) * 2 if embed else mix @ torch.ones(6, 16)
    return (x @ w0.T).abs().max().item()


def _head_loss_and_grad(ops, w0, ids, target, mix, fast: bool, embed=True, scale=0.37):
    """Embedding lookup, then the LM head's summed cross-entropy, through a TiedLMHead (fast)
    or the plain ops; returns the loss and the weight's gradient."""
    w = w0.clone().requires_grad_()
    tied = ops.TiedLMHead(w)
    assert tied.fast  # float32 on the CPU, grad enabled, no autocast
    if embed:
        e = tied.embed(ids) if fast else F.embedding(ids, w)
        x = (mix @ e.flatten(0, 1)) * 2
    else:
        x = mix @ torch.ones(6, 16)
    if fast:
        loss = tied.cross_entropy_sum(x, target)
    else:
        loss = F.cross_entropy(x @ w.T, target, reduction="sum")
    (loss * scale).backward()
    assert w.grad.layout == torch.strided
    return loss.detach(), w.grad


@pytest.mark.parametrize("embed", [True, False], ids=["embedding+head", "head-only"])
def test_tied_head_matches_the_plain_ops(ops, embed):
    case = _head_case(0)
    ref = _head_loss_and_grad(ops, *case, fast=False, embed=embed)
    for _ in range(2):  # the second call runs in the (n, V) buffer the first one handed back
        ours = _head_loss_and_grad(ops, *case, fast=True, embed=embed)
        assert ours[0].item() == pytest.approx(ref[0].item(), rel=1e-6)
        w0, ids, _, mix = case
        assert_softmax_grads_close(ours[1], ref[1], _head_logits_max(w0, ids, mix, embed))
    assert (23, 301) in LOGITS_BUFFERS  # reused from step to step


def test_tied_head_used_twice_in_one_loss_keeps_both_gradients(ops):
    w0, ids, target, mix = _head_case(4)
    grads = []
    for fast in (True, False):
        w = w0.clone().requires_grad_()
        tied = ops.TiedLMHead(w)
        e = tied.embed(ids) if fast else F.embedding(ids, w)
        x = (mix @ e.flatten(0, 1)) * 2
        if fast:
            loss = tied.cross_entropy_sum(x, target) + tied.cross_entropy_sum(x * 0.5, target)
        else:
            loss = F.cross_entropy(x @ w.T, target, reduction="sum") + F.cross_entropy(
                (x * 0.5) @ w.T, target, reduction="sum"
            )
        loss.backward()
        grads.append(w.grad)
    assert_softmax_grads_close(grads[0], grads[1], _head_logits_max(w0, ids, mix))


def test_tied_embedding_without_the_head_gets_its_own_gradient(ops):
    w0, ids, _, _ = _head_case(1)
    g = torch.randn(2, 3, 16)
    grads = []
    for fast in (True, False):
        w = w0.clone().requires_grad_()
        e = ops.TiedLMHead(w).embed(ids) if fast else F.embedding(ids, w)
        e.backward(g)
        grads.append(w.grad)
    assert torch.equal(grads[0], grads[1])
    expected = torch.zeros_like(w0).index_add_(0, ids.flatten(), g.flatten(0, 1))
    assert torch.equal(grads[0], expected)


def test_tied_head_two_live_graphs_keep_their_own_buffers_and_gradients(ops):
    cases = [_head_case(2), _head_case(3)]
    refs = [_head_loss_and_grad(ops, *c, fast=False, scale=1.0) for c in cases]
    ws, losses = [], []
    for w0, ids, target, mix in cases:  # both forwards first, then both backwards
        w = w0.clone().requires_grad_()
        tied = ops.TiedLMHead(w)
        x = (mix @ tied.embed(ids).flatten(0, 1)) * 2
        ws.append(w)
        losses.append(tied.cross_entropy_sum(x, target))
    for loss in reversed(losses):
        loss.backward()
    for w, ref, (w0, ids, _, mix) in zip(ws, refs, cases):
        assert_softmax_grads_close(w.grad, ref[1], _head_logits_max(w0, ids, mix))
    with pytest.raises(RuntimeError, match="second time"):
        w = cases[0][0].clone().requires_grad_()
        loss = ops.TiedLMHead(w).cross_entropy_sum(torch.randn(23, 16), cases[0][2])
        loss.backward(retain_graph=True)
        loss.backward()


def test_tied_head_takes_the_plain_path_where_it_does_not_apply(ops):
    w = torch.randn(301, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ops.TiedLMHead(w).fast
    with torch.no_grad():
        assert not ops.TiedLMHead(w).fast
    assert not ops.TiedLMHead(w.detach()).fast
    assert not ops.TiedLMHead(w.detach().double().requires_grad_()).fast


# ----------------------------------------------------------------------------- the whole step


@pytest.fixture(scope="module")
def ds(small_dir):
    return load_dataset(small_dir)


def _losses_and_grads(ds, ops: str, bucket: int, monkeypatch, dtype=None):
    """Losses and gradients of one step of a fresh model with the ops `ops` ("plain":
    TORCH_OPS, "eager": EAGER_CPU_OPS, "c": the C kernels), rows padded to `bucket`."""
    monkeypatch.setattr(model_mod, "ROW_BUCKET", bucket)
    torch.manual_seed(0)
    mc = ModelConfig(n_layer=2, n_embd=32, n_head=4, n_positions=16, dropout=0.0)
    oc = ObjectiveConfig(k_pred_tok=2)
    model = GPT2Jepa(mc, oc, ds.vocab, ds.entity_len).train()
    if ops == "eager":
        model.ops = torch_ops.step_ops(torch.device("cpu"), compiled=False)
        assert model.ops is torch_ops.EAGER_CPU_OPS
    elif ops == "c":
        use_cpu_kernels(model)
    seq, kind = ds.train.seq[:21], ds.train.kind[:21]
    assert 0 < int((kind == KIND_ID["train"]).sum()) < 21
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        out = model(seq, kind)
    loss = out.sums["ntp"] / out.counts["ntp"] + out.sums["jepa"] / out.counts["jepa"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.sums["ntp"].item(), out.sums["jepa"].item(), grads


@pytest.mark.parametrize("ops", ["eager", pytest.param("c", marks=needs_kernels)])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_optimised_step_equals_the_straightforward_one(ds, monkeypatch, dtype, ops):
    """The eager CPU ops (torch's, or the C kernels of `--cpu_kernels on`) + row padding vs
    the plain ops without padding (dropout 0)."""
    ntp_a, jepa_a, ga = _losses_and_grads(ds, ops, 8, monkeypatch, dtype)
    ntp_b, jepa_b, gb = _losses_and_grads(ds, "plain", 1, monkeypatch, dtype)
    tol = 1e-5 if dtype is None else 2e-2
    assert ntp_a == pytest.approx(ntp_b, rel=tol)
    assert jepa_a == pytest.approx(jepa_b, rel=tol, abs=tol)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for name in ga:
        scale = gb[name].abs().max().item() + 1e-12
        assert (ga[name] - gb[name]).abs().max().item() <= tol * scale, name
