"""Evaluation: every metric against slow loop references, evaluate_split against per-item HF
forwards, the checkpoint / run-directory evaluation CLI, plot, export and their one-line errors.

One short real training run (module-wide) provides the checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from revjepa.checkpoint import load_checkpoint
from revjepa.cli import main
from revjepa.config import ModelConfig, ObjectiveConfig
from revjepa.data import KIND_ID, KINDS, GenConfig, generate, load_dataset, write_generated
from revjepa.evaluate import (
    best_steps,
    evaluate_checkpoint,
    evaluate_split,
    model_from_checkpoint,
    read_jsonl,
)
from revjepa.families.gpt2_jepa import GPT2Jepa
from revjepa.metrics import item_metrics, joint_ranks, token_ranks

REPO = Path(__file__).resolve().parents[1]
VENV_PY = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PY if VENV_PY.exists() else Path(sys.executable))
METRICS = (
    "loss",
    "ntp_loss",
    "jepa_loss",
    "mrr",
    "mrr_token1",
    "mrr_token2",
    "mrr_joint",
    "joint_nll",
    "joint_accuracy",
    "num_samples",
)
# what evaluate_checkpoint / `revjepa evaluate` add by default (tests/test_entity_mrr.py)
CKPT_METRICS = METRICS + ("entity_mrr", "entity_acc", "num_entities")
RANK_METRICS = ("mrr", "mrr_token1", "mrr_token2", "mrr_joint", "joint_accuracy")
HEADER = [
    "split",
    "NTP loss",
    "MRR avg",
    "MRR tok1",
    "MRR tok2",
    "MRR joint",
    "joint NLL",
    "joint acc",
    "entity MRR",
    "entity acc",
]
N_LAYER = 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- slow references


def ref_item(
    logits: torch.Tensor,
    targets: list[int],
    tol: list[float] | None = None,
    joint_tol: float = 0.0,
) -> dict[str, float]:
    """The documented definitions, item by item, with explicit loops over the vocabulary.

    logits (E, V) float32 for one item. Log-probabilities are log_softmax in float32 (that is the
    definition); everything after that is plain Python floats (float64). Scores are compared
    through their difference, whose sign is exactly that of the comparison (a correctly rounded
    subtraction never flips a sign), so with no tolerance these are the definitions' ranks.

    rank1, rank2, joint_rank: 1 + the number of entries (pairs) whose score exceeds the target's
    by more than the tolerance: `tol[k]` for token k, `joint_tol` for pair scores, the most
    another computation of these logits (other kernels, other matmul shapes) can move such a
    difference. Entries within the tolerance are ambiguous: that computation may count them
    either way. rank1_hi, rank2_hi, joint_rank_hi count them all as larger (its worst ranks;
    with no tolerance, the ranks with exact ties counted as larger).
    """
    logits = logits.float()
    e, v = logits.shape
    tol = [0.0] * e if tol is None else [float(t) for t in tol]
    rows = [logits[k].tolist() for k in range(e)]
    lps = [torch.log_softmax(logits[k], -1).tolist() for k in range(e)]
    for k in range(e):  # the float32 log_softmax is the exact one up to float32 rounding
        lse = max(rows[k]) + math.log(sum(math.exp(x - max(rows[k])) for x in rows[k]))
        assert all(abs(lp - (x - lse)) < 1e-5 for lp, x in zip(lps[k], rows[k]))
    ranks, ranks_hi = [], []
    for k in range(e):
        t = targets[k]
        greater = not_less = 0
        for j in range(v):
            if j == t:
                continue
            diff = rows[k][j] - rows[k][t]
            greater += diff > tol[k]
            not_less += diff >= -tol[k]
        ranks.append(1 + greater)
        ranks_hi.append(1 + not_less)
    if e == 1:
        r1, r1_hi = ranks[0], ranks_hi[0]
        return {
            "rank1": r1,
            "rank2": r1,
            "joint_rank": r1,
            "rank1_hi": r1_hi,
            "rank2_hi": r1_hi,
            "joint_rank_hi": r1_hi,
            "nll": -lps[0][targets[0]],
            "correct": float(r1 == 1),
        }
    lp1, lp2 = lps[0], lps[1]
    t1, t2 = targets[0], targets[1]
    target = lp1[t1] + lp2[t2]
    greater = not_less = 0
    for i in range(v):
        for j in range(v):
            if i == t1 and j == t2:
                continue
            diff = (lp1[i] + lp2[j]) - target
            greater += diff > joint_tol
            not_less += diff >= -joint_tol
    return {
        "rank1": ranks[0],
        "rank2": ranks[1],
        "joint_rank": 1 + greater,
        "rank1_hi": ranks_hi[0],
        "rank2_hi": ranks_hi[1],
        "joint_rank_hi": 1 + not_less,
        "nll": -(lp1[t1] + lp2[t2]),
        "correct": float(ranks[0] == 1 and ranks[1] == 1),
    }


def ref_summary(items: list[dict[str, float]], worst: bool = False) -> dict[str, float]:
    """The split's metrics from the items' ranks, or (worst) from their worst-case ranks."""
    n = len(items)
    s = "_hi" if worst else ""
    r1 = [it["rank1" + s] for it in items]
    r2 = [it["rank2" + s] for it in items]
    rj = [it["joint_rank" + s] for it in items]
    return {
        "mrr_token1": sum(1 / r for r in r1) / n,
        "mrr_token2": sum(1 / r for r in r2) / n,
        "mrr": sum((1 / a + 1 / b) / 2 for a, b in zip(r1, r2)) / n,
        "mrr_joint": sum(1 / r for r in rj) / n,
        "joint_nll": sum(it["nll"] for it in items) / n,
        "joint_accuracy": sum(float(a == 1 and b == 1) for a, b in zip(r1, r2)) / n,
    }


# Another computation of the same logits (per-item HF forwards, other batch sizes: other matmul
# shapes and kernels) agrees with them to float32 rounding: ~1e-7 here (logits ~0.1, GPT-2's
# initialisation or a short training); this is checked, 100x above that.
LOGIT_ATOL = 1e-5
# Float losses: float32 sums over items in another order and other kernels (the fused C
# cross-entropy against torch's), ~1e-7 relative; jepa_loss is 1 - cosine ~1e-3, whose float32
# error is absolute (a few ulps of 1.0), hence the abs term.
LOSS_TOL = dict(rel=1e-5, abs=1e-6)
# How many of a split's items may have an ambiguous rank (a near-tie within the tolerance):
# token ranks, at the top of a 71-token vocabulary where one position moves the item's MRR by
# up to 1/2, 0 or 1 of 40 per evaluation here; joint ranks (~5000 pair scores, each rank a few
# thousand, where one position is ~1e-4 of it) 0 to 7 of 40. More would mean the tolerances,
# or the logits, are off and the bounds too loose to tell a wrong rank from rounding.
MAX_AMBIGUOUS_SHARE = {"token": 0.1, "joint": 0.5}


def path_tolerances(
    ref: torch.Tensor, got_batches: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item, how far the score differences that rank it can move between the reference's
    logits `ref` (n, E, V) and the evaluator's, `got_batches` (its logits, batch by batch, as
    the model returned them): a token rank compares two logits, so 2 max_j |delta logit_j|; the
    joint rank compares sums of one log-probability per token, so the sum over tokens of
    2 max_j |delta log p_j|, with the evaluator's log-probabilities computed as item_metrics
    computes them (log_softmax of each batch's (B, V) logits of a token) and the reference's
    as ref_item does. Both doubled, as margin. Returns (n, E) and (n,) float64."""
    e = ref.shape[1]
    got = torch.cat(got_batches)
    assert got.shape == ref.shape
    d_logit = (got.double() - ref.double()).abs().amax(-1)
    lp_got = torch.cat(
        [torch.stack([torch.log_softmax(b[:, k], -1) for k in range(e)], 1) for b in got_batches]
    )
    lp_ref = torch.stack(
        [torch.stack([torch.log_softmax(row[k], -1) for k in range(e)]) for row in ref]
    )
    d_lp = (lp_got.double() - lp_ref.double()).abs().amax(-1)
    return 2 * (2 * d_logit), 2 * (2 * d_lp).sum(1)


