"""The one typed run configuration: model, objective and training fields, validated in one place.

Every field is a command-line flag of `revjepa train` / `train_jepa.py` (same name, underscores),
and the whole configuration is written as plain data to `training_args.json` and into every
checkpoint, so a checkpoint alone is enough to rebuild its model.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import UserError

DISTANCE_METRICS = ("cosine", "l2", "mse", "infonce")
SCHEDULERS = ("constant_with_warmup", "linear", "cosine")
SPLITS = ("train", "atomic", "test")
# the registered families (families.FAMILIES); a list so that one registered elsewhere can be added
MODEL_FAMILIES = ["gpt2_jepa", "concept_jepa", "mlm_u"]
PRECISIONS = ("fp32", "bf16", "fp16")
CONCEPT_NORMS = ("rms", "layernorm")
CONCEPT_CANDIDATES = ("all", "entities")
ON_OFF = ("on", "off")
# --reverse_training (Golovneva et al. 2024): how each training item is reversed (data.py)
REVERSE_TRAINING = ("none", "entity", "token")
# The named loss terms a family may declare (`LossFamily.loss_terms`) and the objective field
# of their weight; None: weight 1 (the only term of its family: a weight would only scale lr).
LOSS_TERM_WEIGHTS = {"ntp": "gamma_ntp", "jepa": "lambda_jepa", "mlm": None}
REPORT_BACKENDS = ("tensorboard", "wandb")  # --report_to (tracking.py); "all" = every one

# Named partial configurations (`--preset NAME`; explicit flags override them). The ws_* ones are
# Wang & Sun (2025)'s concept-level JEPA settings (§3.3 / App. B): d = 768, 12 heads, batch 1024,
# lr 1e-4, 2000 warm-up steps then constant, weight decay 0.25, no positional encodings.
_WS_PAPER = {
    "model": {"family": "concept_jepa", "n_embd": 768, "n_head": 12, "position_embeddings": False},
    "train": {
        "batch_size": 1024,
        "learning_rate": 1e-4,
        "warmup_steps": 2000,
        "scheduler": "constant_with_warmup",
        "weight_decay": 0.25,
    },
}


def _preset(base: dict[str, dict[str, Any]], **model: Any) -> dict[str, dict[str, Any]]:
    return {**base, "model": {**base["model"], **model}}


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "ws_jepa_1_1": _preset(_WS_PAPER, num_rec_layers=1, num_sem_layers=1),
    "ws_jepa_2_2": _preset(_WS_PAPER, num_rec_layers=2, num_sem_layers=2),
    "ws_jepa_3_3": _preset(_WS_PAPER, num_rec_layers=3, num_sem_layers=3),
    "ws_jepa_2_6": _preset(_WS_PAPER, num_rec_layers=2, num_sem_layers=6),
    "ws_jepa_3_12": _preset(_WS_PAPER, num_rec_layers=3, num_sem_layers=12),
    "ws_jepa_mem_1": _preset(_WS_PAPER, num_rec_layers=1, num_sem_layers=1, memory_layer=True),
    "ws_jepa_mem_6": _preset(_WS_PAPER, num_rec_layers=1, num_sem_layers=6, memory_layer=True),
    # CPU-sized 1+1 model for |E_A| = 2,000 (revjepa gen-data --num_ga_entities 2000)
    "ws_jepa_small": {
        "model": {
            "family": "concept_jepa",
            "n_embd": 128,
            "n_head": 4,
            "num_rec_layers": 1,
            "num_sem_layers": 1,
            "position_embeddings": False,
            "dropout": 0.0,
        },
        "train": {
            "batch_size": 256,
            "learning_rate": 1e-3,
            "warmup_steps": 200,
            "scheduler": "constant_with_warmup",
            "weight_decay": 0.25,
            "save_steps": 2000,
            "save_step_dense": 2000,
            "save_step_dense_interval": 1000,
            "eval_steps": 1000,
            "log_interval": 200,
        },
    },
}


def _f(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ModelConfig:
    family: str = _f("gpt2_jepa", "model family", choices=MODEL_FAMILIES, flag="model_family")
    n_layer: int = _f(4, "number of transformer blocks")
    n_embd: int = _f(768, "hidden size")
    n_head: int = _f(12, "attention heads (must divide n_embd)")
    n_positions: int = _f(64, "maximum positions of one block (forward+<PRED> or reverse)")
    vocab_size: int | None = _f(None, "must equal the size of the dataset's vocab.json if given")
    tie_embeddings: bool = _f(True, "tie input and output embeddings (--untie_embeddings to untie)")
    position_embeddings: bool = _f(
        True, "learned positional embeddings (--no_position_embeddings: none, as Wang & Sun 2025)"
    )
    dropout: float = _f(0.1, "embedding, attention and residual dropout (0 = deterministic)")
    # --- model family concept_jepa (n_layer, n_positions, position and tie flags do not apply)
    num_rec_layers: int = _f(
        1, "concept_jepa: GPT-2 blocks of the recognition module (each patch encoded alone)"
    )
    num_sem_layers: int = _f(
        1, "concept_jepa: GPT-2 blocks of the semantic module (over the concept vectors)"
    )
    concept_norm: str = _f(
        "rms",
        "concept_jepa: rms (parameter-free, predictions only) or layernorm (affine, "
        "predictions and candidates)",
        choices=CONCEPT_NORMS,
    )
    memory_layer: bool = _f(
        False, "concept_jepa: a memory layer replaces the recognition module (needs R = 1)"
    )
    memory_top_k: int = _f(1, "concept_jepa memory layer: softmax over the top-k scores only")
    memory_value_only: bool = _f(
        False, "concept_jepa memory layer: freeze embeddings and keys, train the values only"
    )
    memory_spare_rows: int = _f(
        0, "concept_jepa memory layer: extra rows beyond entities and single-token patches"
    )


@dataclass
class ObjectiveConfig:
    use_jepa: bool = _f(True, "add the LLM-JEPA loss for items of kind train (--no_jepa: NTP only)")
    lambda_jepa: float = _f(1.0, "weight of the JEPA loss")
    gamma_ntp: float = _f(1.0, "weight of the next-token loss")
    k_pred_tok: int = _f(1, "number of <PRED> tokens appended to the forward block (0..4)")
    distance_metric: str = _f("cosine", "JEPA distance", choices=DISTANCE_METRICS)
    infonce_temperature: float = _f(0.07, "temperature of the infonce distance")
    loss_dropout: float = _f(0.0, "probability of dropping each item's JEPA term (training only)")
    concept_temperature: float = _f(
        1.0, "concept_jepa: logits = prediction . candidates / temperature (1 = the paper)"
    )
    concept_candidates: str = _f(
        "all",
        "concept_jepa: in-batch candidates: all patches (the paper) or entities (entity patches, "
        "duplicates of the label masked)",
        choices=CONCEPT_CANDIDATES,
    )

    @property
    def jepa_active(self) -> bool:
        return self.use_jepa and self.lambda_jepa != 0.0

    def weight(self, term: str) -> float:
        """The weight of a named loss term in the objective (`ntp`: gamma, `jepa`: lambda,
        `mlm`: 1)."""
        if term not in LOSS_TERM_WEIGHTS:
            raise ValueError(f"unknown loss term {term!r}")
        name = LOSS_TERM_WEIGHTS[term]
        return 1.0 if name is None else getattr(self, name)

    def total(self, means: Mapping[str, Any]) -> Any:
        """The training objective: each of a family's named loss terms (tensors or floats) times
        its weight, summed in the family's order (gamma x NTP + lambda x JEPA)."""
        parts = [self.weight(name) * value for name, value in means.items()]
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total


