#!/usr/bin/env bash
# LoRA+ (Hayou et al. 2024), Llama-7B on MNLI: the Llama row of the LoRA+ GLUE experiments (loraplus/run_glue.py
# here). One run of the learning-rate sweep: the LoRA+ repository's glue/scripts/sweep_llama-7b_lora_mnli.sh
# calls ./scripts/exec_llama-7b_lora_mnli.sh once per grid point and seed, a script its repository does not
# hold; its flags are those of the one-run script of the repository's first layout, scripts/run_llama-7b_lora_mnli.sh
# (commit b43a154; removed since, glue/scripts/run_llama-7b_lora.sh is a 3-step debug run), which this script
# passes (that sweep passes lr_B lr_A seed device, the first layout's script read lr lr_ratio seed device).
# scripts/loraplus_llama_7b_mnli_sweep.sh calls this one once per grid point and seed.
#
#   scripts/loraplus_llama_7b_mnli.sh [--smoke] [TASK ...]        TASK: mnli (the paper's), or another GLUE task
#
#   scripts/loraplus_llama_7b_mnli.sh                             # lr 1e-4, lr_B / lr_A = 1 (plain LoRA), seed 0
#   LR=5e-5 LR_RATIO=8 SEED=1 scripts/loraplus_llama_7b_mnli.sh   # the original's positional lr, ratio, seed
#   scripts/loraplus_llama_7b_mnli.sh --smoke                     # on a tiny Llama, in seconds
#
# LoRA on all seven projections (q, k, v, o, up, down, gate); B trained with lr x LR_RATIO; a [PAD] token is
# added (embedding grown, new row = mean) and the score head trained. Constant schedule, AdamW beta2 0.999,
# weight decay 0, batch 8 x gradient accumulation 4, 1 epoch, --fp16 (fp32 with a warning without a GPU).
# --gradient_checkpointing as the original (each decoder block recomputed in the backward pass); the
# original's --logging_strategy steps is passed (the default); its wandb reporting is left out (TensorBoard).
# The global batch stays 8 x 4 = 32 on any NPROC (the accumulation shrinks; KEEP_PER_DEVICE_BATCH=1 keeps 8 x 4
# per process). Results: OUT_DIR/<task>/lr-LR_ratio-LR_RATIO_seed-SEED/eval_results.json. Environment: LR,
# LR_RATIO, SEED, NPROC (default 1), RECIPE, KEEP_PER_DEVICE_BATCH, MODEL_DIR, DATA_DIR, OUT_DIR, PYTHON, SMOKE_DIR (see scripts/_common.sh).
ALL_TASKS=(mnli sst2 mrpc cola qnli qqp rte stsb)
DEFAULT_TASKS=(mnli)
SMOKE_TASKS=(mnli)
SMOKE_MODELS=(huggyllama/llama-7b)
source "$(dirname "$0")/_common.sh"
parse_args "$@"
setup_run
LR=${LR:-0.0001}
LR_RATIO=${LR_RATIO:-1}
SEED=${SEED:-0}

for task in "${TASKS[@]}"; do
    global_batch "$task" 8 1 4  # the original: one process, batch 8 x accumulation 4
    out=$OUT_DIR/$task/lr-${LR}_ratio-${LR_RATIO}_seed-${SEED}
    launch loraplus/run_glue.py \
        --model_name_or_path "$(model_path huggyllama/llama-7b)" \
        --task_name "$task" \
        --data_dir "$DATA_DIR" \
        --output_dir "$out" \
        --use_lora \
        --target_modules "q_proj, k_proj, v_proj, o_proj, up_proj, down_proj, gate_proj" \
        --lr_scheduler_type constant \
        --optim adamw_torch \
        --learning_rate "$LR" \
        --loraplus_lr_ratio "$LR_RATIO" \
        --adam_beta2 0.999 \
        --weight_decay 0.0 \
        --max_seq_length 128 \
        "${BATCH_FLAGS[@]}" \
        --per_device_eval_batch_size 16 \
        --num_train_epochs 1 \
        --evaluation_strategy steps \
        --eval_steps 500 \
        --logging_strategy steps \
        --logging_steps 10 \
        --save_strategy steps \
        --save_steps 500 \
        --save_total_limit 1 \
        --dataloader_num_workers 2 \
        --gradient_checkpointing \
        --fp16 \
        --report_to tensorboard \
        --keep_checkpoints eval \
        --ignore_mismatched_sizes \
        --seed "$SEED" \
        --recipe "$RECIPE"
done