def rank_bounds(
    ref: torch.Tensor, targets: torch.Tensor, tol: torch.Tensor, joint_tol: torch.Tensor
) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """The loop reference on the logits `ref` (n, E, V) with the items' tolerances: the split's
    metrics at the best ranks (no ambiguous entry counted) and at the worst (all counted), and
    the number of items with an ambiguous token rank and with an ambiguous joint rank."""
    items = [
        ref_item(ref[i], targets[i].tolist(), tol[i].tolist(), float(joint_tol[i]))
        for i in range(ref.shape[0])
    ]
    ambiguous = {
        "token": sum(
            it["rank1"] != it["rank1_hi"] or it["rank2"] != it["rank2_hi"] for it in items
        ),
        "joint": sum(it["joint_rank"] != it["joint_rank_hi"] for it in items),
    }
    return ref_summary(items), ref_summary(items, worst=True), ambiguous


def assert_ranks_match(
    got: dict, ref: torch.Tensor, got_batches: list[torch.Tensor], targets: torch.Tensor
) -> dict[str, int]:
    """The evaluator's metrics `got`, computed from `got_batches`, against the loop reference on
    the logits `ref` of another computation: the logits agree to float32 rounding, every rank
    metric lies between its values at the worst and at the best ranks that rounding allows (the
    reference's exact value where no rank is ambiguous: a single rank off moves it far more
    than the 1e-12), few ranks are ambiguous, joint_nll agrees to LOSS_TOL. Returns the numbers
    of items with an ambiguous token rank and with an ambiguous joint rank."""
    torch.testing.assert_close(torch.cat(got_batches), ref, rtol=0, atol=LOGIT_ATOL)
    best, worst, ambiguous = rank_bounds(ref, targets, *path_tolerances(ref, got_batches))
    for key in RANK_METRICS:
        assert worst[key] - 1e-12 <= got[key] <= best[key] + 1e-12, (key, got[key], worst, best)
    for kind, share in MAX_AMBIGUOUS_SHARE.items():
        assert ambiguous[kind] <= share * ref.shape[0], (kind, ambiguous, worst, best)
    assert got["joint_nll"] == pytest.approx(best["joint_nll"], **LOSS_TOL)
    return ambiguous


