#!/usr/bin/env bash
# The GPU checks of a lent CUDA machine, in one call, most important first: CUDA-only tests,
# `revjepa bench`, the seed's training command with torch.compile + resume + evaluation, a step
# profile, and a concept-JEPA run. Each stage has its own time limit inside an overall deadline,
# so one stuck stage cannot take the rest. Usage (repository root, no install needed):
#   OUT=/some/dir DEADLINE_S=500 bash scripts/gpu_check.sh
# Writes log.txt, bench.json, profile.json, profile_*.txt, eval_A.json and runs.tgz to $OUT.
# STEPS, GEN_EXTRA, TRAIN_EXTRA and STAGES shrink it for a CPU smoke run of the script itself
# (tests/test_slurm.py does that); WORK is where the runs go (default /tmp).
set -u
OUT=${OUT:-/tmp/gpu_check}
DEADLINE_S=${DEADLINE_S:-500}
STEPS=${STEPS:-1000}
GEN_EXTRA=${GEN_EXTRA:-}
TRAIN_EXTRA=${TRAIN_EXTRA:-}
STAGES=${STAGES:-env cuda_tests profile e2e concept bench}
PROFILE_VARIANTS=${PROFILE_VARIANTS:-graphs eager compiled}
PY=${PY:-python3}
WORK=${WORK:-/tmp}  # the runs and data go here
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export OUT STEPS GEN_EXTRA TRAIN_EXTRA PY WORK
T0=$(date +%s)
LOG="$OUT/log.txt"
: >"$LOG"
SUMMARY=()

stage() { # stage NAME LIMIT_S CMD...
    local name=$1 limit=$2
    shift 2
    [[ " $STAGES " == *" $name "* ]] || return 0
    local left=$((DEADLINE_S - ($(date +%s) - T0)))
    ((left < limit)) && limit=$left
    if ((limit < 10)); then
        SUMMARY+=("$name: not run (deadline)")
        return
    fi
    echo "=== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$LOG"
    local s rc
    s=$(date +%s)
    timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    SUMMARY+=("$name: rc $rc, $(($(date +%s) - s)) s")
    echo "=== $name rc=$rc $(($(date +%s) - s))s" | tee -a "$LOG"
}

env_info() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__,
transformers.__version__, torch.cuda.get_device_name(), torch.cuda.is_bf16_supported())'
    nproc
}

e2e() {
    set -e
    local d=$WORK/gc_data
    rm -rf "$d" "$WORK/gc_A" "$WORK/gc_B" "$WORK/gc_C"
    # shellcheck disable=SC2086  # the *_EXTRA variables are word lists
    "$PY" -m revjepa gen-data --output_dir "$d" $GEN_EXTRA
    local half=$((STEPS / 2))
    # shellcheck disable=SC2206
    local common=(--data_dir "$d" --bf16 --eval_steps "$half" --save_step_dense "$STEPS"
        --save_step_dense_interval "$half" --log_interval $((STEPS / 4)) $TRAIN_EXTRA)
    "$PY" train_jepa.py "${common[@]}" --output_dir "$WORK/gc_A" --max_steps "$STEPS"
    "$PY" train_jepa.py "${common[@]}" --output_dir "$WORK/gc_B" --max_steps "$half"
    "$PY" train_jepa.py "${common[@]}" --output_dir "$WORK/gc_B" --max_steps "$STEPS" \
        --resume_from latest
    "$PY" - <<'EOF'
import json, os, torch
last = f"checkpoints/checkpoint_step_{os.environ['STEPS']}.pt"
work = os.environ["WORK"]
a = torch.load(f"{work}/gc_A/{last}", weights_only=False)
b = torch.load(f"{work}/gc_B/{last}", weights_only=False)
diff = max((a["model_state_dict"][k].float() - b["model_state_dict"][k].float()).abs().max().item()
           for k in a["model_state_dict"])
scale = max(v.float().abs().max().item() for v in a["model_state_dict"].values())
ma = [json.loads(x) for x in open(f"{work}/gc_A/metrics.jsonl")]
mb = [json.loads(x) for x in open(f"{work}/gc_B/metrics.jsonl")]
print("RESUME uninterrupted vs resumed halfway: max |dw| =", diff, "max |w| =", scale)
print("RESUME last records A:", ma[-1]); print("RESUME last records B:", mb[-1])
EOF
    "$PY" evaluate_all_splits.py --checkpoint "$WORK/gc_A/checkpoints/checkpoint_step_$STEPS.pt" \
        --data_dir "$d" --batch_size 32 --output "$OUT/eval_A.json"
}

concept() {
    set -e
    # shellcheck disable=SC2086
    "$PY" -m revjepa train --preset ws_jepa_1_1 --data_dir "$WORK/gc_data" \
        --output_dir "$WORK/gc_C" \
        --max_steps "$STEPS" --eval_steps "$STEPS" --log_interval $((STEPS / 4)) --bf16 $TRAIN_EXTRA
}
export -f env_info e2e concept

stage env 30 bash -c env_info
stage cuda_tests 120 "$PY" -m pytest -p no:cacheprovider -q tests/test_train.py -k cuda -rs
# shellcheck disable=SC2086
stage profile 200 "$PY" scripts/gpu_step_profile.py "$OUT" $PROFILE_VARIANTS
# each training process compiles (~20 s on an H200 with torch 2.11, static shapes; the
# inductor cache of the profile stage may shorten that): three of them need time
stage e2e 330 bash -c e2e
stage concept 90 bash -c concept
stage bench 200 "$PY" -m revjepa bench --output "$OUT/bench.json"

tar -czf "$OUT/runs.tgz" --exclude='*.pt' -C "$WORK" gc_A gc_B gc_C 2>/dev/null
echo "=== summary ($(($(date +%s) - T0)) s)"
printf '%s\n' "${SUMMARY[@]}"
grep -E "^(gpu |train cpu (fp32|bf16) steps/s |bf16 speed|RESUME|(eager|compiled|graphs)[- ])|passed|failed|torch.compile|ms/step|steps_per_s [0-9]|test mrr" "$LOG" | tail -60
