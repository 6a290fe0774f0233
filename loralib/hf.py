"""The methods inside Hugging Face's `Trainer`, on PEFT models and on models built with `loralib.inject`.

    from loralib.hf import LoraPlusTrainer, LoraPlusTrainingArguments            # LoRA+
    args = LoraPlusTrainingArguments(output_dir="out", learning_rate=2e-4, loraplus_lr_ratio=16)
    LoraPlusTrainer(model=peft_model, args=args, train_dataset=train).train()

    from loralib.hf import LoRAProTrainer, LoRAProTrainingArguments              # LoRA-Pro
    args = LoRAProTrainingArguments(output_dir="out", learning_rate=2e-5, lorapro_mode="full")
    LoRAProTrainer(model=peft_model, args=args, train_dataset=train).train()
    # as released: lorapro_released_clipping / _scaling (full), lorapro_released_weight_decay (efficient)

    from loralib.hf import RankAllocatorCallback, RegularizedTrainer             # AdaLoRA / LoRA² ranks
    RegularizedTrainer(model=model, args=args, train_dataset=train,              # model: loralib.inject(...,
                       regularizer=lambda m: loralib.compute_orth_regu(m, 0.1),  #   method="adalora")
                       callbacks=[RankAllocatorCallback(RankAllocator(model, lora_r=8, target_rank=4, ...))]).train()
    Trainer(..., callbacks=[RankAllocatorCallback(peft_adalora_model)])          # PEFT's AdaLoRA: its own allocator

Plain-Trainer forms: `optimizers=(loraplus_optimizer(model, args), None)`, `optimizers=(lorapro_optimizer(model,
args), None)` (not under DeepSpeed, nor with the released clipping: there LoRAProTrainer is needed).

The optimizers come from the method registry (loralib.methods: make_method, OptimizerSettings, build_optimizer),
as in every entry point of loralib; the Trainer's arguments are translated into its settings.

Everything else stays the Trainer's: its lr schedule and warmup (they set each group's "lr", which the
optimizers read at every step), gradient accumulation (the optimizers read .grad at step time), clipping
(done by the Trainer before optimizer.step()), bf16/fp16 (LoRA-Pro keeps fp32 state whatever the parameter
dtype), DDP via torchrun, and checkpoints: the optimizer's state is the Trainer's optimizer.pt, the
allocator's is `rank_allocator.pt` written into each checkpoint folder by the callback, so
`trainer.train(resume_from_checkpoint=...)` continues exactly.

DeepSpeed: LoRAProTrainer runs both modes under the Trainer's ZeRO-1/2 (unpatched DeepSpeed, see the class).
Not supported (an error says so): ZeRO-3 under the Trainer (use `loralib.train.train(..., deepspeed_config=)`),
weight decay in the full mode under DeepSpeed, and `optim="sgd"` (the released code's trick for its patched
DeepSpeed; here the optimizer is LoRA-Pro's own).

Importing this module imports transformers; `import loralib` does not.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

try:
    from transformers import Trainer, TrainerCallback, TrainingArguments
except ImportError as error:  # the core needs only torch; this integration needs transformers
    raise ImportError("loralib.hf needs transformers (pip install transformers)") from error
from accelerate.utils.deepspeed import DeepSpeedEngineWrapper  # accelerate comes with the Trainer

from .config import LoRAConfig
from .methods import Method, OptimizerSettings, build_optimizer, make_method
from .optim.loraplus import DEFAULT_LR_EMBEDDING
from .optim.lorapro import LoRAProAdamW, check_released_options

ALLOCATOR_STATE_NAME = "rank_allocator.pt"


def trainer_method(name: str, model: nn.Module, **settings) -> Method:
    """The registry's Method `name` for a model whose adapters are already built (by PEFT or loralib.inject):
    its LoRAConfig is loralib's own when the model carries one (model.loralib_config, so that make_method can
    check it, e.g. DoRA with LoRA-Pro), else one standing for the layers present (the optimizers read the layers,
    not this config)."""
    config = getattr(model, "loralib_config", None)
    return make_method(name, config if isinstance(config, LoRAConfig) else LoRAConfig(target_modules=".*"),
                       **settings)


# -- LoRA+ ----------------------------------------------------------------------------------------

@dataclass
class LoraPlusTrainingArguments(TrainingArguments):
    """TrainingArguments plus LoRA+'s two (the seed's names): lr_B = loraplus_lr_ratio * learning_rate,
    embedding LoRA factors at loraplus_lr_embedding."""

    loraplus_lr_ratio: Optional[float] = field(
        default=None, metadata={"help": "lr_B / lr_A (LoRA+'s lambda, e.g. 16); required by LoraPlusTrainer"})
    loraplus_lr_embedding: Optional[float] = field(
        default=DEFAULT_LR_EMBEDDING, metadata={"help": "learning rate of embedding layers' LoRA factors"})


def loraplus_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """The optimizer `args.optim` names (with its lr, betas, eps), over create_loraplus_optimizer's four
    groups (the registry's "loraplus"); args.weight_decay applies to the decayed groups (biases and LayerNorm
    take none)."""
    ratio = getattr(args, "loraplus_lr_ratio", None)
    if ratio is None:
        raise ValueError("LoraPlusTrainer: loraplus_lr_ratio is not set; pass LoraPlusTrainingArguments("
                         "..., loraplus_lr_ratio=16) (or use the plain Trainer for LoRA)")
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    settings = OptimizerSettings(lr=args.learning_rate, weight_decay=args.weight_decay,
                                 loraplus_lr_embedding=getattr(args, "loraplus_lr_embedding", None),
                                 base_optimizer=(optimizer_cls, dict(optimizer_kwargs)))
    return build_optimizer(model, trainer_method("loraplus", model, loraplus_ratio=ratio), settings)


class LoraPlusTrainer(Trainer):
    """A Trainer whose optimizer has LoRA+'s parameter groups (loralib.optim.loraplus)."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = loraplus_optimizer(self.model if model is None else model, self.args)
        return self.optimizer