def assert_losses_match(got: dict, want: dict) -> None:
    for key in ("loss", "ntp_loss", "jepa_loss"):
        assert got[key] == pytest.approx(want[key], **LOSS_TOL), key
    assert got["num_samples"] == want["num_samples"]


class LogitSpy:
    """Keeps the logits and logit-lens logits of every GPT2Jepa forward that returns them (the
    evaluator's batches, in call order)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        real = GPT2Jepa.forward

        def forward(model, *args, **kwargs):
            out = real(model, *args, **kwargs)
            if out.logits is not None:
                layers = [x.detach().clone() for x in out.layer_logits or []]
                self.calls.append((out.logits.detach().clone(), layers))
            return out

        monkeypatch.setattr(GPT2Jepa, "forward", forward)

    def take(self) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        calls, self.calls = self.calls, []
        return calls


def split_batches(calls: list, sizes: list[int]) -> list[list]:
    """The recorded batches of several splits evaluated one after the other, split by split."""
    out, i = [], 0
    for size in sizes:
        group, rows = [], 0
        while rows < size:
            group.append(calls[i])
            rows += calls[i][0].shape[0]
            i += 1
        assert rows == size
        out.append(group)
    assert i == len(calls)
    return out


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (content hash) and folder under the roots."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def header_columns(text: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith("split"))
    return re.split(r"\s{2,}", line.strip())


# ----------------------------------------------------------------------------- fixtures


def _write_dataset(root: Path, **kw) -> Path:
    cfg = dict(num_ga_entities=200, num_rel_pairs=2, test_size=40, seed=11)
    cfg.update(kw)
    write_generated(generate(GenConfig(**cfg)), root)
    return root


@pytest.fixture(scope="module")
def ev_data(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("evdata") / "D")


@pytest.fixture(scope="module")
def ev_dataset(ev_data):
    return load_dataset(ev_data, with_train=False)


@pytest.fixture(scope="module")
def ev_run(tmp_path_factory, ev_data) -> Path:
    run = tmp_path_factory.mktemp("evrun") / "R"
    # fmt: off
    rc = main([
        "train", "--data_dir", str(ev_data), "--output_dir", str(run), "--n_layer", str(N_LAYER),
        "--n_embd", "32", "--n_head", "2", "--batch_size", "32", "--max_steps", "40",
        "--save_step_dense", "20", "--save_step_dense_interval", "10", "--save_steps", "20",
        "--eval_steps", "20", "--log_interval", "10", "--dropout", "0", "--learning_rate", "1e-3",
    ])
    # fmt: on
    assert rc == 0
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == [
        "best_model.pt",
        "checkpoint_step_10.pt",
        "checkpoint_step_20.pt",
        "checkpoint_step_40.pt",
    ]
    return run


# ----------------------------------------------------------------------------- 1. metrics


def _random_case(vocab: int, mode: str, n: int, e: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (n, e), generator=g)
    if mode == "ties":  # integer logits: many entries (and many pair sums) tie with the target
        logits = torch.randint(-2, 3, (n, e, vocab), generator=g).float()
        for i in range(4):  # the top value, shared with other entries: rank 1 all the same
            logits[i].scatter_(1, targets[i][:, None], 2.0)
    else:
        logits = torch.randn(n, e, vocab, generator=g) * 3
        # a few items certainly right at every token, a few right at token 1 only
        for i in range(4):
            logits[i, :, :].scatter_(1, targets[i][:, None], 50.0)
        logits[4:8, 0].scatter_(1, targets[4:8, :1], 50.0)
    return logits, targets


@pytest.mark.parametrize("mode", ["random", "ties"])
@pytest.mark.parametrize("vocab", [7, 12, 20])
def test_item_metrics_match_loop_reference(vocab, mode):
    n = 48
    logits, targets = _random_case(vocab, mode, n, 2, seed=vocab * 7 + len(mode))
    refs = [ref_item(logits[i], targets[i].tolist()) for i in range(n)]
    if mode == "ties":  # the case really exercises ties
        tgt = logits.gather(2, targets[:, :, None])
        assert int(((logits == tgt).sum(2) > 1).sum()) > n // 2
        assert any(r["correct"] for r in refs) and not all(r["correct"] for r in refs)
    else:
        assert sum(r["correct"] for r in refs) >= 4
        assert any(r["rank1"] == 1 and r["rank2"] > 1 for r in refs)

    for k, key in ((0, "rank1"), (1, "rank2")):
        got = token_ranks(logits[:, k], targets[:, k])
        assert got.tolist() == [r[key] for r in refs]
    lp1 = torch.log_softmax(logits[:, 0], -1)
    lp2 = torch.log_softmax(logits[:, 1], -1)
    want_joint = [r["joint_rank"] for r in refs]
    for chunk in (128, 5, 1):
        got = joint_ranks(lp1, lp2, targets[:, 0], targets[:, 1], chunk=chunk)
        assert got.tolist() == want_joint

    m = item_metrics(logits, targets)
    assert m["rr1"].tolist() == [1.0 / r["rank1"] for r in refs]
    assert m["rr2"].tolist() == [1.0 / r["rank2"] for r in refs]
    assert m["rr"].tolist() == [(1.0 / r["rank1"] + 1.0 / r["rank2"]) / 2 for r in refs]
    assert m["rr_joint"].tolist() == [1.0 / r["joint_rank"] for r in refs]
    assert m["correct"].tolist() == [r["correct"] for r in refs]
    assert m["nll"].tolist() == pytest.approx([r["nll"] for r in refs], rel=1e-12)
    # an item right at both tokens is also first among all V x V pairs
    for r, rj in zip(refs, want_joint):
        if r["correct"]:
            assert rj == 1


def test_item_metrics_one_token_entities():
    n, vocab = 30, 11
    for mode in ("random", "ties"):
        logits, targets = _random_case(vocab, mode, n, 1, seed=5)
        assert logits.shape == (n, 1, vocab)
        refs = [ref_item(logits[i], targets[i].tolist()) for i in range(n)]
        m = item_metrics(logits, targets)
        rr1 = [1.0 / r["rank1"] for r in refs]
        assert m["rr1"].tolist() == rr1
        assert m["rr2"].tolist() == rr1
        assert m["rr"].tolist() == rr1
        assert m["rr_joint"].tolist() == rr1
        assert m["correct"].tolist() == [float(r["rank1"] == 1) for r in refs]
        assert m["nll"].tolist() == pytest.approx([r["nll"] for r in refs], rel=1e-12)


def test_joint_ranks_large_vocabulary_matches_pairwise_reference():
    """V = 16015 (V x V doubles would be 2 GB): joint_ranks runs and is exact; the reference
    compares explicit float64 pair sums, a block of rows at a time."""
    v, n = 16015, 3
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, 2, v, generator=g) * 2
    logits[1] = torch.round(logits[1] * 4) / 4  # heavy ties
    targets = torch.stack(
        [
            logits[0].argmax(1),  # joint rank 1
            torch.randint(0, v, (2,), generator=g),
            logits[2].argsort(1, descending=True)[:, 40],  # near the top
        ]
    )
    lp1 = torch.log_softmax(logits[:, 0], -1)
    lp2 = torch.log_softmax(logits[:, 1], -1)
    got = joint_ranks(lp1, lp2, targets[:, 0], targets[:, 1])
    want = []
    rows = 512
    pair_sums = np.empty((rows, v), dtype=np.float64)  # one block of rows of the V x V table
    greater_mask = np.empty((rows, v), dtype=bool)
    for i in range(n):
        a = lp1[i].numpy().astype(np.float64)
        b = lp2[i].numpy().astype(np.float64)
        target = a[targets[i, 0]] + b[targets[i, 1]]
        greater = 0
        for start in range(0, v, rows):
            k = min(rows, v - start)
            np.add(a[start : start + k, None], b[None, :], out=pair_sums[:k])
            np.greater(pair_sums[:k], target, out=greater_mask[:k])
            greater += int(np.count_nonzero(greater_mask[:k]))
        want.append(1 + greater)
    assert got.tolist() == want
    assert want[0] == 1 and want[2] > 1
    m = item_metrics(logits, targets)
    assert m["rr_joint"].tolist() == [1.0 / r for r in want]


# ----------------------------------------------------------------------------- 2. evaluate_split


def _relation_inverse_by_name(token_to_id: dict[str, int]) -> dict[int, int]:
    out = {}
    for tok, i in token_to_id.items():
        if tok.startswith("<r_"):
            partner = tok[:-5] + ">" if tok.endswith("_inv>") else tok[:-1] + "_inv>"
            out[i] = token_to_id[partner]
    return out


@torch.no_grad()
def slow_split_reference(model: GPT2Jepa, split, vocab, e: int):
    """Item by item through Hugging Face's own GPT-2 forward: the losses, and the logits (n, E, V)
    at the positions before the e2 tokens, of the model and of every layer (logit lens)."""
    lm = model.lm
    inverse = _relation_inverse_by_name(vocab.token_to_id)
    ln_f, head = lm.transformer.ln_f, lm.lm_head.weight
    logits_all, ntp, jepa = [], [], []
    layer_logits = [[] for _ in range(model.model_cfg.n_layer + 1)]
    for n in range(len(split)):
        s = split.seq[n]
        out = lm(s[None], output_hidden_states=True)
        logits = out.logits[0, e + 1 : 2 * e + 1].float()  # positions before the e2 tokens
        logits_all.append(logits)
        ntp.append(F.cross_entropy(logits, s[e + 2 :]).item())
        hs = out.hidden_states  # embeddings, block outputs (pre ln_f), last one after ln_f
        for layer, store in enumerate(layer_logits):
            if layer < len(hs) - 1:
                lens = ln_f(hs[layer][0, e + 1 : 2 * e + 1]) @ head.T
            else:
                lens = hs[layer][0, e + 1 : 2 * e + 1] @ head.T
            store.append(lens.float())
        if model.objective.jepa_active and int(split.kind[n]) == KIND_ID["train"]:
            preds = torch.full((model.objective.k_pred_tok,), vocab.pred_id)
            fwd = torch.cat([s, preds])
            rev = torch.cat([s[e + 2 :], torch.tensor([inverse[int(s[e])], int(s[e + 1])]), s[:e]])
            p = lm.transformer(fwd[None]).last_hidden_state[0, -1].double()
            t = lm.transformer(rev[None]).last_hidden_state[0, -1].double()
            jepa.append(1.0 - float(p @ t / (p.norm() * t.norm())))
    o = model.objective
    ntp_loss = sum(ntp) / len(ntp)
    jepa_loss = sum(jepa) / len(jepa) if jepa else 0.0
    losses = {
        "loss": o.gamma_ntp * ntp_loss + (o.lambda_jepa * jepa_loss if o.jepa_active else 0.0),
        "ntp_loss": ntp_loss,
        "jepa_loss": jepa_loss,
        "num_samples": len(split),
    }
    return losses, torch.stack(logits_all), [torch.stack(store) for store in layer_logits]


@pytest.fixture
def one_thread():
    """Many tiny forwards: one intra-op thread is much faster on a small, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_token_dataset(tmp_path_factory):
    d = _write_dataset(tmp_path_factory.mktemp("evdata1") / "D1", comb=0, seed=4)
    return load_dataset(d, with_train=False)


