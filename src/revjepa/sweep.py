"""`revjepa sweep`: a spec's runs, trained and evaluated locally (N at once) or as one SLURM job
array; resumable and idempotent.

Layout of a sweep directory `OUT`:
  sweep.json          the plan: the spec, every run's name, flags, data and run directory
  data/KEY/           each distinct data block, generated once
  runs/NAME/          ordinary run directories (checkpoints, metrics.jsonl, eval_all.jsonl)
  state/NAME.*        the sweep's own bookkeeping: .lock (held while a task runs), .done.json
                      (written last: the run is trained and evaluated), .failed.json
  logs/NAME.log       a local task's output (SLURM tasks: logs/slurm-JOB_TASK.out)
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .data import atomic_write_bytes
from .errors import UserError
from .runlog import RUN_STATE, lock_held
from .spec import Plan, expand, load_spec, spec_changes

PLAN = "sweep.json"
EXIT_STOPPED = 3  # a task stopped by a signal before its last step: resume it later


# ----------------------------------------------------------------------------- the plan


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def read_plan(out: Path) -> dict[str, Any]:
    path = out / PLAN
    try:
        return json.loads(path.read_text())
    except OSError:
        raise UserError(f"{out}: not a sweep directory (no {PLAN})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON: {exc}") from None


def plan_record(plan: Plan, out: Path, spec_file: Path) -> dict[str, Any]:
    runs = []
    for run in plan.runs:
        record = run.to_dict()
        record["run_dir"] = str(out / "runs" / run.name)
        record["data_dir"] = str(out / "data" / run.data_key)
        runs.append(record)
    return {
        "name": plan.name,
        "spec_file": str(spec_file),
        "spec": plan.spec,
        "data": plan.data,
        "slurm": plan.slurm,
        "entity_mrr": plan.entity_mrr,
        "runs": runs,
    }


def prepare(spec_file: Path, out: Path) -> dict[str, Any]:
    """Check the spec, refuse a changed spec for an existing sweep, write the plan and the
    data. Nothing is written when the spec is refused."""
    plan = expand(load_spec(spec_file))
    out = out.resolve()
    if (out / PLAN).exists():
        old = read_plan(out)
        changes = spec_changes(old.get("spec"), plan.spec)
        if changes:
            raise UserError(
                f"{out} holds a sweep of another spec ({'; '.join(changes[:3])}); "
                "use a new --out or restore the spec"
            )
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty and holds no sweep")
    record = plan_record(plan, out, spec_file.resolve())
    _write_json(out / PLAN, record)
    for key, flags in record["data"].items():
        generate_data(out / "data" / key, flags)
    return record


def describe_plan(spec_file: Path) -> str:
    """The runs a spec expands to, one line each (what `--dry_run` prints); writes nothing."""
    plan = expand(load_spec(spec_file))
    lines = [f"sweep {plan.name}: {len(plan.runs)} runs, {len(plan.data)} dataset(s)"]
    for run in plan.runs:
        steps = run.config["train"]["max_steps"]
        flags = " ".join(run.argv)
        lines.append(f"{run.name}  {run.family}  {steps:,} steps  data {run.data_key}  {flags}")
    return "\n".join(lines)


def check_seeds(spec_file: Path, seeds: list[int]) -> None:
    """Refuse `--seeds` naming a seed the spec does not run (before anything is written)."""
    known = sorted({run.seed for run in expand(load_spec(spec_file)).runs})
    unknown = sorted(set(seeds) - set(known))
    if unknown:
        raise UserError(f"--seeds: the spec has no seed {unknown} (its seeds: {known})")


def generate_data(target: Path, flags: dict[str, Any]) -> None:
    """Generate one data block unless it is there (a temporary directory, then a rename)."""
    from .data import GenConfig, generate, write_generated

    if (target / "vocab.json").is_file():
        return
    tmp = target.with_name(f".{target.name}.tmp")
    write_generated(generate(GenConfig(**flags)), tmp)
    os.replace(tmp, target)
    print(f"generated {target}", flush=True)


# ----------------------------------------------------------------------------- one task


def state_path(out: Path, name: str, kind: str) -> Path:
    return out / "state" / f"{name}.{kind}"


def _lock(out: Path, name: str):
    path = state_path(out, name, "lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise UserError(f"run {name} of {out} is running in another process") from None
    return fh


def run_task(out: Path, index: int) -> int:
    """Train (or resume) and evaluate run `index` of the sweep in `out`; the completion
    marker is written last. Exit codes: 0 done, 3 stopped by a signal (resume later), 1 failed."""
    plan = read_plan(out)
    if not 0 <= index < len(plan["runs"]):
        raise UserError(
            f"{out}: task {index} out of range (the sweep has {len(plan['runs'])} runs)"
        )
    run = plan["runs"][index]
    name = run["name"]
    if state_path(out, name, "done.json").exists():
        print(f"{name}: already done", flush=True)
        return 0
    lock = _lock(out, name)
    state_path(out, name, "failed.json").unlink(missing_ok=True)
    start = time.time()
    try:
        if not _train(run):
            return EXIT_STOPPED
        signal.signal(signal.SIGTERM, _stop_evaluation)  # eval_all.jsonl resumes it later
        _evaluate(run, plan.get("entity_mrr", "auto"))
    except BaseException as exc:  # noqa: BLE001 - recorded for --status, then re-raised
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            _write_json(state_path(out, name, "failed.json"), {"error": line, "time": time.time()})
        raise
    finally:
        lock.close()
    _write_json(
        state_path(out, name, "done.json"), {"seconds": time.time() - start, "time": time.time()}
    )
    print(f"{name}: done", flush=True)
    return 0


def _stop_evaluation(signum, frame) -> None:  # noqa: ARG001
    raise SystemExit(EXIT_STOPPED)


def _train(run: dict[str, Any]) -> bool:
    """Train to the end (resuming the newest checkpoint); False if a signal stopped it."""
    from .spec import parse_run_flags
    from .train import train

    argv = [
        *run["argv"], "--data_dir", run["data_dir"], "--output_dir", run["run_dir"],
        "--seed", str(run["seed"]),
    ]  # fmt: skip
    train(*parse_run_flags(argv), resume_from="latest")
    state = json.loads((Path(run["run_dir"]) / RUN_STATE).read_text())
    return state.get("state") == "finished"


def _evaluate(run: dict[str, Any], entity_mrr: str) -> None:
    """Every checkpoint on every split, into the run's eval_all.jsonl (resumable); entity_mrr
    as the spec's `entity_mrr` (auto, on, off) decides."""
    from .data import load_dataset
    from .evaluate import EntityMrrPlan, sweep_directory

    run_dir = Path(run["run_dir"])
    args = json.loads((run_dir / "training_args.json").read_text())
    device = args.get("resolved", {}).get("device", "cpu")
    dataset = load_dataset(run["data_dir"], with_train=False)
    batch = args["train"]["eval_batch_size"]
    sweep_directory(
        run_dir / "checkpoints", dataset, batch, False, device, log=lambda _: None,
        entity_mrr=EntityMrrPlan(entity_mrr),
    )  # fmt: skip


