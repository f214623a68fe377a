"""`revjepa` command line: gen-data, train, evaluate, plot, export, bench.

Bad input anywhere ends with one line on stderr and exit code 2 (UserError), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import (
    RunConfig,
    add_config_arguments,
    apply_overrides,
    expand_preset,
    given_overrides,
    new_parser,
)
from .errors import UserError


def cmd_gen_data(argv: list[str]) -> int:
    from .data import GenConfig, generate, load_dataset, summarize, write_generated

    p = new_parser("revjepa gen-data", "Generate the inversion (reversal) dataset.")
    defaults = GenConfig()
    p.add_argument(
        "--num_ga_entities",
        type=int,
        default=defaults.num_ga_entities,
        help="group-A entities: facts in both directions (default 50000)",
    )
    p.add_argument(
        "--gb_ratio",
        type=float,
        default=defaults.gb_ratio,
        help="|B| = gb_ratio x |A|: facts in one direction, reverse held out (0.6)",
    )
    p.add_argument(
        "--num_rel_pairs",
        type=int,
        default=defaults.num_rel_pairs,
        help="relation pairs r_i / r_i_inv (6)",
    )
    p.add_argument(
        "--comb",
        type=int,
        default=defaults.comb,
        help="entities sharing each first/last name token (10); 0 = one token each",
    )
    p.add_argument(
        "--test_size",
        type=int,
        default=defaults.test_size,
        help="items per validation split (3000)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (42)")
    p.add_argument(
        "--output_dir",
        default=None,
        help="default data/inversionidcomb{comb}.{nA}.{nB} (data/inversionid.{nA}.{nB} "
        "with --comb 0)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing dataset in --output_dir"
    )
    a = p.parse_args(argv)
    cfg = GenConfig(a.num_ga_entities, a.gb_ratio, a.num_rel_pairs, a.comb, a.test_size, a.seed)
    cfg.validate()
    out = Path(a.output_dir or cfg.default_dir())
    existing = [n for n in ("train.json", "valid.json", "vocab.json") if (out / n).exists()]
    if existing and not a.overwrite:
        raise UserError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace")
    start = time.perf_counter()
    gen = generate(cfg)
    write_generated(gen, out)
    seconds = time.perf_counter() - start
    summary = summarize(load_dataset(out))
    print(f"wrote {out}/{{train,valid,vocab}}.json in {seconds:.1f} s")
    print(json.dumps(summary, indent=2))
    return 0


def _train_parser(prog: str) -> argparse.ArgumentParser:
    p = new_parser(prog, "Step-based GPT-2 + JEPA training (single process or torchrun).")
    add_config_arguments(p)
    p.add_argument(
        "--resume_from",
        default=None,
        help="checkpoint path, or 'latest' (newest valid checkpoint in --output_dir; "
        "a fresh start if there is none)",
    )
    return p


def cmd_train(argv: list[str], prog: str = "revjepa train") -> int:
    from .train import train

    a = _train_parser(prog).parse_args(argv)
    overrides = expand_preset(given_overrides(a))  # --preset NAME: its values under the flags
    train(apply_overrides(RunConfig(), overrides), overrides, a.resume_from)  # validates
    return 0


def _needs_train_data(state: dict, entity_mrr: bool) -> bool:
    """A gpt2_jepa checkpoint older than `entity_mrr` stores no entity table: its metrics then
    rank among the entities of the data directory's train.json (loaded only then)."""
    family = state.get("config", {}).get("model", {}).get("family", "gpt2_jepa")
    return entity_mrr and family == "gpt2_jepa" and "entities" not in state