@pytest.mark.parametrize("which", ["two_token", "one_token"])
def test_evaluate_split_matches_per_item_hf_reference(
    which, ev_dataset, one_token_dataset, one_thread, monkeypatch
):
    """The batched evaluator (packed rows, batches of 1, 7, 64 and the logit lens at 16) against
    per-item HF forwards: two float paths, so the rank metrics are checked against the loop
    reference's best and worst ranks under the measured difference of the logits (see
    assert_ranks_match); the random 32-wide model has near-ties (an AMD EPYC decided one
    differently from the reference where an Intel CPU did not)."""
    ds = ev_dataset if which == "two_token" else one_token_dataset
    e = ds.entity_len
    assert e == (2 if which == "two_token" else 1)
    torch.manual_seed(3)
    model = GPT2Jepa(
        ModelConfig(n_layer=2, n_embd=32, n_head=4, dropout=0.1),
        ObjectiveConfig(lambda_jepa=0.5, gamma_ntp=1.5, k_pred_tok=2),
        ds.vocab,
        e,
    )
    spy = LogitSpy(monkeypatch)
    ambiguous = Counter()
    for name in KINDS:
        split = ds.valid[name]
        targets = split.seq[:, e + 2 :]
        model.eval()
        want, ref_logits, ref_layers = slow_split_reference(model, split, ds.vocab, e)
        if name == "train":
            assert want["jepa_loss"] > 1e-3
        else:
            assert want["jepa_loss"] == 0.0
        model.train()  # evaluate_split must switch dropout off and restore the mode
        # every batch size against the reference (so also against each other, within the
        # same bounds): other matmul shapes are other float paths too
        for b in (1, 7, 64):
            got = evaluate_split(model, split, b)
            assert model.training
            assert set(got) == set(METRICS), b
            assert_losses_match(got, want)
            batches = [logits for logits, _ in spy.take()]
            assert [x.shape[0] for x in batches] == [
                min(b, len(split) - i) for i in range(0, len(split), b)
            ]
            ambiguous.update(assert_ranks_match(got, ref_logits, batches, targets))
            assert got["ntp_loss"] == pytest.approx(got["joint_nll"] / e, **LOSS_TOL)
            if e == 1:
                assert got["mrr_token2"] == got["mrr_token1"] == got["mrr_joint"]
        lens = evaluate_split(model, split, 16, per_layer=True)
        assert model.training
        calls = spy.take()
        assert len(lens["per_layer"]) == model.model_cfg.n_layer + 1 == len(ref_layers)
        for layer, (got, ref) in enumerate(zip(lens["per_layer"], ref_layers)):
            assert got["layer"] == layer
            batches = [layers[layer] for _, layers in calls]
            ambiguous.update(assert_ranks_match(got, ref, batches, targets))
        # the last layer's lens is the model's own output: the same tensors, the same numbers
        last = lens["per_layer"][-1]
        for key in ("mrr", "mrr_token1", "mrr_token2", "mrr_joint", "joint_nll", "joint_accuracy"):
            assert last[key] == lens[key]
    print(f"items with an ambiguous rank over all splits, batch sizes and layers: {ambiguous}")


