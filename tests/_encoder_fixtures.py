"""Tiny RoBERTa / BERT / DeBERTa-v2 models in the Hugging Face layout, and padded batches, for the
encoder tests. Weights are random with initializer_range 0.15 so that attention is far from uniform and
a wrong position term or mask shows up in the outputs (with transformers' default 0.02 it barely would)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

VOCAB = 64
INIT = 0.15


def hf_config(family: str, **overrides):
    """A transformers config object for family "roberta", "bert" or "deberta-v2"."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=64, num_labels=3, initializer_range=INIT,
                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    common.update(overrides)
    cls = {"roberta": transformers.RobertaConfig, "bert": transformers.BertConfig,
           "deberta-v2": transformers.DebertaV2Config}[family]
    return cls(**common)


def reference_model(config, task: str, seed: int = 0):
    """transformers' model for task "base" or "sequence-classification", random weights, eval mode."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    auto = AutoModel if task == "base" else AutoModelForSequenceClassification
    model = auto.from_config(config).eval()
    if task == "sequence-classification":
        with torch.no_grad():  # from_config leaves biases at zero; random ones test their names too
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, INIT)
    return model


def save_and_read(model, folder: Path):
    """save_pretrained into folder; returns (config.json dict, the saved state dict)."""
    model.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))


def padded_batch(pad_token_id: int, seed: int = 1, batch: int = 3, length: int = 30, type_vocab: int = 2):
    """(input_ids, attention_mask, token_type_ids): right padding of 7 and 1 tokens in rows 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -7:] = 0
    mask[1, -1:] = 0
    ids[mask == 0] = pad_token_id
    types = torch.randint(0, max(type_vocab, 1), (batch, length), generator=g)
    return ids, mask, types


def randomise_lora_B(model, seed: int = 0, std: float = 0.3):
    """Random lora_B everywhere (lora_A is already random), so B A != 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(std * torch.randn(p.shape, generator=g))


def lora_paths(model):
    """Dotted names of the modules that carry a LoRA adapter."""
    return sorted(name for name, m in model.named_modules() if getattr(m, "has_lora", False))
