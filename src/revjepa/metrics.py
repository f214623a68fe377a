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
"""

from __future__ import annotations

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
        b = logp2[start : start + chunk].double()
        target = a.gather(1, t1[start : start + chunk, None]) + b.gather(
            1, t2[start : start + chunk, None]
        )
        sorted_b = b.sort(1).values
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
