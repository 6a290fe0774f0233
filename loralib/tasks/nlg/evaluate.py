"""The evaluate step: hypotheses + references -> the task's metrics -> <run folder>/eval_results.json.

    eval_results.json = {"task": "e2e", "split": "test", "num_examples": 630,
                         "bleu": 0.70, "nist": 8.8, "meteor": 0.47, "rouge_l": 0.72, "cider": 2.5}
    WebNLG: bleu, meteor, ter and, when categories are known, bleu_seen, bleu_unseen, bleu_all.
    DART:   bleu, meteor, ter.
Scales are the official scripts': E2E's measure_scores prints fractions (NIST raw); multi-bleu-detok
prints BLEU on 0-100. `loralib compare` puts fractions on the paper's per-cent scale itself.
num_examples counts the inputs scored (groups of references), not reference lines.

Two ways in: the files gpt2_decode.py wrote (evaluate_files), or the beam output and the formatted
input directly (evaluate_predictions, which decodes in memory with each task's decode settings, renders the
texts gpt2_decode.py would write and reads them back, so both ways score the same sentences).
Files are cut into lines as the official script of the task cuts them (lines.py): E2E as measure_scores.py
(str.splitlines(), stripped: U+0085, U+2028, ... also end a line), WebNLG/DART as eval.py (at \n only).
WebNLG/DART TER: "ter" is eval.py's definition (pyter3's, the default); --ter sacrebleu writes
"ter_sacrebleu" instead, so eval_results.json says which one a score is.
examples/NLG/eval_nlg.py is the command line over these functions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ...files import write_json_atomic
from .data import TASKS, DataFormatError
from .lines import e2e_lines, eval_py_lines, first_extra_break, parse_e2e_references, read_utf8

# Decode settings the LoRA README uses per task: (tokenize, lower, ref_num).
DECODE_SETTINGS = {"e2e": (False, False, None), "webnlg": (True, True, 6), "dart": (True, True, 6)}


def _metrics():
    from . import metrics  # engineer H1's module; imported when a score is needed
    return metrics


# the LoRA repository's WebNLG / DART evaluation pads every input to 6 references (multi-bleu-detok -nr 6)
REFERENCES_PER_INPUT = 6


def score(task: str, hypotheses: Sequence[str], references: Sequence[Sequence[str]],
          categories: Optional[Sequence[str]] = None, ter: str = "eval_py") -> Dict[str, float]:
    """The task's metrics with lower-case names; `categories` (WebNLG, one per hypothesis) adds seen/unseen;
    `ter` (WebNLG/DART): "eval_py" -> key "ter", "sacrebleu" -> key "ter_sacrebleu"."""
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
                                  num_refs=REFERENCES_PER_INPUT, ter=ter)
    else:
        result = m.dart_metrics(list(hypotheses), [list(r) for r in references], num_refs=REFERENCES_PER_INPUT,
                                ter=ter)
    return {k.lower(): (None if v is None else float(v)) for k, v in result.items()}


def results_record(task: str, metrics: Dict[str, float], num_examples: int, split: str = "test") -> dict:
    return {"task": task, "split": split, "num_examples": num_examples, **metrics}


def write_eval_results(run_dir, record: dict) -> Path:
    """<run_dir>/eval_results.json, written whole or not at all."""
    return write_json_atomic(Path(run_dir) / "eval_results.json", record)


# -- reading gpt2_decode.py's files -------------------------------------------------------------------

def parse_outputs(task: str, ref_texts: Sequence[str], pred_text: str, ref_sources: Sequence[str],
                  pred_source: str) -> tuple:
    """(hypotheses, references) from the texts of gpt2_decode.py's files, cut as the task's official script
    cuts them. E2E: ref_texts = [the reference file]; WebNLG/DART: [reference0, reference1, ...], line i of
    each a reference of input i. Line counts that disagree name the files (and, for E2E, the first line
    the official reader splits in two)."""
    if task == "e2e":
        hypotheses = e2e_lines(pred_text)
        references = parse_e2e_references(ref_texts[0], ref_sources[0])
    else:
        hypotheses = eval_py_lines(pred_text)
        columns = [eval_py_lines(t) for t in ref_texts]
        for source, col in zip(ref_sources[1:], columns[1:]):
            if len(col) != len(columns[0]):
                raise DataFormatError(f"{source}: {len(col)} lines, {ref_sources[0]} has {len(columns[0])}")
        references = [list(refs) for refs in zip(*columns)]
    if len(references) != len(hypotheses):
        hint = ""
        if task == "e2e":  # a character only the official reader breaks lines at explains a mismatch
            found = (first_extra_break(t, src) for t, src in ((pred_text, pred_source), (ref_texts[0], ref_sources[0])))
            hint = next((h for h in found if h), "")
        why = f" ({hint} is a line break to the E2E script, which reads that line as two)" if hint else ""
        raise DataFormatError(f"{pred_source}: {len(hypotheses)} hypotheses, but {ref_sources[0]} holds "
                              f"{len(references)} inputs{why}")
    return hypotheses, references


def reference_files(path) -> List[Path]:
    """WebNLG/DART layout: a folder (or a path prefix) with reference0, reference1, ..."""
    path = Path(path)
    prefix = path / "reference" if path.is_dir() else path
    files = []
    while Path(f"{prefix}{len(files)}").is_file():
        files.append(Path(f"{prefix}{len(files)}"))
    if not files:
        raise FileNotFoundError(f"{prefix}0: no reference files (expected {prefix}0, {prefix}1, ...)")
    return files


def evaluate_files(task: str, ref_path, pred_path, category_path=None, ter: str = "eval_py") -> Dict[str, object]:
    """Score gpt2_decode.py's outputs; returns the eval_results.json record (split "test")."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    ref_files = [Path(ref_path)] if task == "e2e" else reference_files(ref_path)
    ref_texts = [read_utf8(f, "--ref_file") for f in ref_files]
    pred_text = read_utf8(pred_path, "--pred_file")
    hypotheses, references = parse_outputs(task, ref_texts, pred_text, [str(f) for f in ref_files], str(pred_path))
    categories = eval_py_lines(read_utf8(category_path, "--category_file")) if category_path else None
    if categories is not None and len(categories) != len(hypotheses):
        raise DataFormatError(f"{category_path}: {len(categories)} lines, {pred_path} has {len(hypotheses)}")
    return results_record(task, score(task, hypotheses, references, categories, ter), len(hypotheses))


