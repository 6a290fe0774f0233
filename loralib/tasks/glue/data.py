"""GLUE readers: the official TSV distribution or a `datasets` save_to_disk folder -> plain examples.

    load_glue("mnli", "data/", "dev")      # -> GlueData: examples [(premise, hypothesis, label id)], label names
    load_glue("mnli-mm", "data/", "dev")   # the mismatched dev set of the same task

Label ids follow the Hugging Face "glue" dataset everywhere (MNLI: entailment 0, neutral 1, contradiction 2),
whatever the source, because the released LoRA adapters were trained on that order.

Where a task's files are looked for, under `data_dir`, first match wins:
    data_dir/<GLUE folder>/    official TSV files   (data/MNLI/train.tsv, data/SST-2/dev.tsv, ...)
    data_dir/glue/<name>/      save_to_disk folder  (what data/download_glue.py writes; LoRA+'s layout)
    data_dir/<name>/           save_to_disk folder
    data_dir itself            either kind           (the original run_glue's --data_dir data/MNLI)

Splits are "train", "dev" (alias "validation") and "test" (labels are None there). MNLI has two dev and two test
sets: task "mnli" reads the matched ones, "mnli-mm" the mismatched ones; the split names "dev_matched",
"validation_mismatched", ... pick one explicitly. Besides the nine GLUE tasks there are two offline tasks built
from WordNet by data/make_wordnet_glue.py: "wn-lex" (gloss -> lexicographer category, SST-2 layout plus a
labels.txt) and "wn-pair" (gloss, example sentence -> same sense?, MRPC layout).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

from ...files import not_utf8

GLUE_TASK_NAMES = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
MAX_REPORTED_ERRORS = 20


class GlueExample(NamedTuple):
    text_a: str
    text_b: str | None          # None for the single-sentence tasks (CoLA, SST-2, wn-lex)
    label: int | float | None   # class id, STS-B score, or None on a test split


@dataclass(frozen=True)
class GlueTask:
    """What is needed to read one task from either source. Column names are the files' own header names."""
    name: str                          # our name: "mnli", "mnli-mm", "sst2", ...
    folder: str                        # folder of the official distribution: "MNLI", "SST-2", ...
    hf_config: str                     # config of the `datasets` "glue" dataset: "mnli", "sst2", ...
    hf_columns: tuple[str, str | None]  # text columns in the `datasets` version
    tsv_columns: tuple[str, str | None, str]  # (text_a, text_b, label) header names in the TSV files
    label_names: tuple[str, ...] | None  # None: regression (STS-B) or read from labels.txt (wn-lex)
    tsv_labels: dict[str, int] | None = None  # raw TSV label -> id; None: the raw value is the id or a float
    metrics: tuple[str, ...] = ("accuracy",)
    files: dict[str, str] = field(default_factory=lambda: {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"})
    hf_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "dev": "validation", "test": "test"})
    headerless: tuple[int, int, int] | None = None  # CoLA train/dev: (n_columns, text index, label index)
    labels_file: str | None = None     # wn-lex: label names, one a line, in id order

    @property
    def is_regression(self) -> bool:
        return self.label_names is None and self.labels_file is None

    @property
    def pair(self) -> bool:
        return self.tsv_columns[1] is not None


_BINARY = {"0": 0, "1": 1}
_NLI2 = {"entailment": 0, "not_entailment": 1}
_MNLI = {"entailment": 0, "neutral": 1, "contradiction": 2}
_MNLI_COLUMNS = ("sentence1", "sentence2", "gold_label")


def _mnli(name: str, which: str) -> GlueTask:
    return GlueTask(
        name, "MNLI", "mnli", ("premise", "hypothesis"), _MNLI_COLUMNS,
        ("entailment", "neutral", "contradiction"), _MNLI,
        files={"train": "train.tsv", "dev": f"dev_{which}.tsv", "test": f"test_{which}.tsv"},
        hf_splits={"train": "train", "dev": f"validation_{which}", "test": f"test_{which}"})


TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("cola", "CoLA", "cola", ("sentence", None), ("sentence", None, "label"),
             ("unacceptable", "acceptable"), _BINARY, ("matthews_correlation",), headerless=(4, 3, 1)),
    GlueTask("sst2", "SST-2", "sst2", ("sentence", None), ("sentence", None, "label"),
             ("negative", "positive"), _BINARY),
    GlueTask("mrpc", "MRPC", "mrpc", ("sentence1", "sentence2"), ("#1 String", "#2 String", "Quality"),
             ("not_equivalent", "equivalent"), _BINARY, ("accuracy", "f1")),
    GlueTask("stsb", "STS-B", "stsb", ("sentence1", "sentence2"), ("sentence1", "sentence2", "score"),
             None, None, ("pearson", "spearmanr")),
    GlueTask("qqp", "QQP", "qqp", ("question1", "question2"), ("question1", "question2", "is_duplicate"),
             ("not_duplicate", "duplicate"), _BINARY, ("accuracy", "f1")),
    _mnli("mnli", "matched"),
    _mnli("mnli-mm", "mismatched"),
    GlueTask("qnli", "QNLI", "qnli", ("question", "sentence"), ("question", "sentence", "label"),
             ("entailment", "not_entailment"), _NLI2),
    GlueTask("rte", "RTE", "rte", ("sentence1", "sentence2"), ("sentence1", "sentence2", "label"),
             ("entailment", "not_entailment"), _NLI2),
    GlueTask("wnli", "WNLI", "wnli", ("sentence1", "sentence2"), ("sentence1", "sentence2", "label"),
             ("not_entailment", "entailment"), _BINARY),
    # Offline WordNet tasks (data/make_wordnet_glue.py); TSV only.
    GlueTask("wn-lex", "WN-LEX", "", ("sentence", None), ("sentence", None, "label"),
             None, None, labels_file="labels.txt"),
    GlueTask("wn-pair", "WN-PAIR", "", ("sentence1", "sentence2"), ("#1 String", "#2 String", "Quality"),
             ("different_sense", "same_sense"), _BINARY, ("accuracy", "f1")),
]}

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli",
            "mnli_mismatched": "mnli-mm", "mnli-mismatched": "mnli-mm", "mnli_mm": "mnli-mm",
            "wn_lex": "wn-lex", "wn_pair": "wn-pair"}
_SPLIT_ALIASES = {"train": "train", "dev": "dev", "validation": "dev", "eval": "dev", "test": "test"}
_MNLI_SPLITS = {"dev_matched": ("mnli", "dev"), "validation_matched": ("mnli", "dev"),
                "dev_mismatched": ("mnli-mm", "dev"), "validation_mismatched": ("mnli-mm", "dev"),
                "test_matched": ("mnli", "test"), "test_mismatched": ("mnli-mm", "test")}


def get_task(task_name: str) -> GlueTask:
    """The task spec for a name (case-insensitive; "SST-2", "sts-b", "mnli_mismatched" accepted)."""
    key = task_name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {task_name!r}: expected one of {', '.join(GLUE_TASK_NAMES)} "
                         "('mnli-mm' for MNLI mismatched), or the offline WordNet tasks wn-lex, wn-pair")
    return TASKS[key]


@dataclass
class GlueData:
    """One split of one task. Iterates like the list of examples it holds."""
    task: GlueTask
    split: str               # "train" | "dev" | "test"
    source: Path             # the file (TSV) or folder (save_to_disk) it was read from
    examples: list[GlueExample]
    label_names: tuple[str, ...] | None  # None for STS-B

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[GlueExample]:
        return iter(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def load_glue(task_name: str, data_dir: str | os.PathLike, split: str = "train",
              skip_malformed: bool = False) -> GlueData:
    """Read one split of a GLUE task from `data_dir` (see the module docstring for where files are looked for).

    Raises ValueError for an unknown task or split and for malformed TSV lines (all of them, as file:line),
    FileNotFoundError naming the expected path when the split's file is not there. skip_malformed=True drops
    malformed lines with a warning instead, as the reference GLUE processors did: the QQP train.tsv of the
    first GLUE release has rows broken in two by a newline inside a question.
    """
    task = get_task(task_name)
    task, split = _resolve_split(task, split)
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"GLUE data folder not found: {root}")

    candidates = [root / task.folder]
    if task.hf_config:
        candidates += [root / "glue" / task.hf_config, root / task.hf_config]
    candidates.append(root)
    for folder in candidates:
        if (folder / "dataset_dict.json").is_file() and task.hf_config:
            return _non_empty(_read_saved_dataset(task, split, folder))
        if (folder / task.files[split]).is_file() or _mrpc_raw_file(task, split, folder) is not None:
            return _non_empty(_read_tsv_split(task, split, folder, skip_malformed))
    # Nothing found: name the TSV file where it was most likely meant to be, and the datasets folder.
    tsv_dir = root / task.folder
    if not tsv_dir.is_dir() and any(root.glob("*.tsv")):
        tsv_dir = root  # data_dir is itself a task folder
    expected = f"{tsv_dir / task.files[split]}"
    if task.hf_config:
        expected += f" (official TSV) or {root / 'glue' / task.hf_config / 'dataset_dict.json'} (datasets save_to_disk)"
    raise FileNotFoundError(f"GLUE task {task.name!r}, split {split!r}: expected {expected}")


