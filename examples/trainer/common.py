"""What the three Trainer examples share: a causal LM and a tokenized training set.

--model_name_or_path NAME loads a Hugging Face model and its tokenizer and trains on --text_file (one example
per line); without it a tiny random Llama and random tokens stand in (how the tests run these scripts).
"""
import argparse

import torch


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model_name_or_path", default=None, help="a Hugging Face causal LM; default: a tiny random Llama")
    p.add_argument("--text_file", default=None, help="training text, one example per line (with a real model)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16)
    p.add_argument("--max_length", type=int, default=64)
    return p


def model_and_data(args):
    """(model, train_dataset): each example a dict of equal-length input_ids / attention_mask / labels."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if args.model_name_or_path is None:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
        ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(1))
        return model, [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]
    if args.text_file is None:
        raise SystemExit("--text_file is required with --model_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    with open(args.text_file, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise SystemExit(f"--text_file {args.text_file}: no non-empty line")
    enc = tokenizer(lines, max_length=args.max_length, truncation=True, padding="max_length", return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return model, [{"input_ids": i, "attention_mask": m, "labels": y}
                   for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]