@dataclass
class TrainConfig:
    data_dir: str = _f("data/inversionidcomb10.50000.30000", "dataset directory")
    output_dir: str = _f("runs/jepa", "run directory (checkpoints, logs, metrics)")
    batch_size: int = _f(256, "training items per step per process (global = x world size)")
    eval_batch_size: int = _f(256, "items per evaluation batch")
    max_steps: int | None = _f(
        None, "optimizer steps to train (default 3,000,000; wins over --num_epochs)"
    )
    num_epochs: int | None = _f(
        None, "full passes over the training set (when --max_steps is not given)"
    )
    learning_rate: float = _f(1e-4, "peak learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay on matrices only")
    reverse_training: str = _f(
        "none",
        "reverse training (Golovneva et al. 2024): train on every item and on its reversal, "
        "entity (e2 r <mask> e1) or token (every token reversed); same steps and batch size, "
        "reversed items drawn from the doubled pool",
        choices=REVERSE_TRAINING,
    )
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    warmup_steps: int = _f(0, "linear warm-up steps")
    scheduler: str = _f("constant_with_warmup", "learning-rate schedule", choices=SCHEDULERS)
    save_steps: int = _f(50_000, "checkpoint interval after the dense period")
    save_step_dense: int = _f(30_000, "dense checkpointing until this step")
    save_step_dense_interval: int = _f(5_000, "checkpoint interval in the dense period")
    eval_steps: int = _f(5_000, "evaluation interval on --valid_split")
    log_interval: int = _f(100, "steps between log lines / metrics.jsonl records")
    seed: int = _f(42, "seed of initialisation, data order, dropout and loss dropout")
    num_workers: int = _f(
        0, "accepted for compatibility: batches are tensor indices, no loader workers"
    )
    valid_split: str = _f("test", "split evaluated during training", choices=SPLITS)
    eval_entity_mrr: str = _f(
        "off",
        "gpt2_jepa, mlm_u: entity_mrr / entity_acc (rank of the true tail among all entities) in the "
        "evaluations during training: on, or off (costly on large data; revjepa evaluate "
        "decides with its own --entity_mrr, auto by default)",
        choices=ON_OFF,
    )
    precision: str = _f("fp32", "fp32 | bf16 | fp16 (see --bf16 / --fp16)", choices=PRECISIONS)
    compile: str = _f(
        "auto", "torch.compile: auto (on for CUDA), on, off", choices=("auto", "on", "off")
    )
    cuda_graphs: str = _f(
        "auto",
        "CUDA graphs for the compiled step (torch.compile mode reduce-overhead): auto (on when "
        "compiling for one CUDA device, off under DDP), on, off",
        choices=("auto", "on", "off"),
    )
    cpu_kernels: str = _f(
        "off",
        "fused C kernels for the eager CPU step, built with this machine's C compiler: on, or "
        "off (plain torch ops); with dropout > 0 they draw other dropout masks",
        choices=ON_OFF,
    )
    max_bad_steps: int = _f(20, "stop after this many consecutive non-finite steps")
    device: str = _f("auto", "auto | cpu | cuda")
    peak_tflops: float | None = _f(
        None,
        "peak TFLOP/s for the logged MFU (default: the datasheet figure of a known GPU, else a "
        "matmul measured at start-up)",
    )
    preset: str | None = _f(
        None,
        "named partial configuration (explicit flags override it): " + ", ".join(PRESETS),
        choices=tuple(PRESETS),
    )
    # --- watching a run (tracking.py, collapse.py): no effect on the training itself
    report_to: str = _f(
        "none",
        "experiment trackers that get every metrics.jsonl scalar: none, tensorboard, wandb, all, "
        "or a comma list (tensorboard,wandb)",
    )
    wandb_project: str | None = _f(None, "W&B project (default: $WANDB_PROJECT, else revjepa)")
    wandb_group: str | None = _f(
        None,
        "W&B group (default: $WANDB_RUN_GROUP, else the configuration minus the seed, so that "
        "seeds of one configuration share a group)",
    )
    wandb_name: str | None = _f(
        None, "W&B run name (default: $WANDB_NAME, else the output directory's name)"
    )
    collapse_cos_threshold: float = _f(
        0.99, "JEPA collapse alarm: pred_mean_cos above this value counts as collapsed"
    )
    collapse_window: int = _f(
        5, "JEPA collapse alarm: after this many consecutive collapsed log records (0 = off)"
    )

    @property
    def total_steps_default(self) -> int:
        return 3_000_000


