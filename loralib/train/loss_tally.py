"""The training losses a run records, kept across a resume: a resumed run logs and reports what an
uninterrupted one would.

Two sums make the record (loralib.train.loop):

    the run's sum     sum of (logged mean loss x steps it averages) and the step count: TrainResult.train_loss
                      = sum / steps, the mean over steps first_step..last (train_results.json's train_loss_steps)
    the log window    this process's sum of step losses since the last metrics.jsonl line and its step count;
                      the next line's loss = (mean over processes of the window's sum) / its step count

Both go into every checkpoint (training_state.pt, entry "loss"; the window of every process, gathered), so the
first line after a resume averages the same steps, and the same float values in the same order, as the
uninterrupted run's: the logged losses and train_loss of a resumed run equal the uninterrupted run's exactly.
A checkpoint written before this entry existed resumes as before, with the difference recorded: train_loss
covers the steps after the resume only (first_step), and the first line after it says how many steps it
averages ("loss_steps"). Every resume is recorded (resumed_at: the steps resumed from, oldest first).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .distributed import DistContext, all_reduce_mean


class LossTally:
    """The run's loss sum and the log window of this process (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.total, self.steps, self.first_step = 0.0, 0, 1
        self.window = torch.zeros((), device=device)  # this process's step losses since the last log line
        self.window_steps = 0
        self.resumed_at: List[int] = []
        self.window_cut_short = False  # resumed from a checkpoint without the window: it lost its earlier steps

    def add(self, step_loss: torch.Tensor) -> None:
        """One optimizer step's mean loss (a detached scalar on the training device)."""
        self.window += step_loss
        self.window_steps += 1

    def close_window(self, ctx: DistContext) -> Tuple[float, Dict[str, Any]]:
        """The mean loss of the window over all processes (collective under DDP), added to the run's sum;
        returns it and what the log line must add to be truthful ({"loss_steps": n} after an old resume)."""
        mean_loss = (all_reduce_mean(self.window, ctx) / self.window_steps).item()
        extra = {"loss_steps": self.window_steps} if self.window_cut_short else {}
        self.total += mean_loss * self.window_steps
        self.steps += self.window_steps
        self.window.zero_()
        self.window_steps, self.window_cut_short = 0, False
        return mean_loss, extra

    def mean(self) -> Optional[float]:
        return self.total / self.steps if self.steps else None

    def covered_steps(self, last_step: int) -> Optional[List[int]]:
        """[first, last]: the steps train_loss averages (None when it averages none)."""
        return [self.first_step, last_step] if self.steps else None

    # -- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self, ctx: DistContext) -> Dict[str, Any]:
        """The checkpoint's "loss" entry. Collective under DDP / DeepSpeed (the windows are gathered):
        call on every rank. Plain numbers only (a float holds a float32 / float64 value exactly)."""
        return {"sum": self.total, "steps": self.steps, "first_step": self.first_step,
                "window": _gather(self.window, ctx), "window_steps": self.window_steps,
                "window_cut_short": self.window_cut_short, "resumed_at": list(self.resumed_at)}

    def restore(self, saved: Optional[Dict[str, Any]], step: int, rank: int, log_every: int) -> None:
        """After a resume from the checkpoint of `step`: its "loss" entry, or None for a checkpoint written
        before it existed (train_loss then starts after `step`, and the first log line says how many steps it
        averages unless the window was empty at `step`)."""
        if saved is None:
            self.first_step, self.resumed_at = step + 1, [step]
            self.window_cut_short = step % log_every != 0
            return
        self.total, self.steps, self.first_step = float(saved["sum"]), int(saved["steps"]), int(saved["first_step"])
        self.window.fill_(saved["window"][rank])
        self.window_steps, self.window_cut_short = int(saved["window_steps"]), bool(saved["window_cut_short"])
        self.resumed_at = [int(s) for s in saved["resumed_at"]] + [step]


def _gather(value: torch.Tensor, ctx: DistContext) -> List[float]:
    """Every process's scalar `value`, by rank (one all_gather under DDP / DeepSpeed)."""
    if not ctx.distributed:
        return [value.item()]
    values = [torch.zeros_like(value) for _ in range(ctx.world_size)]
    dist.all_gather(values, value.contiguous())
    return [v.item() for v in values]
