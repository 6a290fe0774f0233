#!/usr/bin/env bash
# LoRA+ (Hayou et al. 2024), RoBERTa-base on MNLI: the RoBERTa row of the LoRA+ GLUE experiments, with the
# flags of nikhil-ghosh-berkeley/loraplus glue/scripts/run_roberta_lora.sh and the settings of recipes.md
# (loraplus/run_glue.py here).
#
#   scripts/loraplus_roberta_base_mnli.sh [--smoke] [TASK ...]    TASK: mnli (the paper's), or another GLUE task
#
#   scripts/loraplus_roberta_base_mnli.sh                         # lr 5e-5, lr_B / lr_A = 80
#   LR=1e-4 LR_RATIO=20 scripts/loraplus_roberta_base_mnli.sh     # another point of the (lr, ratio) plane
#   scripts/loraplus_roberta_base_mnli.sh --smoke                 # on a tiny RoBERTa, in seconds
#
# LoRA r 8, alpha 8 on query and value; B trained with lr x LR_RATIO (the LoRA+ optimizer); the classifier's
# out_proj trained, its dense layer frozen (as the LoRA+ script did). AdamW betas (0.9, 0.99), eps 1e-8,
# linear schedule, 3 epochs, batch 32, --fp16 (fp32 with a warning without a GPU). SEED unset: run_glue.py's
# default (42). The global batch stays 32 on any NPROC (KEEP_PER_DEVICE_BATCH=1: 32 per device); RECIPE is
# recorded (no table/script disagreement is known for this row). Results: OUT_DIR/<task>/lr-LR_ratio-LR_RATIO/eval_results.json. Environment: LR, LR_RATIO,
# SEED, NPROC (default 1), RECIPE, KEEP_PER_DEVICE_BATCH, MODEL_DIR, DATA_DIR, OUT_DIR, PYTHON, SMOKE_DIR (see scripts/_common.sh).
ALL_TASKS=(mnli sst2 mrpc cola qnli qqp rte stsb)
DEFAULT_TASKS=(mnli)
SMOKE_TASKS=(mnli)
SMOKE_MODELS=(roberta-base)
source "$(dirname "$0")/_common.sh"
parse_args "$@"
setup_run
LR=${LR:-5e-5}
LR_RATIO=${LR_RATIO:-80}
seed_flag=()
if [[ -n ${SEED:-} ]]; then seed_flag=(--seed "$SEED"); fi

for task in "${TASKS[@]}"; do
    global_batch "$task" 32 1  # the LoRA+ GLUE runs: one process, batch 32
    out=$OUT_DIR/$task/lr-${LR}_ratio-${LR_RATIO}${SEED:+_seed-$SEED}
    launch loraplus/run_glue.py \
        --model_name_or_path "$(model_path roberta-base)" \
        --task_name "$task" \
        --data_dir "$DATA_DIR" \
        --use_lora \
        --target_modules "query, value" \
        --do_train \
        "${BATCH_FLAGS[@]}" \
        --per_device_eval_batch_size 128 \
        --max_seq_length 128 \
        --eval_steps 500 \
        --save_steps 500 \
        --logging_steps 10 \
        --num_train_epochs 3 \
        --learning_rate "$LR" \
        --loraplus_lr_ratio "$LR_RATIO" \
        --lora_rank 8 \
        --lora_alpha 8 \
        --fp16 \
        --lr_scheduler_type linear \
        --adam_beta1 0.9 \
        --adam_beta2 0.99 \
        --adam_epsilon 1e-8 \
        --output_dir "$out" \
        --logging_dir "$out/logs/" \
        --evaluation_strategy steps \
        --save_strategy steps \
        --report_to tensorboard \
        --keep_checkpoints eval \
        --overwrite_output_dir \
        --ignore_mismatched_sizes \
        --save_total_limit 1 \
        --recipe "$RECIPE" \
        "${seed_flag[@]+"${seed_flag[@]}"}"
done
