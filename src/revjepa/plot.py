"""One PNG per run: training losses and validation MRR per split against step."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .evaluate import read_jsonl
from .runlog import loss_term_keys


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval_all.jsonl")
    if not metrics and not evals:
        raise UserError(f"{run_dir}: no metrics.jsonl or eval_all.jsonl records to plot")
    out = out or run_dir / "training_curves.png"
    fig, (ax_loss, ax_mrr) = plt.subplots(1, 2, figsize=(12, 4.5))
    train_rows = [r for r in metrics if "loss" in r]
    terms = [(k, k[: -len("_loss")].upper()) for k in loss_term_keys(train_rows)]
    for key, label in (("loss", "total"), *terms):  # the total, then the family's named terms
        pts = [(r["step"], r[key]) for r in train_rows if r.get(key) is not None]
        if pts:
            ax_loss.plot(*zip(*pts), label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.set_title("training losses")
    for split in ("train", "atomic", "test"):
        pts = [
            (r["step"], r["splits"][split]["mrr"]) for r in evals if split in r.get("splits", {})
        ]
        if pts:
            ax_mrr.plot(*zip(*pts), marker="o", label=f"{split} (checkpoints)")
        key = f"eval_{split}_mrr"
        pts = [(r["step"], r[key]) for r in metrics if key in r]
        if pts:
            ax_mrr.plot(*zip(*pts), linestyle="--", label=f"{split} (during training)")
    ax_mrr.set_xlabel("step")
    ax_mrr.set_ylabel("MRR")
    ax_mrr.set_ylim(0, 1.02)
    ax_mrr.legend()
    ax_mrr.set_title("MRR per split")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
