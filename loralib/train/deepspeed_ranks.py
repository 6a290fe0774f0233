"""Rank allocation (AdaLoRA's RankAllocator, LoRA²'s) under DeepSpeed ZeRO-1/2.

The allocator reads each scored factor's gradient after the optimizer step and masks E in place. DeepSpeed
keeps the gradients in its own partitioned buffers and zeroes them inside engine.step(), and keeps fp32
master copies that the next step would copy back over a masked E. So the loop:

    grads = gather_scored_gradients(allocator)        # before engine.step(): the whole reduced gradients
    engine.step()
    allocate(allocator, model, step, grads)           # the allocator as on one device, then E's masks
                                                      # written into DeepSpeed's fp32 master copies

Every rank runs the same allocator on the same (reduced) gradients and values, so the masks agree. ZeRO-3
is refused: there the factors themselves are partitioned.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn


def scored_parameters(allocator) -> List[nn.Parameter]:
    """The parameters whose gradients the allocator reads, in its layers' order."""
    return [p for _, layer in allocator.layers for _, p in layer.scored_factors()]


def gather_scored_gradients(allocator) -> List[torch.Tensor]:
    """Each scored parameter's whole, reduced gradient (collective: every rank, before engine.step())."""
    from deepspeed.utils import safe_get_full_grad

    grads = []
    for p in scored_parameters(allocator):
        g = safe_get_full_grad(p)
        if g is None:
            raise RuntimeError("rank allocation under DeepSpeed: a scored factor has no gradient (call before "
                               "engine.step() on an accumulation boundary)")
        grads.append(g.to(p.dtype))
    return grads


@torch.no_grad()
def allocate(allocator, model: nn.Module, step: int, grads: List[torch.Tensor]):
    """allocator.update_and_mask(model, step) with `grads` as the factors' .grad, then every layer's E
    masked in DeepSpeed's fp32 master copy as well. Returns what update_and_mask returns."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    params = scored_parameters(allocator)
    for p, g in zip(params, grads):
        p.grad = g
    try:
        result = allocator.update_and_mask(model, step)
    finally:
        for p in params:
            p.grad = None
    for _, layer in allocator.layers:
        master = safe_get_full_fp32_param(layer.lora_E)
        if master is not None:
            keep = layer.rank_mask.to(device=master.device, dtype=master.dtype).view(-1, *[1] * (master.dim() - 1))
            safe_set_full_fp32_param(layer.lora_E, master * keep)
    return result
