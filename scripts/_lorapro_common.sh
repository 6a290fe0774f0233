# Sourced by scripts/lorapro_{gsm8k,humaneval,mtbench}.sh after _common.sh's parse_args: what the three rows
# share. Sets SEEDS ("0 1 2"; smoke: "0"), LR (the paper's 2e-5), DATA_DIR / OUT_DIR / MODEL_DIR, SMOKE_ARGS (in smoke mode:
# a tiny random Llama and tiny data files, built by lorapro/smoke.py's build_smoke_assets, and flags
# that only cap the work) and DS_ARGS (--deepspeed DEEPSPEED when set).
SEEDS=$(seed_list 0 1 2)  # the paper's three; smoke mode: the first only (SEEDS overrides)
LR=${LR:-0.00002}
if (( SMOKE )); then
    SMOKE_DIR=${SMOKE_DIR:-$REPO/.cache/smoke}
    "$PYTHON" -c 'import sys; sys.path.append(sys.argv[2]); from lorapro.smoke import build_smoke_assets; build_smoke_assets(sys.argv[1])' \
        "$SMOKE_DIR" "$REPO" >/dev/null 2>&1 || die "could not build the smoke assets in $SMOKE_DIR"
    MODEL_DIR=$SMOKE_DIR/models
    DATA_DIR=$SMOKE_DIR/instruct
    OUT_DIR=${OUT_DIR:-$SMOKE_DIR/runs/$SCRIPT_NAME}
    # Only caps: a few steps on a few examples, short generations (argparse keeps a flag's last value); the
    # global batch stays the paper's 32.
    SMOKE_ARGS=(--max_steps 2 --n_train 8 --n_eval 2 --max_length 400 --max_new_tokens 8
                --max_eval_samples 2 --eval_batch_size 2 --logging_steps 1 --disable_tqdm --overwrite_output_dir)
else
    DATA_DIR=${DATA_DIR:-data/instruct}
    OUT_DIR=${OUT_DIR:-outputs/$SCRIPT_NAME}
fi
MODEL_DIR=${MODEL_DIR:-}
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false
DS_ARGS=()
if [[ -n ${DEEPSPEED:-} ]]; then
    [[ -f $DEEPSPEED ]] || die "DEEPSPEED=$DEEPSPEED: no such file"
    DS_ARGS=(--deepspeed "$DEEPSPEED")
fi

# run_rows ROW_FLAGS...: every METHOD x every seed through lorapro/train.py, with the settings the paper's three
# tasks share (recipes.md §LoRA-Pro: r 8, alpha 16, dropout 0 on the seven projections, lr LR, 1 epoch, cosine,
# warmup 0.03, global batch 32 of per-device 1, weight decay 0) and the row's own flags (dataset, data and eval
# files, lengths, split sizes). Each run writes OUT_DIR/<method>/seed<seed>/.
run_rows() {
    local method seed
    local -a method_args
    (( 32 % NPROC == 0 )) || die "the paper's global batch 32 (per device 1) cannot be split over NPROC=$NPROC processes"
    echo "$SCRIPT_NAME: global batch 32 = per-device 1 x NPROC $NPROC x accumulation $((32 / NPROC)), the paper's" \
         "(the original: 1 x 8 process(es) x 4)" >&2
    for method in "${TASKS[@]}"; do
        method_args=()
        [[ $method == lora-ga ]] && method_args=(--loraga_batches "${LORAGA_BATCHES:-8}")
        for seed in $SEEDS; do
            launch lorapro/train.py \
                --model_name_or_path "$(model_path meta-llama/Llama-2-7b-hf)" \
                --lora "$method" \
                "${method_args[@]+"${method_args[@]}"}" \
                "$@" \
                --lora_r 8 \
                --lora_alpha 16 \
                --lora_dropout 0 \
                --target_modules q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj \
                --lr "$LR" \
                --num_train_epochs 1 \
                --per_device_train_batch_size 1 \
                --global_batch_size 32 \
                --warmup_ratio 0.03 \
                --lr_scheduler_type cosine \
                --weight_decay 0 \
                --seed "$seed" \
                --output_dir "$OUT_DIR/$method/seed$seed" \
                --do_eval \
                "${DS_ARGS[@]+"${DS_ARGS[@]}"}"
        done
    done
}
