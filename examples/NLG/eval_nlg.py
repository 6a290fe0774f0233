"""Score NLG outputs with the official metrics and write <output_dir>/eval_results.json for `loralib compare`.

    python examples/NLG/eval_nlg.py --task e2e --ref_file e2e_ref.txt --pred_file e2e_pred.txt --output_dir out/e2e
    python examples/NLG/eval_nlg.py --task webnlg --input_file data/nlg/webnlg/test_formatted.jsonl \
        --sample_file out/webnlg/predict.jsonl --output_dir out/webnlg     # decodes too; adds seen/unseen/all
WebNLG/DART TER is eval.py's (pyter3's) by default, key "ter"; --ter sacrebleu writes "ter_sacrebleu" instead.
Bad input: one "eval_nlg.py: error: file:line: ..." line, exit status 2, nothing written.
This file parses the flags; the logic lives in loralib.tasks.nlg.evaluate (see its docstring).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from loralib.tasks.nlg.data import TASKS
from loralib.tasks.nlg.evaluate import evaluate_files, evaluate_predictions, write_eval_results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score NLG outputs and write <output_dir>/eval_results.json. Either "
                                "--ref_file + --pred_file (gpt2_decode.py's outputs) or --input_file + "
                                "--sample_file (formatted input + gpt2_beam.py output).")
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--output_dir", required=True, help="the run folder that receives eval_results.json")
    p.add_argument("--ref_file", help="e2e: the reference file; webnlg/dart: the reference folder or prefix")
    p.add_argument("--pred_file", help="hypotheses, one a line")
    p.add_argument("--category_file", help="webnlg: one category a line (gpt2_decode.py --output_category_file)")
    p.add_argument("--input_file", help="formatted JSONL of the split")
    p.add_argument("--sample_file", help="gpt2_beam.py output")
    p.add_argument("--vocab", default=None, help="GPT-2 vocabulary (with --sample_file)")
    p.add_argument("--split", default="test")
    p.add_argument("--ter", default="eval_py", choices=("eval_py", "sacrebleu"),
                   help="webnlg/dart TER: eval_py = the LoRA repo's eval.py (pyter3; key 'ter', the paper's), "
                   "sacrebleu = sacrebleu's tercom TER (key 'ter_sacrebleu')")
    return p


def run(argv: Optional[Sequence[str]] = None) -> Path:
    p = build_parser()
    args = p.parse_args(argv)
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        p.error(f"--output_dir {args.output_dir}: a file, expected a folder")
    if args.sample_file or args.input_file:
        if not (args.sample_file and args.input_file) or args.ref_file or args.pred_file:
            p.error("give --input_file with --sample_file, or --ref_file with --pred_file, not a mix")
        record = evaluate_predictions(args.task, args.input_file, args.sample_file, args.vocab, args.ter)
    elif args.ref_file and args.pred_file:
        record = evaluate_files(args.task, args.ref_file, args.pred_file, args.category_file, args.ter)
    else:
        p.error("give --ref_file and --pred_file, or --input_file and --sample_file")
    record["split"] = args.split
    path = write_eval_results(args.output_dir, record)
    print(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 on success; bad input prints one `eval_nlg.py: error:` line naming the file (and line) and returns 2,
    before eval_results.json is written."""
    from loralib.cli import INPUT_ERRORS, run_entry_point

    return run_entry_point(lambda: run(argv), "eval_nlg.py", INPUT_ERRORS + (OSError,))


if __name__ == "__main__":
    sys.exit(main())
