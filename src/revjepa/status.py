"""`revjepa status`: where runs stand, from their files alone (a trainer is never disturbed).

Per run: the step / max steps, steps/s and ETA from the recent log records, the last and the
best evaluation (headline metric per split), the curve's shape on the metric and split that
`revjepa report` would use (and whether it was still rising at its last checkpoint,
`convergence.trend`), the newest valid checkpoint, whether a trainer holds the run's lock now,
the state (running / finished / preempted / failed / crashed / not started) and the collapse
alarm. `run_status` and `collect_status` return plain dicts, for other commands (a sweep's
summary) to reuse.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from .checkpoint import find_latest_valid, list_checkpoints
from .collapse import collapse_summary
from .errors import UserError
from .report import choose_metrics, curve_trend, family_metrics, load_run, run_curve, select_of
from .runlog import RUN_STATE, lock_held, read_jsonl

RATE_RECORDS = 5  # the recent training records that steps/s is measured over
RUN_FILES = ("training_args.json", RUN_STATE, "metrics.jsonl", "checkpoints")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or caught half-way through a write
    return data if isinstance(data, dict) else None


def expand_runs(paths: list[Path]) -> list[Path]:
    """Run directories, with a sweep directory (one holding `runs/`, not itself a run) expanded
    to its runs' directories."""
    out: list[Path] = []
    for path in paths:
        if not path.exists():
            raise UserError(f"{path}: no such run or sweep directory")
        if not path.is_dir():
            raise UserError(f"{path}: not a directory")
        is_run = any((path / name).exists() for name in RUN_FILES)
        if not is_run and (path / "runs").is_dir():
            out.extend(_sweep_runs(path))
        else:
            out.append(path)
    return out


def _sweep_runs(sweep: Path) -> list[Path]:
    """A sweep's runs: every run of its plan (`sweep.json`, in plan order, those not started
    yet included), else the directories under `runs/`."""
    plan = _read_json(sweep / "sweep.json") or {}
    names = [r.get("name") for r in plan.get("runs", []) if isinstance(r, dict)]
    if names and all(isinstance(n, str) and n for n in names):
        return [sweep / "runs" / n for n in names]  # by name: the sweep may have moved
    return sorted(p for p in (sweep / "runs").iterdir() if p.is_dir())


def _rate(train: list[dict[str, Any]]) -> float | None:
    """Steps per second over the last RATE_RECORDS training records: their steps over their
    time (each record's steps_per_s covers the steps since the one before)."""
    steps = seconds = 0.0
    for prev, rec in list(zip([None, *train], train))[-RATE_RECORDS:]:
        sps = rec.get("steps_per_s")
        delta = rec["step"] - (prev["step"] if prev else 0)
        if not sps or sps <= 0 or delta <= 0:
            continue
        steps, seconds = steps + delta, seconds + delta / sps
    return steps / seconds if seconds > 0 else None


def _evaluations(records: list[dict[str, Any]], headline: str) -> list[dict[str, Any]]:
    """(step, {split: headline value}) of every evaluation record."""
    pattern = re.compile(rf"^eval_(train|atomic|test)_{re.escape(headline)}$")
    out = []
    for r in records:
        values = {m.group(1): v for k, v in r.items() if (m := pattern.match(k))}
        if values:
            out.append({"step": r["step"], headline: values})
    return out


def _state(run_state: dict[str, Any] | None, held: bool) -> str:
    if held:
        return "running"
    if run_state is None:
        return "not started"
    return {
        "running": "crashed",  # says running, but no trainer holds the lock
        "finished": "finished",
        "stopped": "preempted",
        "failed": "failed",
    }.get(str(run_state.get("state")), "unknown")


def _checkpoint(run_dir: Path, verify: bool) -> dict[str, Any] | None:
    ckpt_dir = run_dir / "checkpoints"
    if verify:
        found = find_latest_valid(ckpt_dir)  # loads and verifies, newest first
        if found is None:
            return None
        path, state = found
        return {"step": int(state["step"]), "path": str(path), "verified": True}
    listed = list_checkpoints(ckpt_dir)
    if not listed:
        return None
    step, path = listed[-1]
    return {"step": step, "path": str(path), "verified": False}


def _curve(run_dir: Path) -> dict[str, Any] | None:
    """`convergence.trend` of the run's curve on the metric and split `revjepa report` would
    use (from eval_all.jsonl, else the evaluations in metrics.jsonl), with that metric and
    split; None without evaluations."""
    if not (run_dir / "training_args.json").is_file():
        return None
    try:
        run = load_run(run_dir)
    except (UserError, KeyError):
        return None  # training_args.json caught half-way through a write
    metric = choose_metrics([run], None)[0][run.family]
    split = select_of(run, None)
    found = curve_trend(run_curve(run, split, metric))
    return None if found is None else {"metric": metric, "split": split, **found.as_dict()}


