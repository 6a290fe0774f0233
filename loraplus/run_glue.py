"""LoRA+ on GLUE with the flags of the LoRA+ repository's glue/src/run_glue.py (GPT-2, RoBERTa, Llama).

    python loraplus/run_glue.py --model_name_or_path gpt2 --task_name mnli --target_modules "c_attn, c_proj, c_fc" \
        --loraplus_lr_ratio 10 --lora_rank 8 --lora_alpha 8 --max_seq_length 128 \
        --per_device_train_batch_size 32 --num_train_epochs 3 --learning_rate 2e-4 \
        --lr_scheduler_type linear --adam_beta1 0.9 --adam_beta2 0.99 --adam_epsilon 1e-8 \
        --evaluation_strategy steps --eval_steps 500 --save_steps 500 --output_dir out/gpt2_mnli

B is trained with lr * --loraplus_lr_ratio (loralib.optim.create_loraplus_optimizer); --do_train and --do_eval
default to on, as in the LoRA+ script (--no_do_train / --no_do_eval turn them off). The LoRA+ experiments'
swapped init (B kaiming, A zeros) is the default; --use_original_init (or --lora_use_original_init) gives
LoRA's. GPT-2 pads with its eos token, Llama gets a new [PAD] token (embedding grown, new row = mean).
--use_dora and --init_lora_weights (pissa / lora_ga need --use_original_init: both set the factors) re-run a
row with DoRA, PiSSA or LoRA-GA. --recipe released|paper is recorded in run_config.json (no disagreement between
the LoRA+ paper and its scripts is known). Everything else is loralib.tasks.glue.run; see its docstring.
"""
import sys

from loralib.tasks.glue import run


def main(argv=None) -> int:
    return run.main(argv, flavour="loraplus", prog="loraplus/run_glue.py")


if __name__ == "__main__":
    sys.exit(main())
