"""LoRA² (and AdaLoRA) on GLUE with the flags of the released LoRA² scripts (DeBERTaV3). A released LoRA² command
means here what it meant in the LoRA² repository: `--apply_adalora --lora_type svd` builds LoRA²'s layer (that
repository's loralib redefined SVDLinear as LoRA²'s, inner rank k = 8), and the head dropout is the released
run_glue.py's fixed 0.15 whatever --cls_dropout says, unless --recipe paper (then --cls_dropout is honoured).

    # LoRA², the released MRPC command
    python lora2/run_glue.py --model_name_or_path microsoft/deberta-v3-base --task_name mrpc \
        --apply_lora --apply_adalora --lora_type svd --target_rank 1 --lora_r 8 --reg_orth_coef 0.1 \
        --init_warmup 600 --final_warmup 1800 --mask_interval 1 --beta1 0.85 --beta2 0.85 \
        --lora_module query,key,value,intermediate,layer.output,attention.output --lora_alpha 32 \
        --do_train --do_eval --max_seq_length 320 --per_device_train_batch_size 32 --learning_rate 1e-3 \
        --num_train_epochs 30 --warmup_ratio 0.1 --cls_dropout 0.0 --weight_decay 0.01 --seed 6 \
        --root_output_dir ./output/debertav3-base/mrpc --overwrite_output_dir

    # AdaLoRA from the same command: lora2/run_glue_adalora.py (AdaLoRA's repository's meaning), or add
    # --svd_layer adalora here. --apply_lora2 builds LoRA² whatever --svd_layer says (inner rank --lora2_k).

--apply_rankselector (the released MRPC scripts' spelling) means --apply_adalora. The final rank pattern is
written to output_dir/rank_pattern.json. LoRA rows (not AdaLoRA / LoRA², which refuse them) take --use_dora and
--init_lora_weights pissa | pissa_niter_N | lora_ga. The flags both lora2 entry points take are
lora2/glue_entry.py's, the shared GLUE flags loralib.train.hf_flags', the run itself is loralib.tasks.glue.run;
see their docstrings.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import glue_entry  # noqa: E402

PROG = "lora2/run_glue.py"
SVD_LAYER = "lora2"  # what --lora_type svd builds unless --svd_layer says otherwise


def main(argv=None) -> int:
    return glue_entry.main(argv, PROG, SVD_LAYER)


def run_glue(argv=None):
    """Parse, translate, prepare and execute; errors propagate."""
    return glue_entry.run_glue(argv, SVD_LAYER)


if __name__ == "__main__":
    sys.exit(main())