def run_status(run_dir: Path, verify: bool = True) -> dict[str, Any]:
    """The status of one run directory (see the module docstring)."""
    args = _read_json(run_dir / "training_args.json") or {}
    run_state = _read_json(run_dir / RUN_STATE)
    held = lock_held(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    family = args.get("model", {}).get("family", "gpt2_jepa")
    headline = family_metrics(args)[1]
    valid = args.get("train", {}).get("valid_split", "test")
    train = [r for r in records if "loss" in r]
    step = max([r["step"] for r in records] + [int((run_state or {}).get("step", 0))])
    max_steps = (run_state or {}).get("max_steps") or args.get("resolved", {}).get("max_steps")
    state = _state(run_state, held)
    rate = _rate(train)
    evals = _evaluations(records, headline)
    ranked = [e for e in evals if valid in e[headline]]
    metrics_path = run_dir / "metrics.jsonl"
    curve = _curve(run_dir)
    return {
        "run_dir": str(run_dir),
        "state": state,
        "lock_held": held,
        "family": family,
        "step": step,
        "max_steps": max_steps,
        "steps_per_s": rate,
        "eta_s": (max_steps - step) / rate if state == "running" and rate and max_steps else None,
        "updated_s_ago": time.time() - metrics_path.stat().st_mtime
        if metrics_path.exists()
        else None,
        "headline": headline,
        "valid_split": valid,
        "last_eval": evals[-1] if evals else None,
        "best_eval": max(ranked, key=lambda e: e[headline][valid]) if ranked else None,
        "curve": curve,
        "still_rising": curve["rising"] if curve else None,
        "checkpoint": _checkpoint(run_dir, verify),
        "signal": (run_state or {}).get("signal"),
        "error": (run_state or {}).get("error"),
        **collapse_summary(train),
    }


def collect_status(paths: list[Path], verify: bool = True) -> list[dict[str, Any]]:
    """`run_status` of every run of `paths` (sweep directories expanded)."""
    return [run_status(p, verify) for p in expand_runs(paths)]


# ----------------------------------------------------------------------------- the table


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _eval_cell(ev: dict[str, Any] | None, headline: str) -> str:
    if ev is None:
        return "-"
    values = " ".join(f"{split} {v:.4f}" for split, v in ev[headline].items())
    return f"{ev['step']}: {values}"


def _curve_cell(curve: dict[str, Any] | None, named: bool) -> str:
    """The curve's shape; `named`: with its metric and split (the rows differ in them)."""
    if curve is None:
        return "-"
    return f"{curve['metric']} on {curve['split']}: {curve['shape']}" if named else curve["shape"]


def _notes(row: dict[str, Any]) -> str:
    notes = []
    if row["state"] == "preempted" and row["signal"]:
        notes.append(f"stopped by {row['signal']}")
    if row["state"] == "failed" and row["error"]:
        err = row["error"]
        notes.append(err if len(err) <= 70 else err[:67] + "...")
    if row["collapse"]:
        now = "collapsed" if row["collapsed_now"] else "was collapsed"
        cos = row["last_pred_mean_cos"]
        cos_note = f", pred_mean_cos {cos:.4f}" if cos is not None else ""
        notes.append(f"JEPA COLLAPSE: {now} (since step {row['collapse_first_step']}{cos_note})")
    if row["state"] == "running" and row["updated_s_ago"] is not None:
        notes.append(f"updated {_duration(row['updated_s_ago'])} ago")
    return "; ".join(notes)


def format_status(rows: list[dict[str, Any]]) -> str:
    """The compact table of `revjepa status`."""
    if not rows:
        return "no runs"
    headline = rows[0]["headline"] if len({r["headline"] for r in rows}) == 1 else "headline"
    header = ["run", "state", "step", "steps/s", "ETA", f"last eval ({headline})", "best eval"]
    on = sorted({(r["curve"]["metric"], r["curve"]["split"]) for r in rows if r["curve"]})
    header += [f"curve ({on[0][0]} on {on[0][1]})" if len(on) == 1 else "curve"]
    header += ["checkpoint", "notes"]
    table = [header]
    for r in rows:
        step = f"{r['step']:,}/{r['max_steps']:,}" if r["max_steps"] else f"{r['step']:,}"
        ck = r["checkpoint"]
        table.append(
            [
                r["run_dir"],
                r["state"],
                step,
                f"{r['steps_per_s']:.1f}" if r["steps_per_s"] else "-",
                _duration(r["eta_s"]),
                _eval_cell(r["last_eval"], r["headline"]),
                _eval_cell(r["best_eval"], r["headline"]),
                _curve_cell(r["curve"], named=len(on) > 1),
                f"step {ck['step']:,}" if ck else "-",
                _notes(r),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
