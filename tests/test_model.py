"""GPT2Jepa: the one packed block-causal pass against Hugging Face's own forward, by hand.

Every check compares the model's output with an independent computation: separate
`GPT2LMHeadModel` forward passes (HF's own code, no packing), a reverse built in this file from
the token *names* of vocab.json, or numbers worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2LMHeadModel

import revjepa.families.gpt2_jepa as model_mod
from revjepa.config import ModelConfig, ObjectiveConfig
from revjepa.data import (
    KIND_ID,
    GenConfig,
    generate,
    load_dataset,
    loss_dropout_keep,
    write_generated,
)
from revjepa.errors import UserError
from revjepa.families import build_model
from revjepa.families.base import collapse_signal
from revjepa.families.gpt2_jepa import (
    ROW_BUCKET,
    GPT2Jepa,
    build_gpt2,
    jepa_distance,
)

TRAIN, ATOMIC, TEST = KIND_ID["train"], KIND_ID["atomic"], KIND_ID["test"]


# ----------------------------------------------------------------------------- fixtures / helpers


def _dataset(tmp_path_factory, name: str, comb: int):
    gen = generate(GenConfig(num_ga_entities=200, num_rel_pairs=2, test_size=50, comb=comb))
    out = tmp_path_factory.mktemp(name)
    write_generated(gen, out)
    return load_dataset(out)


@pytest.fixture(scope="module")
def comb_ds(tmp_path_factory):
    ds = _dataset(tmp_path_factory, "comb", comb=10)
    assert ds.entity_len == 2
    return ds


@pytest.fixture(scope="module")
def abstract_ds(tmp_path_factory):
    ds = _dataset(tmp_path_factory, "abstract", comb=0)
    assert ds.entity_len == 1
    return ds


def make_model(
    ds,
    *,
    k: int = 1,
    positions: bool = True,
    metric: str = "cosine",
    temperature: float = 0.07,
    use_jepa: bool = True,
    lambda_jepa: float = 1.0,
    tie: bool = True,
    seed: int = 0,
    scramble: bool = True,
) -> GPT2Jepa:
    torch.manual_seed(seed)
    mc = ModelConfig(
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_positions=16,
        dropout=0.0,
        position_embeddings=positions,
        tie_embeddings=tie,
    )
    oc = ObjectiveConfig(
        use_jepa=use_jepa,
        lambda_jepa=lambda_jepa,
        k_pred_tok=k,
        distance_metric=metric,
        infonce_temperature=temperature,
    )
    model = GPT2Jepa(mc, oc, ds.vocab, ds.entity_len)
    if scramble:
        # GPT-2's init (std 0.02) gives nearly uniform attention; larger random weights make
        # any leak across blocks or any position mistake show up far above the tolerances.
        with torch.no_grad():
            for name, p in model.lm.named_parameters():
                if not p.requires_grad:
                    continue
                if "ln_" in name and name.endswith("weight"):
                    p.normal_(1.0, 0.2)
                else:
                    p.normal_(0.0, 0.3)
    return model.eval()


def mixed_batch(ds, n_train: int = 5, n_atomic: int = 3, n_test: int = 2, seed: int = 0):
    """A shuffled batch of train + atomic + test items (never grouped by kind)."""
    seq = torch.cat(
        [
            ds.valid["train"].seq[:n_train],
            ds.valid["atomic"].seq[:n_atomic],
            ds.valid["test"].seq[:n_test],
        ]
    )
    kind = torch.tensor([TRAIN] * n_train + [ATOMIC] * n_atomic + [TEST] * n_test)
    perm = torch.randperm(len(seq), generator=torch.Generator().manual_seed(seed))
    seq, kind = seq[perm], kind[perm]
    assert not bool((kind[1:] >= kind[:-1]).all()), "batch should interleave kinds"
    return seq, kind


def hand_reverse(seq: torch.Tensor, vocab, e: int) -> torch.Tensor:
    """e1 r <mask> e2 -> e2 r_inv <mask> e1, from the relation token names in vocab.json."""
    name = {i: t for t, i in vocab.token_to_id.items()}
    tid = vocab.token_to_id

    def inv(i: int) -> int:
        t = name[i]
        return tid[t[: -len("_inv>")] + ">"] if t.endswith("_inv>") else tid[t[:-1] + "_inv>"]

    rows = []
    for row in seq.tolist():
        rows.append(row[e + 2 :] + [inv(row[e]), row[e + 1]] + row[:e])
    return torch.tensor(rows, dtype=seq.dtype)


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-5) -> None:
    """Two float32 computations of the same values through the dense layers (ours and HF's:
    other kernels, other matmul shapes) agree to within `rel` of the largest |expected|.

    Their rounding errors follow the magnitudes the values are computed from, not each
    element's own (a logit near zero carries the rounding of the large terms that cancelled in
    it): with these scrambled weights (logits up to ~9) up to 8e-7 of the largest here, with
    every kernel set we could try (ATen AVX-512/AVX2/scalar, MKL AVX-512/AVX2/compatible, the C
    kernels on or off), where a fixed atol of 1e-5 (~10 ulps of the largest logits) was up to
    43% used. 2e-5 of the largest is still far below what a leak across blocks or a position
    mistake does (whole units).
    """
    assert actual.shape == expected.shape
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel:g} x max |expected| {scale:.3g}"


def hf_last_hidden(lm: GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    """HF's final hidden states (after ln_f) of `ids` encoded alone (positions 0..T-1)."""
    return lm(ids, output_hidden_states=True).hidden_states[-1]


