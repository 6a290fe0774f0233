"""Beam search of GPT-2 + LoRA over an encoded E2E / DART / WebNLG set, with the flags of microsoft/LoRA
examples/NLG/src/gpt2_beam.py.

    torchrun --nproc_per_node=1 examples/NLG/gpt2_beam.py --data data/e2e/test.jsonl --batch_size 1 \
        --seq_len 512 --eval_len 64 --model_card gpt2.md --init_checkpoint trained_models/GPT2_M/e2e/model.26289.pt \
        --platform local --lora_dim 4 --lora_alpha 32 --beam 10 --length_penalty 0.8 --no_repeat_ngram_size 4 \
        --repetition_penalty 1.0 --eos_token_id 628 --work_dir trained_models/GPT2_M/e2e \
        --output_file predict.26289.b10p08r4.jsonl

The pretrained GPT-2 comes from --base_checkpoint (default models/gpt2-medium for gpt2.md); --init_checkpoint
may be any GPT-2 adapter loralib.adapter_files.open_adapter reads: microsoft's released gpt2_md_lora_e2e.pt, a
gpt2_ft.py work dir or checkpoint-<step>/, a loralib adapter folder or a PEFT folder. Writes WORK_DIR/OUTPUT_FILE,
{"id", "predict"} a line. This file parses the flags into a BeamSpec; the run is loralib.tasks.nlg.beam (see
its docstring).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

from gpt2_ft import add_gpu_flags, recorded_flags
from loralib.models.gpt2_checkpoint import MODEL_CARDS
from loralib.tasks.nlg.beam import BeamSpec, run_beam as run_spec
from loralib.tasks.nlg.completion import EOS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt2_beam.py", description="Beam search of GPT-2 + LoRA on an encoded NLG "
                                "set (the flags of microsoft/LoRA examples/NLG/src/gpt2_beam.py).")
    add_gpu_flags(p)
    p.add_argument("--data", required=True, help="encoded JSONL: {'context': [ids], 'completion': [ids]}")
    p.add_argument("--batch_size", type=int, default=10, help="inputs per generate() call")
    p.add_argument("--seq_len", type=int, default=512, help="prompt + generation fit in this many tokens")
    p.add_argument("--eval_len", type=int, default=256, help="at most this many new tokens")
    p.add_argument("--min_length", type=int, default=0, help="only 0 is supported")
    p.add_argument("--model_card", default="gpt2.sm", choices=tuple(MODEL_CARDS))
    p.add_argument("--init_checkpoint", default=None,
                   help="LoRA checkpoint: model.<step>.pt of gpt2_ft.py, a released gpt2_*_lora_*.pt, "
                   "a gpt2_ft.py work dir or its checkpoint-<step>/, an adapter/ folder or a PEFT folder")
    p.add_argument("--base_checkpoint", default=None, help="the pretrained GPT-2 (folder or file; default "
                   "models/<gpt2 | gpt2-medium | gpt2-large> by --model_card) (not an original flag)")
    p.add_argument("--lora_dim", type=int, default=0, help="LoRA rank; 0: read it from the checkpoint")
    p.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default: the adapter folder's, "
                   "else 32, the paper's value for every released adapter; the original defaulted to 128; "
                   "a PEFT adapter's own)")
    p.add_argument("--work_dir", default=os.getenv("PT_OUTPUT_DIR", "gpt2_model"))
    p.add_argument("--beam", type=int, default=1, help="beam size")
    p.add_argument("--length_penalty", type=float, default=1.0)
    p.add_argument("--no_repeat_ngram_size", type=int, default=4)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--eos_token_id", action="append", type=int, default=[EOS],
                   help="stop tokens; repeatable, added to 50256 (628 is '\\n\\n')")
    p.add_argument("--output_file", default="beam_prediction.jsonl")
    p.add_argument("--decoding", choices=("lora_repo", "transformers"), default="lora_repo",
                   help="lora_repo: the original gpt2_beam.py's search (the paper's numbers); transformers: "
                   "transformers' beam search (not an original flag)")
    return p


def check_flags(args: argparse.Namespace) -> None:
    for name in ("batch_size", "seq_len", "eval_len", "beam"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.eval_len >= args.seq_len:
        raise ValueError(f"--eval_len {args.eval_len} leaves no room for the prompt in --seq_len {args.seq_len}")
    if args.min_length != 0:
        raise ValueError("--min_length > 0 is not supported (the paper's runs leave it at 0)")
    if args.lora_dim < 0:
        raise ValueError(f"--lora_dim must be >= 0, got {args.lora_dim}")
    if args.no_repeat_ngram_size < 0 or args.repetition_penalty <= 0:
        raise ValueError("--no_repeat_ngram_size must be >= 0 and --repetition_penalty > 0")
    if any(t < 0 for t in args.eos_token_id):
        raise ValueError(f"--eos_token_id must be token ids >= 0, got {args.eos_token_id}")
    if args.init_checkpoint is None:
        raise ValueError("--init_checkpoint is required: the LoRA checkpoint to decode with (model.<step>.pt "
                         "of gpt2_ft.py, a released gpt2_*_lora_*.pt, a run or adapter folder, or a PEFT folder)")


def parse(argv: Optional[Sequence[str]] = None) -> BeamSpec:
    """The flags, checked, as a BeamSpec (its fields are the flags' names)."""
    args = build_parser().parse_args(argv)
    check_flags(args)
    names = {f.name for f in dataclasses.fields(BeamSpec)} - {"record"}
    return BeamSpec(**{k: v for k, v in vars(args).items() if k in names}, record=recorded_flags(args))


def run_beam(argv: Optional[Sequence[str]] = None):
    """Parse, check, decode and write; returns the predictions file (None on ranks > 0)."""
    return run_spec(parse(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: 0 on success; a bad flag, file or checkpoint prints one `error:` line, returns 2."""
    from loralib.cli import run_entry_point

    return run_entry_point(lambda: run_beam(argv), "gpt2_beam.py")


if __name__ == "__main__":
    sys.exit(main())
