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

import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoint import list_checkpoints, load_checkpoint
from .config import RunConfig
from .data import KINDS, Dataset, Split, vocab_from_mapping
from .errors import UserError
from .model import build_model
from .runlog import append_jsonl, read_jsonl

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


def _summarise(items: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    cat = {k: torch.cat(v) for k, v in items.items()}
    return {
        "mrr": cat["rr"].mean().item(),
        "mrr_token1": cat["rr1"].mean().item(),
        "mrr_token2": cat["rr2"].mean().item(),
        "mrr_joint": cat["rr_joint"].mean().item(),
        "joint_nll": cat["nll"].mean().item(),
        "joint_accuracy": cat["correct"].mean().item(),
    }


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module, split: Split, batch_size: int, per_layer: bool = False
) -> dict[str, Any]:
    """All metrics of one split, float32, eval mode, batches as tensor slices."""
    if hasattr(model, "evaluate_split"):  # a model family with its own metrics
        return model.evaluate_split(split, batch_size, per_layer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seq, kind = split.seq.to(device), split.kind.to(device)
    e = seq.shape[1] // 2 - 1
    sums = {"ntp_sum": 0.0, "ntp_count": 0.0, "jepa_sum": 0.0, "jepa_count": 0.0}
    items: dict[str, list[torch.Tensor]] = {}
    layer_items: list[dict[str, list[torch.Tensor]]] = []
    for start in range(0, seq.shape[0], batch_size):
        s, k = seq[start : start + batch_size], kind[start : start + batch_size]
        out = model(s, k, with_logits=True, per_layer=per_layer)
        for name in sums:
            sums[name] += float(getattr(out, name))
        for name, value in item_metrics(out.logits, s[:, e + 2 :]).items():
            items.setdefault(name, []).append(value.cpu())
        if per_layer:
            if not layer_items:
                layer_items = [{} for _ in out.layer_logits]
            for store, logits in zip(layer_items, out.layer_logits):
                for name, value in item_metrics(logits, s[:, e + 2 :]).items():
                    store.setdefault(name, []).append(value.cpu())
    model.train(was_training)
    objective = model.objective
    ntp = sums["ntp_sum"] / max(sums["ntp_count"], 1.0)
    jepa = sums["jepa_sum"] / sums["jepa_count"] if sums["jepa_count"] else 0.0
    result: dict[str, Any] = {
        "loss": objective.total(ntp, jepa),
        "ntp_loss": ntp,
        "jepa_loss": jepa,
        **_summarise(items),
        "num_samples": int(seq.shape[0]),
    }
    if per_layer:
        result["per_layer"] = [
            dict(layer=i, **_summarise(store)) for i, store in enumerate(layer_items)
        ]
    return result


# ----------------------------------------------------------------------------- checkpoints


def model_from_checkpoint(
    state: dict[str, Any], dataset: Dataset | None = None, where: str = "checkpoint"
) -> tuple[torch.nn.Module, RunConfig]:
    """Rebuild the model from the configuration stored in a checkpoint (data only to cross-check)."""
    config = RunConfig.from_dict(state["config"])
    vocab = vocab_from_mapping(state.get("vocab"), f"{where} (stored vocabulary)")
    entity_len = int(state.get("entity_len", 0))
    if dataset is not None:
        if dataset.vocab.token_to_id != vocab.token_to_id:
            raise UserError(
                f"{where}: its vocabulary ({vocab.size} tokens) does not match the "
                f"data directory's vocab.json ({dataset.vocab.size} tokens)"
            )
        if dataset.entity_len != entity_len:
            raise UserError(
                f"{where}: trained on {entity_len}-token entities, the data has "
                f"{dataset.entity_len}-token entities"
            )
    model = build_model(config.model, config.objective, vocab, entity_len)
    try:
        model.load_hf_state_dict(state["model_state_dict"])
    except (RuntimeError, KeyError) as exc:
        raise UserError(
            f"{where}: model weights do not fit its configuration: {str(exc).splitlines()[0][:200]}"
        ) from None
    return model, config


def evaluate_checkpoint(
    path: Path,
    dataset: Dataset,
    batch_size: int,
    splits: tuple[str, ...] = KINDS,
    per_layer: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    state = load_checkpoint(path)
    model, config = model_from_checkpoint(state, dataset, str(path))
    model.to(device)
    results = {
        "checkpoint": str(path),
        "step": int(state.get("step", 0)),
        "config": config.to_dict(),
        "eval_batch_size": batch_size,
        "splits": {
            name: evaluate_split(model, dataset.valid[name], batch_size, per_layer)
            for name in splits
        },
    }
    return results


def format_concept_table(results: dict[str, Any]) -> str:
    """The table of a concept_jepa result (see revjepa.concept)."""
    splits = results["splits"]
    first = next(iter(splits.values()), {"concept_batch_size": 0, "num_entities": 0})
    header = (
        f"{'split':<8} {'concept loss':>13} {'concept MRR (in-batch)':>23} {'concept MRR full':>17}"
    )
    lines = [f"step {results['step']}  ({results['checkpoint']})", header, "-" * len(header)]
    for name, m in splits.items():
        lines.append(
            f"{name:<8} {m['concept_loss']:>13.4f} {m['concept_mrr']:>23.4f} "
            f"{m['concept_mrr_full']:>17.4f}"
        )
        for layer in m.get("per_layer", []):
            lines.append(
                f"  L{layer['layer']:<5} {'':>13} {'':>23} {layer['concept_mrr_full']:>17.4f}"
            )
    lines.append(
        f"in-batch candidates: batches of {first['concept_batch_size']} items; full: all "
        f"{first['num_entities']} entities"
    )
    if "atomic" in splits and "test" in splits:
        lines.append(
            f"atomic (seen direction) concept MRR full {splits['atomic']['concept_mrr_full']:.4f} "
            f"vs test (reverse) {splits['test']['concept_mrr_full']:.4f}"
        )
    return "\n".join(lines)


def format_table(results: dict[str, Any]) -> str:
    if any("concept_mrr_full" in m for m in results["splits"].values()):
        return format_concept_table(results)
    header = (
        f"{'split':<8} {'NTP loss':>9} {'MRR avg':>8} {'MRR tok1':>9} {'MRR tok2':>9} "
        f"{'MRR joint':>10} {'joint NLL':>10} {'joint acc':>10}"
    )
    lines = [f"step {results['step']}  ({results['checkpoint']})", header, "-" * len(header)]
    for name, m in results["splits"].items():
        lines.append(
            f"{name:<8} {m['ntp_loss']:>9.4f} {m['mrr']:>8.4f} {m['mrr_token1']:>9.4f} "
            f"{m['mrr_token2']:>9.4f} {m['mrr_joint']:>10.4f} {m['joint_nll']:>10.4f} "
            f"{m['joint_accuracy']:>10.4f}"
        )
        for layer in m.get("per_layer", []):
            lines.append(
                f"  L{layer['layer']:<5} {'':>9} {layer['mrr']:>8.4f} "
                f"{layer['mrr_token1']:>9.4f} {layer['mrr_token2']:>9.4f} "
                f"{layer['mrr_joint']:>10.4f} {layer['joint_nll']:>10.4f} "
                f"{layer['joint_accuracy']:>10.4f}"
            )
    s = results["splits"]
    if "train" in s and "test" in s:
        lines.append(f"train-test MRR gap: {s['train']['mrr'] - s['test']['mrr']:+.4f}")
    if "atomic" in s and "test" in s:
        lines.append(
            f"atomic (seen direction) MRR {s['atomic']['mrr']:.4f} vs test (reverse) "
            f"MRR {s['test']['mrr']:.4f}"
        )
    return "\n".join(lines)


def sweep_directory(
    ckpt_dir: Path, dataset: Dataset, batch_size: int, per_layer: bool, device: str, log=print
) -> list[dict[str, Any]]:
    """Evaluate every checkpoint of a run in step order; resumable through eval_all.jsonl."""
    checkpoints = list_checkpoints(ckpt_dir)
    if not checkpoints:
        raise UserError(f"{ckpt_dir}: no checkpoint_step_*.pt files")
    run_dir = ckpt_dir.parent if ckpt_dir.name == "checkpoints" else ckpt_dir
    record_path = run_dir / "eval_all.jsonl"
    done = {r["step"]: r for r in read_jsonl(record_path)}
    if record_path.is_file() and record_path.stat().st_size:
        with open(record_path, "rb+") as fh:
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":  # a killed sweep's half line: end it (read_jsonl skips it)
                fh.write(b"\n")
    records = []
    for step, path in checkpoints:
        if step in done:
            records.append(done[step])
            continue
        try:
            result = evaluate_checkpoint(
                path, dataset, batch_size, per_layer=per_layer, device=device
            )
        except UserError as exc:
            print(f"skipping: {exc}", file=sys.stderr)
            continue
        result.pop("config")
        append_jsonl(record_path, result)
        records.append(result)
        log(format_table(result))
    return records


def best_steps(records: list[dict[str, Any]]) -> dict[str, tuple[int, float]]:
    best: dict[str, tuple[int, float]] = {}
    for r in records:
        for name, m in r["splits"].items():
            if name not in best or m["mrr"] > best[name][1]:
                best[name] = (r["step"], m["mrr"])
    return best
