#!/usr/bin/env bash
# LoRA+ (Hayou et al. 2024), GPT-2 on MNLI: the GPT-2 row of the LoRA+ GLUE experiments, with the flags of
# nikhil-ghosh-berkeley/loraplus glue/scripts/run_gpt2_lora.sh (loraplus/run_glue.py here).
#
#   scripts/loraplus_gpt2_mnli.sh [--smoke] [TASK ...]            TASK: mnli (the paper's), or another GLUE task
#
#   scripts/loraplus_gpt2_mnli.sh                                 # lr 2e-4, lr_B / lr_A = 10
#   LR=1e-4 LR_RATIO=20 SEED=1 scripts/loraplus_gpt2_mnli.sh      # another point of the (lr, ratio) plane
#   scripts/loraplus_gpt2_mnli.sh --smoke                         # on a tiny GPT-2, in seconds
#
# LoRA r 8, alpha 8 on c_attn, c_proj and c_fc; B trained with lr x LR_RATIO (the LoRA+ optimizer), the
# score head trained too; GPT-2 pads with its eos token. AdamW betas (0.9, 0.99), eps 1e-8, linear schedule,
# 3 epochs, batch 32, --fp16 (fp32 with a warning without a GPU). SEED unset: run_glue.py's default (42, as
# transformers'). The global batch stays 32 on any NPROC (KEEP_PER_DEVICE_BATCH=1: 32 per device); RECIPE is
# recorded (no table/script disagreement is known for this row). Results: OUT_DIR/<task>/lr-LR_ratio-LR_RATIO/eval_results.json. Environment: LR, LR_RATIO,
# SEED, NPROC (default 1), RECIPE, KEEP_PER_DEVICE_BATCH, MODEL_DIR, DATA_DIR, OUT_DIR, PYTHON, SMOKE_DIR (see scripts/_common.sh).
ALL_TASKS=(mnli sst2 mrpc cola qnli qqp rte stsb)
DEFAULT_TASKS=(mnli)
SMOKE_TASKS=(mnli)
SMOKE_MODELS=(gpt2)
source "$(dirname "$0")/_common.sh"
parse_args "$@"
setup_run
LR=${LR:-2e-4}
LR_RATIO=${LR_RATIO:-10}
seed_flag=()
if [[ -n ${SEED:-} ]]; then seed_flag=(--seed "$SEED"); fi

for task in "${TASKS[@]}"; do
    global_batch "$task" 32 1  # the LoRA+ GLUE runs: one process, batch 32
    out=$OUT_DIR/$task/lr-${LR}_ratio-${LR_RATIO}${SEED:+_seed-$SEED}
    launch loraplus/run_glue.py \
        --model_name_or_path "$(model_path gpt2)" \
        --task_name "$task" \
        --data_dir "$DATA_DIR" \
        --use_lora \
        --loraplus_lr_ratio "$LR_RATIO" \
        --lora_rank 8 \
        --lora_alpha 8 \
        --fp16 \
        --target_modules "c_attn, c_proj, c_fc" \
        --do_train \
        --do_eval \
        --max_seq_length 128 \
        "${BATCH_FLAGS[@]}" \
        --per_device_eval_batch_size 128 \
        --eval_steps 500 \
        --save_steps 500 \
        --logging_steps 10 \
        --num_train_epochs 3 \
        --learning_rate "$LR" \
        --optim adamw_torch \
        --lr_scheduler_type linear \
        --adam_beta1 0.9 \
        --adam_beta2 0.99 \
        --adam_epsilon 1e-8 \
        --output_dir "$out" \
        --logging_dir "$out/logs/" \
        --evaluation_strategy steps \
        --save_strategy steps \
        --report_to tensorboard \
        --ignore_mismatched_sizes \
        --keep_checkpoints eval \
        --overwrite_output_dir \
        --save_total_limit 1 \
        --recipe "$RECIPE" \
        "${seed_flag[@]+"${seed_flag[@]}"}"
done
