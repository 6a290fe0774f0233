"""The one place where plain PyTorch and DeepSpeed training differ, behind one small object.

The loop (loralib.train.loop) runs each optimizer step the same way whichever backend it holds:

    with backend.accumulation(last):        # DDP's no_sync / DeepSpeed's accumulation boundary
        with backend.autocast():            # bf16 / fp16 autocast (DeepSpeed casts by itself)
            loss = backend.step_model(**batch).loss
        backend.backward(loss / n)          # fp16: through the GradScaler; DeepSpeed: engine.backward
    taken, grad_norm = backend.step(model, global_step, before_step)
                                            # clip -> optimizer.step -> scheduler.step -> allocator -> zero_grad

- `TorchBackend`: one process or torchrun (DDP), torch.autocast, and a GradScaler for fp16. The step is
  skipped (taken=False: no schedule step, no allocation) when the scaler finds inf/nan gradients.
- `DeepSpeedBackend`: deepspeed.initialize with our optimizer and schedule; engine.step() clips, steps,
  zeroes the gradients and steps the schedule; rank allocation goes through loralib.train.deepspeed_ranks
  (ZeRO-1/2; refused under ZeRO-3, where the scored factors are partitioned).

Both are built in the same order (`build` before a resume restores into them, `wrap` after), and both
hand the checkpoint the same three entries (`training_state`), so a run's checkpoints and resume
refusals do not depend on which backend wrote them beyond what DeepSpeed keeps in its own folder.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..methods import adamw_groups
from . import checkpoint as ckpt
from . import deepspeed_ranks, zero3
from .distributed import DistContext, deepspeed_config, deepspeed_engine, no_sync, wrap_ddp, zero_stage
from .resume_check import apply_overrides, optimizer_differences
from .schedules import build_scheduler, scheduler_factory

# before_step(module): the loop's on_before_optimizer_step callbacks, given the module that trains
BeforeStep = Callable[[Any], None]


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def default_optimizer(model: nn.Module, config) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on 1-d ones (biases, norm weights), the
    split transformers' Trainer makes for the papers' runs (loralib.methods.adamw_groups)."""
    return torch.optim.AdamW(adamw_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
                             eps=config.eps)