# ----------------------------------------------------------------------------- status


def run_status(out: Path, run: dict[str, Any]) -> dict[str, Any]:
    """done / running / failed / interrupted / not started, with the step and an error line."""
    name, run_dir = run["name"], Path(run["run_dir"])
    info: dict[str, Any] = {"name": name, "step": None, "max_steps": None, "error": None}
    state_file = run_dir / RUN_STATE
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
            info["step"], info["max_steps"] = state.get("step"), state.get("max_steps")
        except json.JSONDecodeError:
            pass
    failed = state_path(out, name, "failed.json")
    if state_path(out, name, "done.json").exists():
        info["status"] = "done"
    elif lock_held(out / "state", f"{name}.lock"):
        info["status"] = "running"
    elif failed.exists():
        info["status"] = "failed"
        info["error"] = json.loads(failed.read_text()).get("error")
    elif (run_dir / "training_args.json").exists():
        info["status"] = "interrupted"
    else:
        info["status"] = "not started"
    return info


def format_status(out: Path) -> tuple[str, bool]:
    """The --status table, and whether every run is done."""
    plan = read_plan(out)
    rows = [run_status(out, run) for run in plan["runs"]]
    width = max(len(r["name"]) for r in rows)
    lines = []
    for r in rows:
        step = f"{r['step']}/{r['max_steps']}" if r["step"] is not None else "-"
        line = f"{r['name']:<{width}}  {r['status']:<11}  step {step}"
        if r["error"]:
            line += f"  last line: {r['error']}"
        lines.append(line)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    lines.append(f"{len(rows)} runs: {summary}")
    return "\n".join(lines), counts.get("done", 0) == len(rows)


