"""Exact, vectorized evaluation metrics; evaluation of a checkpoint or of a whole run.

For an item with target tokens t1 (t2): p1 = softmax of the logits before t1, p2 = softmax at t1
(teacher-forced). rank(t) = 1 + #{vocabulary entries with a strictly larger logit}.
  mrr_token1, mrr_token2, mrr = mean over items of (1/rank1 + 1/rank2) / 2
  joint_accuracy = share of items with rank1 = rank2 = 1
  joint_nll = mean of -(log p1[t1] + log p2[t2])
  mrr_joint = mean of 1/rank of (t1, t2) among all V x V pairs scored log p1[i] + log p2[j],
              computed by sorting log p2 and binary-searching (never V x V); log-probabilities
              come from float32 logits, pair scores are compared in float64.
With one-token entities the token-2 and joint metrics equal the token-1 ones.

Entity-level (gpt2_jepa's `entity_mrr`, comparable with concept_jepa's `concept_mrr_full`): the
rank of the true tail among the entities of the run's entity table, scored by the chain rule
log p(c1) + log p(c2 | c1) + ..., each candidate teacher-forced on its own tokens. The model
side is in `families/gpt2_jepa.py`; here are the table's prefix tree (`EntityTrie`) and the chance level
(`chance_mrr`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METRIC_KEYS = (
    "loss",
    "ntp_loss",
    "jepa_loss",
    "mrr",
    "mrr_token1",
    "mrr_token2",
    "mrr_joint",
    "joint_nll",
    "joint_accuracy",
)


def token_ranks(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """rank = 1 + number of entries with a strictly larger logit. logits (n, V), target (n,)."""
    target_logit = logits.gather(1, target[:, None])
    return 1 + (logits > target_logit).sum(1)


def joint_ranks(
    logp1: torch.Tensor, logp2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, chunk: int = 128
) -> torch.Tensor:
    """1 + #{(i, j): logp1[i] + logp2[j] > logp1[t1] + logp2[t2]}, O(V log V) per item."""
    out = []
    v = logp2.shape[1]
    for start in range(0, logp1.shape[0], chunk):
        a = logp1[start : start + chunk].double()
        b = logp2[start : start + chunk]
        target = (
            a.gather(1, t1[start : start + chunk, None])
            + b.gather(1, t2[start : start + chunk, None]).double()
        )
        # sorted in the input's precision (float32: half the bytes to move), then widened: the
        # widening is exact, so this is the float64 sort of the same values
        sorted_b = b.sort(1).values.double()
        # For each i: #{j : b[j] > target - a[i]} = V - #{j : b[j] <= target - a[i]}
        not_greater = torch.searchsorted(sorted_b, target - a, right=True)
        out.append(1 + (v - not_greater).sum(1))
    return torch.cat(out)


def item_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-item metric values from teacher-forced logits (n, E, V) and target tokens (n, E)."""
    logits = logits.float()
    logp1 = torch.log_softmax(logits[:, 0], -1)
    t1 = targets[:, 0]
    rank1 = token_ranks(logits[:, 0], t1)
    nll1 = -logp1.gather(1, t1[:, None]).squeeze(1)
    if logits.shape[1] == 1:
        rr1 = 1.0 / rank1.double()
        return {
            "rr1": rr1,
            "rr2": rr1,
            "rr": rr1,
            "correct": (rank1 == 1).double(),
            "nll": nll1.double(),
            "rr_joint": rr1,
        }
    logp2 = torch.log_softmax(logits[:, 1], -1)
    t2 = targets[:, 1]
    rank2 = token_ranks(logits[:, 1], t2)
    nll2 = -logp2.gather(1, t2[:, None]).squeeze(1)
    rr1, rr2 = 1.0 / rank1.double(), 1.0 / rank2.double()
    return {
        "rr1": rr1,
        "rr2": rr2,
        "rr": (rr1 + rr2) / 2,
        "correct": ((rank1 == 1) & (rank2 == 1)).double(),
        "nll": nll1.double() + nll2.double(),
        "rr_joint": 1.0 / joint_ranks(logp1, logp2, t1, t2).double(),
    }


def summarise(items: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    cat = {k: torch.cat(v) for k, v in items.items()}
    return {
        "mrr": cat["rr"].mean().item(),
        "mrr_token1": cat["rr1"].mean().item(),
        "mrr_token2": cat["rr2"].mean().item(),
        "mrr_joint": cat["rr_joint"].mean().item(),
        "joint_nll": cat["nll"].mean().item(),
        "joint_accuracy": cat["correct"].mean().item(),
    }


# ----------------------------------------------------------------------------- entity level


def chance_mrr(n: int) -> float:
    """Mean of 1/rank for a uniformly random ranking of n candidates: H_n / n (about ln n / n)."""
    if n < 1:
        raise ValueError(f"chance_mrr needs at least one candidate, got {n}")
    return math.fsum(1.0 / k for k in range(1, n + 1)) / n


def row_index(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Index of each row of `rows` (n, w) in `table` (m, w) of distinct rows; -1 when absent."""
    m = table.shape[0]
    if m == 0 or rows.shape[0] == 0:
        return torch.full((rows.shape[0],), -1, dtype=torch.long, device=rows.device)
    _, inverse = torch.unique(torch.cat([table, rows]), dim=0, return_inverse=True)
    row_of = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.long, device=rows.device)
    row_of[inverse[:m]] = torch.arange(m, device=rows.device)
    return row_of[inverse[m:]]


@dataclass
class EntityTrie:
    """The prefix tree of an entity table (N, L). Depth j = 0..L holds `nodes[j]` (K_j, j), the
    distinct length-j prefixes, sorted (depth 0: the root, depth L: the entities). The children
    of node k at depth j are nodes[j + 1][start[j][k] : start[j][k] + count[j][k]]."""

    nodes: list[torch.Tensor]
    start: list[torch.Tensor]
    count: list[torch.Tensor]

    @property
    def depth(self) -> int:
        return len(self.nodes) - 1

    @property
    def size(self) -> int:
        """The number of entities."""
        return int(self.nodes[-1].shape[0])


def entity_trie(entities: torch.Tensor) -> EntityTrie:
    """The prefix tree of an (N, L) int64 entity table (duplicate rows count once)."""
    if entities.dim() != 2 or entities.shape[1] < 1:
        raise ValueError(f"entity table must be (N, L >= 1), got {tuple(entities.shape)}")
    nodes = [entities.new_zeros((1, 0))]
    start, count = [], []
    for j in range(1, entities.shape[1] + 1):
        level = torch.unique(entities[:, :j], dim=0)  # sorted rows: siblings are contiguous
        if j == 1:
            parent = torch.zeros(level.shape[0], dtype=torch.long, device=entities.device)
        else:
            parent = row_index(nodes[-1], level[:, : j - 1])
        c = torch.bincount(parent, minlength=nodes[-1].shape[0])
        start.append(c.cumsum(0) - c)
        count.append(c)
        nodes.append(level)
    return EntityTrie(nodes, start, count)
