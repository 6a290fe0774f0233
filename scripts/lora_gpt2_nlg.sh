#!/usr/bin/env bash
# LoRA (Hu et al. 2021), GPT-2 medium / large on E2E, WebNLG and DART: the rows "GPT-2 M (LoRA)" and
# "GPT-2 L (LoRA)" of the paper's Tables 3 and 13, with the commands of microsoft/LoRA examples/NLG/README.md:
# train (gpt2_ft.py) -> beam search (gpt2_beam.py) -> decode (gpt2_decode.py) -> score (eval_nlg.py).
#
#   scripts/lora_gpt2_nlg.sh [--smoke] [md|lg ...] [TASK ...]     TASK: e2e webnlg dart, or all
#
#   scripts/lora_gpt2_nlg.sh md e2e                  # GPT-2 M on E2E (the default: md e2e)
#   scripts/lora_gpt2_nlg.sh md lg all               # both sizes, the three tasks
#   NPROC=4 scripts/lora_gpt2_nlg.sh lg webnlg       # 4 processes for training and beam search
#   RECIPE=paper SEEDS=110 scripts/lora_gpt2_nlg.sh  # the paper's Table 11 (E2E length penalty 0.9), one seed
#   scripts/lora_gpt2_nlg.sh --smoke                 # md e2e end to end on a tiny random GPT-2, in seconds
#
# Settings (recipes.md §GPT-2 NLG and the paper's Table 11): batch 8, seq_len 512, lr 2e-4, AdamW (beta2 0.999,
# eps 1e-6, bias correction), linear schedule, 500 warmup steps, 5 epochs, LoRA r 4, alpha 32 on q and v of
# c_attn; weight decay / LoRA dropout / label smoothing 0.01 / 0.1 / 0.1 (E2E, WebNLG), 0 / 0 / 0
# (DART). Beam 10, length penalty 0.8 (the README's commands; RECIPE=paper: the paper's Table 11, 0.9 for
# E2E; LENGTH_PENALTY overrides both), no-repeat 4-grams, at most 64 new tokens, stop at 50256 or 628.
# Decode: E2E as is; WebNLG and DART tokenised, lower-cased, 6 references. Seeds 110 111 112 (the README's
# 110 and the next two: the paper reports the mean of 3 seeds); the global batch stays 8 (the README's one
# process) on any NPROC, by a smaller per-device batch (KEEP_PER_DEVICE_BATCH=1: 8 per process).
# Inputs: MODEL_DIR/<gpt2-medium | gpt2-large> (default models/; `python -m loralib.models.hub gpt2-medium`),
# DATA_DIR/<e2e | webnlg | dart>/{train,valid,test}.jsonl and test_formatted.jsonl (default data/nlg; made by
# `python data/prepare_nlg.py --task e2e --raw_dir data/raw/e2e --out_dir data/nlg/e2e --download`).
# Results: OUT_DIR/<md|lg>/<task>/seed<S>/ holds the training run (model.<step>.pt: the last one the whole model,
# model.<step>.lora.pt beside it, adapter/, checkpoints),
# predict.jsonl, the decoded references / hypotheses and eval_results.json. Environment: NPROC (default 1),
# SEEDS, RECIPE, KEEP_PER_DEVICE_BATCH, MODEL_DIR, DATA_DIR, OUT_DIR, PYTHON, SMOKE_DIR, LENGTH_PENALTY
# (see scripts/_common.sh).
ALL_TASKS=(e2e webnlg dart)
SMOKE_TASKS=(e2e)
DEFAULT_TASKS=(e2e)
SMOKE_MODELS=()
source "$(dirname "$0")/_common.sh"

# The model sizes are this script's own words; everything else goes to _common.sh's parse_args.
SIZES=()
rest=()
for arg in "$@"; do
    case ${arg,,} in
        md|lg) SIZES+=("${arg,,}") ;;
        *) rest+=("$arg") ;;
    esac