# ----------------------------------------------------------------------------- 3. checkpoints


def _check_table(stdout: str, results: dict) -> None:
    assert header_columns(stdout) == HEADER
    lines = stdout.splitlines()
    for name, m in results["splits"].items():
        row = next(ln for ln in lines if ln.startswith(f"{name} "))
        values = [float(x) for x in row.split()[1:]]
        keys = ("ntp_loss", "mrr", "mrr_token1", "mrr_token2", "mrr_joint", "joint_nll")
        expected = [m[k] for k in keys] + [m["joint_accuracy"], m["entity_mrr"], m["entity_acc"]]
        assert values == pytest.approx(expected, abs=6e-5), name
    s = results["splits"]
    gap = s["train"]["mrr"] - s["test"]["mrr"]
    assert f"train-test MRR gap: {gap:+.4f}" in lines
    assert (
        f"atomic (seen direction) MRR {s['atomic']['mrr']:.4f} vs test (reverse) MRR "
        f"{s['test']['mrr']:.4f}"
    ) in lines


@pytest.mark.parametrize("name", ["checkpoint_step_20.pt", "best_model.pt"])
def test_evaluate_all_splits_script(name, ev_run, ev_data, tmp_path, capsys):
    ckpt = ev_run / "checkpoints" / name
    out = tmp_path / "results.json"
    # fmt: off
    proc = subprocess.run(
        [PYTHON, "evaluate_all_splits.py", "--checkpoint", str(ckpt), "--data_dir", str(ev_data),
         "--batch_size", "32", "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    # fmt: on
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    results = json.loads(out.read_text())
    assert {"checkpoint", "step", "config", "splits"} <= set(results)
    assert results["step"] == load_checkpoint(ckpt)["step"]
    if name.startswith("checkpoint_step_"):
        assert results["step"] == 20
    assert results["config"]["model"]["n_layer"] == N_LAYER
    assert list(results["splits"]) == ["train", "atomic", "test"]
    for split, m in results["splits"].items():
        assert set(m) == set(CKPT_METRICS), split
        assert m["num_samples"] == 40
        assert all(math.isfinite(m[k]) for k in CKPT_METRICS)
        assert 0 < m["mrr_joint"] <= 1 and 0 <= m["joint_accuracy"] <= 1
    _check_table(proc.stdout, results)

    # `revjepa evaluate` in-process: the same numbers
    out2 = tmp_path / "results2.json"
    # fmt: off
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--data_dir", str(ev_data),
               "--batch_size", "32", "--output", str(out2)])
    # fmt: on
    assert rc == 0
    capsys.readouterr()
    again = json.loads(out2.read_text())
    assert again["splits"] == results["splits"], proc.stdout
    assert again["step"] == results["step"] and again["config"] == results["config"]


