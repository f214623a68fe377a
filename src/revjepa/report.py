"""`revjepa report`: runs grouped by their configuration minus the seed; per group and split,
a metric's mean +- std over seeds at each run's best checkpoint and at its last one, as
Markdown, CSV or JSON, and a seed-band plot.

Records come from a run's `eval_all.jsonl` (every checkpoint on every split, what a sweep
writes); a run without one (still training) falls back to the evaluations in `metrics.jsonl`
(the --valid_split only) and is marked in progress.

A group whose mean curve over seeds, on the select split, was still rising at its last
checkpoint (`convergence.trend`) is marked: its figures measure where training stopped.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import RESUMABLE_OVERRIDES, SPLITS
from .convergence import Trend, trend
from .errors import UserError
from .metrics import chance_mrr
from .runlog import RUN_STATE, read_jsonl

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_FORMATS = ("markdown", "csv", "json")
RISING = "↑"  # after the best value of a group still rising (convergence.trend)
# The families' (comparable_metric, headline_metric), for runs whose training_args.json predates
# its `resolved` record of them (a test keeps them equal to the classes'): report and status
# read run files and import no model code. Frozen: only these two families had such runs, so a
# family added later needs no entry here.
FAMILY_METRICS = {
    "gpt2_jepa": ("entity_mrr", "mrr"),
    "concept_jepa": ("concept_mrr_full", "concept_mrr_full"),
}
# Configuration fields that do not change what a run computes (bookkeeping, speed, the seed).
_NOT_CONFIG = (RESUMABLE_OVERRIDES - {"max_steps", "num_epochs"}) | {"seed", "preset"}


@dataclass
class RunRecords:
    path: Path
    config: dict[str, Any]
    family: str
    seed: int
    label: str | None  # the sweep's name for it, minus the seed
    records: list[dict[str, Any]]  # {"step", "splits": {split: {metric: value}}}
    in_progress: bool
    comparable: str  # the family's metric on one scale with every family's
    headline: str  # the family's own headline metric


@dataclass
class Group:
    key: str
    family: str
    metric: str
    own: str  # the family's own headline metric, shown beside a shared one
    runs: list[RunRecords] = field(default_factory=list)
    label: str = ""


# ----------------------------------------------------------------------------- reading runs


def find_runs(dirs: list[Path]) -> list[Path]:
    """Run directories in `dirs`: runs themselves, sweeps (their runs/), or parents of either."""
    found: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"{d}: no such directory")
        if (d / "training_args.json").is_file():
            found.append(d)
            continue
        inner = d / "runs" if (d / "runs").is_dir() else d
        order = _plan_order(d)
        runs = sorted(
            (p for p in inner.iterdir() if (p / "training_args.json").is_file()),
            key=lambda p: (order.get(p.name, 1 << 30), p.name),
        )
        for sub in sorted(p for p in d.iterdir() if (p / "runs").is_dir() and p != d):
            runs += sorted(
                p for p in (sub / "runs").iterdir() if (p / "training_args.json").is_file()
            )
        if not runs:
            raise UserError(f"{d}: no run directories (training_args.json) found")
        found += runs
    return found


def _plan_order(sweep_dir: Path) -> dict[str, int]:
    """Run name -> its index in the sweep's plan (the spec's order of variants and grid)."""
    plan_file = sweep_dir / "sweep.json"
    if not plan_file.is_file():
        return {}
    return {r["name"]: i for i, r in enumerate(json.loads(plan_file.read_text()).get("runs", []))}


def _metrics_records(path: Path) -> list[dict[str, Any]]:
    """The evaluation records of metrics.jsonl, as eval_all.jsonl shapes them."""
    out = []
    for r in read_jsonl(path / "metrics.jsonl"):
        splits: dict[str, dict[str, float]] = {}
        for key, value in r.items():
            for split in SPLITS:
                if key.startswith(f"eval_{split}_"):
                    splits.setdefault(split, {})[key[len(f"eval_{split}_") :]] = value
        if splits:
            out.append({"step": r["step"], "splits": splits})
    return out


def _sweep_labels(run_dir: Path) -> dict[str, str]:
    plan_file = run_dir.parent.parent / "sweep.json"
    if run_dir.parent.name != "runs" or not plan_file.is_file():
        return {}
    plan = json.loads(plan_file.read_text())
    labels = {}
    for run in plan.get("runs", []):
        parts = [run["variant"]] if run.get("variant") else []
        parts += [f"{k}={v}" for k, v in run.get("grid", {}).items()]
        labels[run["name"]] = " ".join(parts) or plan.get("name", "sweep")
    return labels


def family_metrics(args: dict[str, Any]) -> tuple[str, str]:
    """(comparable, headline) metric of a run's family, from its training_args.json."""
    family = args.get("model", {}).get("family", "gpt2_jepa")
    comparable, headline = FAMILY_METRICS.get(family, FAMILY_METRICS["gpt2_jepa"])
    resolved = args.get("resolved", {})
    return (
        resolved.get("comparable_metric") or comparable,
        resolved.get("headline_metric") or headline,
    )


