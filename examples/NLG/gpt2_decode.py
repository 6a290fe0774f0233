"""Decode gpt2_beam.py's output into reference and hypothesis files (the LoRA repo's src/gpt2_decode.py flags).

    python examples/NLG/gpt2_decode.py --vocab vocab --sample_file out/e2e/predict.jsonl \
        --input_file data/nlg/e2e/test_formatted.jsonl --output_ref_file e2e_ref.txt --output_pred_file e2e_pred.txt
Bad input: one "gpt2_decode.py: error: file:line: ..." line, exit status 2, no output file written.
This file parses the flags into a DecodeSpec; the logic lives in loralib.tasks.nlg.decode (see its docstring).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import List, Optional, Sequence

from loralib.tasks.nlg.decode import FILTERS, DecodeSpec, Group, decode_files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Decode gpt2_beam.py output into reference and hypothesis files.")
    p.add_argument("--vocab", default=None, help="GPT-2 vocabulary: the vocab/ folder (encoder.json + vocab.bpe), "
                   "a *.tiktoken file or a tokenizer.json folder (default .cache/gpt2-bpe/gpt2.tiktoken)")
    p.add_argument("--sample_file", required=True, help="gpt2_beam.py output (JSONL: id, predict)")
    p.add_argument("--input_file", required=True, help="the formatted JSONL of the decoded split")
    p.add_argument("--output_ref_file", required=True, help="e2e: a file; webnlg/dart: a folder")
    p.add_argument("--output_pred_file", required=True)
    p.add_argument("--ref_unique_file", default=None, help="one group key (integer) per input line")
    p.add_argument("--ref_type", default="e2e", choices=["e2e", "webnlg", "dart"])
    p.add_argument("--ref_num", default=4, type=int, help="webnlg/dart: number of reference files")
    p.add_argument("--tokenize", action="store_true", help="split non-word characters off")
    p.add_argument("--lower", action="store_true", help="lower-case")
    p.add_argument("--filter", default="all", choices=list(FILTERS),
                   help="webnlg: keep the categories seen in training, the unseen ones, or all")
    p.add_argument("--output_category_file", default=None,
                   help="(ours) webnlg: also write each group's category, one a line, for eval_nlg.py")
    return p


def run(argv: Optional[Sequence[str]] = None) -> List[Group]:
    """Parse, read, check and decode everything, then write the files; returns the groups written."""
    args = build_parser().parse_args(argv)
    spec = DecodeSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DecodeSpec)})
    num_lines, groups = decode_files(spec)
    print(f"{num_lines} input lines, {len(groups)} inputs ({args.filter}) -> {args.output_pred_file}, "
          f"{args.output_ref_file}")
    return groups


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 on success; bad input prints one `gpt2_decode.py: error:` line naming the file (and line), returns 2,
    and leaves every output file as it was."""
    from loralib.cli import INPUT_ERRORS, run_entry_point

    return run_entry_point(lambda: run(argv), "gpt2_decode.py", INPUT_ERRORS + (OSError,))


if __name__ == "__main__":
    sys.exit(main())
