"""The AdamW of the LoRA paper's GPT-2 code (microsoft/LoRA examples/NLG/src/optimizer.py, BERT's AdamW),
and its parameter groups. loralib.methods builds it for a run whose OptimizerSettings say adamw="lora-repo"
(gpt2_ft.py's runs).

    optimizer = GPT2FTAdamW(lora_repo_groups(model, weight_decay=0.01, no_decay_bias=False), lr=2e-4,
                            betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, correct_bias=True)
"""
from __future__ import annotations

import math
import re
from typing import List

import torch
import torch.nn as nn


class GPT2FTAdamW(torch.optim.Optimizer):
    """The Adam of the original optimizer.py (BERT's AdamW), per parameter p with gradient g at step t:

        m = b1 m + (1 - b1) g;      v = b2 v + (1 - b2) g^2
        p = p - s * m / (sqrt(v) + eps),   s = lr * sqrt(1 - b2^t) / (1 - b1^t) if correct_bias else lr
        p = p - lr * weight_decay * p      (decoupled decay, after the Adam step)

    torch.optim.AdamW differs: eps is added after the bias correction of v, the decay comes first, and
    the correction cannot be turned off.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.98), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"GPT2FTAdamW: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                size = group["lr"]
                if group["correct_bias"]:
                    size *= math.sqrt(1.0 - b2 ** state["step"]) / (1.0 - b1 ** state["step"])
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def lora_repo_groups(model: nn.Module, weight_decay: float, no_decay_bias: bool) -> List[dict]:
    """The trainable tensors as the original grouped them: one group with weight_decay; with no_decay_bias,
    biases and LayerNorm weights get none (the original matched the names "bias" and "layer_norm.weight";
    GPT-2's LayerNorms are ln_*)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not no_decay_bias:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    exempt = lambda n: n.endswith("bias") or re.search(r"(^|\.)ln_(\d+|f)\.weight$", n)  # noqa: E731
    groups = [{"params": [p for n, p in params if not exempt(n)], "weight_decay": weight_decay},
              {"params": [p for n, p in params if exempt(n)], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
