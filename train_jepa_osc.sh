#!/bin/bash
# Full baseline run of the seed: 3,000,000 steps, dense-then-sparse checkpoints, eval every 5k.
# Edit the #SBATCH lines for your cluster (account, partition, GPUs, time), or override them on
# the command line: sbatch --account=ABC --partition=gpu train_jepa_osc.sh
# Paths come from the environment (defaults relative to the submit directory):
#   REPO_DIR, DATA_DIR, OUTPUT_DIR, VENV, GPUS_PER_NODE, EXTRA_ARGS
# In a job array (sbatch --array=0-3) task i writes OUTPUT_DIR/task_i, and %a in EXTRA_ARGS is i
# (e.g. EXTRA_ARGS="--seed %a").
# On a CPU-only partition: sbatch --gpus-per-node=0 --cpus-per-task=N --mem=XG train_jepa_osc.sh
# Signals (README "Clusters"):
#   USR1 (sent 120 s before the time limit by --signal=B:USR1@120, or by
#        `scancel --signal=USR1 --batch JOB`): the trainer finishes its step, checkpoints and
#        exits; this script then requeues the job, which resumes from the latest checkpoint.
#   TERM (`scancel JOB`, the time limit itself, SLURM's own preemption): the trainer checkpoints
#        and exits, and the job ends; it is never requeued here (a preemption with
#        PreemptMode=REQUEUE is requeued by SLURM itself). TERM after USR1 cancels the requeue.
# The log file is opened by SLURM before this script runs: submit from the repository root
# (it ships logs/), or pass --output to sbatch.
#SBATCH --job-name=jepa_train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=48:00:00
#SBATCH --output=logs/jepa_train_%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
##SBATCH --account=YOUR_ACCOUNT
##SBATCH --partition=YOUR_PARTITION
set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
DATA_DIR=${DATA_DIR:-$REPO_DIR/data/inversionidcomb10.50000.30000}
OUTPUT_DIR=${OUTPUT_DIR:-$REPO_DIR/runs/jepa_baseline}
VENV=${VENV:-$REPO_DIR/.venv}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
NNODES=${SLURM_NNODES:-1}
EXTRA_ARGS=${EXTRA_ARGS:-}
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    # a job array: every task trains its own run; %a in EXTRA_ARGS becomes the task id
    OUTPUT_DIR="$OUTPUT_DIR/task_$SLURM_ARRAY_TASK_ID"
    EXTRA_ARGS=${EXTRA_ARGS//%a/$SLURM_ARRAY_TASK_ID}
fi

cd "$REPO_DIR"
mkdir -p logs
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if [ ! -f "$DATA_DIR/train.json" ]; then
    revjepa gen-data --output_dir "$DATA_DIR"
fi

args=(
    --data_dir "$DATA_DIR" --output_dir "$OUTPUT_DIR"
    --n_layer 4 --n_embd 768 --n_head 12 --batch_size 256
    --learning_rate 1e-4 --weight_decay 0.01
    --max_steps 3000000
    --save_steps 50000 --save_step_dense 30000 --save_step_dense_interval 5000
    --eval_steps 5000 --log_interval 1000
    --k_pred_tok 1 --distance_metric cosine --lambda_jepa 1.0 --gamma_ntp 1.0
    --precision bf16 --resume_from latest
)
# shellcheck disable=SC2206
args+=($EXTRA_ARGS)

ntasks=$((NNODES * GPUS_PER_NODE))
if [ "$ntasks" -gt 1 ]; then
    # One process per GPU started by srun (it forwards USR1 to every rank); rank 0's host is
    # the rendezvous point. --batch_size is per GPU: the global batch is 256 x $ntasks.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export MASTER_ADDR
    export MASTER_PORT=${MASTER_PORT:-29500}
    srun --ntasks="$ntasks" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 \
        python train_jepa.py "${args[@]}" &
else
    python train_jepa.py "${args[@]}" &
fi
child=$!

requeue_wanted=0
cancelled=0
# shellcheck disable=SC2329  # the trap handlers are invoked by the traps below
on_usr1() {
    echo "$(date) USR1: asking the trainer to checkpoint; the job will be requeued"
    requeue_wanted=1
    kill -USR1 "$child" 2>/dev/null || true
}
# shellcheck disable=SC2329
on_term() {
    echo "$(date) TERM: asking the trainer to checkpoint; the job ends (no requeue)"
    cancelled=1
    kill -TERM "$child" 2>/dev/null || true
}
trap on_usr1 USR1
trap on_term TERM
# a trapped signal interrupts `wait` while the trainer still runs: wait again; then ask once
# more for the trainer's own exit status (bash keeps it after the process has ended)
while kill -0 "$child" 2>/dev/null; do
    wait "$child" || true
done
status=0
wait "$child" || status=$?
if [ "$requeue_wanted" = 1 ] && [ "$cancelled" = 0 ] && [ "$status" = 0 ] &&
    grep -q '"state": "stopped"' "$OUTPUT_DIR/run_state.json" 2>/dev/null; then
    echo "$(date) requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
