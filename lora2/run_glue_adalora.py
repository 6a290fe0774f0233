"""AdaLoRA on GLUE with the flags of QingruZhang/AdaLoRA's NLU scripts (DeBERTaV3), unchanged: here
`--apply_lora --apply_adalora --lora_type svd ...` builds AdaLoRA's SVDLinear (P diag(E) Q), as in AdaLoRA's
repository, while lora2/run_glue.py gives the same command LoRA²'s meaning (the LoRA² repository's).

    python lora2/run_glue_adalora.py --model_name_or_path microsoft/deberta-v3-base --task_name mrpc \
        --apply_lora --apply_rankselector --lora_type svd --target_rank 1 --lora_r 2 --reg_orth_coef 0.1 \
        --init_warmup 600 --final_warmup 1800 --mask_interval 1 --beta1 0.85 --beta2 0.85 \
        --lora_module query,key,value,intermediate,layer.output,attention.output --lora_alpha 32 \
        --do_train --do_eval --max_seq_length 320 --per_device_train_batch_size 32 --learning_rate 1e-3 \
        --num_train_epochs 30 --warmup_ratio 0.1 --cls_dropout 0.0 --weight_decay 0.01 --seed 6 \
        --root_output_dir ./output/debertav3-base/mrpc --overwrite_output_dir

--cls_dropout is honoured (AdaLoRA's code passed it to the model config). The flags are lora2/glue_entry.py's (shared
with lora2/run_glue.py), the run is loralib.tasks.glue.run; see their docstrings.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import glue_entry  # noqa: E402

PROG = "lora2/run_glue_adalora.py"
SVD_LAYER = "adalora"  # what --lora_type svd builds unless --svd_layer says otherwise


def main(argv=None) -> int:
    return glue_entry.main(argv, PROG, SVD_LAYER)


def run_glue(argv=None):
    """Parse, translate, prepare and execute; errors propagate."""
    return glue_entry.run_glue(argv, SVD_LAYER)


if __name__ == "__main__":
    sys.exit(main())
