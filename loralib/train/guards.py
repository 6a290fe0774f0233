"""Finiteness guards of the training loop: a run whose loss or trainable weights stop being finite ends
with one error naming the step and the value, before any checkpoint, adapter or result is written from it.

The loss is checked every optimizer step, before the update; the trainable weights before each checkpoint
and before the final adapter (a finite loss can still be followed by an update that overflows).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .distributed import DistContext


class NonFiniteError(ValueError, FloatingPointError):
    """Training produced a nan / inf loss or weight; nothing from that point on was written. A ValueError
    too, so every entry point (loralib.cli.run_entry_point) prints it as one line and exits 2."""


def check_loss(loss: torch.Tensor, step: int, ctx: DistContext, last_checkpoint: Optional[str] = None,
               lr_flag: str = "--learning_rate") -> None:
    """Raise NonFiniteError if `loss` (this rank's detached scalar of optimizer step `step`, 1-based) or any
    other rank's is nan / inf; the message names `lr_flag`, the caller's learning-rate flag. Called after the
    backward pass and before the optimizer step, so the weights stay those of the last good step. One host
    sync per step (transformers' Trainer makes the same one for its nan filter); under DDP one more all-reduce
    of a flag, so that every rank stops together."""
    bad = (~torch.isfinite(loss)).to(torch.float32)
    if ctx.distributed:
        bad = bad.clone()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if not bool(bad.item()):
        return
    value = loss.item()
    where = f"{value}" if not math.isfinite(value) else "not finite on another rank"
    kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint of this call"
    raise NonFiniteError(
        f"train: the loss is {where} at step {step}; training stopped before that step's update and before "
        f"writing anything computed from it ({kept}). Usual causes: a learning rate too high for the method "
        f"({lr_flag}), fp16 without loss scaling, or nan / inf in the data")


def check_finite_parameters(model: nn.Module, step: int, ctx: DistContext) -> None:
    """Raise NonFiniteError naming the first trainable parameter holding nan / inf (syncs: call before writing).
    Collective under DDP / DeepSpeed (a ZeRO-3 shard may be bad on one rank only): call on every rank."""
    bad = next((name for name, p in model.named_parameters()
                if p.requires_grad and p.numel() and not bool(torch.isfinite(p.detach()).all())), None)
    anywhere = bad is not None
    if ctx.distributed:
        flag = torch.tensor(float(anywhere), device=next(model.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        anywhere = bool(flag.item())
    if anywhere:
        raise NonFiniteError(f"train: trainable parameter {bad or '(on another rank)'!r} holds nan / inf after step "
                             f"{step}; training stopped before writing it (the learning rate is likely too high)")