# Fields that may differ between a checkpoint's run and a resume of it. Not `cpu_kernels`:
# it changes the dropout stream (and float order), so a resume keeps the run's choice.
RESUMABLE_OVERRIDES = {
    "max_steps",
    "num_epochs",
    "save_steps",
    "save_step_dense",
    "save_step_dense_interval",
    "eval_steps",
    "log_interval",
    "eval_batch_size",
    "eval_entity_mrr",
    "num_workers",
    "compile",
    "cuda_graphs",
    "device",
    "max_bad_steps",
    "peak_tflops",
    "output_dir",
    "data_dir",
    # watching the run changes nothing in it
    "report_to",
    "wandb_project",
    "wandb_group",
    "wandb_name",
    "collapse_cos_threshold",
    "collapse_window",
}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        if not isinstance(data, dict):
            raise UserError("configuration is not a mapping")
        parts = {}
        for f_ in fields(cls):
            sub = data.get(f_.name, {})
            if not isinstance(sub, dict):
                raise UserError(f"configuration section {f_.name!r} is not a mapping")
            sub_cls = _SECTIONS[f_.name]
            known = {g.name for g in fields(sub_cls)}
            unknown = set(sub) - known
            if unknown:
                raise UserError(f"unknown configuration keys in {f_.name}: {sorted(unknown)}")
            parts[f_.name] = sub_cls(**sub)
        return cls(**parts)

    def validate(self) -> None:
        """Raise UserError with one line naming the first invalid value."""
        m, o, t = self.model, self.objective, self.train
        _positive("n_layer", m.n_layer)
        _positive("n_embd", m.n_embd)
        _positive("n_head", m.n_head)
        _positive("n_positions", m.n_positions)
        if m.n_embd % m.n_head:
            raise UserError(f"--n_embd {m.n_embd} is not divisible by --n_head {m.n_head}")
        if not 0.0 <= m.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {m.dropout}")
        if m.vocab_size is not None:
            _positive("vocab_size", m.vocab_size)
        if not 0 <= o.k_pred_tok <= 4:
            raise UserError(f"--k_pred_tok must be between 0 and 4, got {o.k_pred_tok}")
        if o.distance_metric not in DISTANCE_METRICS:
            raise UserError(f"unknown --distance_metric {o.distance_metric!r}")
        if not 0.0 <= o.loss_dropout < 1.0:
            raise UserError(f"--loss_dropout must be in [0, 1), got {o.loss_dropout}")
        if o.infonce_temperature <= 0:
            raise UserError("--infonce_temperature must be positive")
        if o.lambda_jepa < 0 or o.gamma_ntp < 0:
            raise UserError("--lambda_jepa and --gamma_ntp must be >= 0")
        if t.peak_tflops is not None and not t.peak_tflops > 0:
            raise UserError(f"--peak_tflops must be positive, got {t.peak_tflops}")
        if o.gamma_ntp == 0 and not o.jepa_active:
            raise UserError("--gamma_ntp 0 with JEPA off leaves nothing to train")
        for name in (
            "batch_size",
            "eval_batch_size",
            "save_steps",
            "save_step_dense_interval",
            "eval_steps",
            "log_interval",
            "max_bad_steps",
        ):
            _positive(name, getattr(t, name))
        if t.max_steps is not None:
            _positive("max_steps", t.max_steps)
        if t.num_epochs is not None:
            _positive("num_epochs", t.num_epochs)
        if t.save_step_dense < 0:
            raise UserError(f"--save_step_dense must be >= 0, got {t.save_step_dense}")
        if t.warmup_steps < 0:
            raise UserError(f"--warmup_steps must be >= 0, got {t.warmup_steps}")
        if t.learning_rate <= 0:
            raise UserError(f"--learning_rate must be positive, got {t.learning_rate}")
        if t.weight_decay < 0 or t.max_grad_norm < 0:
            raise UserError("--weight_decay and --max_grad_norm must be >= 0")
        if t.num_workers < 0:
            raise UserError("--num_workers must be >= 0")
        _validate_train_choices(t)
        if not -1.0 <= t.collapse_cos_threshold <= 1.0:
            raise UserError(
                f"--collapse_cos_threshold must be in [-1, 1], got {t.collapse_cos_threshold}"
            )
        if t.collapse_window < 0:
            raise UserError(f"--collapse_window must be >= 0, got {t.collapse_window}")
        self._validate_concept()
        from .families import FAMILIES  # the registry imports this module: at call time

        family = FAMILIES.get(m.family)
        if family is not None:
            family.check_config(self)  # the family's own refusals (LossFamily.check_config)

    def _validate_concept(self) -> None:
        m, o = self.model, self.objective
        if m.family not in MODEL_FAMILIES:
            raise UserError(f"unknown --model_family {m.family!r}")
        _positive("num_rec_layers", m.num_rec_layers)
        _positive("num_sem_layers", m.num_sem_layers)
        _positive("memory_top_k", m.memory_top_k)
        if m.memory_spare_rows < 0:
            raise UserError(f"--memory_spare_rows must be >= 0, got {m.memory_spare_rows}")
        if m.concept_norm not in CONCEPT_NORMS:
            raise UserError(f"unknown --concept_norm {m.concept_norm!r}")
        if o.concept_candidates not in CONCEPT_CANDIDATES:
            raise UserError(f"unknown --concept_candidates {o.concept_candidates!r}")
        if not o.concept_temperature > 0:
            raise UserError(f"--concept_temperature must be positive, got {o.concept_temperature}")
        if m.family != "concept_jepa":
            return
        if m.memory_layer and m.num_rec_layers != 1:
            raise UserError(
                f"--memory_layer replaces a one-block recognition module: it needs "
                f"--num_rec_layers 1, got {m.num_rec_layers}"
            )
        if m.memory_value_only and not m.memory_layer:
            raise UserError("--memory_value_only needs --memory_layer")
        if not o.jepa_active:
            raise UserError(
                "--model_family concept_jepa trains only the concept loss: --no_jepa or "
                "--lambda_jepa 0 leaves nothing to train"
            )


