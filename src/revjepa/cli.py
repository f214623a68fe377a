"""`revjepa` command line: gen-data, train, evaluate, plot, export, bench, status, sweep,
report.

Bad input anywhere ends with one line on stderr and exit code 2 (UserError), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import (
    RunConfig,
    add_config_arguments,
    apply_overrides,
    config_file_argv,
    expand_preset,
    given_overrides,
    new_parser,
)
from .errors import UserError


def _gen_data_parser() -> argparse.ArgumentParser:
    from .data import GenConfig

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
        "--identity_bridge",
        action="store_true",
        help="add the identity fact `e <r_id> e` of every entity to train.json, type identity "
        "(Ma et al. 2026); valid.json and the other items stay as without it",
    )
    p.add_argument(
        "--output_dir",
        default=None,
        help="default data/inversionidcomb{comb}.{nA}.{nB} (data/inversionid.{nA}.{nB} "
        "with --comb 0), with .idbridge appended under --identity_bridge",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing dataset in --output_dir"
    )
    return p


def cmd_gen_data(argv: list[str]) -> int:
    from .data import GenConfig, generate, load_dataset, summarize, write_generated

    a = _gen_data_parser().parse_args(argv)
    cfg = GenConfig(
        a.num_ga_entities, a.gb_ratio, a.num_rel_pairs, a.comb, a.test_size, a.seed,
        a.identity_bridge,
    )  # fmt: skip
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
    p.add_argument(
        "--config",
        default=None,
        help="YAML or JSON file of flag names and values (or a run's training_args.json); "
        "flags on the command line override it",
    )
    p.add_argument(
        "--print_config", action="store_true", help="print the resolved configuration and exit"
    )
    return p


def cmd_train(argv: list[str], prog: str = "revjepa train") -> int:
    from .train import print_resolved_config, train

    parser = _train_parser(prog)
    a = parser.parse_args(argv)
    if a.config is not None:  # the file's flags first, so the command line's win
        a = parser.parse_args(config_file_argv(a.config) + argv)
    overrides = expand_preset(given_overrides(a))  # --preset NAME: its values under the flags
    config = apply_overrides(RunConfig(), overrides)
    if a.print_config:
        print_resolved_config(config, overrides, a.resume_from)
        return 0
    train(config, overrides, a.resume_from)  # validates
    return 0


def _needs_train_data(state: dict, entity_mrr: str, data_dir: str) -> bool:
    """Whether the checkpoint's family needs train.json to evaluate it (loaded only then; with
    `--entity_mrr auto` only if the data directory has one: otherwise auto skips the metric)."""
    from .families import FAMILIES

    family = FAMILIES.get(state.get("config", {}).get("model", {}).get("family", "gpt2_jepa"))
    if family is None or entity_mrr == "off":
        return False
    if entity_mrr == "auto" and not (Path(data_dir) / "train.json").is_file():
        return False
    return family.needs_train_data(state, True)


def _evaluate_parser(prog: str) -> argparse.ArgumentParser:
    from .evaluate import ENTITY_MRR_BUDGET_S, ENTITY_MRR_CHOICES
    from .progress import PROGRESS_CHOICES

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
        default="auto",
        choices=ENTITY_MRR_CHOICES,
        help="gpt2_jepa, mlm_u: entity_mrr / entity_acc, the rank of the true tail among all entities. "
        "auto (default): computed when its cost, estimated before the work, fits "
        "--entity_mrr_budget_s, else skipped with one line; on: always; off: never",
    )
    p.add_argument(
        "--entity_mrr_budget_s",
        type=float,
        default=ENTITY_MRR_BUDGET_S,
        help=f"auto: the estimated seconds (whole call) under which entity_mrr is computed "
        f"({ENTITY_MRR_BUDGET_S:g})",
    )
    p.add_argument(
        "--progress",
        default="auto",
        choices=PROGRESS_CHOICES,
        help="progress bars on stderr (per split, items/s, ETA): auto (default) when stderr is "
        "a terminal, on, off",
    )
    return p


def _parse_splits(text: str) -> tuple[str, ...]:
    from .data import KINDS

    splits = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in splits if s not in KINDS]
    if unknown or not splits:
        raise UserError(f"--splits: unknown split(s) {unknown}; choose from {', '.join(KINDS)}")
    return splits


def cmd_evaluate(argv: list[str], prog: str = "revjepa evaluate") -> int:
    from .checkpoint import list_checkpoints, load_checkpoint
    from .data import load_dataset
    from .evaluate import (
        EntityMrrPlan,
        best_steps,
        evaluate_checkpoint,
        format_table,
        sweep_directory,
    )
    from .progress import Progress, progress_enabled

    a = _evaluate_parser(prog).parse_args(argv)
    if a.batch_size <= 0:
        raise UserError(f"--batch_size must be positive, got {a.batch_size}")
    if not a.entity_mrr_budget_s >= 0:  # also refuses nan
        raise UserError(f"--entity_mrr_budget_s must be >= 0, got {a.entity_mrr_budget_s}")
    splits = _parse_splits(a.splits)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda requested but CUDA is not available")
    target = Path(a.checkpoint)
    if a.output and Path(a.output).is_dir():
        raise UserError(f"--output {a.output} is a directory")
    entity = EntityMrrPlan(a.entity_mrr, a.entity_mrr_budget_s)
    progress = Progress(progress_enabled(a.progress))
    if target.is_dir():
        ckpt_dir = target / "checkpoints" if (target / "checkpoints").is_dir() else target
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise UserError(f"{target}: no checkpoint_step_*.pt files")
        last = load_checkpoint(found[-1][1])
        data_dir = a.data_dir or last["config"]["train"]["data_dir"]
        dataset = load_dataset(data_dir, with_train=_needs_train_data(last, a.entity_mrr, data_dir))
        del last
        records = sweep_directory(
            ckpt_dir, dataset, a.batch_size, a.per_layer, a.device, entity_mrr=entity,
            progress=progress,
        )  # fmt: skip
        for split, (step, mrr) in best_steps(records).items():
            print(f"best {split} MRR {mrr:.4f} at step {step}")
        if a.output:
            Path(a.output).write_text(json.dumps(records, indent=2) + "\n")
        return 0
    state = load_checkpoint(target)
    data_dir = a.data_dir or state["config"]["train"]["data_dir"]
    with_train = _needs_train_data(state, a.entity_mrr, data_dir)
    del state
    dataset = load_dataset(data_dir, with_train=with_train)
    results = evaluate_checkpoint(
        target, dataset, a.batch_size, splits, a.per_layer, a.device, entity, progress
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


def cmd_status(argv: list[str]) -> int:
    from .status import collect_status, format_status

    p = new_parser(
        "revjepa status",
        "Where runs stand: step, speed, ETA, evaluations, checkpoint, state, collapse alarm.",
    )
    p.add_argument("run_dirs", nargs="+", help="run directories, or sweep directories (runs/)")
    p.add_argument("--json", action="store_true", help="print the per-run records as JSON")
    p.add_argument(
        "--no_verify",
        action="store_true",
        help="name the newest checkpoint file without loading it (fast on large runs)",
    )
    a = p.parse_args(argv)
    rows = collect_status([Path(x) for x in a.run_dirs], verify=not a.no_verify)
    print(json.dumps(rows, indent=2) if a.json else format_status(rows))
    return 0


def cmd_sweep(argv: list[str]) -> int:
    from . import slurm_array, sweep

    p = new_parser("revjepa sweep", "Run a spec's variants x grid x seeds; resumable.")
    p.add_argument("spec", nargs="?", help="sweep spec, YAML or JSON (not needed with --status)")
    p.add_argument("--out", required=True, help="sweep directory (plan, data, runs, logs)")
    p.add_argument(
        "--executor", default="local", choices=("local", "slurm"), help="local (default) or slurm"
    )
    p.add_argument("--parallel", type=int, default=1, help="local: runs at once (1)")
    p.add_argument(
        "--threads_per_run",
        type=int,
        default=None,
        help="local: CPU threads of each run (default: the CPUs divided by --parallel)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="local: run only these seeds' runs now; the rest stay pending for a later call",
    )
    p.add_argument("--status", action="store_true", help="print each run's state and exit")
    p.add_argument(
        "--dry_run",
        action="store_true",
        help="local: print the runs, run nothing; slurm: write and print the script only",
    )
    p.add_argument("--max_concurrent", type=int, default=None, help="slurm: tasks at once (%%K)")
    for key in ("partition", "time", "gres", "cpus_per_task", "mem", "account"):
        p.add_argument(f"--{key}", default=None, help=f"slurm: #SBATCH --{key.replace('_', '-')}")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    if a.status:
        table, all_done = sweep.format_status(out)
        print(table)
        return 0 if all_done else 1
    if a.spec is None:
        raise UserError("revjepa sweep: a spec file is required (or --status)")
    if a.parallel < 1:
        raise UserError(f"--parallel must be >= 1, got {a.parallel}")
    if a.threads_per_run is not None and a.threads_per_run < 1:
        raise UserError(f"--threads_per_run must be >= 1, got {a.threads_per_run}")
    if a.max_concurrent is not None and a.max_concurrent < 1:
        raise UserError(f"--max_concurrent must be >= 1, got {a.max_concurrent}")
    if a.dry_run and a.executor == "local":
        print(sweep.describe_plan(Path(a.spec)))
        print("nothing run or written (--dry_run)")
        return 0
    if a.seeds is not None and a.executor != "local":
        raise UserError("--seeds: local executor only (a SLURM job array runs every seed at once)")
    if a.seeds is not None:
        sweep.check_seeds(Path(a.spec), a.seeds)
    plan = sweep.prepare(Path(a.spec), out)
    if a.executor == "local":
        return sweep.run_local(out, a.parallel, a.threads_per_run, a.seeds)
    given = {k: v for k, v in vars(a).items() if k in slurm_array.OPTION_KEYS and v is not None}
    script = out / "sweep.sbatch"
    (out / "logs").mkdir(exist_ok=True)  # SLURM opens the task logs there before the script runs
    script.write_text(slurm_array.sbatch_script(plan, out, {**plan["slurm"], **given}))
    script.chmod(0o755)
    if a.dry_run:
        print(script.read_text(), end="")
        print(f"wrote {script} (not submitted: --dry_run)")
        return 0
    job = slurm_array.submit(script)
    print(
        f"submitted job array {job}: {len(plan['runs'])} tasks; revjepa sweep --status --out {out}"
    )
    return 0


def cmd_sweep_run(argv: list[str]) -> int:
    from .sweep import run_task

    p = new_parser("revjepa sweep-run", "Run one task of a sweep (what each job-array task runs).")
    p.add_argument("out", help="sweep directory")
    p.add_argument("index", type=int, help="run index in sweep.json")
    a = p.parse_args(argv)
    return run_task(Path(a.out), a.index)


def cmd_report(argv: list[str]) -> int:
    from .report import REPORT_FORMATS, report

    p = new_parser("revjepa report", "Mean +- std over seeds of runs grouped by configuration.")
    p.add_argument("dirs", nargs="+", help="run directories, sweep directories, or their parents")
    p.add_argument("--metric", default=None, help="metric name (default: each family's headline)")
    p.add_argument(
        "--select_split",
        default=None,
        help="split that picks the best checkpoint (default: the runs' --valid_split)",
    )
    p.add_argument(
        "--format",
        default="markdown",
        choices=REPORT_FORMATS,
        help="markdown (default), csv or json",
    )
    p.add_argument("--out", default=None, help="write the report to this file instead of stdout")
    p.add_argument(
        "--plot", default=None, help="PNG: mean curve and +-std band per group, a panel per split"
    )
    p.add_argument(
        "--log_steps",
        action="store_true",
        help="--plot with steps on a log axis (how grokking curves are read)",
    )
    a = p.parse_args(argv)
    if a.log_steps and not a.plot:
        raise UserError("--log_steps applies to --plot, which is not given")
    dirs = [Path(d) for d in a.dirs]
    text = report(dirs, a.metric, a.select_split, a.format, a.plot, a.log_steps)
    if a.out:
        Path(a.out).write_text(text)
        print(f"wrote {a.out}")
    else:
        print(text, end="")
    if a.plot:
        print(f"wrote {a.plot}", file=sys.stderr)
    return 0


COMMANDS = {
    "gen-data": cmd_gen_data,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "plot": cmd_plot,
    "export": cmd_export,
    "bench": cmd_bench,
    "status": cmd_status,
    "sweep": cmd_sweep,
    "sweep-run": cmd_sweep_run,
    "report": cmd_report,
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
    except BrokenPipeError:  # `revjepa ... | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


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
