"""Gradient (activation) checkpointing for our decoder model files, without touching them.

    from loralib.models.grad_checkpoint import enable_gradient_checkpointing
    enable_gradient_checkpointing(model)      # before training; undo with disable_gradient_checkpointing

Each decoder block (the entries of the model's ModuleList of blocks: Llama's `model.layers`, GPT-2's
`transformer.h`) keeps only its input during the forward pass and recomputes its inside during the
backward pass, with torch.utils.checkpoint (use_reentrant=False). Activation memory of the stack falls
from O(layers x everything a block saves) to O(layers x one hidden state + one block's worth), at the cost
of about one more forward pass per step. Gradients are those of the plain model: the recomputation sees
the same inputs, the same RNG state (LoRA dropout draws the same mask) and the same autocast state.

A block runs checkpointed only when it matters and is safe: in training mode, with autograd recording,
and without a KV cache among its arguments (generation fills the cache in place, which a recomputation
would do twice). Evaluation and generation are therefore unchanged.

How: the block instance gets a `forward` attribute (Python looks it up before the class's method), a
wrapper around the class's own forward. Parameter names, state dicts, hooks and the model files stay as
they are. Works under DDP (non-reentrant checkpointing supports it) and under DeepSpeed ZeRO-1/2/3 (the recomputed
forward calls the submodules again, so ZeRO-3's hooks gather their weights again).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .cache import KVCache

_MARK = "_loralib_checkpointed"


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks: among the model's ModuleLists whose entries all share one class,
    the one holding the most parameters (a Llama's `model.layers`, a GPT-2's `transformer.h`).

    Raises ValueError when the model has none (the model is not a stack of repeated blocks)."""
    best, best_size = None, -1
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = module, size
    if best is None:
        raise ValueError(f"gradient checkpointing: {type(model).__name__} has no ModuleList of repeated "
                         "blocks to checkpoint")
    return best


def _uses_cache(args, kwargs) -> bool:
    return any(isinstance(a, KVCache) for a in args) or any(isinstance(v, KVCache) for v in kwargs.values())


def _checkpointed_forward(block: nn.Module):
    plain_forward = type(block).forward.__get__(block)

    def forward(*args, **kwargs):
        if block.training and torch.is_grad_enabled() and not _uses_cache(args, kwargs):
            return checkpoint(plain_forward, *args, use_reentrant=False, **kwargs)
        return plain_forward(*args, **kwargs)

    return forward


def enable_gradient_checkpointing(model: nn.Module) -> List[nn.Module]:
    """Checkpoint every decoder block of `model` (see the module docstring); returns the blocks.

    Idempotent. Call it on the bare model (before DDP / DeepSpeed wrap it)."""
    blocks = list(decoder_blocks(model))
    for block in blocks:
        if not getattr(block, _MARK, False):
            block.forward = _checkpointed_forward(block)
            setattr(block, _MARK, True)
    return blocks


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Undo enable_gradient_checkpointing: the blocks run their class's forward again."""
    for block in decoder_blocks(model):
        if getattr(block, _MARK, False):
            del block.forward
            delattr(block, _MARK)


def is_gradient_checkpointing(model: nn.Module) -> bool:
    """True when every decoder block of `model` is checkpointed."""
    try:
        return all(getattr(block, _MARK, False) for block in decoder_blocks(model))
    except ValueError:
        return False