# -- LoRA-Pro -------------------------------------------------------------------------------------

@dataclass
class LoRAProTrainingArguments(TrainingArguments):
    """TrainingArguments plus LoRA-Pro's mode and the released code's rules (each off by default, the corrected
    math; see loralib.optim.lorapro); Adam's betas and eps are the Trainer's adam_beta1/2 and adam_epsilon,
    weight decay is args.weight_decay (on W = W0 + s B A, see loralib.optim.lorapro)."""

    lorapro_mode: str = field(default="full", metadata={
        "help": "'full': Adam moments of the m x n equivalent gradient (the paper's); 'efficient': Adam on A, B"})
    lorapro_decay_base_weight: bool = field(default=False, metadata={
        "help": "weight decay also shrinks the frozen W0 in place (a PEFT checkpoint does not save W0, "
                "so the default decays s B A only)"})
    lorapro_released_clipping: bool = field(default=False, metadata={
        "help": "full mode: scale Adam's direction by max_grad_norm / (the raw LoRA gradients' norm), as the "
                "released DeepSpeed run did, instead of clipping the raw gradients (LoRAProTrainer only)"})
    lorapro_released_weight_decay: bool = field(default=False, metadata={
        "help": "efficient mode: decay A and B each by (1 - lr wd), as released, instead of W"})
    lorapro_released_scaling: bool = field(default=False, metadata={
        "help": "full mode: the released code's hard-coded s = 2 in the rsLoRA step"})


def _released(args: TrainingArguments) -> dict:
    return {f"lorapro_released_{key}": bool(getattr(args, f"lorapro_released_{key}", False))
            for key in ("clipping", "weight_decay", "scaling")}


def lorapro_optimizer(model: nn.Module, args: TrainingArguments, mode: Optional[str] = None) -> LoRAProAdamW:
    """LoRAProAdamW from TrainingArguments, for `Trainer(optimizers=(lorapro_optimizer(model, args), None))`
    or LoRAProTrainer. `mode` defaults to args.lorapro_mode, else "full"."""
    if getattr(args, "lorapro_released_clipping", False) and args.max_grad_norm:
        raise ValueError("lorapro_released_clipping: a plain Trainer clips the raw gradients at max_grad_norm "
                         "before the optimizer, which undoes the released rule; use LoRAProTrainer")
    return _lorapro_optimizer(model, args, mode)