done
parse_args "${rest[@]+"${rest[@]}"}"
(( ${#SIZES[@]} )) || SIZES=(md)

if (( SMOKE )); then
    # Tiny random GPT-2s named gpt2-medium / gpt2-large and a few lines of each task; every flag stays the real
    # run's, the appended SMOKE_* flags only cap the work (argparse keeps the last value of a flag).
    SMOKE_DIR=${SMOKE_DIR:-$REPO/.cache/smoke}
    "$PYTHON" "$SCRIPTS_DIR/_nlg_smoke_assets.py" --root "$SMOKE_DIR/nlg" >/dev/null
    MODEL_DIR=$SMOKE_DIR/nlg/models
    DATA_DIR=$SMOKE_DIR/nlg/data
    OUT_DIR=${OUT_DIR:-$SMOKE_DIR/runs/$SCRIPT_NAME}
    SMOKE_TRAIN=(--max_step 2 --eval_interval 1 --save_interval 1 --log_interval 1 --disable_tqdm)
    SMOKE_BEAM=(--eval_len 8)
else
    MODEL_DIR=${MODEL_DIR:-models}
    DATA_DIR=${DATA_DIR:-data/nlg}
    OUT_DIR=${OUT_DIR:-outputs/$SCRIPT_NAME}
    SMOKE_TRAIN=()
    SMOKE_BEAM=()
fi
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false

# task    weight_decay  lora_dropout  label_smooth  length_penalty  decode flags
RELEASED="
e2e       0.01          0.1           0.1           0.8             --ref_type e2e
webnlg    0.01          0.1           0.1           0.8             --ref_type webnlg --ref_num 6 --tokenize --lower
dart      0.0           0.0           0.0           0.8             --ref_type dart --ref_num 6 --tokenize --lower
"
# the paper's Table 11, where it differs from the README's commands
PAPER="
e2e       0.01          0.1           0.1           0.9             --ref_type e2e
"

for size in "${SIZES[@]}"; do
    case $size in md) card=gpt2.md; model=gpt2-medium ;; lg) card=gpt2.lg; model=gpt2-large ;; esac
    for task in "${TASKS[@]}"; do
      read -r _ wd dropout smooth penalty decode_flags <<<"$(recipe_row "$task")"
      read -r -a decode_flags <<<"$decode_flags"
      global_batch "$task" 8 1  # the README's runs: one process, batch 8
      batch=${BATCH_FLAGS[1]} accum=${BATCH_FLAGS[3]}
      for seed in $(seed_list 110 111 112); do
        data=$DATA_DIR/$task
        out=$OUT_DIR/$size/$task/seed$seed
        for f in "$data/train.jsonl" "$data/valid.jsonl" "$data/test.jsonl" "$data/test_formatted.jsonl"; do
            [[ -f $f ]] || die "$f is missing: run python data/prepare_nlg.py --task $task --raw_dir data/raw/$task" \
                                "--out_dir $data --download (or set DATA_DIR)"
        done
        [[ -d $MODEL_DIR/$model ]] || die "$MODEL_DIR/$model is missing: run python -m loralib.models.hub $model" \
                                          "(or set MODEL_DIR)"

        SMOKE_ARGS=("${SMOKE_TRAIN[@]+"${SMOKE_TRAIN[@]}"}")
        launch examples/NLG/gpt2_ft.py \
            --train_data "$data/train.jsonl" \
            --valid_data "$data/valid.jsonl" \
            --train_batch_size "$batch" \
            --grad_acc "$accum" \
            --valid_batch_size 4 \
            --seq_len 512 \
            --model_card "$card" \
            --init_checkpoint "$MODEL_DIR/$model" \
            --platform local \
            --clip 0.0 \
            --lr 0.0002 \
            --weight_decay "$wd" \
            --correct_bias \
            --adam_beta2 0.999 \
            --scheduler linear \
            --warmup_step 500 \
            --max_epoch 5 \
            --save_interval 1000 \
            --lora_dim 4 \
            --lora_alpha 32 \
            --lora_dropout "$dropout" \
            --label_smooth "$smooth" \
            --work_dir "$out" \
            --overwrite_work_dir \
            --random_seed "$seed" \
            --recipe "$RECIPE"

        step=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["global_step"])' \
               "$out/train_results.json")
        SMOKE_ARGS=("${SMOKE_BEAM[@]+"${SMOKE_BEAM[@]}"}")
        launch examples/NLG/gpt2_beam.py \
            --data "$data/test.jsonl" \
            --batch_size 1 \
            --seq_len 512 \
            --eval_len 64 \
            --model_card "$card" \
            --init_checkpoint "$out/model.$step.pt" \
            --base_checkpoint "$MODEL_DIR/$model" \
            --platform local \
            --lora_dim 4 \
            --lora_alpha 32 \
            --beam 10 \
            --length_penalty "${LENGTH_PENALTY:-$penalty}" \
            --no_repeat_ngram_size 4 \
            --repetition_penalty 1.0 \
            --eos_token_id 628 \
            --work_dir "$out" \
            --output_file predict.jsonl

        SMOKE_ARGS=()
        categories=()  # WebNLG: each input's category, so the BLEU of seen / unseen / all categories is scored
        [[ $task == webnlg ]] && categories=(--output_category_file "$out/categories_$task.txt")
        NPROC=1 launch examples/NLG/gpt2_decode.py \
            --sample_file "$out/predict.jsonl" \
            --input_file "$data/test_formatted.jsonl" \
            --output_ref_file "$out/ref_$task" \
            --output_pred_file "$out/hyp_$task.txt" \
            "${decode_flags[@]}" \
            "${categories[@]+"${categories[@]}"}"
        [[ $task == webnlg ]] && categories=(--category_file "$out/categories_$task.txt")
        NPROC=1 launch examples/NLG/eval_nlg.py \
            --task "$task" \
            --ref_file "$out/ref_$task" \
            --pred_file "$out/hyp_$task.txt" \
            "${categories[@]+"${categories[@]}"}" \
            --output_dir "$out"
      done
    done
done