def evaluate_predictions(task: str, input_file, sample_file, vocab=None, ter: str = "eval_py") -> Dict[str, object]:
    """Decode beam output against the formatted input with the README's settings for the task (E2E as is;
    WebNLG and DART tokenised, lower-cased, 6 references), render the files gpt2_decode.py would write, read
    them back as the official scripts do, and score them; WebNLG gets seen/unseen/all."""
    from .bpe import load_bpe
    from .data import read_formatted
    from .decode import decode_beam, e2e_reference_text, hypothesis_text, multi_reference_texts, read_predictions

    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    tokenize, lower, ref_num = DECODE_SETTINGS[task]
    bpe = load_bpe(vocab)
    records = read_formatted(input_file, "--input_file")
    groups = decode_beam(records, read_predictions(sample_file, bpe.vocab_size, len(records)), bpe,
                         source=str(sample_file))
    if task == "e2e":
        ref_texts, ref_sources = [e2e_reference_text(groups, tokenize, lower)], ["<e2e references>"]
    else:
        ref_texts = multi_reference_texts(groups, ref_num, tokenize, lower)
        ref_sources = [f"<reference{k}>" for k in range(ref_num)]
    hypotheses, references = parse_outputs(task, ref_texts, hypothesis_text(groups, tokenize, lower), ref_sources,
                                           f"<hypotheses decoded from {sample_file}>")
    categories = None
    if task == "webnlg" and all(g.category is not None for g in groups):
        categories = [g.category for g in groups]
    return results_record(task, score(task, hypotheses, references, categories, ter), len(hypotheses))
