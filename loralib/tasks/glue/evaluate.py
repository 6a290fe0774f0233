"""The GLUE dev sets a run reports and how they are scored."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from .data import GlueData, get_task, load_glue
from .metrics import compute_metrics

logger = logging.getLogger("loralib.glue")


def eval_sets(task_name: str, data_dir: str) -> List[GlueData]:
    """The dev sets to report: MNLI's matched and mismatched, one set for the other tasks."""
    task = get_task(task_name)
    names = [task.name] + (["mnli-mm"] if task.name == "mnli" else [])
    return [load_glue(name, data_dir, "dev") for name in names]


def split_name(data: GlueData) -> str:
    if data.task.folder == "MNLI":
        return f"{data.split}_{'mismatched' if data.task.name == 'mnli-mm' else 'matched'}"
    return data.split


@torch.no_grad()
def predict(model: nn.Module, features: List[dict], collate: Callable, batch_size: int) -> torch.Tensor:
    """Logits (n, num_labels) of the model on the features, in batches (the caller sets eval mode)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(features), batch_size):
        batch = collate(features[start:start + batch_size])
        batch.pop("labels", None)
        out.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
    return torch.cat(out)


def score(model: nn.Module, data: GlueData, features: List[dict], collate: Callable, batch_size: int) -> dict:
    logits = predict(model, features, collate, batch_size)
    labels = [f["labels"] for f in features]
    return compute_metrics(data.task.name, logits.numpy(), labels)



def evaluate_dev_sets(model: nn.Module, dev: List[Tuple[GlueData, List[dict]]], collate: Callable,
                      batch_size: int) -> Dict[str, Any]:
    """eval_results.json: {"task", "split", "num_examples", <metric>: value, ...} of the first dev set; MNLI adds
    the mismatched one under the key "mnli-mm" (same fields), as the original reports both."""
    model.eval()
    results: Dict[str, Any] = {}
    for i, (data, features) in enumerate(dev):
        metrics = score(model, data, features, collate, batch_size)
        record = {"task": data.task.name, "split": split_name(data), "num_examples": len(features), **metrics}
        if i == 0:
            results.update(record)
        else:
            results[data.task.name] = record
        logger.info("eval %s: %s", data.task.name, metrics)
    return results