def test_evaluate_defaults_to_stored_data_dir_and_matches_api(
    ev_run, ev_dataset, tmp_path, capsys, monkeypatch
):
    ckpt = ev_run / "checkpoints" / "checkpoint_step_40.pt"
    out = tmp_path / "r.json"
    spy = LogitSpy(monkeypatch)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["step"] == 40
    _check_table(stdout, results)
    cli_calls = spy.take()
    api = evaluate_checkpoint(ckpt, ev_dataset, batch_size=5)
    sizes = [len(ev_dataset.valid[name]) for name in KINDS]
    # batches of 256 (the default) against batches of 5: other matmul shapes, another float
    # path, so the rank metrics are compared near-ties counted (against the loop reference on
    # the API's logits, which the API's own metrics must match exactly up to exact ties)
    per_split = zip(KINDS, split_batches(cli_calls, sizes), split_batches(spy.take(), sizes))
    for name, cli_batches, api_batches in per_split:
        assert [x[0].shape[0] for x in cli_batches] == [len(ev_dataset.valid[name])]
        ref = torch.cat([logits for logits, _ in api_batches])
        targets = ev_dataset.valid[name].seq[:, ev_dataset.entity_len + 2 :]
        got, want = results["splits"][name], api["splits"][name]
        assert set(got) == set(want) == set(CKPT_METRICS)
        assert_ranks_match(want, ref, [logits for logits, _ in api_batches], targets)
        assert_ranks_match(got, ref, [logits for logits, _ in cli_batches], targets)
        assert_losses_match(got, want)
        assert got["joint_nll"] == pytest.approx(want["joint_nll"], **LOSS_TOL)


def test_evaluate_subset_of_splits(ev_run, ev_data, tmp_path, capsys):
    ckpt = ev_run / "checkpoints" / "checkpoint_step_10.pt"
    out = tmp_path / "r.json"
    # fmt: off
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--data_dir", str(ev_data),
               "--splits", "test, atomic", "--output", str(out)])
    # fmt: on
    assert rc == 0
    capsys.readouterr()
    assert list(json.loads(out.read_text())["splits"]) == ["test", "atomic"]


