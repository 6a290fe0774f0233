"""LoRA on GLUE with the flags of microsoft/LoRA examples/NLU (RoBERTa, BERT, DeBERTa v2/v3).

    python examples/NLU/run_glue.py --model_name_or_path roberta-base --task_name mnli --do_train --do_eval \
        --max_seq_length 512 --per_device_train_batch_size 16 --learning_rate 5e-4 --num_train_epochs 30 \
        --warmup_ratio 0.06 --weight_decay 0.1 --evaluation_strategy epoch --save_strategy epoch \
        --apply_lora --lora_r 8 --lora_alpha 16 --seed 0 --output_dir out/mnli

    # evaluate microsoft's released adapter
    python examples/NLU/run_glue.py --model_name_or_path roberta-base --task_name mnli --do_eval \
        --lora_path roberta_base_lora_mnli.bin --apply_lora --lora_r 8 --lora_alpha 16 --output_dir out/eval

LoRA goes on the self-attention query and value projections. Any row re-runs with a baseline: --use_dora
(DoRA), --init_lora_weights pissa | pissa_niter_N | lora_ga (with --loraga_batches N). --lora_a_init normal draws
lora_A from N(0, 0.02) as microsoft's DeBERTa fork did (default: loralib's kaiming init); --recipe released|paper
is recorded in run_config.json (scripts/README.md lists where the paper's tables and its scripts disagree; the
scripts choose the flag values). Everything else (data, model, training,
results files, the decisions where the original was silent) is loralib.tasks.glue.run; see its docstring.
"""
import sys

from loralib.tasks.glue import run


def main(argv=None) -> int:
    return run.main(argv, flavour="nlu", prog="examples/NLU/run_glue.py")


if __name__ == "__main__":
    sys.exit(main())