def _lorapro_optimizer(model: nn.Module, args: TrainingArguments, mode: Optional[str] = None) -> LoRAProAdamW:
    if getattr(args, "optim", None) == "sgd":
        raise ValueError("LoRA-Pro: optim='sgd' was the released code's trick for its patched DeepSpeed; here "
                         "LoRAProAdamW is the optimizer, leave TrainingArguments.optim at its default")
    if getattr(args, "deepspeed", None):
        raise ValueError("lorapro_optimizer: under the Trainer's DeepSpeed integration use LoRAProTrainer (ZeRO "
                         "flattens a client optimizer's parameters, so LoRAProAdamW cannot be handed to DeepSpeed)")
    method = trainer_method("lorapro", model, lorapro_mode=mode or getattr(args, "lorapro_mode", "full"))
    settings = OptimizerSettings(lr=args.learning_rate, weight_decay=args.weight_decay,
                                 betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                 max_grad_norm=args.max_grad_norm,
                                 lorapro_decay_base_weight=getattr(args, "lorapro_decay_base_weight", False),
                                 **_released(args))
    return build_optimizer(model, method, settings)


class LoRAProTrainer(Trainer):
    """A Trainer that runs LoRAProAdamW (full or efficient, args.lorapro_mode) on the model's LoRA pairs
    (PEFT's LoraConfig layers or loralib's) and AdamW on its other trainable parameters (a head).

    With args.lorapro_released_clipping the Trainer does not clip the raw gradients: LoRAProAdamW scales Adam's
    direction by max_grad_norm / (their norm), the released rule (under DeepSpeed: ZeROLoRAProFull's).

    Under the Trainer's DeepSpeed ZeRO-1/2 (`args.deepspeed`) both modes run through
    loralib.optim.deepspeed_lorapro, unpatched, the LoRA-Pro part inside accelerate's DeepSpeed backward(),
    between engine.backward() and engine.step() on each accumulation boundary:
    - efficient: DeepSpeed's partitioned AdamW (the config's "optimizer", else torch's AdamW with the
      Trainer's lr, betas, eps and weight decay, decoupled on each factor) steps on the reduced gradients
      that `adjust_zero_gradients` replaced by LoRA-Pro's; DeepSpeed clips (args.max_grad_norm) the
      adjusted gradients.
    - full: `ZeROLoRAProFull` keeps the m x n moments sharded by pair over the ranks (saved per rank with each
      checkpoint as lorapro_full_rank<k>.pt) and writes Adam's directions as gradients, which DeepSpeed
      applies with plain SGD at the scheduled lr; the raw gradients are clipped at args.max_grad_norm first
      and DeepSpeed's own clipping is turned off. weight_decay > 0 is refused there (the paper uses 0).
    ZeRO-3 is refused (use loralib.train.train with deepspeed_config=, which runs it).
    """

    _zero_full = None  # the full mode's ZeROLoRAProFull under DeepSpeed

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            if self.is_deepspeed_enabled:
                self.optimizer = self._zero_client_optimizer(opt_model)
            else:
                self.optimizer = _lorapro_optimizer(opt_model, self.args)
        return self.optimizer

    def _clip_grad_norm(self, model):
        if getattr(self.args, "lorapro_released_clipping", False) and not self.is_deepspeed_enabled:
            return None  # the optimizer clips (released rule); the Trainer then logs the unclipped norm
        return super()._clip_grad_norm(model)

    def _zero_client_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer DeepSpeed partitions; LoRA-Pro itself acts on the gradients (training_step)."""
        from .optim.deepspeed_lorapro import ZeROLoRAProFull, sgd_for_full_mode
        from .optim.lorapro import lora_pairs

        args = self.args
        mode = getattr(args, "lorapro_mode", "full")
        config = args.hf_deepspeed_config.config
        stage = config.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2):
            raise ValueError(f"LoRAProTrainer: DeepSpeed ZeRO stage {stage} is not supported under the Trainer; "
                             "use 1 or 2, or loralib.train.train with deepspeed_config= for ZeRO-3")
        lora_pairs(model)  # a model LoRA-Pro cannot pair fails here, before DeepSpeed starts
        released = _released(args)
        check_released_options(mode, released["lorapro_released_clipping"] and args.max_grad_norm,
                               released["lorapro_released_weight_decay"], released["lorapro_released_scaling"])
        if mode == "efficient":
            return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                     betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                     weight_decay=args.weight_decay)
        if mode != "full":
            raise ValueError(f"lorapro_mode must be 'full' or 'efficient', got {mode!r}")
        if args.weight_decay or "optimizer" in config:
            raise ValueError("LoRAProTrainer: the full mode under DeepSpeed runs DeepSpeed's plain SGD on Adam's "
                             "directions: set weight_decay=0 (the paper's) and no 'optimizer' in the DeepSpeed "
                             "config, or use lorapro_mode='efficient'")
        config["gradient_clipping"] = 0.0  # ZeROLoRAProFull clips the raw gradients itself
        self._zero_full = ZeROLoRAProFull((args.adam_beta1, args.adam_beta2), args.adam_epsilon,
                                          max_grad_norm=args.max_grad_norm,
                                          released_clipping=released["lorapro_released_clipping"],
                                          released_scaling=released["lorapro_released_scaling"])
        return sgd_for_full_mode(model, args.learning_rate)

    def training_step(self, model, inputs, num_items_in_batch=None):
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if wrapped is not None and not isinstance(wrapped, _LoRAProEngineWrapper):
            from .optim.deepspeed_lorapro import adjust_zero_gradients

            adjust = self._zero_full.adjust if self._zero_full is not None else adjust_zero_gradients
            self.accelerator.deepspeed_engine_wrapped = _LoRAProEngineWrapper(wrapped.engine, adjust)
        return super().training_step(model, inputs, num_items_in_batch)

    def _full_state_path(self, folder: str) -> str:
        return os.path.join(folder, f"lorapro_full_rank{self.args.process_index}.pt")

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._zero_full is not None:
            torch.save(self._zero_full.state_dict(), self._full_state_path(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self._zero_full is not None:
            path = self._full_state_path(checkpoint)
            if not os.path.isfile(path):
                raise ValueError(f"LoRAProTrainer: {path} is missing; the checkpoint was not written by the full "
                                 "mode under DeepSpeed with this number of processes")
            self._zero_full.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))


class _LoRAProEngineWrapper(DeepSpeedEngineWrapper):
    """accelerate's DeepSpeedEngineWrapper.backward with `adjust(engine)` right before engine.step()."""

    def __init__(self, engine, adjust):
        super().__init__(engine)
        self.adjust = adjust

    def backward(self, loss, sync_gradients=True, **kwargs):
        self.engine.set_gradient_accumulation_boundary(is_boundary=sync_gradients)
        self.engine.backward(loss, **kwargs)
        if sync_gradients:
            self.adjust(self.engine)
            self.engine.step()


