#!/usr/bin/env bash
# LoRA-Pro (Wang et al., ICLR 2025), Llama-2-7B on WizardLM -> MT-Bench: the paper's rows (lora, rslora, lora-pro,
# rslora-pro; seeds 0 1 2) with the hyper-parameters of recipes.md, through lorapro/train.py.
#
#   scripts/lorapro_mtbench.sh [--smoke] [METHOD ...]   METHOD: lora rslora lora-pro rslora-pro (default: these four),
#                                                  loraplus adalora lora2 dora pissa lora-ga full (the baselines), or all
#
#   scripts/lorapro_mtbench.sh                              # four methods x seeds 0 1 2, one process each
#   NPROC=8 scripts/lorapro_mtbench.sh lora-pro             # torchrun, 8 processes: per device 1 x accumulation 4
#   NPROC=8 DEEPSPEED=lorapro/ds_zero2.json scripts/lorapro_mtbench.sh lora-pro   # DeepSpeed ZeRO-2 (moments sharded)
#   SEEDS=0 scripts/lorapro_mtbench.sh --smoke              # tiny random Llama + tiny files, seconds
#
# r 8, alpha 16, dropout 0 on q,k,v,o,up,down,gate; lr 2e-5, 1 epoch, cosine, warmup ratio 0.03, global batch 32
# (per device 1, accumulation 32 / NPROC), weight decay 0; bf16 and gradient checkpointing on a GPU.
# Baselines dora, pissa, lora-ga (the LoRA-GA setting's rows, registry paper "lorapro"): the same r, alpha, lr,
# schedule and batch as above (recipes.md gives no per-method values). NOT KNOWN here, so chosen and stated:
# PiSSA uses the full SVD ("pissa"; the fast variant is --init_lora_weights pissa_niter_N); LoRA-GA estimates
# the gradient over LORAGA_BATCHES (8) per-device batches of the first training examples, with PEFT's defaults
# (direction ArB2r, scale stable, gamma 16); DoRA's learning rate is the shared 2e-5.
# Data: DATA_DIR/wizardlm.jsonl (no "sorry" / "as an ai" answers, under 1024 tokens, first 52k) and
# MTBENCH_QUESTIONS (FastChat's data/mt_bench/question.jsonl). The run writes mtbench_answers.jsonl; score it
# with FastChat's llm_judge (gen_judgment.py --judge-model gpt-4, then show_result.py).
# Results: OUT_DIR/<method>/seed<seed>/{eval_results.json,run_config.json,adapter/,peft_adapter/}.
# Environment: SEEDS ("0 1 2"), LR (2e-5), NPROC (1), DEEPSPEED (a DeepSpeed JSON config, passed as --deepspeed),
# MODEL_DIR (folder holding meta-llama/Llama-2-7b-hf; default: models/, else a download), DATA_DIR (data/instruct),
# OUT_DIR (outputs/lorapro_mtbench), PYTHON, SMOKE_DIR (.cache/smoke), LORAGA_BATCHES (8), MTBENCH_QUESTIONS (data/mt_bench/question.jsonl).
ALL_TASKS=(lora rslora lora-pro rslora-pro loraplus adalora lora2 dora pissa lora-ga full)
DEFAULT_TASKS=(lora rslora lora-pro rslora-pro)
SMOKE_TASKS=(lora-pro)
source "$(dirname "$0")/_common.sh"
parse_args "$@"

source "$SCRIPTS_DIR/_lorapro_common.sh"   # SEEDS, LR, smoke assets, DATA_DIR, OUT_DIR, DS_ARGS
if (( SMOKE )); then MTBENCH_QUESTIONS=$DATA_DIR/mt_bench_question.jsonl; fi
MTBENCH_QUESTIONS=${MTBENCH_QUESTIONS:-data/mt_bench/question.jsonl}
[[ -f $MTBENCH_QUESTIONS ]] || die "MTBENCH_QUESTIONS=$MTBENCH_QUESTIONS: no such file (FastChat's fastchat/llm_judge/data/mt_bench/question.jsonl)"
EVAL_ARGS=(--eval_data_path "$MTBENCH_QUESTIONS")
[[ -e $DATA_DIR/wizardlm.jsonl ]] || die "$DATA_DIR/wizardlm.jsonl is missing: python data/download_instruct.py --tasks wizardlm"

run_rows \
    --dataset wizardlm \
    --data_path "$DATA_DIR/wizardlm.jsonl" \
    --eval_task mt-bench \
    "${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"}" \
    --max_length 1024 \
    --n_train 52000 \
    --n_eval 18000 \
    --max_new_tokens 1024
