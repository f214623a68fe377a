#!/bin/bash
# Quick check of the whole pipeline on a cluster: small model, 1 epoch (~1,523 steps) of the
# default dataset, then the evaluation of the final checkpoint on all splits.
# Edit the #SBATCH lines for your cluster, or pass them to sbatch. Paths from the environment:
#   REPO_DIR, DATA_DIR, OUTPUT_DIR, VENV
#SBATCH --job-name=jepa_test
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=32G
#SBATCH --time=01:00:00
#SBATCH --output=logs/jepa_test_%j.out
# (SLURM opens that file before this script runs: submit from the repository root, which ships
# logs/, or pass --output to sbatch)
##SBATCH --account=YOUR_ACCOUNT
##SBATCH --partition=YOUR_PARTITION
set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
DATA_DIR=${DATA_DIR:-$REPO_DIR/data/inversionidcomb10.50000.30000}
OUTPUT_DIR=${OUTPUT_DIR:-$REPO_DIR/runs/jepa_test_${SLURM_JOB_ID:-local}}
VENV=${VENV:-$REPO_DIR/.venv}

cd "$REPO_DIR"
mkdir -p logs
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if [ ! -f "$DATA_DIR/train.json" ]; then
    revjepa gen-data --output_dir "$DATA_DIR"
fi

python train_jepa.py \
    --data_dir "$DATA_DIR" --output_dir "$OUTPUT_DIR" \
    --n_layer 2 --n_embd 256 --n_head 4 --batch_size 256 \
    --num_epochs 1 --eval_steps 500 --log_interval 100 \
    --save_steps 500 --save_step_dense 0 --save_step_dense_interval 500 \
    --resume_from latest

python evaluate_all_splits.py \
    --checkpoint "$OUTPUT_DIR/checkpoints/best_model.pt" \
    --data_dir "$DATA_DIR" --batch_size 256 --output "$OUTPUT_DIR/results.json"
