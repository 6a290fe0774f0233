#!/usr/bin/env bash
# AdaLoRA (Zhang et al. 2023), DeBERTaV3-base on GLUE: the AdaLoRA row of the LoRA² paper's GLUE table, with
# the flags of QingruZhang/AdaLoRA NLU/scripts/run_debertav3_{task}.sh (lora2/run_glue.py here).
#
#   scripts/adalora_deberta_v3_base_glue.sh [--smoke] [TASK ...]   TASK: mnli sst2 cola qqp qnli rte mrpc stsb, or all
#
#   scripts/adalora_deberta_v3_base_glue.sh rte mrpc stsb          # one process, batch 32, as the paper
#   scripts/adalora_deberta_v3_base_glue.sh --smoke                # mrpc on a tiny model, in seconds
#
# SVD-form LoRA (P diag(E) Q) on query, key, value, intermediate, layer.output and attention.output of every
# layer, rank allocation from --lora_r down to an average --target_rank 1 (init_warmup / final_warmup /
# mask_interval), orthogonal regularizer, beta1 = beta2 = 0.85. The released MRPC script spelled
# --apply_adalora as --apply_rankselector (run_glue.py accepts both); its --tb_writter_loginterval (a
# TensorBoard interval of the rank logs) is accepted and changes nothing: ranks go to metrics.jsonl. Results: OUT_DIR/<task>/model/eval_results.json and rank_pattern.json.
# Environment: NPROC (default 1), MODEL_DIR, DATA_DIR, OUT_DIR, PYTHON, SMOKE_DIR (see scripts/_common.sh).
ALL_TASKS=(mnli sst2 cola qqp qnli rte mrpc stsb)
SMOKE_TASKS=(mrpc)
SMOKE_MODELS=(microsoft/deberta-v3-base)
source "$(dirname "$0")/_common.sh"
parse_args "$@"
setup_run
if (( SMOKE )); then  # a budgeting phase must fit in the few smoke steps
    SMOKE_ARGS+=(--max_steps 3 --init_warmup 1 --final_warmup 1 --mask_interval 1)
fi

# AdaLoRA's scripts (recipes.md: the LoRA² table with r 2-3, target_rank 1, QNLI lr 5e-4, QQP 5 epochs,
# RTE seed 6); batch 32 on one process. warmup in steps, or ratio:R. eval/save/log = --eval_steps,
# --save_steps, --logging_steps of the original scripts.
# task r  target init  final  mask reg  alpha lr      epochs warmup    seq cls   wd   seed eval save  log
RECIPE="
mnli   3  1      8000  50000  100  0.1  16    5e-4    7      1000      256 0.15  0    6    3000 30000 500
sst2   2  1      6000  22000  100  0.1  16    8e-4    24     1000      128 0.0   0.01 6    3000 10000 500
cola   3  1      800   3500   10   0.1  32    8e-4    25     100       64  0.10  0    6    100  10000 10
qqp    2  1      8000  25000  100  0.1  16    8e-4    5      2000      320 0.15  0.01 6    3000 10000 500
qnli   2  1      2000  8000   100  0.1  32    5e-4    5      500       512 0.1   0.01 6    1000 16000 300
rte    2  1      600   1800   1    0.3  32    1.2e-3  50     200       320 0.20  0.01 6    100  10000 10
mrpc   2  1      600   1800   1    0.1  32    1e-3    30     ratio:0.1 320 0.0   0.01 6    300  3000  100
stsb   2  1      800   2000   10   0.3  32    2.2e-3  25     100       128 0.2   0.1  6    100  10000 50
"

for task in "${TASKS[@]}"; do
    read -r _ r target init final mask reg alpha lr epochs warmup seq cls wd seed eval save log \
        <<<"$(grep -E "^$task " <<<"$RECIPE")"
    note_nproc "$task" 1
    case $warmup in
        ratio:*) warmup_flag=(--warmup_ratio "${warmup#ratio:}") ;;
        *) warmup_flag=(--warmup_steps "$warmup") ;;
    esac
    launch lora2/run_glue.py \
        --model_name_or_path "$(model_path microsoft/deberta-v3-base)" \
        --task_name "$task" \
        --data_dir "$DATA_DIR" \
        --apply_lora --apply_adalora --lora_type svd \
        --target_rank "$target" --lora_r "$r" \
        --reg_orth_coef "$reg" \
        --init_warmup "$init" --final_warmup "$final" --mask_interval "$mask" \
        --beta1 0.85 --beta2 0.85 \
        --lora_module query,key,value,intermediate,layer.output,attention.output \
        --lora_alpha "$alpha" \
        --do_train --do_eval \
        --max_seq_length "$seq" \
        --per_device_train_batch_size 32 --learning_rate "$lr" --num_train_epochs "$epochs" \
        "${warmup_flag[@]}" \
        --cls_dropout "$cls" --weight_decay "$wd" \
        --evaluation_strategy steps --eval_steps "$eval" \
        --save_strategy steps --save_steps "$save" \
        --logging_steps "$log" --tb_writter_loginterval "$log" \
        --report_to tensorboard \
        --seed "$seed" \
        --root_output_dir "$OUT_DIR/$task" \
        --overwrite_output_dir
done
