"""The evaluate step: hypotheses + references -> the task's metrics -> <run folder>/eval_results.json.

    eval_results.json = {"task": "e2e", "split": "test", "num_examples": 630,
                         "bleu": 0.70, "nist": 8.8, "meteor": 0.47, "rouge_l": 0.72, "cider": 2.5}
    WebNLG: bleu, meteor, ter and, when categories are known, bleu_seen, bleu_unseen, bleu_all.
    DART:   bleu, meteor, ter.
Scales are the official scripts': E2E's measure_scores prints fractions (NIST raw); multi-bleu-detok
prints BLEU on 0-100. `loralib compare` puts fractions on the paper's per-cent scale itself.
num_examples counts the inputs scored (groups of references), not reference lines.

Two ways in: the files gpt2_decode.py wrote (evaluate_files), or the beam output and the formatted
input directly (evaluate_predictions, which decodes in memory with each task's decode settings).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ...files import write_json_atomic
from .data import TASKS, DataFormatError

# Decode settings the LoRA README uses per task: (tokenize, lower, ref_num).
DECODE_SETTINGS = {"e2e": (False, False, None), "webnlg": (True, True, 6), "dart": (True, True, 6)}


def _metrics():
    from . import metrics  # engineer H1's module; imported when a score is needed
    return metrics


# the LoRA repository's WebNLG / DART evaluation pads every input to 6 references (multi-bleu-detok -nr 6)
REFERENCES_PER_INPUT = 6


def score(task: str, hypotheses: Sequence[str], references: Sequence[Sequence[str]],
          categories: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """The task's metrics with lower-case names; `categories` (WebNLG, one per hypothesis) adds seen/unseen."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    if not hypotheses:
        raise ValueError("nothing to score: no hypotheses")
    m = _metrics()
    if task == "e2e":
        result = m.e2e_metrics(list(hypotheses), [list(r) for r in references])
    elif task == "webnlg":
        if categories is not None and len(categories) != len(hypotheses):
            raise ValueError(f"{len(categories)} categories but {len(hypotheses)} hypotheses")
        result = m.webnlg_metrics(list(hypotheses), [list(r) for r in references],
                                  categories=list(categories) if categories is not None else None,
                                  num_refs=REFERENCES_PER_INPUT)
    else:
        result = m.dart_metrics(list(hypotheses), [list(r) for r in references], num_refs=REFERENCES_PER_INPUT)
    return {k.lower(): (None if v is None else float(v)) for k, v in result.items()}


def results_record(task: str, metrics: Dict[str, float], num_examples: int, split: str = "test") -> dict:
    return {"task": task, "split": split, "num_examples": num_examples, **metrics}


def write_eval_results(run_dir, record: dict) -> Path:
    """<run_dir>/eval_results.json, written whole or not at all."""
    return write_json_atomic(Path(run_dir) / "eval_results.json", record)


# -- reading gpt2_decode.py's files -------------------------------------------------------------------

def read_lines(path) -> List[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path.read_text(encoding="utf-8").splitlines()


def read_reference_folder(path) -> List[List[str]]:
    """WebNLG/DART layout: a folder (or a path prefix) with reference0, reference1, ...: line i of each
    file is a reference of input i. -> [[ref0_i, ref1_i, ...] for each i]."""
    path = Path(path)
    prefix = path / "reference" if path.is_dir() else path
    files = []
    while Path(f"{prefix}{len(files)}").is_file():
        files.append(Path(f"{prefix}{len(files)}"))
    if not files:
        raise FileNotFoundError(f"{prefix}0: no reference files (expected {prefix}0, {prefix}1, ...)")
    columns = [read_lines(f) for f in files]
    for f, col in zip(files[1:], columns[1:]):
        if len(col) != len(columns[0]):
            raise DataFormatError(f"{f}: {len(col)} lines, {files[0]} has {len(columns[0])}")
    return [list(refs) for refs in zip(*columns)]


def evaluate_files(task: str, ref_path, pred_path, category_path=None) -> Dict[str, object]:
    """Score gpt2_decode.py's outputs; returns the eval_results.json record (split "test")."""
    hypotheses = read_lines(pred_path)
    if task == "e2e":  # one reference a line, a blank line after each input's references
        references = _metrics().read_e2e_references(ref_path)
    else:
        references = read_reference_folder(ref_path)
    if len(references) != len(hypotheses):
        raise DataFormatError(f"{pred_path}: {len(hypotheses)} hypotheses, but {ref_path} holds "
                              f"{len(references)} inputs")
    categories = read_lines(category_path) if category_path else None
    if categories is not None and len(categories) != len(hypotheses):
        raise DataFormatError(f"{category_path}: {len(categories)} lines, {pred_path} has {len(hypotheses)}")
    return results_record(task, score(task, hypotheses, references, categories), len(hypotheses))


def evaluate_predictions(task: str, input_file, sample_file, vocab=None) -> Dict[str, object]:
    """Decode beam output against the formatted input with the README's settings for the task (E2E as is;
    WebNLG and DART tokenised, lower-cased, 6 references) and score it; WebNLG gets seen/unseen/all."""
    from .bpe import load_bpe
    from .decode import decode_beam, padded_references, post_process, read_predictions
    from .data import read_formatted

    tokenize, lower, ref_num = DECODE_SETTINGS[task]
    bpe = load_bpe(vocab)
    records = read_formatted(input_file)
    groups = decode_beam(records, read_predictions(sample_file, bpe.vocab_size, len(records)), bpe,
                    source=str(sample_file))
    hypotheses = [post_process(g.hypothesis, tokenize, lower) for g in groups]
    references = [[post_process(r, tokenize, lower)
                   for r in (padded_references(g.references, ref_num) if ref_num else g.references)]
                  for g in groups]
    categories = None
    if task == "webnlg" and all(g.category is not None for g in groups):
        categories = [g.category for g in groups]
    return results_record(task, score(task, hypotheses, references, categories), len(groups))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """examples/NLG/eval_nlg.py."""
    import argparse

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
    args = p.parse_args(argv)
    if args.sample_file or args.input_file:
        if not (args.sample_file and args.input_file) or args.ref_file or args.pred_file:
            p.error("give --input_file with --sample_file, or --ref_file with --pred_file, not a mix")
        record = evaluate_predictions(args.task, args.input_file, args.sample_file, args.vocab)
    elif args.ref_file and args.pred_file:
        record = evaluate_files(args.task, args.ref_file, args.pred_file, args.category_file)
    else:
        p.error("give --ref_file and --pred_file, or --input_file and --sample_file")
    record["split"] = args.split
    path = write_eval_results(args.output_dir, record)
    print(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return 0
