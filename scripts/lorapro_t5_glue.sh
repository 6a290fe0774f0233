#!/usr/bin/env bash
# LoRA-Pro's T5-base GLUE table (the LoRA-GA setting): every method x task x seed, through lorapro/run_t5_glue.py.
#
#   scripts/lorapro_t5_glue.sh [--smoke] [METHOD ...]   METHOD: lora rslora loraplus adalora lora-pro rslora-pro full
#                                                    dora pissa lora-ga (the table's rows; default all of them),
#                                                    lora2, or all
#
#   scripts/lorapro_t5_glue.sh                          # 10 methods x mnli sst2 cola qnli mrpc x seeds 0 1 2
#   GLUE_TASKS="sst2 cola" SEEDS=0 scripts/lorapro_t5_glue.sh lora-pro
#   scripts/lorapro_t5_glue.sh --smoke                  # tiny random T5 + tiny GLUE files, seconds a row
#
# The setting (loralib/tasks/t5glue/run.py's docstring, from LoRA-GA's released code): t5-base in fp32, r 8,
# alpha 16, dropout 0 on every linear layer but the head, lr 1e-4, 1 epoch, batch 32, cosine, warmup ratio
# 0.03, weight decay 0, max length 128; LoRA+ ratio 16; accuracy on the dev split by scoring the label words.
# DoRA, PiSSA and LoRA-GA rows (loralib.dora, loralib.init_methods, held to PEFT): the same r, alpha, lr and
# targets; PiSSA with the full SVD; LoRA-GA's gradient over LORAGA_BATCHES (8, conf/init/gradient.yaml's iters)
# per-device batches of the first training examples, PEFT's direction ArB2r / scale stable / gamma 16. Not
# known here: whether the table's LoRA-GA row also used rsLoRA scaling (LoRA-GA's README recommends it; pass
# it with EXTRA_ARGS="--use_rslora").
# Results: OUT_DIR/<task>/<method>/seed<seed>/{eval_results.json,run_config.json,adapter/,peft_adapter/};
# `loralib compare OUT_DIR --paper lorapro` sets them against the reported rows.
# Environment: SEEDS ("0 1 2"), GLUE_TASKS ("mnli sst2 cola qnli mrpc"), LR (1e-4), NPROC (1), MODEL_DIR (folder
# holding t5-base; default: models/, else a download), DATA_DIR (data), OUT_DIR (outputs/lorapro_t5_glue),
# PYTHON, SMOKE_DIR (.cache/smoke), LORAGA_BATCHES (8), EXTRA_ARGS (appended to every row).
ALL_TASKS=(lora rslora loraplus adalora lora-pro rslora-pro full dora pissa lora-ga lora2)
DEFAULT_TASKS=(lora rslora loraplus adalora lora-pro rslora-pro full dora pissa lora-ga)
SMOKE_TASKS=(lora lora-pro)
source "$(dirname "$0")/_common.sh"
parse_args "$@"

SEEDS=$(seed_list 0 1 2)  # the paper's three; smoke mode: the first only (SEEDS overrides)
GLUE_TASKS=${GLUE_TASKS:-mnli sst2 cola qnli mrpc}
LR=${LR:-0.0001}
if (( SMOKE )); then
    SMOKE_DIR=${SMOKE_DIR:-$REPO/.cache/smoke}
    [[ -f $SMOKE_DIR/glue/.smoke-complete ]] || "$PYTHON" "$SCRIPTS_DIR/_smoke_assets.py" --root "$SMOKE_DIR" \
        --models "" >/dev/null || die "could not build the smoke GLUE files in $SMOKE_DIR"
    "$PYTHON" "$REPO/lorapro/smoke_t5.py" "$SMOKE_DIR/models/t5-base" >/dev/null 2>&1 || die "could not build the smoke T5 in $SMOKE_DIR/models"
    MODEL_DIR=$SMOKE_DIR/models
    DATA_DIR=$SMOKE_DIR/glue
    OUT_DIR=${OUT_DIR:-$SMOKE_DIR/runs/$SCRIPT_NAME}
    # Only caps: a few optimizer steps of a few examples (argparse keeps a flag's last value); the global batch
    # stays the setting's 32 (4 per device x accumulation 8).
    SMOKE_ARGS=(--max_steps 2 --per_device_train_batch_size 4 --logging_steps 1
                --disable_tqdm --overwrite_output_dir)
else
    DATA_DIR=${DATA_DIR:-data}
    OUT_DIR=${OUT_DIR:-outputs/$SCRIPT_NAME}
fi
MODEL_DIR=${MODEL_DIR:-}
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false

(( 32 % NPROC == 0 )) || die "the setting's global batch 32 cannot be split over NPROC=$NPROC processes"
PER_DEVICE=$((32 / NPROC))  # the setting's global batch 32 (LoRA-GA's: 32 on one process) on any NPROC
echo "$SCRIPT_NAME: global batch 32 = per-device $PER_DEVICE x NPROC $NPROC x accumulation 1, the setting's" \
     "(the original: 32 x 1 process(es) x 1); smoke mode: 4 per device x accumulation $((32 / NPROC / 4 > 0 ? 32 / NPROC / 4 : 1))" >&2
for task in $GLUE_TASKS; do
    for method in "${TASKS[@]}"; do
        method_args=()
        [[ $method == lora-ga ]] && method_args=(--loraga_batches "${LORAGA_BATCHES:-8}")
        for seed in $SEEDS; do
            # shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
            launch lorapro/run_t5_glue.py \
                --model_name_or_path "$(model_path t5-base)" \
                --task "$task" \
                --data_dir "$DATA_DIR" \
                --lora "$method" \
                --lora_r 8 \
                --lora_alpha 16 \
                --lora_dropout 0 \
                --lr "$LR" \
                --num_train_epochs 1 \
                --per_device_train_batch_size "$PER_DEVICE" \
                --global_batch_size 32 \
                --warmup_ratio 0.03 \
                --lr_scheduler_type cosine \
                --weight_decay 0 \
                --max_length 128 \
                --eval_mode score \
                --seed "$seed" \
                --output_dir "$OUT_DIR/$task/$method/seed$seed" \
                "${method_args[@]}" ${EXTRA_ARGS:-}
        done
    done
done
