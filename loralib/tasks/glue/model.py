"""The GLUE run's model: a sequence classifier from a Hugging Face folder with LoRA inline, and what the
entry points' flags do to it (the head's dropout, the LoRA targets checked, lora_A's init, a pad token added,
what is trained, LoRA-GA's gradient init, the positions the examples need).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ...config import LoRAConfig

CLASSIFIER_FAMILIES = ("roberta", "bert", "deberta-v2")  # config.json model types with a dropout in the head


def load_pretrained(folder: Path, num_labels: int, lora: Optional[LoRAConfig],
                    overrides: Dict[str, Any]) -> nn.Module:
    """loralib.models.from_pretrained for sequence classification, with config.json entries overridden
    (cls_dropout) before the model is built."""
    from ...models import loading

    return loading.from_pretrained(folder, "sequence-classification", num_labels, lora, dtype=torch.float32,
                                   config_overrides=overrides)


def grow_embeddings(model: nn.Module, new_size: int) -> int:
    """Give the input embedding new_size rows; the new rows are the mean of the old ones (LoRA+'s recipe
    for Llama's added pad token). Returns the number of rows added."""
    old = model.hf_config["vocab_size"]
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == old), None)
    if embedding is None:
        raise ValueError(f"cannot find the input embedding ({old} rows) to add the pad token to")
    n_new = new_size - old
    with torch.no_grad():
        weight = embedding.weight
        rows = weight.mean(dim=0, keepdim=True).expand(n_new, -1)
        embedding.weight = nn.Parameter(torch.cat([weight, rows]), requires_grad=weight.requires_grad)
    embedding.num_embeddings = new_size
    model.hf_config["vocab_size"] = new_size
    if hasattr(getattr(model, "config", None), "vocab_size"):
        model.config.vocab_size = new_size
    return n_new


def normal_lora_a(model: nn.Module, std: float) -> int:
    """Redraw every lora_A (r, in) from N(0, std), as microsoft/LoRA's DeBERTa fork initialised it (its
    _init_weights); lora_B stays zero, so the model's output is unchanged. Returns the count redrawn."""
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "lora_A":
                param.normal_(0.0, std)
                count += 1
    if not count:
        raise ValueError("--lora_a_init normal: the model has no lora_A (add --apply_lora)")
    return count


def mark_trainable(model: nn.Module, full: bool, frozen_head: Tuple[str, ...] = ()) -> None:
    """Full fine-tuning trains everything. Otherwise the adapter factors and the head (everything outside
    the base model: classifier, pooler, score) are trained, as the released NLU scripts did, less the head
    parameters whose names start with one of frozen_head (LoRA+'s GLUE script froze RoBERTa's classifier.dense)."""
    if full:
        for p in model.parameters():
            p.requires_grad = True
        return
    prefix = getattr(model, "base_model_prefix", "")
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name.rsplit(".", 1)[-1] or not name.startswith(prefix + ".")
        if frozen_head and name.startswith(frozen_head):
            p.requires_grad = False


def head_overrides(model_type: str, cls_dropout: Optional[float], fixed: Optional[float]) -> Dict[str, Any]:
    """config.json entries overridden before the model is built: the head's dropout, cls_dropout (the flag) or
    fixed (a value the run's recipe imposes whatever the flag says: LoRA²'s released 0.15, with a warning when
    the flag asked for another)."""
    import warnings

    overrides: Dict[str, Any] = {}
    if cls_dropout is not None:
        if model_type not in CLASSIFIER_FAMILIES:
            raise ValueError(f"--cls_dropout: a {model_type} classifier has no dropout (only {', '.join(CLASSIFIER_FAMILIES)})")
        overrides["cls_dropout"] = cls_dropout
    if fixed is not None and model_type in CLASSIFIER_FAMILIES:
        if cls_dropout not in (None, fixed):
            warnings.warn(f"--cls_dropout {cls_dropout} is ignored for LoRA² under --recipe released (the "
                          f"released code hard-coded {fixed}); --recipe paper honours it")
        overrides["cls_dropout"] = fixed
    return overrides


def position_limit(hf_config: dict) -> Optional[int]:
    """Input positions the model has a learned embedding for (None: relative or rotary positions only)."""
    kind, table = hf_config.get("model_type"), hf_config.get("max_position_embeddings")
    if kind == "gpt2":
        return hf_config.get("n_positions") or hf_config.get("n_ctx")
    if kind in ("roberta", "xlm-roberta", "camembert") and table:  # positions count from pad_token_id + 1
        return table - (hf_config.get("pad_token_id", 1) + 1)
    if kind in ("deberta-v2", "deberta") and not hf_config.get("position_biased_input", True):
        return None
    return table if kind in ("bert", "deberta-v2", "deberta") else None


def check_positions(features: List[dict], limit: Optional[int], max_seq_length: int, source) -> None:
    longest = max((len(f["input_ids"]) for f in features), default=0)
    if limit is not None and longest > limit:
        raise ValueError(f"--max_seq_length {max_seq_length}: {source} has examples of {longest} tokens but "
                         f"the model has {limit} positions; pass --max_seq_length {limit} or less")


def loraga_from_features(model: nn.Module, features: List[dict], collate: Callable, batch_size: int,
                         n_batches: int) -> None:
    """LoRA-GA's init from the mean gradient of the training loss over the first n_batches batches."""
    from ...init_methods import loraga_init

    if n_batches < 1:
        raise ValueError(f"--loraga_batches must be >= 1, got {n_batches}")

    def train_step():
        for start in range(0, min(len(features), n_batches * batch_size), batch_size):
            model(**collate(features[start:start + batch_size])).loss.backward()

    loraga_init(model, train_step)