def _validate_train_choices(t: TrainConfig) -> None:
    """The training fields that name one of a few values (a configuration read from a
    checkpoint or a file has not been through argparse's choices)."""
    if t.scheduler not in SCHEDULERS:
        raise UserError(f"unknown --scheduler {t.scheduler!r}")
    if t.valid_split not in SPLITS:
        raise UserError(f"unknown --valid_split {t.valid_split!r}")
    if t.reverse_training not in REVERSE_TRAINING:
        raise UserError(f"unknown --reverse_training {t.reverse_training!r}")
    if t.eval_entity_mrr not in ON_OFF:
        raise UserError(f"--eval_entity_mrr must be on or off, got {t.eval_entity_mrr!r}")
    if t.cpu_kernels not in ON_OFF:
        raise UserError(f"--cpu_kernels must be on or off, got {t.cpu_kernels!r}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown --device {t.device!r}")
    if t.preset is not None and t.preset not in PRESETS:
        raise UserError(f"unknown --preset {t.preset!r}; choose from {', '.join(PRESETS)}")
    report_backends(t.report_to)  # raises on a bad value


def report_backends(value: str) -> tuple[str, ...]:
    """The trackers of a --report_to value: `none` -> (), `all` -> every one, else the comma
    list (order kept, duplicates dropped); UserError on an unknown name."""
    names = [n.strip() for n in str(value).split(",") if n.strip()]
    if names == ["none"]:
        return ()
    if names == ["all"]:
        return REPORT_BACKENDS
    bad = [n for n in names if n not in REPORT_BACKENDS]
    if bad or not names:
        raise UserError(
            f"--report_to {value!r}: choose none, all, or a comma list of "
            f"{', '.join(REPORT_BACKENDS)}"
        )
    return tuple(dict.fromkeys(names))


