"""Model-level helpers: freezing, LoRA-only state dicts, merging, parameter summaries."""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

import torch
import torch.nn as nn

from .layers import LoRALayer

_BIAS_MODES = ("none", "all", "lora_only")


def _check_bias(bias: str) -> None:
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}, got bias={bias!r}")


def lora_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, module) for every LoRA layer of the model, adapted (r > 0) or not."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter whose name lacks "lora_" and make the LoRA parameters trainable.

    bias="all" re-enables every bias; "lora_only" the biases of LoRA layers. (0.1.2 never set the LoRA
    parameters back to trainable, so a model frozen earlier stayed frozen; this one does.)
    """
    _check_bias(bias)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    if bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name:
                param.requires_grad = True
    elif bias == "lora_only":
        for _, module in lora_layers(model):
            b = getattr(module, "bias", None)
            if isinstance(b, torch.Tensor):
                b.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> Dict[str, torch.Tensor]:
    """The entries of model.state_dict() whose keys contain "lora_" (plus the chosen biases)."""
    _check_bias(bias)
    full = model.state_dict()
    if bias == "none":
        return {k: v for k, v in full.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in full.items() if "lora_" in k or "bias" in k}
    out = {}
    for k, v in full.items():
        if "lora_" in k:
            out[k] = v
            bias_key = k.split("lora_")[0] + "bias"
            if bias_key in full:
                out[bias_key] = full[bias_key]
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (whatever merge_weights says). Idempotent."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of its weight again. Idempotent."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A state dict for the plain model: adapters folded into the weights, no "lora_" keys.

    `model.state_dict()` always holds the unmerged weights (so a merged model is never merged twice
    after a reload); this is the export for deploying without loralib.
    """
    was_merged = {name: layer.merged for name, layer in lora_layers(model)}
    merge_lora(model)
    try:
        state = model.state_dict()
        adapter_buffers = set()  # AdaLoRA's / LoRA²'s ranknum and the like: the plain layer has none
        for name, layer in lora_layers(model):
            prefix = name + "." if name else ""
            if layer.merged:
                state[prefix + layer._weight_key()] = layer._base_weight().detach().clone()
            if layer.has_lora:
                adapter_buffers.update(prefix + b for b, _ in layer.named_buffers(recurse=False))
        return {k: v for k, v in state.items() if "lora_" not in k and k not in adapter_buffers}
    finally:
        for name, layer in lora_layers(model):
            if not was_merged[name]:
                layer.unmerge()


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """One line: trainable / total parameters and the share, plus the number of adapted layers."""
    trainable, total = count_parameters(model)
    adapted = sum(1 for _, layer in lora_layers(model) if layer.has_lora)
    share = 100.0 * trainable / max(total, 1)
    return (f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"
            f" || adapted layers: {adapted}")
