"""GLUE examples -> token ids, and the collate that batches them.

    n_added = ensure_pad_token(tokenizer)          # GPT-2: pad = eos; Llama: a new "[PAD]" token (resize embeddings!)
    features = encode_examples(data.examples, tokenizer, max_seq_length=128)
    loader = DataLoader(features, batch_size=32, collate_fn=GlueCollator(tokenizer))

Pairs go through the tokenizer's own pair template ([CLS] a [SEP] b [SEP] for BERT/DeBERTa, <s> a </s></s> b </s>
for RoBERTa, plain concatenation for GPT-2/Llama) and are truncated longest-first to max_seq_length, as the
Hugging Face run_glue.py the papers used does. By default nothing is padded here and the collate pads each batch
to its longest sequence; pad_to_max_length=True pads every example to max_seq_length as the original runs did.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from .data import GlueExample

LLAMA_PAD_TOKEN = "[PAD]"  # what the LoRA+ GLUE scripts add to the Llama tokenizer


def ensure_pad_token(tokenizer, model_type: str | None = None) -> int:
    """Give a tokenizer without a pad token one; returns how many tokens were ADDED to its vocabulary.

    GPT-2 pads with its eos token (nothing added). Llama gets a new "[PAD]" token, as the LoRA+ recipe does:
    the caller must then grow the embedding matrix by that many rows (LoRA+ sets them to the mean of the
    existing rows). `model_type` ("gpt2", "llama", ...) overrides the guess from the tokenizer's class name.
    """
    if tokenizer.pad_token is not None:
        return 0
    kind = (model_type or type(tokenizer).__name__).lower()
    if "llama" in kind:
        return tokenizer.add_special_tokens({"pad_token": LLAMA_PAD_TOKEN})
    if tokenizer.eos_token is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an eos token to pad with")
    tokenizer.pad_token = tokenizer.eos_token
    return 0


def encode_examples(examples: Sequence[GlueExample], tokenizer, max_seq_length: int = 128,
                    pad_to_max_length: bool = False, is_regression: bool | None = None,
                    chunk_size: int = 1000) -> list[dict]:
    """Tokenise examples into feature dicts: input_ids, attention_mask, token_type_ids (only if the tokenizer
    produces them, e.g. BERT/DeBERTa), and labels (int, or float for STS-B; absent when the label is None).
    Each list has at most max_seq_length ids (exactly that many with pad_to_max_length)."""
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and max_seq_length > limit:
        warnings.warn(f"max_seq_length {max_seq_length} exceeds the tokenizer's model_max_length {limit}; "
                      f"using {limit}")
        max_seq_length = limit
    if pad_to_max_length and tokenizer.pad_token is None:
        raise ValueError("pad_to_max_length needs a pad token: call ensure_pad_token(tokenizer) first")
    examples = list(examples)
    if not examples:
        return []
    pair = examples[0].text_b is not None
    if any((ex.text_b is not None) != pair for ex in examples):
        raise ValueError("examples mix single sentences and sentence pairs")
    if is_regression is None:
        is_regression = any(isinstance(ex.label, float) for ex in examples)

    features: list[dict] = []
    for start in range(0, len(examples), chunk_size):  # chunks: fast tokenizers work in parallel per call
        chunk = examples[start:start + chunk_size]
        texts = ([ex.text_a for ex in chunk],) + (([ex.text_b for ex in chunk],) if pair else ())
        encoded = tokenizer(*texts, truncation=True, max_length=max_seq_length,
                            padding="max_length" if pad_to_max_length else False)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        for i, ex in enumerate(chunk):
            feature = {k: list(encoded[k][i]) for k in keys}
            if ex.label is not None:
                feature["labels"] = float(ex.label) if is_regression else int(ex.label)
            features.append(feature)
    return features


def collate(features: Sequence[dict], pad_token_id: int, padding_side: str = "right",
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Stack features into tensors (B, T), T = the longest sequence in the batch (rounded up to a multiple of
    pad_to_multiple_of). Padding uses pad_token_id for input_ids and 0 for attention_mask / token_type_ids, on the
    tokenizer's padding side. labels -> (B,) int64, or float32 for regression."""
    if not features:
        raise ValueError("cannot collate an empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    length = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    batch = {}
    for key, value in fill.items():
        if key not in features[0]:
            continue
        rows = []
        for f in features:
            pad = [value] * (length - len(f[key]))
            rows.append(f[key] + pad if padding_side == "right" else pad + f[key])
        batch[key] = torch.tensor(rows, dtype=torch.long)
    if "labels" in features[0]:
        labels = [f["labels"] for f in features]
        dtype = torch.float32 if isinstance(labels[0], float) else torch.long
        batch["labels"] = torch.tensor(labels, dtype=dtype)
    return batch


class GlueCollator:
    """collate_fn for a DataLoader, taking the pad id and padding side from the tokenizer."""

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        if tokenizer.pad_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no pad token: call ensure_pad_token(tokenizer) first")
        self.pad_token_id = tokenizer.pad_token_id
        self.padding_side = getattr(tokenizer, "padding_side", "right")
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        return collate(features, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)