_SECTIONS = {"model": ModelConfig, "objective": ObjectiveConfig, "train": TrainConfig}

# Fields that not every model family reads, listed under each family that reads them: giving
# one to a family that does not is a mistake that `revjepa sweep` refuses (a single `revjepa
# train` keeps ignoring it, as it always has).
FAMILY_ONLY_FIELDS = {
    "gpt2_jepa": (
        "n_layer", "n_positions", "tie_embeddings", "gamma_ntp", "k_pred_tok",
        "distance_metric", "infonce_temperature", "use_jepa", "lambda_jepa", "loss_dropout",
    ),
    "concept_jepa": (
        "num_rec_layers", "num_sem_layers", "concept_norm", "memory_layer", "memory_top_k",
        "memory_value_only", "memory_spare_rows", "concept_temperature", "concept_candidates",
        "use_jepa", "lambda_jepa", "loss_dropout",
    ),
    "mlm_u": ("n_layer", "n_positions", "tie_embeddings"),
}  # fmt: skip


def foreign_fields(overrides: dict[str, dict[str, Any]], family: str) -> list[str]:
    """The given fields that some model family reads, but not `family`."""
    given = {name for values in overrides.values() for name in values}
    own = set(FAMILY_ONLY_FIELDS.get(family, ()))
    listed = {name for names in FAMILY_ONLY_FIELDS.values() for name in names}
    return sorted(name for name in given if name in listed and name not in own)


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise UserError(f"--{name} must be positive, got {value}")


