"""Learning-rate schedules: linear, cosine or constant, each after a linear warmup.

The multiplier applied to every parameter group's base lr at optimizer step t (t = 0 before the first
step), with w warmup steps and T total steps, is the one of transformers' schedulers of the same name:

    t < w:      t / max(1, w)
    linear:     max(0, (T - t) / max(1, T - w))
    cosine:     max(0, (1 + cos(pi * p)) / 2),  p = (t - w) / max(1, T - w)   (half a cosine wave)
    constant:   1

The multiplier is a small picklable object, so `LambdaLR.state_dict()` records its parameters and a
resumed run gets the same schedule.
"""
from __future__ import annotations

import math
import torch

SCHEDULES = ("linear", "cosine", "constant")


class WarmupSchedule:
    """lr multiplier at step t (see the module docstring)."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int):
        if kind not in SCHEDULES:
            raise ValueError(f"schedule={kind!r} is not one of {SCHEDULES}")
        self.kind = kind
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear":
            return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def resolve_warmup(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Warmup length in steps: warmup_steps when > 0, else ceil(warmup_ratio * total_steps)
    (transformers' precedence, so the papers' flags mean what they meant)."""
    if warmup_steps > 0:
        return int(warmup_steps)
    return math.ceil(warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int = 0,
                    warmup_ratio: float = 0.0, last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `optimizer` (every group keeps its own base lr, e.g. LoRA+'s groups)."""
    warmup = resolve_warmup(total_steps, warmup_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(kind, warmup, total_steps),
                                             last_epoch=last_epoch)


def scheduler_factory(kind: str, total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0):
    """build_scheduler as a callable of the optimizer only (what deepspeed.initialize accepts)."""
    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return build_scheduler(optimizer, kind, total_steps, warmup_steps, warmup_ratio)
    return make


__all__ = ["SCHEDULES", "WarmupSchedule", "build_scheduler", "resolve_warmup", "scheduler_factory"]
