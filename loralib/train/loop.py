"""The one training loop of every subproject: no Trainer subclass, methods plug in at named points.

    from loralib.train import TrainConfig, train

    config = TrainConfig(output_dir="runs/mrpc", num_epochs=30, per_device_batch_size=32, lr=4e-4,
                         schedule="linear", warmup_ratio=0.06, weight_decay=0.1,
                         eval_strategy="epoch", metric_for_best="accuracy", resume_from=None)
    result = train(model, train_set, collate_fn, config, eval_fn=lambda m: evaluate(m, dev_set))

`model(**collate_fn([train_set[i], ...]))` returns an object or dict with `.loss` (a scalar);
`eval_fn(model)` returns a dict of metrics and is called in eval mode (under DDP on every rank; rank 0's
dict is used). The methods plug in as arguments:

    optimizer_factory=lambda m: create_loraplus_optimizer(m, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)
    optimizer_factory=lambda m: LoRAProAdamW(m, lr=2e-5)
    regularizer=lambda m: compute_orth_regu(m, regu_weight=0.1)          # AdaLoRA, LoRA²
    allocator=RankAllocator(model, lora_r=8, target_rank=2, ...)          # total_step is filled in if unset

One optimizer step (an accumulation group of n micro-batches, n = grad_accum_steps except at an
epoch's end):

    for each micro-batch:  loss = model(**batch).loss (+ regularizer(model));  backward(loss / n)
    clip -> optimizer.step -> scheduler.step -> allocator.update_and_mask(model, step) -> zero_grad

`step` passed to the allocator is the number of optimizer steps completed before this one (0 on the first),
as in AdaLoRA's released trainer (under DeepSpeed ZeRO-1/2 too: loralib.train.deepspeed_ranks). What
differs between plain PyTorch and DeepSpeed (building the optimizer, accumulation, backward, the step,
what a checkpoint keeps) lives in one backend object (loralib.train.backend); the loop itself does not branch
on it. Several processes: `torchrun --nproc_per_node N script.py` (DDP, gloo on CPU), or
`deepspeed_config="ds.json"` (deepspeed.initialize; batch size, accumulation, clipping and precision are
filled in from this config and must not contradict it; ZeRO stages 0-3). Under ZeRO-3 the
model is partitioned by deepspeed.initialize and stays so after train(): LoRA layers are kept unmerged,
eval_fn must run the same forwards on every rank (its gathers are collectives), and the adapter folders
are written whole; for single-process inference load `result.adapter_dir` into a fresh model.
Resume: `resume_from="latest"`; refused, naming each difference, when a setting that changes the result
differs from the checkpoint's (loralib.train.resume_check). The checkpoint keeps the loss sums too
(loralib.train.loss_tally), so a resumed run's metrics.jsonl losses and train_loss equal the uninterrupted run's;
TrainResult records the resumes (resumed_from_step, resumed_at_steps) and the steps train_loss averages.
Safety: rank 0 holds a lock on output_dir for the call (loralib.train.run_lock: a second process is refused); a
nan/inf loss stops the run before that step's update, with an error naming config.lr_flag, and non-finite
weights are never written (loralib.train.guards); a full disk is one DiskFullError.
Callbacks are objects with any of on_train_begin(state), on_before_optimizer_step(state, model,
optimizer), on_step_end(state, logs), on_evaluate(state, metrics), on_save(state, path),
on_train_end(state); an exception raised in one stops training (the last checkpoint stays good). A callback
with state_dict() / load_state_dict() has its state saved per process in each checkpoint and restored on resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..layers import LoRALayer
from . import checkpoint as ckpt
from . import zero3
from ..files import full_disk_named
from .backend import default_optimizer, make_backend, trainable_parameters
from .guards import check_finite_parameters, check_loss
from .loss_tally import LossTally
from .resume_check import (RESULT_SETTINGS, config_differences, layer_differences, layer_signature,
                           refuse_if_different)
from .run_lock import output_dir_lock
from .distributed import DistContext, ShardedBatches, barrier, broadcast_object, setup
from .progress import open_progress
from .schedules import SCHEDULES

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("no", "steps", "epoch")


@dataclass
class TrainConfig:
    """Everything the loop needs besides the model, the data and the method's plug-ins.

    Steps are optimizer steps. max_steps wins over num_epochs (which may be fractional). Warmup:
    warmup_steps if > 0, else ceil(warmup_ratio * total steps). max_grad_norm None or 0: no clipping.
    precision: "fp32"; "bf16" (autocast, on GPU or CPU); "fp16" (autocast + loss scaling, GPU only).
    eval_strategy / save_strategy: "no" | "steps" (every eval_every / save_every steps) | "epoch";
    left None they are "steps" when eval_every / save_every is set, else "no" (eval) and "epoch" (save).
    A final checkpoint is written at the end unless save_strategy is "no"; the final adapter always is.
    metric_for_best: a key of eval_fn's dict ("accuracy" also finds "eval_accuracy"); greater_is_better
    defaults to True unless the name ends in "loss". merge_lora_for_eval: let LoRA layers merge in eval
    mode during in-loop evaluation (faster; but W + BA - BA is not W in floating point, so it perturbs
    the frozen weights and a resumed run is no longer bit-identical).
    torch_compile: run the training forward (and so its backward) through torch.compile: True for its default
    backend (inductor; needs a C compiler on CPU), or a backend's name ("aot_eager": no code generation). The
    model itself stays uncompiled, so checkpoints, adapters and evaluation see plain module names (no
    `_orig_mod.`); not with deepspeed_config. Default off: on CPU the compiled LoRA step measured 1.09x (GPT-2)
    and 1.15x (SmolLM2) slower than eager (benchmarks/README.md, "torch.compile"); on the GPU not measured yet.
    lr_flag: the command-line flag of the learning rate in the entry point that runs the loop, named by the
    error a non-finite loss ends in ("--lr" for examples/NLG/gpt2_ft.py).
    resume_overrides: settings (names of TrainConfig fields, loralib.train.resume_check.RESULT_SETTINGS) a resume
    may change on purpose, e.g. ("lr",) to continue with a lower learning rate: the change is applied to the
    restored optimizer / schedule and recorded in metrics.jsonl; any other difference refuses the resume.
    """

    output_dir: str
    max_steps: Optional[int] = None
    num_epochs: Optional[float] = None
    per_device_batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    precision: str = "fp32"
    eval_strategy: Optional[str] = None
    eval_every: Optional[int] = None
    eval_at_end: bool = True
    save_strategy: Optional[str] = None
    save_every: Optional[int] = None
    save_total_limit: Optional[int] = None
    save_full_model: bool = False
    metric_for_best: Optional[str] = None
    greater_is_better: Optional[bool] = None
    load_best_at_end: bool = False
    seed: int = 42
    drop_last: bool = False
    num_workers: int = 0
    log_every: int = 10
    tensorboard: bool = False
    progress_bar: bool = True
    resume_from: Optional[str] = None
    deepspeed_config: Optional[Union[str, dict]] = None
    device: Optional[str] = None
    ddp_find_unused_parameters: bool = False
    merge_lora_for_eval: bool = False
    resume_overrides: Tuple[str, ...] = ()
    torch_compile: Union[bool, str] = False
    lr_flag: str = "--learning_rate"

    def __post_init__(self):
        def bad(name: str, why: str):
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        if not self.output_dir:
            bad("output_dir", "an output folder is required")
        if self.max_steps is None and self.num_epochs is None:
            raise ValueError("TrainConfig: set max_steps or num_epochs (both are unset)")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            bad("max_steps", "must be a positive int")
        if self.max_steps is None and not self.num_epochs > 0:
            bad("num_epochs", "must be > 0")
        for name in ("per_device_batch_size", "grad_accum_steps", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be an int >= 1")
        if not self.lr >= 0:
            bad("lr", "must be >= 0")
        if not self.weight_decay >= 0:
            bad("weight_decay", "must be >= 0")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            bad("betas", "must be two numbers in [0, 1)")
        if not self.eps > 0:
            bad("eps", "must be > 0")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"must be one of {SCHEDULES}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            bad("warmup_steps", "must be an int >= 0")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            bad("warmup_ratio", "must lie in [0, 1]")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            bad("max_grad_norm", "must be >= 0 (0 or None: no clipping)")
        if self.precision not in PRECISIONS:
            bad("precision", f"must be one of {PRECISIONS}")
        for kind, every in (("eval", "eval_every"), ("save", "save_every")):
            value = getattr(self, every)
            if value is not None and (not isinstance(value, int) or value < 1):
                bad(every, "must be a positive int")
            strategy = f"{kind}_strategy"
            if getattr(self, strategy) is None:
                setattr(self, strategy, "steps" if value else ("no" if kind == "eval" else "epoch"))
            if getattr(self, strategy) not in STRATEGIES:
                bad(strategy, f"must be one of {STRATEGIES}")
            if getattr(self, strategy) == "steps" and not value:
                bad(strategy, f"'steps' needs {every}")
        if self.save_total_limit is not None and (not isinstance(self.save_total_limit, int)
                                                  or self.save_total_limit < 1):
            bad("save_total_limit", "must be a positive int or None")
        if self.greater_is_better is None and self.metric_for_best is not None:
            self.greater_is_better = not self.metric_for_best.endswith("loss")
        if self.load_best_at_end and self.metric_for_best is None:
            bad("load_best_at_end", "needs metric_for_best")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            bad("num_workers", "must be an int >= 0")
        if not isinstance(self.torch_compile, (bool, str)) or self.torch_compile == "":
            bad("torch_compile", "must be True / False or the name of a torch.compile backend")
        if isinstance(self.torch_compile, str) and self.torch_compile not in torch._dynamo.list_backends(None):
            bad("torch_compile", f"is not a torch.compile backend; choose from {torch._dynamo.list_backends(None)}")
        if self.torch_compile and self.deepspeed_config is not None:
            bad("torch_compile", "is not supported with deepspeed_config (set DeepSpeed's own \"compile\" section)")
        self.resume_overrides = tuple(self.resume_overrides)
        unknown = [k for k in self.resume_overrides if k not in RESULT_SETTINGS]
        if unknown:
            bad("resume_overrides", f"{unknown} are not among the result-changing settings {RESULT_SETTINGS}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint (the data position is epoch + micro_in_epoch)."""

    global_step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0          # micro-batches of `epoch` this rank has consumed
    total_steps: int = 0
    steps_per_epoch: int = 0
    data_seed: int = 0               # the permutation of epoch e is drawn from seed data_seed + e
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    last_eval_step: Optional[int] = None
    last_save_step: Optional[int] = None