# ----------------------------------------------------------------------------- argparse glue

_BOOL_FLAGS = {
    # field: (on flag, off flag)
    "use_jepa": ("--use_jepa", "--no_jepa"),
    "tie_embeddings": ("--tie_embeddings", "--untie_embeddings"),
    "position_embeddings": ("--position_embeddings", "--no_position_embeddings"),
    "memory_layer": ("--memory_layer", "--no_memory_layer"),
    "memory_value_only": ("--memory_value_only", "--no_memory_value_only"),
}


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UserError(f"{self.prog}: {message}")


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _ArgumentParser(prog=prog, description=description)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per configuration field; defaults are None so we can tell what was given."""
    for section, cls in _SECTIONS.items():
        group = parser.add_argument_group(section)
        for f_ in fields(cls):
            flag = f_.metadata.get("flag", f_.name)
            help_ = f_.metadata["help"] + f" (default: {f_.default})"
            if f_.name in _BOOL_FLAGS:
                on, off = _BOOL_FLAGS[f_.name]
                group.add_argument(
                    on, dest=flag, action="store_const", const=True, default=None, help=help_
                )
                group.add_argument(
                    off,
                    dest=flag,
                    action="store_const",
                    const=False,
                    default=None,
                    help=argparse.SUPPRESS,
                )
                continue
            conv = {"int": int, "int | None": int, "float": float, "float | None": float}.get(
                str(f_.type), str
            )
            group.add_argument(
                f"--{flag}",
                dest=flag,
                type=conv,
                default=None,
                choices=f_.metadata.get("choices"),
                help=help_,
            )
    parser.add_argument("--fp16", action="store_true", help="fp16 autocast + GradScaler (CUDA)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA, bf16 CPUs)")


def given_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The configuration values the user gave explicitly, by section."""
    out: dict[str, dict[str, Any]] = {}
    for section, cls in _SECTIONS.items():
        for f_ in fields(cls):
            value = getattr(args, f_.metadata.get("flag", f_.name), None)
            if value is not None:
                out.setdefault(section, {})[f_.name] = value
    if getattr(args, "fp16", False) and getattr(args, "bf16", False):
        raise UserError("--fp16 and --bf16 are mutually exclusive")
    if getattr(args, "fp16", False):
        out.setdefault("train", {})["precision"] = "fp16"
    if getattr(args, "bf16", False):
        out.setdefault("train", {})["precision"] = "bf16"
    return out


