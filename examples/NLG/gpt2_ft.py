"""Fine-tune GPT-2 with LoRA on E2E / DART / WebNLG, with the flags of microsoft/LoRA examples/NLG/src/gpt2_ft.py.

    torchrun --nproc_per_node=1 examples/NLG/gpt2_ft.py --train_data data/e2e/train.jsonl \
        --valid_data data/e2e/valid.jsonl --train_batch_size 8 --grad_acc 1 --valid_batch_size 4 --seq_len 512 \
        --model_card gpt2.md --init_checkpoint models/gpt2-medium --platform local --clip 0.0 --lr 0.0002 \
        --weight_decay 0.01 --correct_bias --adam_beta2 0.999 --scheduler linear --warmup_step 500 --max_epoch 5 \
        --save_interval 1000 --lora_dim 4 --lora_alpha 32 --lora_dropout 0.1 --label_smooth 0.1 \
        --work_dir trained_models/GPT2_M/e2e --random_seed 110

Writes WORK_DIR/model.<step>.pt (the LoRA factors, readable by the original gpt2_beam.py and ours),
adapter/, checkpoint-<step>/ and run_config.json. Everything is loralib.tasks.nlg.train; see its docstring.
"""
import sys

from loralib.tasks.nlg import train

if __name__ == "__main__":
    sys.exit(train.main())