def _non_empty(data: GlueData) -> GlueData:
    # checked at load time: a dev set with only its header would otherwise fail after a whole training
    if not len(data):
        raise ValueError(f"{data.source}: no {data.split} examples in it (only a header, or every line dropped)")
    return data


def _resolve_split(task: GlueTask, split: str) -> tuple[GlueTask, str]:
    key = split.strip().lower()
    if key in _MNLI_SPLITS and task.folder == "MNLI":
        name, key = _MNLI_SPLITS[key]
        return TASKS[name], key
    if key not in _SPLIT_ALIASES:
        allowed = "train, dev (validation), test" + (", dev_matched, dev_mismatched, test_matched, "
                                                      "test_mismatched" if task.folder == "MNLI" else "")
        raise ValueError(f"unknown split {split!r} for GLUE task {task.name!r}: expected one of {allowed}")
    return task, _SPLIT_ALIASES[key]


# ---------------------------------------------------------------- official TSV files

class _Errors:
    """Collects every bad line so one ValueError can list them all (a file rarely has just one)."""

    def __init__(self, skip: bool = False):
        self.items: list[str] = []
        self.skip = skip

    def add(self, path: Path, line_no: int, reason: str):
        self.items.append(f"{path}:{line_no}: {reason}")

    def raise_if_any(self, what: str):
        if not self.items:
            return
        shown = self.items[:MAX_REPORTED_ERRORS]
        more = len(self.items) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        listing = "\n  " + "\n  ".join(shown) + tail
        if self.skip:
            warnings.warn(f"skipped {len(self.items)} malformed line(s) in {what}:{listing}")
            return
        raise ValueError(f"{len(self.items)} malformed line(s) in {what} (skip_malformed=True drops them):"
                         + listing)


def read_tsv_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) for each non-empty line. GLUE files are tab-separated with NO quoting:
    a '"' is an ordinary character (SST-2 and QQP contain many), so the csv module's quote rules must not apply."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for line_no, line in enumerate(f, start=1):
                line = line.rstrip("\n").rstrip("\r")
                if line.strip():
                    yield line_no, line.split("\t")
    except UnicodeDecodeError:
        raise ValueError(not_utf8(path)) from None


def _read_tsv_split(task: GlueTask, split: str, folder: Path, skip_malformed: bool) -> GlueData:
    label_names = task.label_names
    if task.labels_file is not None:
        label_names = _read_labels_file(folder / task.labels_file)
    label_ids = task.tsv_labels
    if task.labels_file is not None:
        label_ids = {str(i): i for i in range(len(label_names))}

    path = folder / task.files[split]
    if not path.is_file() and _mrpc_raw_file(task, split, folder) is not None:
        examples = _read_mrpc_raw(task, split, folder, skip_malformed)
        return GlueData(task, split, _mrpc_raw_file(task, split, folder), examples, label_names)

    errors = _Errors(skip_malformed)
    examples = []
    lines = read_tsv_lines(path)
    if task.headerless is not None and split != "test":
        n_columns, text_at, label_at = task.headerless
        columns = None
    else:
        header_line = next(lines, None)
        if header_line is None:
            raise ValueError(f"{path}:1: empty file, expected a header with {_wanted(task, split)}")
        columns = {name.strip(): i for i, name in enumerate(header_line[1])}
        missing = [c for c in _wanted(task, split) if c not in columns]
        if missing:
            raise ValueError(f"{path}:{header_line[0]}: header lacks column(s) {missing}; "
                             f"found {list(columns)}")
        n_columns = len(header_line[1])
    for line_no, fields in lines:
        if len(fields) != n_columns:
            errors.add(path, line_no, f"expected {n_columns} tab-separated fields, found {len(fields)}")
            continue
        if columns is None:
            text_a, text_b, raw_label = fields[text_at], None, fields[label_at]
        else:
            a, b, lab = task.tsv_columns
            text_a = fields[columns[a]]
            text_b = fields[columns[b]] if b is not None else None
            raw_label = fields[columns[lab]] if lab in columns else None
        label = None if raw_label is None else _parse_label(raw_label, label_ids, path, line_no, errors)
        if raw_label is None or label is not None:
            examples.append(GlueExample(text_a, text_b, label))
    errors.raise_if_any(str(path))
    return GlueData(task, split, path, examples, label_names)


def _wanted(task: GlueTask, split: str) -> list[str]:
    a, b, label = task.tsv_columns
    wanted = [a] + ([b] if b is not None else [])
    return wanted if split == "test" else wanted + [label]


def _parse_label(raw: str, label_ids: dict[str, int] | None, path: Path, line_no: int, errors: _Errors):
    raw = raw.strip()
    if label_ids is None:  # STS-B similarity score in [0, 5]
        try:
            score = float(raw)
        except ValueError:
            errors.add(path, line_no, f"label {raw!r} is not a number")
            return None
        if not (math.isfinite(score) and 0.0 <= score <= 5.0):
            errors.add(path, line_no, f"score {raw!r} is outside STS-B's range [0, 5]")
            return None
        return score
    if raw not in label_ids:
        errors.add(path, line_no, f"label {raw!r} is not one of {sorted(label_ids)}")
        return None
    return label_ids[raw]


def _read_labels_file(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise FileNotFoundError(f"label names file not found: {path} (one label name a line, in id order)")
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not names:
        raise ValueError(f"{path}: no label names")
    return names


# MRPC as Microsoft distributes it: msr_paraphrase_train.txt (train + dev, told apart by GLUE's dev_ids.tsv)
# and msr_paraphrase_test.txt, both with the header "Quality  #1 ID  #2 ID  #1 String  #2 String".
def _mrpc_raw_file(task: GlueTask, split: str, folder: Path) -> Path | None:
    if task.name != "mrpc":
        return None
    path = folder / ("msr_paraphrase_test.txt" if split == "test" else "msr_paraphrase_train.txt")
    return path if path.is_file() else None


def _read_mrpc_raw(task: GlueTask, split: str, folder: Path, skip_malformed: bool) -> list[GlueExample]:
    path = _mrpc_raw_file(task, split, folder)
    dev_ids: set[tuple[str, str]] = set()
    if split != "test":
        ids_path = folder / "dev_ids.tsv"
        if not ids_path.is_file():
            raise FileNotFoundError(f"GLUE task 'mrpc': {ids_path} is needed to split {path.name} into "
                                    "train and dev (or provide train.tsv and dev.tsv)")
        errors = _Errors()
        for line_no, fields in read_tsv_lines(ids_path):
            if len(fields) != 2:
                errors.add(ids_path, line_no, f"expected 2 tab-separated ids, found {len(fields)} fields")
            dev_ids.add(tuple(f.strip() for f in fields[:2]))
        errors.raise_if_any(str(ids_path))
    errors = _Errors(skip_malformed)
    lines = read_tsv_lines(path)
    next(lines, None)  # header
    examples = []
    for line_no, fields in lines:
        if len(fields) != 5:
            errors.add(path, line_no, f"expected 5 tab-separated fields, found {len(fields)}")
            continue
        in_dev = (fields[1].strip(), fields[2].strip()) in dev_ids
        if split == "test" or in_dev == (split == "dev"):
            label = _parse_label(fields[0], task.tsv_labels, path, line_no, errors)
            if label is not None:
                examples.append(GlueExample(fields[3], fields[4], label))
    errors.raise_if_any(str(path))
    return examples


# ---------------------------------------------------------------- datasets save_to_disk

def _read_saved_dataset(task: GlueTask, split: str, folder: Path) -> GlueData:
    try:
        from datasets import load_from_disk
    except ImportError as e:  # the TSV path needs nothing beyond the standard library
        raise ImportError(f"{folder} is a `datasets` save_to_disk folder; reading it needs the datasets "
                          "package (pip install datasets)") from e
    dataset_dict = load_from_disk(str(folder))
    hf_split = task.hf_splits[split]
    if hf_split not in dataset_dict:
        raise FileNotFoundError(f"GLUE task {task.name!r}: split {hf_split!r} not in {folder} "
                                f"(it holds {sorted(dataset_dict)})")
    ds = dataset_dict[hf_split]
    a, b = task.hf_columns
    wanted = [a] + ([b] if b else []) + ["label"]
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise ValueError(f"{folder} [{hf_split}]: columns {missing} missing; found {ds.column_names}")
    feature = ds.features["label"]
    names = getattr(feature, "names", None)
    if task.label_names is not None and names is not None and tuple(names) != task.label_names:
        raise ValueError(f"{folder} [{hf_split}]: label names {names} differ from the GLUE names "
                         f"{list(task.label_names)} of task {task.name!r}")
    rows = ds.select_columns(wanted).to_dict()
    texts_b = rows[b] if b else [None] * len(rows[a])
    convert = float if task.is_regression else int
    # datasets marks the unlabelled test rows with -1
    labels = [None if lab is None or lab == -1 else convert(lab) for lab in rows["label"]]
    if task.is_regression:
        bad = [i for i, lab in enumerate(labels) if lab is not None and not (math.isfinite(lab) and 0 <= lab <= 5)]
        if bad:
            raise ValueError(f"{folder} [{hf_split}]: row {bad[0]} has score {labels[bad[0]]!r}, outside STS-B's "
                             f"range [0, 5] ({len(bad)} such rows)")
    examples = [GlueExample(x, y, lab) for x, y, lab in zip(rows[a], texts_b, labels)]
    return GlueData(task, split, folder, examples, task.label_names)