def cmd_evaluate(argv: list[str], prog: str = "revjepa evaluate") -> int:
    from .checkpoint import load_checkpoint
    from .data import KINDS, load_dataset
    from .evaluate import best_steps, evaluate_checkpoint, format_table, sweep_directory

    p = new_parser(prog, "Evaluate a checkpoint (or every checkpoint of a run) on all splits.")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint_step_X.pt / best_model.pt, or a run's checkpoints/ directory",
    )
    p.add_argument(
        "--data_dir",
        default=None,
        help="dataset directory (default: the one stored in the checkpoint)",
    )
    p.add_argument("--batch_size", type=int, default=256, help="items per batch (256)")
    p.add_argument("--output", default=None, help="write the results as JSON to this file")
    p.add_argument("--splits", default="train,atomic,test", help="comma-separated splits")
    p.add_argument("--per_layer", action="store_true", help="logit-lens metrics for every layer")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (default) or cuda")
    p.add_argument(
        "--entity_mrr",
        default="on",
        choices=("on", "off"),
        help="gpt2_jepa: entity_mrr / entity_acc, the rank of the true tail among all entities "
        "(on, the default; off skips their cost)",
    )
    a = p.parse_args(argv)
    entity = a.entity_mrr == "on"
    if a.batch_size <= 0:
        raise UserError(f"--batch_size must be positive, got {a.batch_size}")
    splits = tuple(s.strip() for s in a.splits.split(",") if s.strip())
    unknown = [s for s in splits if s not in KINDS]
    if unknown or not splits:
        raise UserError(f"--splits: unknown split(s) {unknown}; choose from {', '.join(KINDS)}")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda requested but CUDA is not available")
    target = Path(a.checkpoint)
    if a.output and Path(a.output).is_dir():
        raise UserError(f"--output {a.output} is a directory")
    if target.is_dir():
        from .checkpoint import list_checkpoints

        ckpt_dir = target / "checkpoints" if (target / "checkpoints").is_dir() else target
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise UserError(f"{target}: no checkpoint_step_*.pt files")
        last = load_checkpoint(found[-1][1])
        data_dir = a.data_dir or last["config"]["train"]["data_dir"]
        dataset = load_dataset(data_dir, with_train=_needs_train_data(last, entity))
        del last
        records = sweep_directory(
            ckpt_dir, dataset, a.batch_size, a.per_layer, a.device, entity_mrr=entity
        )
        for split, (step, mrr) in best_steps(records).items():
            print(f"best {split} MRR {mrr:.4f} at step {step}")
        if a.output:
            Path(a.output).write_text(json.dumps(records, indent=2) + "\n")
        return 0
    state = load_checkpoint(target)
    data_dir = a.data_dir or state["config"]["train"]["data_dir"]
    with_train = _needs_train_data(state, entity)
    del state
    dataset = load_dataset(data_dir, with_train=with_train)
    results = evaluate_checkpoint(
        target, dataset, a.batch_size, splits, a.per_layer, a.device, entity_mrr=entity
    )
    print(format_table(results))
    if a.output:
        Path(a.output).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {a.output}")
    return 0


def cmd_plot(argv: list[str]) -> int:
    from .plot import plot_run

    p = new_parser("revjepa plot", "Plot training losses and MRR per split against step.")
    p.add_argument("run_dir", help="a run's output directory")
    p.add_argument("--out", default=None, help="PNG file (default RUN_DIR/training_curves.png)")
    a = p.parse_args(argv)
    out = plot_run(Path(a.run_dir), Path(a.out) if a.out else None)
    print(f"wrote {out}")
    return 0


def cmd_export(argv: list[str]) -> int:
    from .export import export_checkpoint

    p = new_parser("revjepa export", "Write a Hugging Face save_pretrained directory.")
    p.add_argument("checkpoint", help="a checkpoint file")
    p.add_argument("out_dir", help="new or empty output directory")
    a = p.parse_args(argv)
    out = export_checkpoint(Path(a.checkpoint), Path(a.out_dir))
    print(f"wrote {out}")
    return 0


def cmd_bench(argv: list[str]) -> int:
    from .bench import run_bench

    p = new_parser("revjepa bench", "Measure training, evaluation and data speed on this machine.")
    p.add_argument("--output", default="bench_results.json", help="JSON results file")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (median)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    a = p.parse_args(argv)
    if a.repeats < 1:
        raise UserError("--repeats must be >= 1")
    run_bench(Path(a.output), a.repeats, a.quick)
    return 0


COMMANDS = {
    "gen-data": cmd_gen_data,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "plot": cmd_plot,
    "export": cmd_export,
    "bench": cmd_bench,
}


def run_guarded(fn, argv: list[str]) -> int:
    try:
        return fn(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; commands: {names}", file=sys.stderr)
            return 2
        print(f"usage: revjepa {{{names}}} [--help] ...")
        return 0
    return run_guarded(COMMANDS[argv[0]], argv[1:])
