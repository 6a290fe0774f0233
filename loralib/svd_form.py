"""LoRA in SVD form: what AdaLoRA's `SVDLinear` and LoRA²'s `LoRA2Linear` share.

Both adapt a linear layer with delta-W = P diag(E) Q * scaling / (ranknum + 1e-5), where E (r, 1) holds
one value per rank ("triplet"), ranknum = the initial r stays constant, and a rank allocator
(`loralib.adalora.RankAllocator`) masks the E_i of the least important triplets. They differ only in
how P (out, r) and Q (r, in) are stored: plain factors (AdaLoRA) or products of two small ones (LoRA²).

`SVDFormLinear` is their common base (initialisation order, merge on eval, the rank buffers); the
functions below are the rules both follow: the scaling (`effective_alpha`), the rank buffers
(`init_rank_state`, `rebuild_rank_buffers`), the orthogonality gap of one factor (`orth_gap`) and the
regularizer over many layers (`orth_regularizer`), and the LoRAConfig options neither supports
(`check_config_for`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from .layers import LoRALayer


def effective_alpha(lora_alpha, r: int) -> float:
    """AdaLoRA's rule: the scaling is lora_alpha, or r when lora_alpha <= 0."""
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got lora_alpha={lora_alpha!r}")
    return float(lora_alpha) if lora_alpha > 0 else float(r)


def init_rank_state(layer: nn.Module, r: int) -> None:
    """ranknum (persistent, as in the released checkpoints) and the rank mask (kept triplets)."""
    if r > 0:
        layer.register_buffer("ranknum", torch.full((1,), float(r), device=layer.weight.device))
    layer.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=layer.weight.device),
                          persistent=False)
    layer.trimmed = False


def rebuild_rank_buffers(layer: nn.Module) -> None:
    """After materialising from the meta device: ranknum = initial r, every triplet kept."""
    r0 = layer.rank_mask.numel()
    layer.rank_mask = torch.ones(r0, dtype=torch.bool, device=layer.weight.device)
    if hasattr(layer, "ranknum"):
        layer.ranknum = torch.full((1,), float(r0), dtype=layer.ranknum.dtype, device=layer.weight.device)
    layer.trimmed = False


def orth_gap(m: torch.Tensor) -> torch.Tensor:
    """M M^T - I or M^T M - I, on the smaller side of M (the Gram that can be the identity)."""
    rows, cols = m.shape
    gram = m @ m.transpose(0, 1) if rows <= cols else m.transpose(0, 1) @ m
    return gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def orth_regularizer(layers: Sequence[nn.Module], regu_weight: float, squared: bool, what: str) -> torch.Tensor:
    """regu_weight * the mean of every adapted layer's `orth_penalties` terms; `what` names the caller
    in the error raised when no layer has one."""
    terms = [t for layer in layers if layer.has_lora for t in layer.orth_penalties(squared=squared)]
    if not terms:
        raise ValueError(f"{what}: the model has no adapted rank-adaptive layer to regularize")
    return regu_weight * torch.stack(terms).sum() / len(terms)


def check_config_for(method: str, config) -> None:
    """Refuse the LoRAConfig options an SVD-form layer has no meaning for (`method` names it)."""
    if config.use_rslora:
        raise ValueError(f"LoRAConfig.use_rslora=True is not supported with method={method!r} "
                         f"(its scale is lora_alpha / ranknum)")
    if config.init_swapped:
        raise ValueError(f"LoRAConfig.init_swapped=True is not supported with method={method!r} "
                         f"(E starts at zero; A and B are N(0, 0.02))")


class SVDFormLinear(nn.Linear, LoRALayer):
    """Base of the SVD-form linear layers: a subclass builds its factors in __init__ (then calls
    `init_rank_state` and `reset_parameters`) and defines `reset_lora_parameters`, `delta_weight`,
    `lora_forward`, `scored_factors`, `triplet_score` and `orth_penalties`."""

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        self.reset_lora_parameters()

    def rebuild_buffers(self) -> None:
        rebuild_rank_buffers(self)

    def _rank_scale(self) -> torch.Tensor:
        """scaling / (ranknum + 1e-5), (1,)."""
        return self.scaling / (self.ranknum + 1e-5)

    def train(self, mode: bool = True):
        nn.Linear.train(self, mode)
        self._train_merge(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear_forward(x)
