"""Sweep specifications: a YAML/JSON file of data flags, base flags, named variants, a grid and
seeds, checked whole and expanded into a plan of ordinary `revjepa train` runs.

Every run's flags go through the same argument parser and configuration validation as the
command line, so a spec is refused (one line naming the key, exit 2) before anything starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (
    FAMILY_ONLY_FIELDS,
    RunConfig,
    add_config_arguments,
    apply_overrides,
    expand_preset,
    flag_field,
    flags_to_argv,
    foreign_fields,
    given_overrides,
    new_parser,
)
from .data import GenConfig
from .errors import UserError

_ALL_FAMILY_ONLY = {name for names in FAMILY_ONLY_FIELDS.values() for name in names}
TOP_KEYS = ("name", "data", "base", "variants", "grid", "seeds", "slurm", "entity_mrr")
# Set by the sweep for every run: a spec may not give them.
SWEEP_OWNED = ("data_dir", "output_dir", "seed")
SLURM_KEYS = ("partition", "time", "gres", "cpus_per_task", "mem", "max_concurrent", "account")
SLURM_LIST_KEYS = ("sbatch_args", "setup")
# Short names of common flags in run names (others keep their flag name).
ABBREVIATIONS = {
    "learning_rate": "lr",
    "batch_size": "bs",
    "lambda_jepa": "lambda",
    "gamma_ntp": "gamma",
    "k_pred_tok": "k",
    "weight_decay": "wd",
    "max_steps": "steps",
    "distance_metric": "dist",
    "n_embd": "d",
    "n_layer": "L",
    "dropout": "drop",
    "reverse_training": "rev",
}


@dataclass
class PlannedRun:
    """One run of a sweep: its name, flags, data and directories."""

    name: str
    variant: str | None
    grid: dict[str, Any]
    seed: int
    argv: list[str]  # the train flags from base, variant and grid (not data/output/seed)
    data_key: str
    family: str
    config: dict[str, Any]  # the resolved configuration (what training_args.json records)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Plan:
    name: str
    spec: dict[str, Any]
    data: dict[str, dict[str, Any]]  # data key -> gen-data flags
    runs: list[PlannedRun]
    slurm: dict[str, Any]
    entity_mrr: str = "auto"  # the sweep's evaluation of each run: auto, on or off


def load_spec(path: Path) -> dict[str, Any]:
    """The spec file as data (YAML or JSON), or one line saying why not."""
    import yaml

    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read the sweep spec: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: a sweep spec is a mapping (name, data, base, ...)")
    return spec


def format_value(value: Any) -> str:
    """A value as it appears in a run name: 3e-4, 0.5, cosine, 128."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        plain = f"{value:g}"
        mantissa, exponent = f"{value:e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        short = f"{mantissa}e{int(exponent)}"
        text = short if len(short) < len(plain) else plain
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


def _data_config(block: Any, where: str) -> dict[str, Any]:
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise UserError(f"{where}: expected a mapping of gen-data flags")
    known = {f.name: f for f in dataclasses.fields(GenConfig)}
    for key, value in block.items():
        if key not in known:
            raise UserError(f"{where}: unknown key {key!r}; gen-data flags are {', '.join(known)}")
        if known[key].type in ("bool", bool):
            if not isinstance(value, bool):
                raise UserError(f"{where}.{key}: expected true or false, got {value!r}")
            continue
        want = float if known[key].type in ("float", float) else int
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}.{key}: expected a number, got {value!r}")
        if want is int and not isinstance(value, int):
            raise UserError(f"{where}.{key}: expected an integer, got {value!r}")
    cfg = GenConfig(**block)
    try:
        cfg.validate()
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    flags = dataclasses.asdict(cfg)
    if not cfg.identity_bridge:  # left out: the data keys of sweeps made before it stay the same
        del flags["identity_bridge"]
    return flags


def data_key(flags: dict[str, Any]) -> str:
    """A readable, content-addressed directory name for one generated dataset."""
    cfg = GenConfig(**flags)
    digest = hashlib.sha256(json.dumps(flags, sort_keys=True).encode()).hexdigest()[:8]
    return f"{Path(cfg.default_dir()).name}-{digest}"


def _mapping(spec: dict[str, Any], key: str) -> dict[str, Any]:
    value = spec.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"spec {key}: expected a mapping")
    return value


def _check_flags(flags: dict[str, Any], where: str) -> None:
    if not isinstance(flags, dict):
        raise UserError(f"{where}: expected a mapping of revjepa train flags")
    for key in flags:
        if key in SWEEP_OWNED:
            raise UserError(f"{where}: {key} is set by the sweep for every run (use seeds / data)")
        if key in ("config", "resume_from", "print_config"):
            raise UserError(f"{where}: {key} cannot be given in a sweep spec")


def _variants(spec: dict[str, Any]) -> list[tuple[str | None, dict[str, Any], Any]]:
    variants = spec.get("variants")
    if variants is None:
        return [(None, {}, None)]
    if not isinstance(variants, dict) or not variants:
        raise UserError("spec variants: expected a non-empty mapping of name -> flags")
    out = []
    for name, flags in variants.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+]+", name):
            raise UserError(f"spec variants: name {name!r} must be letters, digits, _ . +")
        flags = dict(flags or {})
        data = flags.pop("data", None)
        _check_flags(flags, f"spec variants.{name}")
        out.append((name, flags, data))
    return out


