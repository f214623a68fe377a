"""The model families and their registry: a family is a `base.LossFamily` subclass with a
`family` name, in a module of this package (`gpt2_jepa`, `concept_jepa`, `mlm_u`); the trainer,
evaluator, bench and export build models only through `build_model`, so a new family is one
module and one line here, and touches no trainer or evaluator file. A model is rebuilt from a
checkpoint here too (`model_from_checkpoint`)."""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig, ObjectiveConfig, RunConfig
from ..data import Dataset, Vocab, vocab_from_mapping
from ..errors import UserError
from .base import LossFamily
from .concept_jepa import ConceptJepa
from .gpt2_jepa import GPT2Jepa
from .mlm_u import MlmU

FAMILIES: dict[str, type[LossFamily]] = {cls.family: cls for cls in (GPT2Jepa, ConceptJepa, MlmU)}


def build_model(
    model_cfg: ModelConfig,
    objective: ObjectiveConfig,
    vocab: Vocab,
    entity_len: int,
    train_seq: torch.Tensor | None = None,
) -> LossFamily:
    """The model of the configured family.

    `train_seq` (the training sequences) gives a family data-derived tables (concept_jepa's
    entity table); without it (a model rebuilt from a checkpoint) they come with the weights
    in `load_hf_state_dict`.
    """
    cls = FAMILIES.get(model_cfg.family)
    if cls is None:
        raise UserError(
            f"unknown model family {model_cfg.family!r}; choose from {', '.join(FAMILIES)}"
        )
    return cls.build(model_cfg, objective, vocab, entity_len, train_seq)


def model_from_checkpoint(
    state: dict[str, Any], dataset: Dataset | None = None, where: str = "checkpoint"
) -> tuple[torch.nn.Module, RunConfig]:
    """Rebuild the model from the configuration stored in a checkpoint (data only to cross-check,
    and as the source of tables that checkpoints older than them lack: gpt2_jepa's entity
    table comes from `dataset.train` when the checkpoint has none)."""
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
    train = dataset.train if dataset is not None else None
    try:  # data tables stored beside the weights (gpt2_jepa's entity table)
        model.load_checkpoint_extras(state, None if train is None else train.seq)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return model, config