# -- AdaLoRA / LoRA² rank allocation -------------------------------------------------------------

class RankAllocatorCallback(TrainerCallback):
    """Drives a loralib RankAllocator (AdaLoRA's SVDLinear, LoRA2RankAllocator for LoRA²) from a Trainer.

    `on_optimizer_step` fires right after optimizer.step() and before the scheduler step and zero_grad
    (transformers 5.23's _inner_training_loop), so the gradients the allocator scores are still there;
    the step passed is `state.global_step` there, the number of optimizer steps completed before this one
    (0 on the first), as AdaLoRA's released trainer and loralib.train do. A step the fp16 scaler skipped
    allocates nothing (as in loralib.train). total_step, when the allocator has none, is the Trainer's
    max_steps. Not under the Trainer's DeepSpeed (a ValueError; loralib.train does ZeRO-1/2 allocation).
    Every checkpoint folder gets the allocator's state (rank_allocator.pt, written by the main
    process); a run resumed from `<output_dir>/checkpoint-<step>` reloads it, or give `resume_from=` the
    folder. Under DDP every rank allocates on the same all-reduced gradients, so the masks agree.

    PEFT's AdaLoRA layers (peft.tuners.adalora) are not scored by our allocator: they are another class
    with their own parameter layout, and PEFT ships its own allocator. Passing the PEFT AdaLoRA model itself,
    `RankAllocatorCallback(peft_model)`, drives PEFT's allocator at the same point (PeftAdaLoraAllocator):
    the step PEFT's users miss (PEFT issues #432, #1801: "the rank never changes" because the Trainer never
    calls update_and_allocate). For our allocator on a transformers model, build it with
    `loralib.inject(model, targets, method="adalora")` (or "lora2").
    """

    def __init__(self, allocator, resume_from: Optional[str] = None):
        if callable(getattr(getattr(allocator, "base_model", None), "update_and_allocate", None)):
            allocator = PeftAdaLoraAllocator(allocator)
        if not callable(getattr(allocator, "update_and_mask", None)):
            raise ValueError(f"RankAllocatorCallback: {type(allocator).__name__} has no update_and_mask(model, "
                             "step); pass a loralib.adalora.RankAllocator or loralib.lora2.LoRA2RankAllocator")
        self.allocator = allocator
        self.resume_from = resume_from

    def on_train_begin(self, args, state, control, **kwargs):
        if getattr(args, "deepspeed", None):
            # ZeRO keeps the gradients partitioned and zeroes them inside engine.step(), before this callback
            # runs, and its fp32 master copies would restore the masked E.
            raise ValueError("RankAllocatorCallback under the Trainer's DeepSpeed is not supported; use torchrun "
                             "(DDP), or loralib.train.train(..., allocator=, deepspeed_config=) for ZeRO-1/2")
        if getattr(self.allocator, "total_step", 0) is None:
            self.allocator.set_total_step(state.max_steps)
        if state.global_step > 0:  # resumed: the Trainer has loaded trainer_state.json
            folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            path = os.path.join(folder, ALLOCATOR_STATE_NAME)
            if not os.path.isfile(path):
                raise ValueError(f"RankAllocatorCallback: resuming at step {state.global_step} but {path} does not "
                                 "exist; pass RankAllocatorCallback(allocator, resume_from=<checkpoint folder>)")
            self.allocator.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(optimizer, "step_was_skipped", False):
            return
        self.allocator.update_and_mask(model, state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            torch.save(self.allocator.state_dict(), os.path.join(folder, ALLOCATOR_STATE_NAME))


class PeftAdaLoraAllocator:
    """PEFT's own AdaLoRA allocator behind our allocator's interface, for RankAllocatorCallback:
    update_and_mask(model, step) is `peft_model.base_model.update_and_allocate(step)`; the state (PEFT's
    importance EMAs by parameter name and the adapter config's rank_pattern) goes with the checkpoint.
    PEFT's AdaLoraModel adds its orthogonality penalty to the loss itself.

    Resume: a Trainer checkpoint written after PEFT's first pruning holds the adapter trimmed to its
    rank_pattern (PEFT's save_pretrained), which the Trainer cannot load back into the untrimmed model;
    checkpoints before pruning resume exactly. loralib's AdaLoRA saves untrimmed and resumes at any step."""

    def __init__(self, peft_model: nn.Module):
        self.peft_model = peft_model
        self.last_step: Optional[int] = None

    @property
    def _config(self):
        tuner = self.peft_model.base_model
        return tuner.peft_config[tuner.trainable_adapter_name]

    @property
    def total_step(self):
        return self._config.total_step

    def set_total_step(self, total_step: int) -> None:
        self.peft_model.base_model.rankallocator.set_total_step(total_step)

    def update_and_mask(self, model, global_step: int) -> None:
        self.peft_model.base_model.update_and_allocate(global_step)
        self.last_step = global_step

    def state_dict(self) -> dict:
        allocator = self.peft_model.base_model.rankallocator
        return {"last_step": self.last_step, "rank_pattern": self._config.rank_pattern,
                **{key: dict(getattr(allocator, key)) for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")}}

    def load_state_dict(self, state: dict) -> None:
        allocator = self.peft_model.base_model.rankallocator
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, dict(state[key]))
        self._config.rank_pattern = state["rank_pattern"]
        self.last_step = state["last_step"]


class RegularizedTrainer(Trainer):
    """A Trainer that adds `regularizer(model)` to each micro-batch's loss, e.g. AdaLoRA's orthogonality
    penalty `lambda m: loralib.compute_orth_regu(m, regu_weight=0.1)` (as loralib.train's regularizer=)."""

    def __init__(self, *args, regularizer: Optional[Callable[[nn.Module], torch.Tensor]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.regularizer = regularizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch, **kwargs)
        if self.regularizer is not None:
            penalty = self.regularizer(self.model)
            # When the model normalised its loss by the accumulation group's token count, training_step
            # does not divide by the accumulation steps: the penalty is divided here, so each optimizer
            # step sees it once, as loralib.train's (loss + regularizer) / n.
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                    or self.compute_loss_func is not None
            if scaled and model.training:
                penalty = penalty / self.current_gradient_accumulation_steps
            loss = loss + penalty
        return (loss, outputs) if return_outputs else loss