@dataclass
class TrainResult:
    global_step: int
    epoch: float
    train_loss: Optional[float]      # mean loss of the steps train_loss_steps names (all, unless see there)
    best_metric: Optional[float]
    best_step: Optional[int]
    eval_metrics: Optional[Dict[str, Any]]
    adapter_dir: Optional[str]
    best_adapter_dir: Optional[str]
    last_checkpoint: Optional[str]
    # [first, last] step train_loss averages: [1, global_step], except after a resume from a checkpoint written
    # before checkpoints kept the loss sums (then from the step after it); None when it averages none
    train_loss_steps: Optional[List[int]] = None
    resumed_from_step: Optional[int] = None                         # this call resumed from checkpoint-<step>
    resumed_at_steps: List[int] = dataclasses.field(default_factory=list)  # every resume of the run, oldest first


# -- helpers ---------------------------------------------------------------------------------------
def _call(callbacks: Sequence[Any], hook: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _loss_of(out) -> torch.Tensor:
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("model(**batch) returned no loss: the batch must hold the labels and the model must "
                         "return an object or dict with .loss")
    return loss


def _tokens(batch) -> Tuple[Any, str]:
    """Amount of work in a batch for the throughput display: tokens when the batch says, else samples."""
    if isinstance(batch, dict):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return mask.sum(), "tok"
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return ids.numel(), "tok"
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        if first is not None and first.dim() > 0:
            return first.shape[0], "samples"
    return 0, "samples"


def _scalar(value):
    """A one-element tensor or a numpy scalar as a Python number (JSON-able); anything else as is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if ckpt.np is not None:
        ckpt.np.random.seed(seed % 2**32)


def _stateful(callbacks) -> List[Tuple[str, Any]]:
    """(key, callback) for the callbacks whose state a checkpoint keeps (they have state_dict and
    load_state_dict); the key is "<position>:<class name>", so a resumed run must pass the same ones."""
    return [(f"{i}:{type(cb).__name__}", cb) for i, cb in enumerate(callbacks)
            if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None))]


@contextlib.contextmanager
def _evaluation(model: nn.Module, forward_model: nn.Module, merge: bool):
    """Eval mode for eval_fn, without touching training: the RNG streams are restored afterwards and,
    unless merge, LoRA layers stay unmerged so the frozen weights keep their exact values."""
    saved_rng = ckpt.rng_state()
    layers = [m for m in model.modules() if isinstance(m, LoRALayer)]
    saved_merge = [m.merge_weights for m in layers]
    if not merge:
        for m in layers:
            m.merge_weights = False
    forward_model.eval()
    try:
        yield
    finally:
        forward_model.train()
        for m, flag in zip(layers, saved_merge):
            m.merge_weights = flag
        ckpt.set_rng_state(saved_rng)


class _MetricsLog:
    """metrics.jsonl (rank 0) and, if asked and installed, TensorBoard."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool):
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                warnings.warn("TrainConfig.tensorboard=True but the tensorboard package is not installed "
                              "(pip install tensorboard); logging to metrics.jsonl only", stacklevel=3)

    def truncate_after(self, step: int, evaluated_at_step: bool = True) -> None:
        """Drop the records a crashed run wrote after the checkpoint being resumed: every later step's, and
        the checkpoint step's evaluation when it came after the save (the resumed run evaluates again)."""
        if not self.enabled or not self.path.is_file():
            return
        lines = [line for line in self.path.read_text(errors="replace").splitlines() if line.strip()]
        kept = []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise ValueError(f"{self.path}:{i + 1}: not valid JSON (only a torn last line, from a crash "
                                     "or a full disk mid-append, is dropped on resume)") from None
                logger.warning("%s: dropped its torn last line (a crash or a full disk mid-append): %r",
                               self.path, line[:80])
                continue
            at = record.get("step", 0)
            after_save = at == step and not evaluated_at_step and any(k.startswith("eval_") for k in record)
            if at <= step and not after_save:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# -- the loop --------------------------------------------------------------------------------------
def train(model: nn.Module, train_dataset, collate_fn: Callable, config: TrainConfig,
          eval_fn: Optional[Callable[[nn.Module], Dict[str, Any]]] = None,
          optimizer_factory: Optional[Callable[[nn.Module], torch.optim.Optimizer]] = None,
          regularizer: Optional[Callable[[nn.Module], torch.Tensor]] = None,
          allocator=None, callbacks: Optional[Sequence[Any]] = None) -> TrainResult:
    """Train `model` in place (see the module docstring); returns a TrainResult."""
    if not isinstance(config, TrainConfig):
        raise ValueError(f"train: config must be a TrainConfig, got {type(config).__name__}")
    if config.metric_for_best is not None and eval_fn is None:
        raise ValueError(f"TrainConfig.metric_for_best={config.metric_for_best!r} needs eval_fn")
    if config.eval_strategy != "no" and eval_fn is None:
        raise ValueError(f"TrainConfig.eval_strategy={config.eval_strategy!r} needs eval_fn")
    if allocator is not None and not callable(getattr(allocator, "update_and_mask", None)):
        raise ValueError(f"train: allocator ({type(allocator).__name__}) has no update_and_mask(model, step)")

    callbacks = list(callbacks or [])
    wants_cuda = config.device.startswith("cuda") if config.device else torch.cuda.is_available()
    ctx = setup("cuda" if wants_cuda else "cpu")
    # one run per output folder (rank 0 holds the lock); a full disk is one error naming the path
    with output_dir_lock(config.output_dir, enabled=ctx.is_main), full_disk_named(config.output_dir):
        run = _Run(model, train_dataset, collate_fn, config, eval_fn, regularizer, allocator, callbacks, ctx)
        run.setup(optimizer_factory)
        return run.train()


def _device(config: TrainConfig, ctx: DistContext) -> torch.device:
    """config.device, else this rank's GPU, else the CPU; fp16 is refused off the GPU."""
    if config.device:
        device = torch.device(config.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", ctx.local_rank)
    else:
        device = torch.device("cpu")
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError(f"TrainConfig.precision='fp16' needs a GPU (device is {device}); use 'bf16' or 'fp32'")
    return device


@dataclass
class _Resume:
    """A checkpoint being resumed: its path, its TrainConfig and the differences found before restoring."""

    path: Path
    saved_config: Dict[str, Any]
    differences: List[str]


class _Run:
    """One call of train(). The phases: setup (model, backend, resume, logs), train (epochs of optimizer
    steps, evaluation and saving on their schedules), finish (final evaluation, checkpoint and adapter).
    Everything that differs between plain PyTorch and DeepSpeed is behind self.backend (backend.py)."""

    def __init__(self, model, dataset, collate_fn, config: TrainConfig, eval_fn, regularizer, allocator,
                 callbacks: List[Any], ctx: DistContext):
        self.model, self.dataset, self.collate_fn, self.config = model, dataset, collate_fn, config
        self.eval_fn, self.regularizer, self.allocator, self.callbacks, self.ctx = (
            eval_fn, regularizer, allocator, callbacks, ctx)
        self.device = _device(config, ctx)
        self.output_dir = Path(config.output_dir)
        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.sampler = ShardedBatches(len(dataset), config.per_device_batch_size, ctx.world_size, ctx.rank,
                                      seed=config.seed, drop_last=config.drop_last)
        self.micro_per_epoch = len(self.sampler)
        steps_per_epoch = math.ceil(self.micro_per_epoch / config.grad_accum_steps)
        self.total_steps = config.max_steps or math.ceil(config.num_epochs * steps_per_epoch)
        self.state = TrainState(total_steps=self.total_steps, steps_per_epoch=steps_per_epoch, data_seed=config.seed)
        self.best_dir = self.output_dir / "best_adapter"
        self.last_metrics: Optional[Dict[str, Any]] = None
        self.last_checkpoint: Optional[Path] = None
        self.losses = LossTally(self.device)  # train_loss and the log window; restored on resume
        self.resumed_from_step: Optional[int] = None

    # -- setup -------------------------------------------------------------------------------------
    def setup(self, optimizer_factory) -> None:
        """Seed, place the model, build the backend, restore a checkpoint (refusing any result-changing
        difference before anything restored is used), then open the progress display and metrics log."""
        model, config = self.model, self.config
        resume = self._read_resume() if config.resume_from else None
        _seed_everything(config.seed)
        model.to(self.device)
        if not trainable_parameters(model):
            raise ValueError("train: the model has no trainable parameter (call loralib.mark_only_lora_as_trainable "
                             "after adding LoRA layers, or mark a head trainable)")
        if (self.allocator is not None and getattr(self.allocator, "total_step", 0) is None
                and hasattr(self.allocator, "set_total_step")):
            self.allocator.set_total_step(self.total_steps)
        if resume is not None:
            ckpt.load_model(resume.path, model)
        self.backend = make_backend(config, self.ctx, self.device, self.allocator)
        self.backend.build(model, optimizer_factory, self.total_steps)
        overridden = self._restore(resume) if resume is not None else {}
        self.backend.wrap(model)
        self._open_logs(resume, overridden)

    def _read_resume(self) -> _Resume:
        """The checkpoint to resume; refused at once when the data position cannot carry over (world size,
        batch size, accumulation, dataset size, drop_last, seed)."""
        config, ctx = self.config, self.ctx
        path = ckpt.resolve_resume(config.resume_from, self.output_dir)
        meta = ckpt.read_meta(path)
        for key, now in (("world_size", ctx.world_size), ("per_device_batch_size", config.per_device_batch_size),
                         ("grad_accum_steps", config.grad_accum_steps), ("num_samples", len(self.dataset)),
                         ("drop_last", config.drop_last), ("seed", config.seed)):
            if meta.get(key) != now:
                raise ValueError(f"resume_from={str(path)!r}: the checkpoint was written with {key}="
                                 f"{meta.get(key)!r}, this run has {now!r}; exact resume needs the same")
        saved_config = meta.get("config", {})
        differences = (config_differences(saved_config, config)
                       + layer_differences(meta.get("lora_layers", layer_signature(self.model)), self.model))
        return _Resume(path, saved_config, differences)

    def _restore(self, resume: _Resume) -> Dict[str, list]:
        """Optimizer / schedule (the backend's), allocator, callbacks, loop position, loss sums, and last the
        RNG streams; returns the resume_overrides applied."""
        path, allocator = resume.path, self.allocator
        saved = ckpt.load_training_state(path)
        overridden = self.backend.restore(path, saved, resume.saved_config, resume.differences)
        if (saved.get("allocator") is None) != (allocator is None):
            raise ValueError(f"resume_from={str(path)!r}: the checkpoint was written "
                             f"{'with' if allocator is None else 'without'} an allocator, this run has "
                             f"{'none' if allocator is None else 'one'}")
        if allocator is not None:
            allocator.load_state_dict(saved["allocator"])
        saved_callbacks = ckpt.load_rank_state(path, self.ctx.rank)
        for key, callback in _stateful(self.callbacks):
            if key not in saved_callbacks:
                raise ValueError(f"resume_from={str(path)!r}: the checkpoint holds no state for callback "
                                 f"{key!r} (it was written by a run without it)")
            callback.load_state_dict(saved_callbacks[key])
        refuse_if_different(path, resume.differences)  # nothing restored so far has been used or written
        self.state = TrainState(**saved["loop"])
        if self.state.total_steps != self.total_steps:
            raise ValueError(f"resume_from={str(path)!r}: the checkpoint's run has {self.state.total_steps} steps, "
                             f"this one {self.total_steps} (max_steps / num_epochs changed); the schedule depends "
                             "on it, so exact resume needs the same")
        self.resumed_from_step = self.state.global_step
        # absent from checkpoints written before it was kept: then train_loss starts after this step (recorded)
        self.losses.restore(saved.get("loss"), self.state.global_step, self.ctx.rank, self.config.log_every)
        self.last_metrics = saved.get("last_metrics")  # absent before it was kept: the next evaluation's
        ckpt.load_rng(path, self.ctx.rank)  # last: nothing after it may draw random numbers
        return overridden

    def _open_logs(self, resume: Optional[_Resume], overridden: Dict[str, list]) -> None:
        """The progress display and metrics.jsonl (cut back to a resumed checkpoint's step); stale
        half-written checkpoint folders are removed."""
        state, ctx = self.state, self.ctx
        # a bar on a terminal, plain periodic lines otherwise (progress_bar=False: lines only); see progress.py;
        # made before say() below, which writes through it (a resumed run's first message)
        self.bar = open_progress(self.total_steps, state.global_step, main=ctx.is_main, bar=self.config.progress_bar)
        self.log = _MetricsLog(self.output_dir, ctx.is_main, self.config.tensorboard)
        if resume is not None:
            self.log.truncate_after(state.global_step, evaluated_at_step=state.last_eval_step == state.global_step)
            if overridden:
                self.log.write({"step": state.global_step, "resume_overrides": overridden})
            if ctx.is_main:
                self.say(f"resumed from {resume.path} at step {state.global_step} (epoch {state.epoch}, "
                         f"micro-batch {state.micro_in_epoch})" + (f" with {overridden}" if overridden else ""))
        if ctx.is_main:
            ckpt.remove_stale(self.output_dir)
        barrier(ctx)

    def say(self, message: str) -> None:
        self.bar.write(message) if self.config.progress_bar else logger.info(message)

    def epoch_float(self) -> float:
        return self.state.epoch + self.state.micro_in_epoch / max(1, self.micro_per_epoch)

    # -- train -------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        self.work, self.unit, self.tick = 0, "samples", time.perf_counter()
        _call(self.callbacks, "on_train_begin", self.state)
        self.backend.forward_model.train()
        try:
            while self.state.global_step < self.total_steps:
                self._epoch()
            adapter_dir = self._finish()
        finally:
            self.bar.close()
            self.log.close()
        return self._result(adapter_dir)

    def _epoch(self) -> None:
        """The optimizer steps of the current epoch from its current micro-batch (all of them, or up to
        the last step); each step evaluates and saves when its strategy says so."""
        config, state = self.config, self.state
        batches = self.sampler.batches(state.epoch)
        loader = DataLoader(self.dataset, batch_sampler=batches[state.micro_in_epoch:], collate_fn=self.collate_fn,
                            num_workers=config.num_workers, pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(config.seed + state.epoch))
        micro_batches = iter(loader)
        while state.micro_in_epoch < len(batches) and state.global_step < self.total_steps:
            n = min(config.grad_accum_steps, len(batches) - state.micro_in_epoch)
            step_loss = self._accumulate(micro_batches, n)
            check_loss(step_loss, state.global_step + 1, self.ctx,
                       str(self.last_checkpoint) if self.last_checkpoint else None, lr_flag=config.lr_flag)
            _, grad_norm = self.backend.step(self.model, state.global_step, lambda module: _call(
                self.callbacks, "on_before_optimizer_step", state, module, self.backend.optimizer))
            state.global_step += 1
            state.micro_in_epoch += n
            end_of_epoch = state.micro_in_epoch >= len(batches)
            logs = self._log_step(step_loss, grad_norm)
            if self.eval_fn is not None and ((config.eval_strategy == "steps" and state.global_step % config.eval_every == 0)
                                             or (config.eval_strategy == "epoch" and end_of_epoch)):
                self.evaluate()
            if end_of_epoch:
                state.epoch += 1
                state.micro_in_epoch = 0
            if ((config.save_strategy == "steps" and state.global_step % config.save_every == 0)
                    or (config.save_strategy == "epoch" and end_of_epoch)):
                self.save()
            _call(self.callbacks, "on_step_end", state, logs)
            if end_of_epoch:
                break  # the next epoch draws its own order

    def _accumulate(self, micro_batches, n: int) -> torch.Tensor:
        """Forward and backward of n micro-batches (loss / n each, + the regularizer); their mean loss."""
        backend = self.backend
        step_loss = torch.zeros((), device=self.device)
        for j in range(n):
            batch = _to_device(next(micro_batches), self.device)
            with backend.accumulation(last=j == n - 1):
                with backend.autocast():
                    loss = _loss_of(backend.step_model(**batch))
                if self.regularizer is not None:
                    loss = loss + self.regularizer(self.model)
                backend.backward(loss / n)
            step_loss += loss.detach().float() / n
            amount, self.unit = _tokens(batch)
            self.work = self.work + amount
        return step_loss

    def _log_step(self, step_loss: torch.Tensor, grad_norm) -> Dict[str, Any]:
        """Every log_every steps (and at the last): a metrics.jsonl line with the mean loss since the last
        one (over all ranks), the learning rate, the throughput and the gradient norm; else {}. The progress
        display moves on after it, so the line it draws for this step shows this step's logged values."""
        state = self.state
        self.losses.add(step_loss)
        logs = {}
        if state.global_step % self.config.log_every == 0 or state.global_step == self.total_steps:
            logs = self._write_log_line(grad_norm)
        self.bar.update(1)
        return logs

    def _write_log_line(self, grad_norm) -> Dict[str, Any]:
        """The metrics.jsonl line closing the current log window (collective under DDP); shown by the bar."""
        state, ctx = self.state, self.ctx
        mean_loss, extra = self.losses.close_window(ctx)
        elapsed = time.perf_counter() - self.tick
        rate = float(_scalar(self.work)) * ctx.world_size / max(elapsed, 1e-9)
        lr = self.backend.scheduler.get_last_lr()[0]
        logs = {"step": state.global_step, "epoch": round(self.epoch_float(), 4), "loss": mean_loss, **extra,
                "lr": lr, f"{self.unit}_per_s": round(rate, 2)}
        if grad_norm is not None:
            logs["grad_norm"] = float(_scalar(grad_norm))
        self.log.write(logs)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", **{f"{self.unit}/s": f"{rate:.0f}"})
        self.work, self.tick = 0, time.perf_counter()
        return logs

    # -- evaluate and save -------------------------------------------------------------------------
    def evaluate(self) -> Dict[str, Any]:
        """eval_fn in eval mode (rank 0's dict), logged; a better metric_for_best writes best_adapter/."""
        state, ctx = self.state, self.ctx
        with _evaluation(self.model, self.backend.forward_model, self.config.merge_lora_for_eval):
            metrics = self.eval_fn(self.model)
        if not isinstance(metrics, dict):
            raise ValueError(f"eval_fn returned {type(metrics).__name__}; it must return a dict of metrics")
        metrics = broadcast_object({k: _scalar(v) for k, v in metrics.items()}, ctx)
        state.last_eval_step = state.global_step
        record = {"step": state.global_step, "epoch": round(self.epoch_float(), 4)}
        record.update({k if k.startswith("eval_") else f"eval_{k}": v for k, v in metrics.items()})
        self.log.write(record)
        if self.config.metric_for_best is not None:
            self._keep_if_best(metrics)
        self.last_metrics = metrics
        if ctx.is_main:
            self.say(f"step {state.global_step}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        _call(self.callbacks, "on_evaluate", state, metrics)
        return metrics

    def _keep_if_best(self, metrics: Dict[str, Any]) -> None:
        config, state = self.config, self.state
        name = config.metric_for_best
        key = name if name in metrics else f"eval_{name}"
        if key not in metrics:
            raise KeyError(f"TrainConfig.metric_for_best={name!r} is not among eval_fn's metrics {sorted(metrics)}")
        value = float(metrics[key])
        better = math.isfinite(value) and (state.best_metric is None or (
            value > state.best_metric if config.greater_is_better else value < state.best_metric))
        if better:
            state.best_metric, state.best_step = value, state.global_step
            tensors = ckpt.adapter_state_dict(self.model)
            if self.ctx.is_main:
                ckpt.save_adapter_atomic(self.model, self.best_dir, metadata={"global_step": state.global_step,
                                                                             "metrics": metrics}, state_dict=tensors)
            barrier(self.ctx)

    def save(self) -> Path:
        """checkpoint-<step>: the adapter, the backend's optimizer / schedule / scaler state, the allocator's,
        the loop position, the loss sums (loss_tally.py), each rank's RNG streams and callback states."""
        config, state, model = self.config, self.state, self.model
        check_finite_parameters(model, state.global_step, self.ctx)
        training_state = dict(self.backend.training_state(),
                              allocator=self.allocator.state_dict() if self.allocator is not None else None,
                              loss=self.losses.state_dict(self.ctx),  # collective: every rank's log window
                              last_metrics=self.last_metrics,  # train_results' eval_metrics after a resume here
                              loop=dataclasses.asdict(dataclasses.replace(state, last_save_step=state.global_step)))
        meta = {"epoch": self.epoch_float(), "best_metric": state.best_metric, "best_step": state.best_step,
                "per_device_batch_size": config.per_device_batch_size, "grad_accum_steps": config.grad_accum_steps,
                "num_samples": len(self.dataset), "drop_last": config.drop_last, "seed": config.seed,
                "config": {k: v for k, v in config.to_dict().items() if k != "deepspeed_config"},
                "lora_layers": layer_signature(model)}
        path = ckpt.save_checkpoint(self.output_dir, state.global_step, model, self.ctx, training_state, meta,
                                    engine=self.backend.engine, save_full_model=config.save_full_model,
                                    total_limit=config.save_total_limit,
                                    rank_state={key: cb.state_dict() for key, cb in _stateful(self.callbacks)})
        state.last_save_step = state.global_step
        self.last_checkpoint = path
        _call(self.callbacks, "on_save", state, path)
        return path

    # -- finish ------------------------------------------------------------------------------------
    def _finish(self) -> Path:
        """The final evaluation and checkpoint (unless done at this step), the best adapter loaded back if
        asked, and adapter/ written; returns adapter/'s path."""
        config, state, model, ctx = self.config, self.state, self.model, self.ctx
        if self.eval_fn is not None and config.eval_at_end and state.last_eval_step != state.global_step:
            self.evaluate()
        if config.save_strategy != "no" and state.last_save_step != state.global_step:
            self.save()
        if config.load_best_at_end and state.best_step is not None:
            with zero3.writable(model, [n for n, p in model.named_parameters() if "lora_" in n or p.requires_grad]):
                ckpt.load_adapter_weights(self.best_dir, model)
        adapter_dir = self.output_dir / "adapter"
        check_finite_parameters(model, state.global_step, ctx)
        tensors = ckpt.adapter_state_dict(model)
        if ctx.is_main:
            ckpt.save_adapter_atomic(model, adapter_dir, metadata={"global_step": state.global_step,
                                                                   "best_step": state.best_step}, state_dict=tensors)
        barrier(ctx)
        _call(self.callbacks, "on_train_end", state)
        return adapter_dir

    def _result(self, adapter_dir: Path) -> TrainResult:
        state, last_checkpoint = self.state, self.last_checkpoint
        if last_checkpoint is None and state.last_save_step is not None:
            found = ckpt.list_checkpoints(self.output_dir)
            last_checkpoint = found[-1][1] if found else None
        return TrainResult(
            global_step=state.global_step, epoch=self.epoch_float(),
            train_loss=self.losses.mean(), best_metric=state.best_metric, best_step=state.best_step,
            eval_metrics=self.last_metrics, adapter_dir=str(adapter_dir),
            best_adapter_dir=str(self.best_dir) if state.best_step is not None else None,
            last_checkpoint=str(last_checkpoint) if last_checkpoint else None,
            train_loss_steps=self.losses.covered_steps(state.global_step), resumed_from_step=self.resumed_from_step,
            resumed_at_steps=list(self.losses.resumed_at))