def test_per_layer_logit_lens(ev_run, ev_data, tmp_path, capsys):
    ckpt = ev_run / "checkpoints" / "checkpoint_step_40.pt"
    plain, lens = tmp_path / "plain.json", tmp_path / "lens.json"
    base = ["evaluate", "--checkpoint", str(ckpt), "--data_dir", str(ev_data), "--batch_size", "16"]
    assert main(base + ["--output", str(plain)]) == 0
    assert main(base + ["--per_layer", "--output", str(lens)]) == 0
    stdout = capsys.readouterr().out
    plain_r, lens_r = json.loads(plain.read_text()), json.loads(lens.read_text())
    for name in KINDS:
        m = lens_r["splits"][name]
        layers = m.pop("per_layer")
        assert m == plain_r["splits"][name]  # --per_layer does not change the metrics
        assert [layer["layer"] for layer in layers] == list(range(N_LAYER + 1))
        last = layers[-1]
        for key in ("mrr", "mrr_token1", "mrr_token2", "mrr_joint", "joint_nll", "joint_accuracy"):
            assert last[key] == m[key], (name, key)
    assert re.search(r"^\s+L0\s", stdout, re.M) and re.search(rf"^\s+L{N_LAYER}\s", stdout, re.M)


# ----------------------------------------------------------------------------- 4./5. sweep, plot


@pytest.fixture(scope="module")
def swept(ev_run, ev_data, ev_dataset, tmp_path_factory):
    """A copy of the run, swept once; returns (run copy, stdout of the sweep)."""
    run = tmp_path_factory.mktemp("evsweep") / "R"
    shutil.copytree(ev_run, run)
    argv = ["evaluate", "--checkpoint", str(run / "checkpoints"), "--data_dir", str(ev_data)]
    return run, argv


def _measured_out(record: dict) -> dict:
    """A record without `--entity_mrr auto`'s estimate (its seconds come from a matmul timed
    at the time: the metrics are exact, the estimate is a measurement)."""
    return {k: v for k, v in record.items() if k != "entity_mrr_estimate"}