def cosine_dist_by_hand(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    p, t = p.double(), t.double()
    return 1 - (p * t).sum(-1) / (p.pow(2).sum(-1).sqrt() * t.pow(2).sum(-1).sqrt())


def distance_by_hand(p: torch.Tensor, t: torch.Tensor, metric: str, temp: float) -> torch.Tensor:
    p, t = p.double(), t.double()
    if metric == "cosine":
        return cosine_dist_by_hand(p, t)
    if metric == "l2":
        return (p - t).pow(2).sum(-1).sqrt()
    if metric == "mse":
        return (p - t).pow(2).sum(-1) / p.shape[-1]
    assert metric == "infonce"
    pu = p / p.pow(2).sum(-1, keepdim=True).sqrt()
    tu = t / t.pow(2).sum(-1, keepdim=True).sqrt()
    sim = (pu[:, None, :] * tu[None, :, :]).sum(-1) / temp
    return torch.stack([sim[i].exp().sum().log() - sim[i, i] for i in range(len(p))])


def separate_pred_target(model: GPT2Jepa, fwd: torch.Tensor, k: int, vocab, e: int):
    """Pred and target embeddings from two independent HF passes (no packing)."""
    fwd_k = torch.cat([fwd, torch.full((len(fwd), k), vocab.token_to_id["<PRED>"])], 1)
    pred = hf_last_hidden(model.lm, fwd_k)[:, -1]
    target = hf_last_hidden(model.lm, hand_reverse(fwd, vocab, e))[:, -1]
    return pred, target


class Spy:
    """Wrap `revjepa.families.gpt2_jepa.gpt2_hidden_states` to keep the packed ids and hidden states."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        real = model_mod.gpt2_hidden_states

        def spy(lm, ids, *args, **kwargs):
            h, layers = real(lm, ids, *args, **kwargs)
            self.calls.append((ids.clone(), h))
            return h, layers

        monkeypatch.setattr(model_mod, "gpt2_hidden_states", spy)


# ----------------------------------------------------------------------------- 1. one pass == two


@pytest.mark.parametrize("positions", [True, False], ids=["pos", "nopos"])
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_one_pass_equals_separate_hf_passes(comb_ds, k, positions, monkeypatch):
    ds, e = comb_ds, comb_ds.entity_len
    model = make_model(ds, k=k, positions=positions)
    assert model.k == k
    seq, kind = mixed_batch(ds)  # 5 train, 5 non-JEPA items: odd, so the pad slot is used
    spy = Spy(monkeypatch)
    with torch.no_grad():
        out = model(seq, kind)
        train = kind == TRAIN
        fwd = seq[train]
        n_j = len(fwd)
        pred_sep, target_sep = separate_pred_target(model, fwd, k, ds.vocab, e)

        # pred: the last <PRED> token (last forward token when k = 0), in batch order
        pred = out.jepa_embeddings()
        assert pred is not None
        assert pred.shape == (n_j, 32)
        assert_close_to_scale(pred, pred_sep)

        # target: read from the packed pass directly (last token of the reverse block)
        assert len(spy.calls) == 1
        ids, h = spy.calls[0]
        big_l = seq.shape[1]
        ln_f = model.lm.transformer.ln_f
        assert_close_to_scale(ln_f(h[:n_j, 2 * big_l + k - 1]), target_sep)

        # the documented packing, and every block of every row encoded exactly as if alone
        pred_tok = torch.full((n_j, k), ds.vocab.pred_id)
        jepa_rows = torch.cat([fwd, pred_tok, hand_reverse(fwd, ds.vocab, e)], 1)
        torch.testing.assert_close(ids[:n_j], jepa_rows, rtol=0, atol=0)
        assert_close_to_scale(
            ln_f(h[:n_j, : big_l + k]),
            hf_last_hidden(model.lm, jepa_rows[:, : big_l + k]),
        )
        assert_close_to_scale(
            ln_f(h[:n_j, big_l + k :]),
            hf_last_hidden(model.lm, jepa_rows[:, big_l + k :]),
        )
        others = seq[~train]
        assert ids.shape[0] == n_j + (len(others) + 1) // 2
        assert ids.shape[1] == 2 * big_l + k
        for i, item in enumerate(others):
            row, off = n_j + i // 2, (i % 2) * big_l
            torch.testing.assert_close(ids[row, off : off + big_l], item, rtol=0, atol=0)
            assert_close_to_scale(
                ln_f(h[row, off : off + big_l]),
                hf_last_hidden(model.lm, item[None])[0],
            )
        # odd count: the last pair row's second slot is <pad>
        assert len(others) % 2 == 1
        assert bool((ids[-1, big_l:] == ds.vocab.pad_id).all())

    # the JEPA distance of the one pass equals the distance from the separate passes
    expected = cosine_dist_by_hand(pred_sep, target_sep)
    assert out.counts["jepa"].item() == n_j
    assert out.sums["jepa"].dtype == torch.float32
    assert out.sums["jepa"].item() == pytest.approx(expected.sum().item(), abs=1e-5)
    model_mean = (out.sums["jepa"] / out.counts["jepa"]).item()
    assert model_mean == pytest.approx(expected.mean().item(), abs=1e-5)
    by_library = jepa_distance(pred_sep, target_sep, "cosine", 0.07).mean().item()
    assert model_mean == pytest.approx(by_library, abs=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "l2", "mse", "infonce"])
def test_jepa_sum_every_metric_matches_separate_passes(abstract_ds, metric):
    ds = abstract_ds
    model = make_model(ds, k=2, metric=metric, temperature=0.5, positions=True)
    seq, kind = mixed_batch(ds, n_train=6, n_atomic=2, n_test=3, seed=1)
    with torch.no_grad():
        out = model(seq, kind)
        pred, target = separate_pred_target(model, seq[kind == TRAIN], 2, ds.vocab, ds.entity_len)
    expected = distance_by_hand(pred, target, metric, 0.5)
    assert out.counts["jepa"].item() == 6
    assert out.sums["jepa"].item() == pytest.approx(expected.sum().item(), rel=1e-5, abs=1e-5)


# ----------------------------------------------------------------------------- 2. NTP == HF loss


@pytest.mark.parametrize("composition", [(5, 3, 2), (4, 4, 3)], ids=["b10", "b11"])
@pytest.mark.parametrize("positions", [True, False], ids=["pos", "nopos"])
@pytest.mark.parametrize("use_jepa", [True, False], ids=["jepa", "nojepa"])
@pytest.mark.parametrize("ds_name", ["comb_ds", "abstract_ds"])
def test_ntp_matches_hf_loss_and_logits(request, ds_name, use_jepa, positions, composition):
    ds = request.getfixturevalue(ds_name)
    e = ds.entity_len
    model = make_model(ds, k=3, positions=positions, use_jepa=use_jepa)
    seq, kind = mixed_batch(ds, *composition, seed=2)
    labels = torch.full_like(seq, -100)
    labels[:, e + 2 :] = seq[:, e + 2 :]
    with torch.no_grad():
        out = model(seq, kind, with_logits=True)
        ref = model.lm(seq, labels=labels)
    assert out.counts["ntp"].item() == len(seq) * e
    # logits in batch order at the positions that predict the e2 tokens
    assert out.logits is not None and out.logits.shape == (len(seq), e, ds.vocab.size)
    ref_logits = ref.logits[:, e + 1 : 2 * e + 1]
    assert_close_to_scale(out.logits, ref_logits)
    # the mean cross-entropy moves by at most twice the largest logit difference (log-sum-exp
    # and the target's logit each by at most that), plus float32 sums over items in another
    # order and another cross-entropy kernel (~1e-7 relative): rel=1e-6 alone was up to 20%
    # used by logit differences of ~3e-6
    bound = 2 * (out.logits - ref_logits).abs().max().item() + 1e-5 * ref.loss.item()
    assert abs((out.sums["ntp"] / out.counts["ntp"]).item() - ref.loss.item()) <= bound
    # and the NTP loss is the cross-entropy of those logits, computed by hand
    logp = out.logits.double().log_softmax(-1)
    by_hand = -logp.gather(-1, seq[:, e + 2 :, None]).sum()
    assert out.sums["ntp"].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_per_layer_logits_match_hf_hidden_states(comb_ds):
    ds, e = comb_ds, comb_ds.entity_len
    model = make_model(ds, k=1)
    seq, kind = mixed_batch(ds, seed=3)
    with torch.no_grad():
        out = model(seq, kind, per_layer=True)
        hf = model.lm(seq, output_hidden_states=True)
    head = model.lm.lm_head.weight
    ln_f = model.lm.transformer.ln_f
    assert out.layer_logits is not None and len(out.layer_logits) == 3  # embeddings + 2 blocks
    for i in range(2):  # HF's hidden_states[i < n_layer] are before ln_f, the last one after
        ref = (ln_f(hf.hidden_states[i]) @ head.T)[:, e + 1 : 2 * e + 1]
        assert_close_to_scale(out.layer_logits[i], ref)
    assert_close_to_scale(out.layer_logits[-1], hf.logits[:, e + 1 : 2 * e + 1])
    assert_close_to_scale(out.logits, hf.logits[:, e + 1 : 2 * e + 1])


# ----------------------------------------------------------------------------- 3. reverse


def test_reverse_hand_written_comb(comb_ds):
    v = comb_ds.vocab
    tid = v.token_to_id
    model = make_model(comb_ds, scramble=False)
    a, b, c, d = torch.nonzero(v.is_entity).flatten()[:4].tolist()
    r0, r0i, r1, r1i = tid["<r_0>"], tid["<r_0_inv>"], tid["<r_1>"], tid["<r_1_inv>"]
    m = tid["<mask>"]
    seq = torch.tensor([[a, b, r0, m, c, d], [d, a, r1i, m, b, c]])
    rev = model.reverse(seq)
    assert rev.tolist() == [[c, d, r0i, m, a, b], [b, c, r1, m, d, a]]
    assert model.reverse(rev).tolist() == seq.tolist()


def test_reverse_hand_written_abstract(abstract_ds):
    v = abstract_ds.vocab
    tid = v.token_to_id
    model = make_model(abstract_ds, scramble=False)
    a, b = torch.nonzero(v.is_entity).flatten()[:2].tolist()
    m = tid["<mask>"]
    seq = torch.tensor([[a, tid["<r_1>"], m, b], [b, tid["<r_0_inv>"], m, a]])
    assert model.reverse(seq).tolist() == [[b, tid["<r_1_inv>"], m, a], [a, tid["<r_0>"], m, b]]


@pytest.mark.parametrize("ds_name", ["comb_ds", "abstract_ds"])
def test_reverse_is_an_involution_and_maps_train_facts_to_train_facts(request, ds_name):
    ds = request.getfixturevalue(ds_name)
    model = make_model(ds, scramble=False)
    seq = ds.train.seq
    rev = model.reverse(seq)
    assert torch.equal(rev, hand_reverse(seq, ds.vocab, ds.entity_len))
    assert torch.equal(model.reverse(rev), seq)
    # the generator writes both directions of every group-A fact: reverse stays inside train
    train = seq[ds.train.kind == TRAIN]
    facts = {tuple(r) for r in train.tolist()}
    assert all(tuple(r) in facts for r in model.reverse(train).tolist())


def test_no_reverse_block_for_atomic_or_test_items(comb_ds, monkeypatch):
    ds = comb_ds
    model = make_model(ds, k=2)
    spy = Spy(monkeypatch)
    seq = torch.cat([ds.valid["atomic"].seq[:4], ds.valid["test"].seq[:3]])
    kind = torch.tensor([ATOMIC] * 4 + [TEST] * 3)
    with torch.no_grad():
        out = model(seq, kind)
    assert out.counts["jepa"].item() == 0
    assert out.sums["jepa"].item() == 0.0
    assert out.jepa_embeddings().shape[0] == 0
    ids, _ = spy.calls[0]
    real_rows = ids[(ids != ds.vocab.pad_id).any(1)]
    assert real_rows.shape[0] == 4  # 7 items, two per row, no JEPA rows
    assert ids.shape[0] % ROW_BUCKET == 0  # the rest is all-<pad> filler
    assert not bool((ids == ds.vocab.pred_id).any())


def test_only_train_items_get_a_reverse_block(comb_ds, monkeypatch):
    ds, e = comb_ds, comb_ds.entity_len
    model = make_model(ds, k=1)
    spy = Spy(monkeypatch)
    big_l = ds.valid["train"].seq.shape[1]

    def jepa_rows(seq, kind):
        spy.calls.clear()
        with torch.no_grad():
            out = model(seq, kind)
        ids, _ = spy.calls[0]
        rows = ids[ids[:, big_l] == ds.vocab.pred_id]  # a <PRED> after the first block
        return out, rows

    train_facts = {tuple(r) for r in ds.valid["train"].seq.tolist()}
    for seed, comp in enumerate([(5, 3, 2), (1, 6, 6), (7, 0, 1), (3, 3, 0)]):
        seq, kind = mixed_batch(ds, *comp, seed=seed)
        out, rows = jepa_rows(seq, kind)
        train = seq[kind == TRAIN]
        assert torch.equal(rows[:, :big_l], train)
        assert torch.equal(rows[:, big_l + 1 :], hand_reverse(train, ds.vocab, e))
        assert all(tuple(r) in train_facts for r in rows[:, :big_l].tolist())
        assert out.counts["jepa"].item() == comp[0]
    # items of kind atomic/test are never reversed even when their tokens are train-like
    seq, kind = mixed_batch(ds, 5, 3, 2)
    fake = kind.clone()
    fake[kind == TRAIN] = ATOMIC
    out, rows = jepa_rows(seq, fake)
    assert rows.shape[0] == 0 and out.counts["jepa"].item() == 0 and out.sums["jepa"].item() == 0.0


# ----------------------------------------------------------------------------- 4. distances


def test_jepa_distance_by_hand():
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    s2 = math.sqrt(2.0)
    cases = {
        # cos([1,0],[1,1]) = 1/sqrt2 ; cos([0,2],[0,-1]) = -1
        "cosine": [1.0 - 1.0 / s2, 2.0],
        # |[0,-1]| = 1 ; |[0,3]| = 3
        "l2": [1.0, 3.0],
        # (0 + 1) / 2 ; (0 + 9) / 2
        "mse": [0.5, 4.5],
    }
    for metric, expected in cases.items():
        got = jepa_distance(pred, target, metric, 0.07)
        assert got.dtype == torch.float32
        assert got.tolist() == pytest.approx(expected, abs=1e-6), metric
    # infonce, temperature 0.5: unit rows p0=[1,0], p1=[0,1], t0=[1,1]/sqrt2, t1=[0,-1]
    # sim = p.t / 0.5: row 0 = [sqrt2, 0], row 1 = [sqrt2, -2]
    expected = [
        -(s2 - math.log(math.exp(s2) + math.exp(0.0))),
        -(-2.0 - math.log(math.exp(s2) + math.exp(-2.0))),
    ]
    got = jepa_distance(pred, target, "infonce", 0.5)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    # temperature 1: row 0 = [1/sqrt2, 0], row 1 = [1/sqrt2, -1]
    r = 1.0 / s2
    expected_t1 = [
        -(r - math.log(math.exp(r) + 1.0)),
        -(-1.0 - math.log(math.exp(r) + math.exp(-1.0))),
    ]
    got = jepa_distance(pred, target, "infonce", 1.0)
    assert got.tolist() == pytest.approx(expected_t1, abs=1e-6)
    # bf16 inputs still give float32 distances
    assert jepa_distance(pred.bfloat16(), target.bfloat16(), "l2", 1.0).dtype == torch.float32
    with pytest.raises(ValueError):
        jepa_distance(pred, target, "hamming", 1.0)


def test_jepa_distance_zero_for_identical_and_scale_invariance():
    x = torch.tensor([[3.0, 4.0, 0.0], [-1.0, 2.0, 2.0]])
    assert jepa_distance(x, x, "cosine", 1.0).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert jepa_distance(x, 5 * x, "cosine", 1.0).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert jepa_distance(x, x, "l2", 1.0).tolist() == [0.0, 0.0]
    # |[3,4,0] - [6,8,0]| = 5
    assert jepa_distance(x, 2 * x, "l2", 1.0)[0].item() == pytest.approx(5.0)


# ----------------------------------------------------------------------------- 5. loss dropout


def test_jepa_keep_masks_items(comb_ds):
    ds = comb_ds
    model = make_model(ds, k=1)
    seq, kind = mixed_batch(ds, n_train=6, n_atomic=3, n_test=2, seed=4)
    train = kind == TRAIN
    with torch.no_grad():
        pred, target = separate_pred_target(model, seq[train], 1, ds.vocab, ds.entity_len)
        per_item = cosine_dist_by_hand(pred, target)
        keep = torch.zeros(len(seq), dtype=torch.bool)
        train_pos = torch.nonzero(train).flatten()
        keep[train_pos[[0, 2, 3]]] = True
        keep[~train] = True  # irrelevant for non-JEPA items
        out = model(seq, kind, jepa_keep=keep)
        full = model(seq, kind)
        none_kept = model(seq, kind, jepa_keep=torch.zeros(len(seq), dtype=torch.bool))
        all_kept = model(seq, kind, jepa_keep=torch.ones(len(seq), dtype=torch.bool))
    assert out.counts["jepa"].item() == 3
    assert out.sums["jepa"].item() == pytest.approx(per_item[[0, 2, 3]].sum().item(), abs=1e-5)
    assert full.counts["jepa"].item() == 6
    assert full.sums["jepa"].item() == pytest.approx(per_item.sum().item(), abs=1e-5)
    assert none_kept.counts["jepa"].item() == 0 and none_kept.sums["jepa"].item() == 0.0
    assert all_kept.sums["jepa"].item() == pytest.approx(full.sums["jepa"].item(), abs=1e-6)
    # loss dropout never touches NTP
    assert out.sums["ntp"].item() == pytest.approx(full.sums["ntp"].item(), abs=1e-6)


def _losses_grads_logits(model, seq, kind, keep, fixed: bool):
    model.zero_grad(set_to_none=True)
    out = model.losses(*model.prepare(seq, kind, keep, fixed_shapes=fixed), with_logits=True)
    loss = sum(out.sums[n] / out.counts[n].clamp(min=1) for n in model.loss_terms)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("use_jepa", [True, False], ids=["jepa", "nojepa"])
@pytest.mark.parametrize("metric", ["cosine", "infonce"])
@pytest.mark.parametrize(
    "composition", [(12, 10, 10), (0, 16, 15), (20, 0, 0)], ids=["mix", "none", "all"]
)
def test_fixed_shapes_give_the_same_losses_gradients_and_logits(
    comb_ds, use_jepa, metric, composition
):
    """The fixed-shape packing of compiled/CUDA-graph steps (every batch of B items gets the
    rows its worst case would need; the extra rows are all-<pad>) computes what the tight
    packing computes, loss dropout included."""
    ds = comb_ds
    model = make_model(ds, k=2, metric=metric, temperature=0.5, use_jepa=use_jepa)
    seq = torch.cat([ds.valid[s].seq[:n] for s, n in zip(("train", "atomic", "test"), composition)])
    kind = torch.tensor(
        [TRAIN] * composition[0] + [ATOMIC] * composition[1] + [TEST] * composition[2]
    )
    perm = torch.randperm(len(seq), generator=torch.Generator().manual_seed(3))
    seq, kind = seq[perm], kind[perm]
    keep = torch.rand(len(seq), generator=torch.Generator().manual_seed(4)) < 0.7
    b = len(seq)
    tight = model.prepare(seq, kind, keep)[1]
    fixed = model.prepare(seq, kind, keep, fixed_shapes=True)[1]
    worst = b if use_jepa else (b + 1) // 2
    assert (fixed.numel() - 2 * b) // 3 == -(-worst // ROW_BUCKET) * ROW_BUCKET
    assert tight.numel() < fixed.numel() or not use_jepa or composition[0] == b
    a, ga = _losses_grads_logits(model, seq, kind, keep, fixed=False)
    f, gf = _losses_grads_logits(model, seq, kind, keep, fixed=True)
    n_j = int((kind == TRAIN).sum()) if use_jepa else 0
    assert a.sums["ntp"].item() == pytest.approx(f.sums["ntp"].item(), rel=1e-5)
    kept = int((keep & (kind == TRAIN)).sum()) if use_jepa else 0
    if use_jepa:
        assert a.counts["jepa"].item() == f.counts["jepa"].item() == kept
        assert a.sums["jepa"].item() == pytest.approx(f.sums["jepa"].item(), rel=1e-5, abs=1e-6)
    else:
        assert list(a.sums) == list(f.sums) == ["ntp"] and kept == 0
    torch.testing.assert_close(a.logits, f.logits, atol=1e-5, rtol=1e-5)
    if use_jepa:
        assert a.jepa_embeddings().shape == f.jepa_embeddings().shape == (n_j, 32)
    assert ga.keys() == gf.keys() and len(ga) > 10
    for name in ga:
        torch.testing.assert_close(ga[name], gf[name], atol=1e-6, rtol=1e-4, msg=name)


def test_loss_dropout_keep_rate_and_determinism():
    n, p = 20_000, 0.3
    keep = loss_dropout_keep(42, 7, n, p)
    assert keep.dtype == torch.bool and keep.shape == (n,)
    assert abs((1.0 - keep.float().mean().item()) - p) < 0.01
    assert torch.equal(keep, loss_dropout_keep(42, 7, n, p))
    assert not torch.equal(keep, loss_dropout_keep(42, 8, n, p))
    assert not torch.equal(keep, loss_dropout_keep(43, 7, n, p))
    rates = [1.0 - loss_dropout_keep(0, s, n, 0.5).float().mean().item() for s in range(3)]
    assert all(abs(r - 0.5) < 0.01 for r in rates)
    assert bool(loss_dropout_keep(1, 0, 1000, 0.0).all())


# ----------------------------------------------------------------------------- 6. gradients


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gradients_from_both_losses(comb_ds, tie):
    ds = comb_ds
    model = make_model(ds, k=2, tie=tie, positions=False).train()
    seq, kind = mixed_batch(ds)
    lm = model.lm
    block_w = lm.transformer.h[0].attn.c_attn.weight

    out = model(seq, kind)
    out.sums["ntp"].backward()
    assert lm.lm_head.weight.grad is not None and lm.lm_head.weight.grad.abs().sum() > 0
    assert block_w.grad is not None and block_w.grad.abs().sum() > 0
    assert lm.transformer.wpe.weight.grad is None  # frozen without positions
    model.zero_grad(set_to_none=True)

    out = model(seq, kind)
    out.sums["jepa"].backward()
    assert block_w.grad is not None and block_w.grad.abs().sum() > 0
    assert lm.transformer.h[1].mlp.c_fc.weight.grad.abs().sum() > 0
    assert lm.transformer.wte.weight.grad.abs().sum() > 0
    if not tie:  # JEPA never goes through the LM head
        assert lm.lm_head.weight.grad is None
    assert lm.transformer.wpe.weight.grad is None
    # the <PRED> embedding is on the path of the pred embedding
    assert lm.transformer.wte.weight.grad[ds.vocab.pred_id].abs().sum() > 0


@pytest.mark.parametrize(
    "objective", [{"use_jepa": False}, {"lambda_jepa": 0.0}], ids=["no_jepa", "lambda0"]
)
def test_no_jepa_work_when_off(comb_ds, monkeypatch, objective):
    ds = comb_ds
    model = make_model(ds, k=3, **objective)
    assert model.k == 0 and not model.jepa
    spy = Spy(monkeypatch)
    seq, kind = mixed_batch(ds)
    with torch.no_grad():
        out = model(seq, kind)
    assert list(out.sums) == list(out.counts) == ["ntp"]  # no JEPA term at all, not a zero
    assert out.pred_embeddings is None
    ids, _ = spy.calls[0]
    assert ids.shape == (ROW_BUCKET, 2 * seq.shape[1])  # no <PRED>, no reverse block
    real_rows = ids[(ids != ds.vocab.pad_id).any(1)]
    assert real_rows.shape[0] == 5  # 10 items two per row
    assert not bool((ids == ds.vocab.pred_id).any())


# ----------------------------------------------------------------------------- 7. build_gpt2


def test_build_gpt2(comb_ds):
    v = comb_ds.vocab
    base = {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 16}
    with pytest.raises(UserError, match="vocab_size"):
        build_gpt2(ModelConfig(**base, vocab_size=v.size + 1), v)
    lm = build_gpt2(ModelConfig(**base, vocab_size=v.size), v)
    assert lm.config.vocab_size == v.size
    assert lm.transformer.wte.weight.shape == (v.size, 32)
    assert lm.lm_head.weight is lm.transformer.wte.weight
    assert lm.config.n_layer == 2 and lm.config.n_positions == 16

    untied = build_gpt2(ModelConfig(**base, tie_embeddings=False), v)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()

    pos = build_gpt2(ModelConfig(**base), v)
    assert pos.transformer.wpe.weight.requires_grad and pos.transformer.wpe.weight.abs().sum() > 0
    nopos = build_gpt2(ModelConfig(**base, position_embeddings=False), v)
    assert not nopos.transformer.wpe.weight.requires_grad
    assert bool((nopos.transformer.wpe.weight == 0).all())

    drop = build_gpt2(ModelConfig(**base, dropout=0.25), v)
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        assert getattr(drop.config, name) == 0.25
    assert drop.transformer.drop.p == 0.25

    state = lm.state_dict()
    assert "transformer.h.0.attn.c_attn.weight" in state
    assert "transformer.wte.weight" in state and "transformer.ln_f.weight" in state
    # the HF state dict loads strictly into a plain HF model of the same config
    fresh = GPT2LMHeadModel(lm.config)
    fresh.load_state_dict(state)
    fresh.eval(), lm.eval()  # dropout 0.1 by default
    ids = comb_ds.valid["test"].seq[:3]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, lm(ids).logits, rtol=0, atol=0)


def test_gpt2jepa_state_dict_and_position_limit(comb_ds):
    ds = comb_ds
    model = make_model(ds, k=4)
    sd = model.hf_state_dict()
    assert all(not key.startswith("lm.") for key in sd)
    assert "transformer.h.1.mlp.c_fc.weight" in sd
    other = make_model(ds, k=4, seed=1)
    other.load_hf_state_dict(sd)
    seq, kind = mixed_batch(ds)
    with torch.no_grad():
        a, b = model(seq, kind), other(seq, kind)
    assert (
        a.sums["ntp"].item() == b.sums["ntp"].item()
        and a.sums["jepa"].item() == b.sums["jepa"].item()
    )
    # n_positions must hold a forward block + k <PRED> tokens (6 + 4 = 10)
    mc = ModelConfig(n_layer=1, n_embd=8, n_head=2, n_positions=9)
    with pytest.raises(UserError, match="n_positions"):
        GPT2Jepa(mc, ObjectiveConfig(k_pred_tok=4), ds.vocab, ds.entity_len)
    mc.n_positions = 10
    assert GPT2Jepa(mc, ObjectiveConfig(k_pred_tok=4), ds.vocab, ds.entity_len).k == 4
    assert isinstance(build_model(mc, ObjectiveConfig(), ds.vocab, ds.entity_len), GPT2Jepa)
    with pytest.raises(UserError):
        build_model(ModelConfig(family="nope"), ObjectiveConfig(), ds.vocab, ds.entity_len)


# ----------------------------------------------------------------------------- 8. collapse


def test_collapse_signal_by_hand():
    same = torch.tensor([[1.0, 2.0, 3.0]] * 4)
    sig = collapse_signal(same)
    assert sig["pred_mean_cos"].item() == pytest.approx(1.0, abs=1e-6)
    assert sig["pred_std"].item() == pytest.approx(0.0, abs=1e-7)

    ortho = torch.eye(3)
    sig = collapse_signal(ortho)
    assert sig["pred_mean_cos"].item() == pytest.approx(0.0, abs=1e-7)
    # each column is [1, 0, 0] in some order: sample std = sqrt(((2/3)^2 + 2 (1/3)^2) / 2)
    assert sig["pred_std"].item() == pytest.approx(math.sqrt(1.0 / 3.0), abs=1e-6)

    # cos([1,0],[1,1]) = 1/sqrt2 (one pair); scaling a row changes nothing
    two = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert collapse_signal(two)["pred_mean_cos"].item() == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    # pairs of [1,0],[0,1],[-1,0]: 0, -1, 0 -> mean -1/3
    three = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]])
    assert collapse_signal(three)["pred_mean_cos"].item() == pytest.approx(-1 / 3, abs=1e-6)

    one = collapse_signal(torch.ones(1, 4))
    assert math.isnan(one["pred_mean_cos"].item()) and math.isnan(one["pred_std"].item())
