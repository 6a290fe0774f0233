"""Text-to-text GLUE as the LoRA-GA setting formats it (the T5-base table LoRA-Pro's paper shares).

Source of every rule below: LoRA-GA's released code, github.com/Outsider565/LoRA-GA at commit
7cbdd6897bdb6dfa4fe21c945b11c8776423e85e, files reproduce/data.py (load_sst2, load_cola, load_mrpc,
load_mnli, load_qnli: template, label words, splits) and reproduce/utils.py (SeqToSeqEncode: tokenisation;
compute_metrics: evaluation), with conf/model/t5base.yaml (commit c185846309ea9012d0bcd46ebd30347dda1c592c).

    x = INSTRUCTION + text_a [+ "\\n" + text_b] + "\\nresult: "        y = the label word of the gold label
    MNLI   "classify the semantic similarity of the text: "  entailment / neutral / contradiction
    SST-2  "classify the sentiment of the text: "            negative / positive
    CoLA   "classify the grammaticality of the text: "       unacceptable / acceptable
    QNLI   "classify the semantic similarity of the question and the sentence: "  entailment / not_entailment
    MRPC   "classify the semantic similarity of the text: "  different / equivalent

Label ids are the Hugging Face "glue" ids (what loralib.tasks.glue reads), which LoRA-GA's label maps index.
Splits: the whole train split for training (no sub-sampling), the validation split for evaluation (MNLI:
validation_matched). Tokenisation: x and y each with the model's tokenizer (T5 appends </s>), truncated to
max_length 128, padded per batch; the labels keep the pad id at padded positions (SeqToSeqEncode's default
ignore_masked_token=False, so the loss also trains "pad after </s>"), and decoder_attention_mask is the
labels' mask. `mask_label_padding=True` sets those positions to -100 instead (a documented fix, off by default).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..glue import load_glue


@dataclass(frozen=True)
class T5GlueTask:
    name: str                    # our GLUE task name (loralib.tasks.glue)
    instruction: str
    label_words: Tuple[str, ...]  # by Hugging Face glue label id
    dev_split: str = "dev"


TASKS: Dict[str, T5GlueTask] = {
    "mnli": T5GlueTask("mnli", "classify the semantic similarity of the text: ",
                       ("entailment", "neutral", "contradiction"), "dev_matched"),
    "sst2": T5GlueTask("sst2", "classify the sentiment of the text: ", ("negative", "positive")),
    "cola": T5GlueTask("cola", "classify the grammaticality of the text: ", ("unacceptable", "acceptable")),
    "qnli": T5GlueTask("qnli", "classify the semantic similarity of the question and the sentence: ",
                       ("entailment", "not_entailment")),
    "mrpc": T5GlueTask("mrpc", "classify the semantic similarity of the text: ", ("different", "equivalent")),
}
MAX_LENGTH = 128


def get_task(name: str) -> T5GlueTask:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"text-to-text GLUE task {name!r} is not one of the LoRA-GA setting's: {', '.join(TASKS)}")
    return TASKS[key]


def format_example(task: T5GlueTask, text_a: str, text_b: Optional[str], label: Optional[int]) -> Tuple[str, Optional[str]]:
    """(x, y): the prompt and the label word (None when the label is unknown)."""
    body = text_a if text_b is None else f"{text_a}\n{text_b}"
    y = None
    if label is not None:
        if not 0 <= int(label) < len(task.label_words):
            raise ValueError(f"{task.name}: label {label!r} is not one of 0..{len(task.label_words) - 1}")
        y = task.label_words[int(label)]
    return f"{task.instruction}{body}\nresult: ", y


@dataclass
class T5GlueExample:
    """One tokenised example: input_ids (</s> included), label_ids (the label word's tokens + </s>), label id."""

    input_ids: List[int]
    label_ids: List[int]
    label: int


def load_split(task: T5GlueTask, data_dir: str | os.PathLike, split: str, limit: Optional[int] = None
               ) -> List[Tuple[str, str, int]]:
    """[(x, y, label id)] of a split ("train" or "dev": the task's own dev split) read with loralib.tasks.glue."""
    data = load_glue(task.name, data_dir, task.dev_split if split == "dev" else split)
    rows = []
    for example in data.examples[:limit] if limit else data.examples:
        if example.label is None:
            raise ValueError(f"{task.name} {split}: an example has no label (a test split cannot be trained or scored)")
        x, y = format_example(task, example.text_a, example.text_b, int(example.label))
        rows.append((x, y, int(example.label)))
    return rows


def _ids(tokenizer, text: str, max_length: int) -> List[int]:
    return list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])


def encode(rows: Sequence[Tuple[str, str, int]], tokenizer, max_length: int = MAX_LENGTH) -> List[T5GlueExample]:
    """Tokenise (x, y, label) rows as SeqToSeqEncode does (each side truncated to max_length, </s> appended)."""
    return [T5GlueExample(_ids(tokenizer, x, max_length), _ids(tokenizer, y, max_length), label) for x, y, label in rows]


def label_word_ids(task: T5GlueTask, tokenizer, max_length: int = MAX_LENGTH) -> List[List[int]]:
    """Each label word's token ids, </s> included (what the decoder is trained to produce)."""
    return [_ids(tokenizer, word, max_length) for word in task.label_words]


class T5GlueCollator:
    """Examples -> {input_ids, attention_mask, labels, decoder_attention_mask}, right-padded with pad_id per batch.
    Padded label positions hold pad_id (LoRA-GA's SeqToSeqEncode) or -100 with mask_label_padding."""

    def __init__(self, pad_id: int, mask_label_padding: bool = False):
        self.pad_id, self.mask_label_padding = pad_id, mask_label_padding

    @staticmethod
    def _pad(rows: List[List[int]], value: int) -> Tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), value, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return ids, mask

    def __call__(self, examples: Sequence[T5GlueExample]) -> Dict[str, torch.Tensor]:
        input_ids, attention_mask = self._pad([e.input_ids for e in examples], self.pad_id)
        labels, decoder_mask = self._pad([e.label_ids for e in examples], self.pad_id)
        if self.mask_label_padding:
            labels = labels.masked_fill(decoder_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "decoder_attention_mask": decoder_mask}