def _grid(spec: dict[str, Any]) -> list[dict[str, Any]]:
    grid = _mapping(spec, "grid")
    _check_flags(grid, "spec grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"spec grid.{key}: expected a non-empty list of values")
        if len({json.dumps(v) for v in values}) != len(values):
            raise UserError(f"spec grid.{key}: repeated values {values}")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _seeds(spec: dict[str, Any]) -> list[int]:
    seeds = spec.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)
    ):
        raise UserError(f"spec seeds: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"spec seeds: repeated seeds {seeds}")
    return seeds


def parse_run_flags(argv: list[str]) -> tuple[RunConfig, dict[str, dict[str, Any]]]:
    """A run's configuration and explicit overrides from its flags, as `revjepa train` reads
    them (unvalidated: `train` validates on its one resolution)."""
    parser = new_parser("revjepa train", "")
    add_config_arguments(parser)
    overrides = expand_preset(given_overrides(parser.parse_args(argv)))
    return apply_overrides(RunConfig(), overrides), overrides


def resolve_run_flags(argv: list[str], where: str) -> RunConfig:
    """A run's configuration from its flags, validated as `revjepa train` would."""
    try:
        config, overrides = parse_run_flags(argv)
        config.validate()
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    foreign = foreign_fields(overrides, config.model.family)
    if foreign:
        raise UserError(
            f"{where}: {', '.join(foreign)}: not a flag of model family {config.model.family}"
        )
    return config


def _for_family(flags: dict[str, Any], own: set[str], where: str) -> dict[str, Any]:
    """The run's flags without the base flags that its model family does not read (a shared
    base may hold gpt2_jepa's n_layer beside a concept_jepa variant); a variant's or grid's own
    flag that its family does not read is an error (resolve_run_flags)."""
    config = resolve_run_flags(flags_to_argv({k: v for k, v in flags.items() if k in own or
                                              flag_field(k) not in _ALL_FAMILY_ONLY}, where), where)  # fmt: skip
    family = config.model.family
    foreign = set(_ALL_FAMILY_ONLY) - set(FAMILY_ONLY_FIELDS.get(family, ()))
    return {k: v for k, v in flags.items() if k in own or flag_field(k) not in foreign}


def run_name(variant: str | None, point: dict[str, Any], seed: int) -> str:
    parts = [variant] if variant else []
    parts += [f"{ABBREVIATIONS.get(k, k)}{format_value(v)}" for k, v in point.items()]
    return "-".join([*parts, f"seed{seed}"])


def expand(spec: dict[str, Any]) -> Plan:
    """Check the whole spec and expand it into runs (variants x grid x seeds)."""
    unknown = [k for k in spec if k not in TOP_KEYS]
    if unknown:
        raise UserError(f"spec: unknown key(s) {unknown}; allowed: {', '.join(TOP_KEYS)}")
    name = spec.get("name", "sweep")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise UserError(f"spec name: {name!r} must be letters, digits, _ . + -")
    base_data = _mapping(spec, "data")
    base = _mapping(spec, "base")
    _check_flags(base, "spec base")
    variants, points, seeds = _variants(spec), _grid(spec), _seeds(spec)
    data: dict[str, dict[str, Any]] = {}
    runs: list[PlannedRun] = []
    for vname, vflags, vdata in variants:
        where = f"spec variants.{vname}" if vname else "spec base"
        if vdata is not None and not isinstance(vdata, dict):
            raise UserError(f"{where}.data: expected a mapping of gen-data flags")
        flags = _data_config({**base_data, **(vdata or {})}, f"{where} data")
        key = data_key(flags)
        data[key] = flags
        for point in points:
            merged = _for_family({**base, **vflags, **point}, set(vflags) | set(point), where)
            argv = flags_to_argv(merged, where)
            config = resolve_run_flags(argv, where if not point else f"{where} x grid {point}")
            for seed in seeds:
                runs.append(
                    PlannedRun(
                        run_name(vname, point, seed),
                        vname,
                        point,
                        seed,
                        argv,
                        key,
                        config.model.family,
                        config.to_dict(),
                    )  # fmt: skip
                )
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError("spec: two runs get the same name; rename the variants")
    entity_mrr = spec.get("entity_mrr", "auto")
    if isinstance(entity_mrr, bool):  # YAML 1.1 reads a bare on / off as a boolean
        entity_mrr = "on" if entity_mrr else "off"
    if entity_mrr not in ("auto", "on", "off"):
        raise UserError(f"spec entity_mrr: expected auto, on or off, got {entity_mrr!r}")
    return Plan(name, spec, data, runs, _slurm(spec), entity_mrr)


def _slurm(spec: dict[str, Any]) -> dict[str, Any]:
    block = _mapping(spec, "slurm")
    for key, value in block.items():
        if key in SLURM_LIST_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UserError(f"spec slurm.{key}: expected a list of strings")
        elif key in SLURM_KEYS:
            if isinstance(value, (dict, list, bool)) or value is None:
                raise UserError(f"spec slurm.{key}: expected one value, got {value!r}")
        else:
            allowed = ", ".join(SLURM_KEYS + SLURM_LIST_KEYS)
            raise UserError(f"spec slurm: unknown key {key!r}; allowed: {allowed}")
    return block


def spec_changes(old: Any, new: Any, path: str = "") -> list[str]:
    """Where two specs differ, as 'key.path: old -> new' lines (the first few)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in new:
                out.append(f"{sub}: removed")
            elif key not in old:
                out.append(f"{sub}: added")
            else:
                out += spec_changes(old[key], new[key], sub)
        return out
    if old != new:
        return [f"{path or 'spec'}: {json.dumps(old)} -> {json.dumps(new)}"]
    return []
