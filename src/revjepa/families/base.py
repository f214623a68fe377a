"""The contract of a model family (`LossFamily`) and what its forward pass returns
(`LossOutput`): the trainer, evaluator, bench and export see a model only through these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, ObjectiveConfig
from ..data import Vocab
from ..ops import TORCH_OPS, StepOps


@dataclass
class LossOutput:
    """Sums and counts (not means) so that callers can normalise by global counts under DDP."""

    sums: dict[str, torch.Tensor]  # per named loss term of the family (`loss_terms`), in order
    counts: dict[str, torch.Tensor]  # the items each sum is over
    pred_embeddings: torch.Tensor | None = None  # (n, d), detached, for the collapse signal
    pred_rows: torch.Tensor | None = None  # (n,) bool: which pred_embeddings are real (None: all)
    logits: torch.Tensor | None = None  # (B, E, V) float32 in batch order, when asked
    layer_logits: list[torch.Tensor] | None = None  # per layer (B, E, V), logit lens

    def jepa_embeddings(self) -> torch.Tensor | None:
        """The pred embeddings of real JEPA items (a host sync: for log steps only)."""
        if self.pred_embeddings is None or self.pred_rows is None:
            return self.pred_embeddings
        return self.pred_embeddings[self.pred_rows]


def collapse_signal(pred: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean pairwise cosine and mean per-dimension std of the batch's pred embeddings."""
    n = pred.shape[0]
    if n < 2:
        nan = pred.new_tensor(float("nan"))
        return {"pred_mean_cos": nan, "pred_std": nan}
    unit = F.normalize(pred.float(), dim=-1)
    total = unit.sum(0)
    mean_cos = (total @ total - n) / (n * (n - 1))
    return {"pred_mean_cos": mean_cos, "pred_std": pred.float().std(0).mean()}


class LossFamily(nn.Module):
    """What the trainer, evaluator and bench see of a model family: batch (seq, kind) -> loss
    sums, in two halves: `prepare` (host side: packing plans, anything data-dependent) and
    `losses(*prepared)` (device side, fixed shapes for fixed input shapes: the half that
    torch.compile and CUDA graphs take). `ops`: the implementations of the block and head ops
    this model calls, plain torch unless set up otherwise (`revjepa.cpu.use_cpu_kernels`).

    The rest of the contract, which every family defines: `family` (its registry name,
    `families`), `loss_terms` (the names of its loss sums, each a key of
    `config.LOSS_TERM_WEIGHTS`: `ntp`, `jepa`, `mlm`, weighted by `ObjectiveConfig.total`; each
    is logged as `<name>_loss`), `headline_metric` (the evaluation metric that picks best_model.pt),
    `step_cost(kind)` (tokens and FLOPs of a training step), `evaluate_split(split,
    batch_size, per_layer, entity_mrr, progress)` (its metrics; `progress` a
    `revjepa.progress.Bar` it advances by the items done), `entity_metric_flops(n)` (the cost of
    its optional entity metric, for `--entity_mrr auto`), `format_table(results)` (its evaluation
    table), `hf_state_dict` / `load_hf_state_dict` (checkpoint weights), optionally
    `checkpoint_extras` / `load_checkpoint_extras` (data tables stored beside the weights),
    `export_pretrained(dir)`, optionally `check_config` (the configurations it refuses).

    Randomness: a family that draws at training time (dropout aside) draws on the host in
    `prepare`, in training mode only, from torch's default CPU generator: the trainer seeds it
    (--seed) and saves and restores it with every checkpoint, so a resumed run draws what an
    uninterrupted one does; evaluation must draw nothing (it would shift the stream).
    """

    family: str
    headline_metric: str
    loss_terms: tuple[str, ...]  # the named terms of `LossOutput.sums`, weighted by the config
    comparable_metric: str  # the metric on one scale with every family's (revjepa report)
    ops: StepOps = TORCH_OPS

    def checkpoint_extras(self) -> dict[str, Any]:
        """Data tables a checkpoint stores beside `model_state_dict` (top-level keys)."""
        return {}

    def load_checkpoint_extras(self, state: dict[str, Any], train_seq=None) -> None:
        """Restore `checkpoint_extras` from a checkpoint (`train_seq`: a fallback source)."""

    def entity_metric_flops(self, n_items: int) -> float | None:
        """FLOPs that `evaluate_split(..., entity_mrr=True)` adds over `n_items` items: an
        upper bound (no pruning), from which `--entity_mrr auto` decides. 0.0: nothing extra (a
        family whose entity metric is always computed); None: not computable (no entity table)."""
        return 0.0

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Raise UserError (one line) for a `RunConfig` this family cannot train; called by
        `RunConfig.validate`, so that `revjepa train` and `revjepa sweep` refuse it before
        anything starts. The flags that only some families read are `config.FAMILY_ONLY_FIELDS`."""

    @classmethod
    def needs_train_data(cls, state: dict[str, Any], entity_mrr: bool) -> bool:
        """Whether evaluating this checkpoint needs the training data's sequences (a table
        that older checkpoints of the family lack); the evaluator loads train.json only then."""
        return False

    @classmethod
    def build(
        cls,
        model_cfg: ModelConfig,
        objective: ObjectiveConfig,
        vocab: Vocab,
        entity_len: int,
        train_seq: torch.Tensor | None = None,
    ) -> LossFamily:
        """A fresh model of this family (`train_seq`: see `families.build_model`)."""
        return cls(model_cfg, objective, vocab, entity_len)

    def forward(
        self,
        seq: torch.Tensor,
        kind: torch.Tensor,
        jepa_keep: torch.Tensor | None = None,
        with_logits: bool = False,
        per_layer: bool = False,
    ) -> LossOutput:
        return self.losses(
            *self.prepare(seq, kind, jepa_keep), with_logits=with_logits, per_layer=per_layer
        )