class TorchBackend:
    """One process or DDP; autocast for bf16 / fp16 and a GradScaler for fp16."""

    engine = None  # checkpoints write no DeepSpeed folder

    def __init__(self, config, ctx: DistContext, device: torch.device, allocator=None):
        self.config, self.ctx, self.device, self.allocator = config, ctx, device, allocator
        self.optimizer = self.scheduler = self.scaler = None
        self.forward_model: Optional[nn.Module] = None  # DDP-wrapped (or the model): train()/eval(), no_sync
        self.step_model: Optional[nn.Module] = None     # what the training forward runs through (maybe compiled)
        self.params: List[nn.Parameter] = []

    def build(self, model: nn.Module, optimizer_factory: Optional[Callable], total_steps: int) -> None:
        """The optimizer (the factory's, else default_optimizer), the schedule and, for fp16, the scaler."""
        c = self.config
        optimizer = optimizer_factory(model) if optimizer_factory is not None else None
        self.optimizer = optimizer or default_optimizer(model, c)
        self.scheduler = build_scheduler(self.optimizer, c.schedule, total_steps, c.warmup_steps, c.warmup_ratio)
        if c.precision == "fp16":
            self.scaler = torch.amp.GradScaler("cuda")

    def restore(self, resume_path: Path, saved: dict, saved_config: dict, differences: List[str]) -> Dict[str, list]:
        """Load the checkpoint's optimizer / schedule / scaler state unless a difference (appended to
        `differences`, which the caller then refuses) forbids it; returns the resume_overrides applied."""
        differences.extend(optimizer_differences(saved["optimizer"]["param_groups"], self.optimizer.param_groups,
                                                 self.config.resume_overrides))
        if differences:  # refused by the caller, with the other checks' findings
            return {}
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None and saved.get("scaler") is not None:
            self.scaler.load_state_dict(saved["scaler"])
        return apply_overrides(saved_config, self.config, self.optimizer, self.scheduler)

    def wrap(self, model: nn.Module) -> None:
        """DDP (several processes) and torch.compile; after a resume has restored the model's state. The
        compiled wrapper only runs the training forward: no_sync, train/eval and checkpoints use the modules."""
        self.forward_model = wrap_ddp(model, self.ctx, self.device, self.config.ddp_find_unused_parameters)
        self.step_model = self.forward_model
        if self.config.torch_compile:
            self.step_model = torch.compile(self.forward_model, **(
                {} if self.config.torch_compile is True else {"backend": self.config.torch_compile}))
        self.params = trainable_parameters(model)

    def autocast(self):
        if self.config.precision not in ("bf16", "fp16"):
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def accumulation(self, last: bool):
        """DDP reduces the gradients on the last micro-batch of a group only."""
        return no_sync(self.forward_model, not last)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, model: nn.Module, global_step: int, before_step: BeforeStep) -> Tuple[bool, Any]:
        """clip -> optimizer.step -> scheduler.step -> allocator -> zero_grad. Returns (taken, grad_norm):
        taken is False when the fp16 scaler skipped the update (inf/nan gradients); grad_norm is None
        without clipping."""
        grad_norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        before_step(self.forward_model)
        taken = True
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            taken = self.scaler.get_scale() >= scale  # a lowered scale means inf/nan: step skipped
        else:
            self.optimizer.step()
        if taken:
            self.scheduler.step()
            if self.allocator is not None:
                self.allocator.update_and_mask(model, global_step)
        model.zero_grad(set_to_none=True)
        return taken, grad_norm

    def training_state(self) -> Dict[str, Any]:
        """The checkpoint's optimizer / scheduler / scaler entries."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}


class DeepSpeedBackend:
    """deepspeed.initialize (ZeRO 0-3): the engine is the training module and steps the schedule itself."""

    scaler = None  # DeepSpeed scales fp16 losses itself

    def __init__(self, config, ctx: DistContext, device: torch.device, allocator=None):
        self.config, self.ctx, self.device, self.allocator = config, ctx, device, allocator
        self.engine = self.optimizer = self.scheduler = None

    @property
    def forward_model(self):
        return self.engine

    step_model = forward_model

    def build(self, model: nn.Module, optimizer_factory: Optional[Callable], total_steps: int) -> None:
        """The completed DeepSpeed config, our optimizer (the factory's, else default_optimizer, unless the
        config has an 'optimizer' section) and schedule, then deepspeed.initialize."""
        c = self.config
        optimizer = optimizer_factory(model) if optimizer_factory is not None else None
        ds = deepspeed_config(c, self.ctx.world_size, optimizer_factory is not None)
        if optimizer is None and "optimizer" not in ds:
            optimizer = default_optimizer(model, c)
        make_scheduler = scheduler_factory(c.schedule, total_steps, c.warmup_steps, c.warmup_ratio)
        if zero_stage(ds) == 3 and self.allocator is not None:
            raise ValueError("train: rank allocation (an allocator) under DeepSpeed ZeRO-3 is not supported: the "
                             "factors it scores and masks are partitioned there; use ZeRO-1/2 or torchrun (DDP)")
        if zero_stage(ds) == 3:
            model.train()  # unmerged: ZeRO-3 is about to partition W, which B A can no longer be added to
            zero3.disable_merging(model)
        self.engine, self.optimizer, self.scheduler = deepspeed_engine(model, optimizer, make_scheduler, ds)

    def restore(self, resume_path: Path, saved: dict, saved_config: dict, differences: List[str]) -> Dict[str, list]:
        """engine.load_checkpoint of the checkpoint's deepspeed/ folder; resume_overrides cannot be applied
        to the engine's restored optimizer, so asking for them is a difference."""
        ckpt.load_deepspeed(resume_path, self.engine)
        if self.config.resume_overrides:
            differences.append(f"resume_overrides={self.config.resume_overrides} (not applied to a DeepSpeed "
                               "engine's restored optimizer)")
        return {}

    def wrap(self, model: nn.Module) -> None:
        """Nothing: deepspeed.initialize has wrapped the model already."""

    def autocast(self):
        return contextlib.nullcontext()

    def accumulation(self, last: bool):
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop has divided by the group's size already

    def step(self, model: nn.Module, global_step: int, before_step: BeforeStep) -> Tuple[bool, Any]:
        """engine.step() (clip, step, zero_grad, scheduler.step), the allocator around it; (taken, grad_norm)."""
        before_step(self.engine)
        scored = deepspeed_ranks.gather_scored_gradients(self.allocator) if self.allocator is not None else None
        skipped = getattr(self.engine, "skipped_steps", 0)
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        taken = getattr(self.engine, "skipped_steps", 0) == skipped
        if self.allocator is not None and taken:
            deepspeed_ranks.allocate(self.allocator, model, global_step, scored)
        return taken, grad_norm

    def training_state(self) -> Dict[str, Any]:
        """None for each entry: the optimizer and schedule live in the checkpoint's deepspeed/ folder."""
        return {"optimizer": None, "scheduler": None, "scaler": None}


def make_backend(config, ctx: DistContext, device: torch.device, allocator=None):
    """DeepSpeedBackend when config.deepspeed_config is set, else TorchBackend."""
    cls = DeepSpeedBackend if config.deepspeed_config is not None else TorchBackend
    return cls(config, ctx, device, allocator)