def expand_preset(overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The given overrides on top of the named preset's values (explicit flags win)."""
    name = overrides.get("train", {}).get("preset")
    if name is None:
        return overrides
    if name not in PRESETS:
        raise UserError(f"unknown --preset {name!r}; choose from {', '.join(PRESETS)}")
    out = {section: dict(values) for section, values in PRESETS[name].items()}
    for section, values in overrides.items():
        out.setdefault(section, {}).update(values)
    return out


def apply_overrides(config: RunConfig, overrides: dict[str, dict[str, Any]]) -> RunConfig:
    data = config.to_dict()
    for section, values in overrides.items():
        data[section].update(values)
    return RunConfig.from_dict(data)


def resolve_config(
    config: RunConfig,
    overrides: dict[str, dict[str, Any]],
    state: dict[str, Any] | None,
    path: Path | None,
    resume_from: str | None,
    world: int,
) -> RunConfig:
    """The one resolution of a run's configuration, validated once: `config` (presets and
    flags applied) for a fresh start; on resume, the checkpoint's configuration with the
    resumable flags of `overrides` on top, the per-process batch following the world size."""
    if state is None or path is None:
        config.validate()
        return config
    saved = RunConfig.from_dict(state["config"])
    # The global batch must stay the same; the per-process batch follows the world size.
    saved_global = saved.train.batch_size * int(state.get("world_size", 1))
    given_batch = overrides.get("train", {}).get("batch_size")
    if given_batch is None and saved_global % world == 0:
        per_process = saved_global // world
    else:
        per_process = given_batch if given_batch is not None else saved.train.batch_size
    if per_process * world != saved_global:
        raise UserError(
            f"{path}: the run's global batch is {saved_global}; with {world} process(es) use "
            f"--batch_size {saved_global / world:g} (a whole number is required)"
        )
    overrides = {**overrides, "train": {**overrides.get("train", {}), "batch_size": per_process}}
    conflicts = []
    for section, values in overrides.items():
        saved_section = getattr(saved, section)
        for name, value in values.items():
            if name in RESUMABLE_OVERRIDES or name == "batch_size":
                continue
            if getattr(saved_section, name) != value:
                conflicts.append(f"--{name} {value} (checkpoint: {getattr(saved_section, name)})")
    if conflicts:
        raise UserError(f"{path}: flags conflict with the checkpoint's run: {', '.join(conflicts)}")
    merged = saved.to_dict()
    for section, values in overrides.items():
        for name, value in values.items():
            if name in RESUMABLE_OVERRIDES or name == "batch_size":
                merged[section][name] = value
    if "output_dir" not in overrides.get("train", {}) and resume_from != "latest":
        # resuming from an explicit path: keep writing next to that checkpoint's run
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        merged["train"]["output_dir"] = str(run_dir)
    resolved = RunConfig.from_dict(merged)
    resolved.validate()
    return resolved


# ----------------------------------------------------------------------------- config files

_VALUE_FLAGS = {
    f_.metadata.get("flag", f_.name): f_.name
    for cls in _SECTIONS.values()
    for f_ in fields(cls)
    if f_.name not in _BOOL_FLAGS
}
_SWITCHES = {
    flag.lstrip("-"): (field_name, flag)
    for field_name, pair in _BOOL_FLAGS.items()
    for flag in pair
}
_SWITCHES.update({"fp16": ("fp16", "--fp16"), "bf16": ("bf16", "--bf16")})


def _switch_argv(key: str, value: Any, where: str) -> list[str]:
    if not isinstance(value, bool):
        raise UserError(f"{where}: {key} is a switch and takes true or false, got {value!r}")
    field_name, flag = _SWITCHES[key]
    if field_name in ("fp16", "bf16"):
        return [flag] if value else []
    on, off = _BOOL_FLAGS[field_name]
    return [flag] if value else [off if flag == on else on]


def flag_field(key: str) -> str | None:
    """The configuration field a flag name (underscores, no dashes) sets, if any."""
    if key in _SWITCHES:
        return _SWITCHES[key][0]
    return _VALUE_FLAGS.get(key)


def flags_to_argv(values: dict[str, Any], where: str) -> list[str]:
    """Command-line tokens for a mapping of `revjepa train` flag names (underscores, no dashes)
    to values: how config files and sweep specs become flags, so the one argument parser
    checks names, types and choices for all of them."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a mapping of flag names to values")
    argv: list[str] = []
    for key, value in values.items():
        if key in _SWITCHES:
            argv += _switch_argv(key, value, where)
        elif key in _VALUE_FLAGS:
            if value is None:
                continue
            if isinstance(value, (bool, list, dict)):
                raise UserError(f"{where}: {key} takes one value, got {value!r}")
            argv += [f"--{key}", str(value)]
        else:
            raise UserError(f"{where}: unknown key {key!r} (not a revjepa train flag)")
    return argv


def _sections_to_flags(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A stored configuration (training_args.json: model/objective/train sections of field
    names) as flag names and values."""
    flat: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        values = data.get(section, {})
        if not isinstance(values, dict):
            raise UserError(f"{where}: section {section!r} is not a mapping")
        known = {f_.name: f_ for f_ in fields(cls)}
        for name, value in values.items():
            if name not in known:
                raise UserError(f"{where}: unknown key {section}.{name}")
            if name in _BOOL_FLAGS:
                on, _ = _BOOL_FLAGS[name]
                flat[on.lstrip("-")] = value
            else:
                flat[known[name].metadata.get("flag", name)] = value
    return flat


def config_file_argv(path: str) -> list[str]:
    """`--config FILE` (YAML or JSON) as command-line tokens: either flat flag names, or a
    run's own training_args.json (sections model/objective/train; `resolved` is ignored)."""
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise UserError(f"--config {path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(
            f"--config {path}: not valid YAML/JSON: {str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of flags to values")
    if set(data) & set(_SECTIONS):
        data = _sections_to_flags({k: v for k, v in data.items() if k != "resolved"}, path)
    return flags_to_argv(data, f"--config {path}")