# ----------------------------------------------------------------------------- local executor


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the sweep process dies (even by SIGKILL), so no trainer
    outlives its sweep; the trainer then checkpoints and stops as on any SIGTERM."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_local(
    out: Path, parallel: int, threads: int | None = None, seeds: list[int] | None = None
) -> int:
    """Run every unfinished task (of `seeds` only, when given: a long sweep split into parts),
    `parallel` at once, CPU threads divided among them."""
    import subprocess

    plan = read_plan(out)
    runs = plan["runs"]
    chosen = [i for i, r in enumerate(runs) if seeds is None or r["seed"] in seeds]
    if not chosen:
        known = sorted({r["seed"] for r in runs})
        raise UserError(
            f"--seeds {seeds}: the sweep has no runs of these seeds (its seeds: {known})"
        )
    todo = [i for i in chosen if not state_path(out, runs[i]["name"], "done.json").exists()]
    total, done = len(chosen), len(chosen) - len(todo)
    threads = threads or max(1, (os.cpu_count() or 1) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"sweep {plan['name']}: {total} runs, {done} done, {len(todo)} to run, "
          f"{parallel} at once x {threads} thread(s)", flush=True)  # fmt: skip
    stopping = []
    procs: dict[int, tuple[subprocess.Popen, float]] = {}

    def stop(signum, frame) -> None:  # noqa: ARG001
        stopping.append(signum)
        for proc, _ in procs.values():
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    failed = 0
    try:
        while (todo and not stopping) or procs:
            while todo and not stopping and len(procs) < parallel:
                i = todo.pop(0)
                procs[i] = (_start(out, i, runs[i]["name"], env), time.time())
                print(f"[{done}/{total}] start {runs[i]['name']}", flush=True)
            time.sleep(0.2)
            for i, (proc, started) in list(procs.items()):
                if proc.poll() is None:
                    continue
                del procs[i]
                ok = _report_task(out, runs[i]["name"], proc.returncode, time.time() - started)
                done += ok
                failed += not ok and proc.returncode != EXIT_STOPPED
                print(f"[{done}/{total}] done", flush=True) if ok else None
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    print(format_status(out)[0], flush=True)
    return 0 if done == total else 1


def _start(out: Path, index: int, name: str, env: dict[str, str]):
    import subprocess

    log_path = out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "revjepa", "sweep-run", str(out), str(index)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent,
        )  # fmt: skip


def _report_task(out: Path, name: str, returncode: int, seconds: float) -> bool:
    """One line per finished task; a task that died without a word gets a failure record."""
    if returncode == 0 and state_path(out, name, "done.json").exists():
        print(f"  {name}: finished in {seconds:.0f} s", flush=True)
        return True
    if returncode == EXIT_STOPPED:
        print(f"  {name}: stopped by a signal (resumes on the next run)", flush=True)
        return False
    failed = state_path(out, name, "failed.json")
    if not failed.exists():
        lines = (out / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()
        _write_json(failed, {"error": lines[-1] if lines else f"exit {returncode}"})
    error = json.loads(failed.read_text()).get("error")
    print(f"  {name}: FAILED (exit {returncode}): {error}", flush=True)
    return False
