"""`revjepa sweep --executor slurm`: one job-array script for a sweep (one task per run), with
the preemption handling of train_jepa_osc.sh: USR1 (time limit near, or `scancel
--signal=USR1 --batch`) checkpoints the run and requeues the task; TERM checkpoints and ends it.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from .errors import UserError

_OPTIONS = {  # spec/flag key -> sbatch option
    "partition": "--partition",
    "time": "--time",
    "gres": "--gres",
    "cpus_per_task": "--cpus-per-task",
    "mem": "--mem",
    "account": "--account",
}

OPTION_KEYS = (*_OPTIONS, "max_concurrent")

# The task's exit code 3 means "stopped by a signal before its last step" (sweep.EXIT_STOPPED).
_BODY = """\
set -uo pipefail
OUT={out}
{setup}
{python} -m revjepa sweep-run "$OUT" "$SLURM_ARRAY_TASK_ID" &
child=$!
requeue_wanted=0
cancelled=0
# shellcheck disable=SC2329  # invoked by the traps below
on_usr1() {{
    echo "$(date) USR1: the run checkpoints; this task will be requeued"
    requeue_wanted=1
    kill -USR1 "$child" 2>/dev/null || true
}}
# shellcheck disable=SC2329
on_term() {{
    echo "$(date) TERM: the run checkpoints; this task ends (no requeue)"
    cancelled=1
    kill -TERM "$child" 2>/dev/null || true
}}
trap on_usr1 USR1
trap on_term TERM
while kill -0 "$child" 2>/dev/null; do
    wait "$child" || true
done
status=0
wait "$child" || status=$?
if [ "$requeue_wanted" = 1 ] && [ "$cancelled" = 0 ] && [ "$status" = 3 ]; then
    echo "$(date) requeueing task $SLURM_ARRAY_TASK_ID (job $SLURM_JOB_ID)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
"""


def sbatch_script(plan: dict[str, Any], out: Path, options: dict[str, Any]) -> str:
    """The job-array script: `options` are the spec's slurm block with the flags on top."""
    n = len(plan["runs"])
    concurrent = options.get("max_concurrent")
    array = f"0-{n - 1}" + (f"%{concurrent}" if concurrent else "")
    lines = [
        "#!/bin/bash",
        f"# revjepa sweep {plan['name']}: {n} runs, one array task each (see {out}/sweep.json)",
        f"#SBATCH --job-name=revjepa-{plan['name']}",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={out}/logs/slurm-%A_%a.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
    ]
    for key, option in _OPTIONS.items():
        if options.get(key) is not None:
            lines.append(f"#SBATCH {option}={options[key]}")
    lines += [f"#SBATCH {arg}" for arg in options.get("sbatch_args", [])]
    body = _BODY.format(
        out=shlex.quote(str(out)),
        setup="\n".join(options.get("setup", [])),
        python=shlex.quote(sys.executable),
    )
    return "\n".join(lines) + "\n" + body


def submit(script: Path) -> str:
    """Submit with sbatch; the job id."""
    try:
        proc = subprocess.run(
            ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise UserError(
            "sbatch not found: is this a SLURM login node? (--dry_run writes the script only)"
        ) from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(f"sbatch refused {script}: {lines[-1] if lines else proc.returncode}")
    return proc.stdout.strip().split(";")[0]