def _sweep(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


def test_directory_sweep_is_resumable(swept, ev_dataset, capsys):
    run, argv = swept
    record_path = run / "eval_all.jsonl"
    stdout = _sweep(argv, capsys)
    lines = record_path.read_text().splitlines()
    records = [json.loads(ln) for ln in lines]
    assert [r["step"] for r in records] == [10, 20, 40]
    assert stdout.count("split     NTP loss") == 3
    for r in records:
        assert set(r["splits"]) == set(KINDS)
        for m in r["splits"].values():
            assert set(m) == set(CKPT_METRICS)
    api = evaluate_checkpoint(run / "checkpoints" / "checkpoint_step_20.pt", ev_dataset, 256)
    assert records[1]["splits"] == api["splits"]
    for split, (step, mrr) in best_steps(records).items():
        assert mrr == max(r["splits"][split]["mrr"] for r in records)
        assert f"best {split} MRR {mrr:.4f} at step {step}" in stdout

    # again, naming the run directory itself: nothing re-evaluated, nothing appended, the best
    # steps still printed; --output gets the records
    out_json = run.parent / "sweep.json"
    stdout = _sweep(
        ["evaluate", "--checkpoint", str(run), *argv[3:], "--output", str(out_json)], capsys
    )
    assert record_path.read_text().splitlines() == lines
    assert json.loads(out_json.read_text()) == records
    assert "NTP loss" not in stdout
    assert all(f"best {split} MRR" in stdout for split in KINDS)

    # lose the last record: only that step is evaluated again
    record_path.write_text("\n".join(lines[:-1]) + "\n")
    stdout = _sweep(argv, capsys)
    assert stdout.count("NTP loss") == 1 and "step 40  (" in stdout
    new_lines = record_path.read_text().splitlines()
    assert new_lines[:2] == lines[:2]
    assert _measured_out(json.loads(new_lines[2])) == _measured_out(records[2])

    # a half-written last line (killed sweep): that step is redone and the file stays readable
    record_path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    stdout = _sweep(argv, capsys)
    assert stdout.count("NTP loss") == 1 and "step 40  (" in stdout
    assert [r["step"] for r in read_jsonl(record_path)] == [10, 20, 40]
    assert _measured_out(read_jsonl(record_path)[-1]) == _measured_out(records[2])
    stdout = _sweep(argv, capsys)
    assert "NTP loss" not in stdout
    assert [r["step"] for r in read_jsonl(record_path)] == [10, 20, 40]


def test_plot_png(swept, tmp_path, capsys):
    run, argv = swept
    if not (run / "eval_all.jsonl").exists():
        _sweep(argv, capsys)
    assert read_jsonl(run / "metrics.jsonl") and read_jsonl(run / "eval_all.jsonl")
    out = tmp_path / "sub" / "X.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    assert f"wrote {out}" in capsys.readouterr().out


def test_plot_without_records_fails_cleanly(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no metrics.jsonl" in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 6. export


def test_export_loads_in_transformers(ev_run, ev_dataset, tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    ckpt = ev_run / "checkpoints" / "checkpoint_step_40.pt"
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), str(out)]) == 0
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    model, _ = model_from_checkpoint(load_checkpoint(ckpt), ev_dataset)
    model.eval()
    split = ev_dataset.valid["test"]
    e = ev_dataset.entity_len
    with torch.no_grad():
        hf_logits = hf(split.seq).logits
        ours = model(split.seq, split.kind, with_logits=True).logits
        lm_logits = model.lm(split.seq).logits
    torch.testing.assert_close(hf_logits, lm_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(hf_logits[:, e + 1 : 2 * e + 1], ours, rtol=0, atol=1e-5)
    assert json.loads((out / "vocab.json").read_text()) == ev_dataset.vocab.token_to_id
    assert json.loads((out / "revjepa.json").read_text())["step"] == 40
    capsys.readouterr()

    before = snapshot(out)
    assert main(["export", str(ckpt), str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not empty" in err
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- 7. errors


@pytest.fixture(scope="module")
def error_runs(ev_run, ev_data, tmp_path_factory):
    """The bad-file cases, each its own process (as a user runs them), all started at once;
    returns the results and the file snapshots taken before and after."""
    work = tmp_path_factory.mktemp("everr")
    ckpt = ev_run / "checkpoints" / "checkpoint_step_20.pt"
    (work / "random.pt").write_bytes(random.Random(0).randbytes(8192))
    raw = ckpt.read_bytes()
    (work / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    other = _write_dataset(work / "D_other", num_rel_pairs=3)
    nosplit = work / "D_nosplit"
    shutil.copytree(ev_data, nosplit)
    valid = json.loads((nosplit / "valid.json").read_text())
    del valid["atomic"]
    (nosplit / "valid.json").write_text(json.dumps(valid))
    outs = work / "outs"
    outs.mkdir()
    script = [PYTHON, "evaluate_all_splits.py"]
    module = [PYTHON, "-m", "revjepa", "evaluate"]
    d = ["--data_dir", str(ev_data)]
    cases = {
        "missing": (script + ["--checkpoint", str(work / "nope.pt")] + d, "checkpoint not found"),
        "corrupt": (script + ["--checkpoint", str(work / "random.pt")] + d, "random.pt"),
        "truncated": (script + ["--checkpoint", str(work / "truncated.pt")] + d, "truncated"),
        "vocab_mismatch": (
            module + ["--checkpoint", str(ckpt), "--data_dir", str(other)],
            "does not match",
        ),
        "missing_split": (
            module + ["--checkpoint", str(ckpt), "--data_dir", str(nosplit)],
            "missing split 'atomic'",
        ),
    }
    roots = (ev_run, ev_data, work)
    before = snapshot(*roots)
    procs = {
        name: subprocess.Popen(
            argv + ["--output", str(outs / f"{name}.json")],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (argv, _) in cases.items()
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        results[name] = (proc.returncode, stdout, stderr, cases[name][1])
    return results, before, snapshot(*roots)


def _assert_one_line_error(rc: int, stdout: str, stderr: str, needle: str) -> None:
    assert rc == 2, (stdout, stderr)
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert stdout == ""


@pytest.mark.parametrize(
    "case", ["missing", "corrupt", "truncated", "vocab_mismatch", "missing_split"]
)
def test_one_line_errors_bad_files(case, error_runs):
    results, before, after = error_runs
    _assert_one_line_error(*results[case])
    assert after == before  # nothing written, nothing changed (no --output file either)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--splits", "train,bogus"], "--splits: unknown split(s) ['bogus']"),
        (["--splits", ","], "--splits"),
        (["--batch_size", "0"], "--batch_size must be positive, got 0"),
        (["--batch_size", "-3"], "--batch_size must be positive"),
    ],
)
def test_one_line_errors_bad_flags(extra, needle, ev_run, ev_data, tmp_path, capfd):
    ckpt = ev_run / "checkpoints" / "checkpoint_step_20.pt"
    out = tmp_path / "r.json"
    before = snapshot(ev_run, ev_data, tmp_path)
    # fmt: off
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--data_dir", str(ev_data),
               "--output", str(out), *extra])
    # fmt: on
    _assert_one_line_error(rc, *capfd.readouterr(), needle)
    assert snapshot(ev_run, ev_data, tmp_path) == before


def test_one_line_error_directory_without_checkpoints(ev_data, tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "empty"), "--data_dir", str(ev_data)])
    _assert_one_line_error(rc, *capfd.readouterr(), "no checkpoint_step_*.pt files")
    assert list((tmp_path / "empty").iterdir()) == []


def test_loss_term_keys_are_the_families_terms():
    """What the log line and `revjepa plot` draw beside the total: each family's named terms
    (mlm_u's `mlm_loss` too), never the evaluations' `eval_*_loss`."""
    from revjepa.runlog import loss_term_keys

    records = [
        {"step": 1, "loss": 1.0, "mlm_loss": 1.0},
        {"step": 2, "loss": 1.0, "ntp_loss": 0.5, "jepa_loss": 0.5, "eval_test_ntp_loss": 2.0},
    ]
    assert loss_term_keys(records) == ["mlm_loss", "ntp_loss", "jepa_loss"]
    assert loss_term_keys([{"step": 3, "loss": 2.0, "eval_test_loss": 2.0}]) == []