def load_run(path: Path) -> RunRecords:
    try:
        args = json.loads((path / "training_args.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}/training_args.json: cannot read: {exc}") from None
    config = {k: v for k, v in args.items() if k in ("model", "objective", "train")}
    records = read_jsonl(path / "eval_all.jsonl")
    finished = False
    if (path / RUN_STATE).is_file():
        finished = json.loads((path / RUN_STATE).read_text()).get("state") == "finished"
    in_progress = not (records and finished)
    if not records:
        records = _metrics_records(path)
    return RunRecords(
        path, config, config["model"]["family"], int(config["train"]["seed"]),
        _sweep_labels(path).get(path.name), sorted(records, key=lambda r: r["step"]), in_progress,
        *family_metrics(args),
    )  # fmt: skip


def config_key(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened configuration that defines a group: everything but the seed and the
    bookkeeping fields; the data by its directory name (a sweep's data keys are content hashes)."""
    flat = {}
    for section, values in config.items():
        for name, value in values.items():
            if name in _NOT_CONFIG:
                continue
            flat[f"{section}.{name}"] = value
    flat["train.data"] = Path(config["train"]["data_dir"]).name
    return flat


# ----------------------------------------------------------------------------- statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; nan for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _value(record: dict[str, Any], split: str, metric: str) -> float | None:
    value = record["splits"].get(split, {}).get(metric)
    return None if value is None else float(value)


def select_of(run: RunRecords, select_split: str | None) -> str:
    """The split that picks a run's best checkpoint: --select_split, else its --valid_split."""
    return select_split or run.config["train"]["valid_split"]


def run_curve(run: RunRecords, split: str, metric: str) -> dict[int, float]:
    """Step -> the run's `metric` on `split`, at every evaluation that has it."""
    return {r["step"]: v for r in run.records if (v := _value(r, split, metric)) is not None}


def mean_curve(curves: list[dict[int, float]]) -> tuple[list[int], list[tuple[float, float]]]:
    """The steps that every curve has, and the mean and std over the curves at each."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, [mean_std([c[s] for c in curves]) for s in steps]


def curve_trend(curve: dict[int, float]) -> Trend | None:
    """`convergence.trend` of a step -> value curve (None if it is empty)."""
    return trend(*zip(*sorted(curve.items()))) if curve else None


def best_and_last(run: RunRecords, metric: str, select: str) -> tuple[dict, dict] | None:
    """The run's best record (highest `metric` on `select`, the earliest on ties) and last."""
    scored = [r for r in run.records if _value(r, select, metric) is not None]
    if not scored:
        return None
    best = max(scored, key=lambda r: (_value(r, select, metric), -r["step"]))
    return best, run.records[-1]


def _has(run: RunRecords, metric: str) -> bool:
    return any(metric in m for r in run.records for m in r["splits"].values())


def choose_metrics(runs: list[RunRecords], metric: str | None) -> tuple[dict[str, str], str]:
    """Per family, the metric of the table, and how it was chosen: `metric` if given; else the
    entity-level metric that compares families (`entity_mrr` / `concept_mrr_full`) when every
    run has it; else each family's headline metric."""
    if metric is not None:
        return {r.family: metric for r in runs}, "given"
    comparable = {r.family: r.comparable for r in runs}
    if all(_has(r, comparable[r.family]) for r in runs):
        return comparable, "entity"
    return {r.family: r.headline for r in runs}, "headline"


def group_runs(runs: list[RunRecords], metrics: dict[str, str]) -> list[Group]:
    groups: dict[str, Group] = {}
    for run in runs:
        key = json.dumps(config_key(run.config), sort_keys=True)
        if key not in groups:
            groups[key] = Group(key, run.family, metrics[run.family], run.headline)
        groups[key].runs.append(run)
    ordered = list(groups.values())
    varying = _varying_keys([json.loads(g.key) for g in ordered])
    for g in ordered:
        flat = json.loads(g.key)
        labels = {r.label for r in g.runs if r.label}
        g.label = " / ".join(sorted(labels)) if labels else (
            " ".join(f"{k.split('.')[-1]}={flat.get(k)}" for k in varying) or g.runs[0].path.name
        )  # fmt: skip
    return ordered


def _varying_keys(flats: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if len({json.dumps(f.get(k)) for f in flats}) > 1]


def summarize(groups: list[Group], select_split: str | None) -> list[dict[str, Any]]:
    """Per group: n, best-step statistics, and mean/std per split at best and last."""
    rows = []
    for g in groups:
        picks, runs = [], []
        for run in g.runs:
            pick = best_and_last(run, g.metric, select_of(run, select_split))
            if pick is not None:
                picks.append(pick)
                runs.append(run)
        row: dict[str, Any] = {
            "group": g.label, "family": g.family, "metric": g.metric, "n": len(picks),
            "seeds": sorted(r.seed for r in runs),
            "in_progress": any(r.in_progress for r in g.runs),
            "runs": [str(r.path) for r in runs],
            "select_split": select_split or sorted({r.config["train"]["valid_split"] for r in runs}),
        }  # fmt: skip
        if picks:
            steps = [best["step"] for best, _ in picks]
            row["best_step"] = {
                "mean": sum(steps) / len(steps),
                "min": min(steps),
                "max": max(steps),
            }
            row["last_step"] = {"min": min(last["step"] for _, last in picks),
                                "max": max(last["step"] for _, last in picks)}  # fmt: skip
        for split in SPLITS:
            for which, index in (("best", 0), ("last", 1)):
                _put(row, f"{split}_{which}", [_value(p[index], split, g.metric) for p in picks])
                if g.own != g.metric:  # the family's own metric at the same checkpoints
                    _put(
                        row, f"own_{split}_{which}", [_value(p[index], split, g.own) for p in picks]
                    )
        row["own_metric"] = g.own
        sizes = {_value(best, s, "num_entities") for best, _ in picks for s in best["splits"]}
        sizes.discard(None)
        if len(sizes) == 1:
            row["num_entities"] = int(sizes.pop())
            row["chance"] = chance_mrr(row["num_entities"])
        row.update(_rising(g, runs, select_split))
        rows.append(row)
    return rows


def _rising(g: Group, runs: list[RunRecords], select_split: str | None) -> dict[str, Any]:
    """Whether the group's mean curve over seeds (on the select split, at the steps every seed
    has) was still rising at its last checkpoint, and how many seeds' own curves were."""
    curves = [run_curve(run, select_of(run, select_split), g.metric) for run in runs]
    steps, stats = mean_curve(curves)
    mean = curve_trend({s: m for s, (m, _) in zip(steps, stats)})
    return {
        "still_rising": bool(mean and mean.rising),
        "rising_seeds": sum(bool((t := curve_trend(c)) and t.rising) for c in curves),
        "curve": mean.as_dict() if mean else None,
    }


def _put(row: dict[str, Any], key: str, values: list[float | None]) -> None:
    values = [v for v in values if v is not None]
    if values:
        mean, std = mean_std(values)
        row[key] = {"mean": mean, "std": std, "n": len(values)}


# ----------------------------------------------------------------------------- formats


def _cell(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "–"
    std = "–" if math.isnan(stat["std"]) else f"{stat['std']:.4f}"
    return f"{stat['mean']:.4f} ± {std}"


_HOW = {
    "entity": "the entity-level MRR that compares families (rank of the true tail among all N "
    "entities of the run's table: `entity_mrr` for gpt2_jepa, `concept_mrr_full` for "
    "concept_jepa)",
    "headline": "each family's headline metric",
    "given": "chosen with --metric",
}


def fallback_note(runs: list[RunRecords]) -> str:
    """Why a report fell back to the headline metrics: which runs lack the comparable one."""
    lacking = [r for r in runs if not _has(r, r.comparable)]
    names = sorted({r.comparable for r in lacking})
    return (
        f" (not the entity-level metric: {len(lacking)} of {len(runs)} runs lack "
        f"{', '.join(f'`{n}`' for n in names)}, e.g. skipped by `--entity_mrr auto` or off, "
        "or a sweep's `entity_mrr`; the families' scales then differ)"
    )


def _header(
    rows: list[dict[str, Any]], select_split: str | None, how: str, note: str = ""
) -> list[str]:
    select = select_split or "each run's --valid_split"
    metrics = ", ".join(sorted({f"`{r['metric']}` ({r['family']})" for r in rows}))
    lines = [
        f"Metric: {metrics}: {_HOW[how]}{note}. Best = the checkpoint with the highest metric on "
        f"{select} (per run; the earliest on ties); last = the run's last evaluated checkpoint. "
        "Mean ± sample std (n − 1) over seeds."
    ]
    chances = sorted({(r["num_entities"], r["chance"]) for r in rows if "chance" in r})
    if chances and how == "entity":
        parts = [f"{c:.4f} for N = {n:,}" for n, c in chances]
        lines.append(f"Chance (uniformly random ranking, H_N / N ≈ ln N / N): {'; '.join(parts)}.")
    if any("own_test_best" in r for r in rows):
        lines.append("own = the family's own headline metric at the same best checkpoint.")
    return [" ".join(lines), ""]


def to_markdown(
    rows: list[dict[str, Any]], select_split: str | None, how: str, note: str = ""
) -> str:
    own = any("own_test_best" in r for r in rows)
    cols = ["group", "family", "n", "best step (mean, min–max)"]
    cols += [f"{s} {w}" for s in ("test", "atomic", "train") for w in ("best", "last")]
    cols += ["own metric", "own test best", "own atomic best"] if own else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        up = set(_selects(r, select_split)) if r["still_rising"] else set()
        b = r.get("best_step")
        step = f"{b['mean']:.0f} ({b['min']}–{b['max']})" if b else "–"
        name = r["group"] + (" *" if r["in_progress"] else "")
        cells = [name, r["family"], str(r["n"]), step]
        cells += [
            _cell(r.get(f"{s}_{w}")) + (f" {RISING}" if w == "best" and s in up else "")
            for s in ("test", "atomic", "train")
            for w in ("best", "last")
        ]
        if own:
            same = "own_test_best" not in r  # its own metric is the table's
            cells += [f"`{r['own_metric']}`", *(["(same)"] * 2 if same else
                      [_cell(r.get("own_test_best")), _cell(r.get("own_atomic_best"))])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if any(r["in_progress"] for r in rows):
        lines += [
            "",
            "\\* in progress: not every run has finished and been evaluated on all splits.",
        ]
    lines += _rising_note(rows)
    return "\n".join(_header(rows, select_split, how, note) + lines) + "\n"


def _selects(row: dict[str, Any], select_split: str | None) -> list[str]:
    return [select_split] if select_split else list(row["select_split"])


def _rising_note(rows: list[dict[str, Any]]) -> list[str]:
    """The line under the table that names the groups still rising (none: no line)."""
    rising = [r for r in rows if r["still_rising"]]
    if not rising:
        return []
    groups = ", ".join(
        f"{r['group']} ({r['rising_seeds']} of {r['n']} seeds rise on their own)" for r in rising
    )
    return [
        "",
        f"{RISING} still rising at the last checkpoint: conclusions provisional; train longer: "
        f"{groups}. (The best checkpoint of the seeds' mean curve on the select split is in the "
        "last quarter of the run and above the earlier best by more than twice the evaluation "
        "noise and 0.01; revjepa.convergence.)",
    ]


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    cols = ["group", "family", "metric", "n", "seeds", "in_progress", "still_rising",
            "rising_seeds", "best_step_mean", "best_step_min", "best_step_max"]  # fmt: skip
    cols += [f"{s}_{w}_{m}" for s in SPLITS for w in ("best", "last") for m in ("mean", "std")]
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    for r in rows:
        keys = ("group", "family", "metric", "n", "in_progress", "still_rising", "rising_seeds")
        out = {k: r[k] for k in keys}
        out["seeds"] = " ".join(map(str, r["seeds"]))
        for k in ("mean", "min", "max"):
            out[f"best_step_{k}"] = r.get("best_step", {}).get(k)
        for s in SPLITS:
            for w in ("best", "last"):
                stat = r.get(f"{s}_{w}") or {}
                out[f"{s}_{w}_mean"], out[f"{s}_{w}_std"] = stat.get("mean"), stat.get("std")
        writer.writerow(out)
    return buf.getvalue()


def report(
    dirs: list[Path],
    metric: str | None,
    select_split: str | None,
    fmt: str,
    plot: str | None,
    log_steps: bool = False,
) -> str:
    """The report text in `fmt`; with `plot`, also the seed-band PNG (steps on a log axis with
    `log_steps`)."""
    if select_split is not None and select_split not in SPLITS:
        raise UserError(f"--select_split must be one of {', '.join(SPLITS)}, got {select_split!r}")
    runs = [load_run(p) for p in find_runs(dirs)]
    metrics, how = choose_metrics(runs, metric)
    groups = group_runs(runs, metrics)
    rows = summarize(groups, select_split)
    if not any(r["n"] for r in rows):
        raise UserError(
            f"no run has an evaluation with the metric {', '.join(set(metrics.values()))}"
        )
    if plot:
        plot_groups(groups, Path(plot), log_steps)
    if fmt == "json":
        return json.dumps(rows, indent=2, allow_nan=True) + "\n"
    if fmt == "csv":
        return to_csv(rows)
    return to_markdown(rows, select_split, how, fallback_note(runs) if how == "headline" else "")


def plot_groups(groups: list[Group], out: Path, log_steps: bool = False) -> None:
    """Write `band_figure` to `out`."""
    import matplotlib.pyplot as plt

    fig = band_figure(groups, log_steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def band_figure(groups: list[Group], log_steps: bool = False) -> Figure:
    """Per group the mean curve and a +-std band over seeds, one panel per split; steps on a log
    axis with `log_steps` (grokking curves are read that way; a step 0 is left out there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SPLITS), figsize=(5 * len(SPLITS), 4), squeeze=False)
    for ax, split in zip(axes[0], ("test", "atomic", "train")):
        for g in groups:
            curves = [c for run in g.runs if (c := run_curve(run, split, g.metric))]
            if not curves:
                continue
            steps, stats = mean_curve(curves)
            mean = [m for m, _ in stats]
            std = [0.0 if math.isnan(s) else s for _, s in stats]
            line = ax.plot(steps, mean, label=f"{g.label} (n={len(curves)})")[0]
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.2)  # fmt: skip
        ax.set_title(split)
        ax.set_xscale("log" if log_steps else "linear")
        ax.set_xlabel("step (log)" if log_steps else "step")
        ax.set_ylabel(", ".join(sorted({g.metric for g in groups})))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig
