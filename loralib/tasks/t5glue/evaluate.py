"""Evaluation of text-to-text GLUE: score the label words (the setting's rule) or generate them.

"score" (default) is LoRA-GA's compute_metrics (reproduce/utils.py at commit 7cbdd68, the branch it runs: the
"soft metric"): the decoder's logits at its first position (teacher-forced, i.e. after the start token alone),
read at the first token of each label word; the prediction is the label whose first token scores highest. For
the binary tasks this is the released rule (gold correct when its first-token logit beats the other label's).
The released code writes the other label as `sum(unique first tokens) - gold`, which is only defined for two
labels; for MNLI's three we take the argmax over the three first tokens (the same rule, generalised).
"generate": greedy decoding of up to the longest label word (+ </s>); correct when the decoded text equals the
gold label word (the released code's unused "hard metric", in generated rather than teacher-forced form).

Metrics: accuracy for every task, as the setting reports (CoLA too); for CoLA Matthews' correlation as well.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..glue.metrics import accuracy, matthews_corrcoef
from .data import T5GlueCollator, T5GlueExample, T5GlueTask, label_word_ids

MODES = ("score", "generate")


def first_tokens(task: T5GlueTask, tokenizer) -> List[int]:
    """The first token of each label word; ValueError if two share one (scoring could not tell them apart)."""
    firsts = [ids[0] for ids in label_word_ids(task, tokenizer)]
    if len(set(firsts)) != len(firsts):
        raise ValueError(f"{task.name}: label words {task.label_words} start with the same token under this "
                         "tokenizer, so they cannot be scored by their first token; use --eval_mode generate")
    return firsts


@torch.no_grad()
def predict(model: nn.Module, task: T5GlueTask, tokenizer, examples: Sequence[T5GlueExample], mode: str = "score",
            batch_size: int = 32) -> List[int]:
    """The predicted label id of each example (-1: a generated text that is no label word)."""
    if mode not in MODES:
        raise ValueError(f"eval mode {mode!r} is not one of {MODES}")
    device = next(model.parameters()).device
    collate = T5GlueCollator(model.config.pad_token_id)
    firsts = first_tokens(task, tokenizer) if mode == "score" else None
    longest = max(len(ids) for ids in label_word_ids(task, tokenizer))
    words = {w: i for i, w in enumerate(task.label_words)}
    predictions: List[int] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if mode == "score":
            begin = ids.new_full((ids.shape[0], 1), model.config.decoder_start_token_id)
            logits = model(ids, mask, decoder_input_ids=begin).logits[:, 0]          # (B, vocab)
            predictions += logits[:, firsts].argmax(-1).tolist()
        else:
            out = model.generate(ids, mask, max_new_tokens=longest)
            texts = tokenizer.batch_decode(out.tolist(), skip_special_tokens=True)
            predictions += [words.get(t.strip(), -1) for t in texts]
    return predictions


def metrics(task: T5GlueTask, predictions: Sequence[int], labels: Sequence[int]) -> Dict[str, float]:
    result = {"accuracy": accuracy(predictions, labels)}
    if task.name == "cola":
        result["matthews_correlation"] = matthews_corrcoef(predictions, labels)
    return result


def evaluate(model: nn.Module, task: T5GlueTask, tokenizer, examples: Sequence[T5GlueExample], mode: str = "score",
             batch_size: int = 32) -> Tuple[Dict[str, float], List[dict]]:
    """(metrics, per-example rows) on labelled examples; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        predicted = predict(model, task, tokenizer, examples, mode, batch_size)
    finally:
        model.train(was_training)
    labels = [e.label for e in examples]
    rows = [{"index": i, "label": task.label_words[y], "prediction": task.label_words[p] if p >= 0 else None}
            for i, (p, y) in enumerate(zip(predicted, labels))]
    return metrics(task, predicted, labels), rows
