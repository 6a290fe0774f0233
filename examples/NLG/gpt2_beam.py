"""Beam search of GPT-2 + LoRA over an encoded E2E / DART / WebNLG set, with the flags of microsoft/LoRA
examples/NLG/src/gpt2_beam.py.

    torchrun --nproc_per_node=1 examples/NLG/gpt2_beam.py --data data/e2e/test.jsonl --batch_size 1 \
        --seq_len 512 --eval_len 64 --model_card gpt2.md --init_checkpoint trained_models/GPT2_M/e2e/model.26289.pt \
        --platform local --lora_dim 4 --lora_alpha 32 --beam 10 --length_penalty 0.8 --no_repeat_ngram_size 4 \
        --repetition_penalty 1.0 --eos_token_id 628 --work_dir trained_models/GPT2_M/e2e \
        --output_file predict.26289.b10p08r4.jsonl

The pretrained GPT-2 comes from --base_checkpoint (default models/gpt2-medium for gpt2.md); --init_checkpoint
may also be microsoft's released gpt2_md_lora_e2e.pt or an adapter folder. Writes WORK_DIR/OUTPUT_FILE,
{"id", "predict"} a line. Everything is loralib.tasks.nlg.beam; see its docstring.
"""
import sys

from loralib.tasks.nlg import beam

if __name__ == "__main__":
    sys.exit(beam.main())
