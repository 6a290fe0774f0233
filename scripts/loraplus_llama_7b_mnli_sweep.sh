#!/usr/bin/env bash
# LoRA+ (Hayou et al. 2024), the learning-rate sweep: Llama-7B on MNLI over a grid of (lr_A, lr_B) with seeds
# {0, 1}, as nikhil-ghosh-berkeley/loraplus scripts/sweep_llama-7b_lora_mnli.sh. Each point is one run of
# scripts/loraplus_llama_7b_mnli.sh with LR = lr_A and LR_RATIO = lr_B / lr_A.
#
#   scripts/loraplus_llama_7b_mnli_sweep.sh [--smoke]
#
#   scripts/loraplus_llama_7b_mnli_sweep.sh                        # 7 x 5 x 2 = 70 runs, one after another
#   JOBS=8 scripts/loraplus_llama_7b_mnli_sweep.sh                 # 8 runs at a time, run i on GPU i mod 8
#   LRS_A="1e-5 1e-4" LRS_B="1e-4 4e-4" SEEDS=0 scripts/loraplus_llama_7b_mnli_sweep.sh
#   scripts/loraplus_llama_7b_mnli_sweep.sh --smoke                # lr_A 1e-4, lr_B 4e-4, seeds 0 and 1, tiny Llama
#
# The grid (space-separated lists): LRS_B (default 1e-6 5e-6 1e-5 5e-5 1e-4 2e-4 4e-4), LRS_A (default
# 1e-6 5e-6 1e-5 5e-5 1e-4), SEEDS (default 0 1). JOBS > 1 runs that many single-process runs at once, as the
# original did on 8 GPUs (CUDA_VISIBLE_DEVICES = run index mod JOBS); then NPROC must be 1. At the end
# OUT_DIR/sweep_results.tsv lists lr_A, lr_B, ratio, seed and the matched / mismatched accuracy of every run.
# Runs: OUT_DIR/mnli/lr-LR_ratio-RATIO_seed-SEED/. Environment: LRS_A, LRS_B, SEEDS, JOBS, NPROC (default 1),
# MODEL_DIR, DATA_DIR, OUT_DIR, PYTHON, SMOKE_DIR (see scripts/_common.sh).
ALL_TASKS=(mnli)
SMOKE_TASKS=(mnli)
SMOKE_MODELS=(huggyllama/llama-7b)
source "$(dirname "$0")/_common.sh"
parse_args "$@"
setup_run
if (( SMOKE )); then
    read -r -a lrs_B <<<"${LRS_B:-4e-4}"
    read -r -a lrs_A <<<"${LRS_A:-1e-4}"
else
    read -r -a lrs_B <<<"${LRS_B:-1e-6 5e-6 1e-5 5e-5 1e-4 2e-4 4e-4}"
    read -r -a lrs_A <<<"${LRS_A:-1e-6 5e-6 1e-5 5e-5 1e-4}"
fi
read -r -a seeds <<<"${SEEDS:-0 1}"
JOBS=${JOBS:-1}
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "JOBS must be a positive integer, got '$JOBS'"
(( JOBS == 1 || NPROC == 1 )) || die "JOBS=$JOBS runs one process per GPU: leave NPROC at 1 (got NPROC=$NPROC)"
(( ${#lrs_A[@]} && ${#lrs_B[@]} && ${#seeds[@]} )) || die "LRS_A, LRS_B and SEEDS must each name at least one value"

run_one=("$SCRIPTS_DIR/loraplus_llama_7b_mnli.sh")
if (( SMOKE )); then run_one+=(--smoke); fi
export MODEL_DIR DATA_DIR OUT_DIR NPROC PYTHON
if (( SMOKE )); then export SMOKE_DIR; fi

# A failed run does not stop the sweep (its row in the summary stays empty); the exit status says so.
count=0
failed=0
pids=()
runs=()
for lr_B in "${lrs_B[@]}"; do
    for lr_A in "${lrs_A[@]}"; do
        ratio=$(awk -v lrB="$lr_B" -v lrA="$lr_A" 'BEGIN { print lrB / lrA }')
        for seed in "${seeds[@]}"; do
            runs+=("$lr_A $lr_B $ratio $seed $OUT_DIR/mnli/lr-${lr_A}_ratio-${ratio}_seed-${seed}")
            echo "$SCRIPT_NAME: lr_B=$lr_B lr_A=$lr_A (ratio $ratio) seed=$seed" >&2
            if (( JOBS == 1 )); then
                LR=$lr_A LR_RATIO=$ratio SEED=$seed "${run_one[@]}" mnli || failed=$((failed + 1))
            else
                CUDA_VISIBLE_DEVICES=$((count % JOBS)) LR=$lr_A LR_RATIO=$ratio SEED=$seed "${run_one[@]}" mnli &
                pids+=($!)
                if (( (count + 1) % JOBS == 0 )); then
                    for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
                    pids=()
                fi
            fi
            count=$((count + 1))
        done
    done
done
for pid in "${pids[@]+"${pids[@]}"}"; do wait "$pid" || failed=$((failed + 1)); done

# One line per run: lr_A, lr_B, ratio, seed, matched and mismatched accuracy (empty where a run left none).
"$PYTHON" - "$OUT_DIR/sweep_results.tsv" "${runs[@]}" <<'PY'
import json, os, sys
rows = ["lr_A\tlr_B\tratio\tseed\taccuracy\taccuracy_mm\trun"]
for run in sys.argv[2:]:
    lr_a, lr_b, ratio, seed, path = run.split(" ", 4)
    results = os.path.join(path, "eval_results.json")
    acc = acc_mm = ""
    if os.path.isfile(results):
        with open(results) as f:
            r = json.load(f)
        acc, acc_mm = r.get("accuracy", ""), r.get("mnli-mm", {}).get("accuracy", "")
    rows.append("\t".join(map(str, (lr_a, lr_b, ratio, seed, acc, acc_mm, path))))
with open(sys.argv[1], "w") as f:
    f.write("\n".join(rows) + "\n")
PY
echo "$SCRIPT_NAME: $count runs, $failed failed; results in $OUT_DIR/sweep_results.tsv" >&2
(( failed == 0 ))
