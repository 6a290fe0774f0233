"""The method registry: every fine-tuning method once, by the name written in results.

    entry = method_entry("lora-pro")        # aliases resolve: entry.name == "lorapro"
    method = make_method("lorapro", LoRAConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj")),
                         lorapro_mode="full")
    optimizer = build_optimizer(model, method, OptimizerSettings(lr=2e-5))
    config, factory, callbacks, groups = training_hooks(method, train_config, settings)

An entry says what a method is made of:
    layer       the LoRAConfig.method of its layers: "lora" (B A), "adalora" (SVDLinear, P diag(E) Q),
                "lora2" (LoRA2Linear), or "none" (full fine-tuning: no adapter, every weight trained)
    optimizer   "adamw" (AdamW, no decay on 1-d tensors, as transformers' Trainer), "loraplus" (B's learning
                rate x ratio, loralib.optim.loraplus) or "lorapro" (LoRAProAdamW, full or efficient variant)
    allocates   an AdaLoRA-style rank allocator may run (`rank_allocator`), with the orthogonal regularizer
                (`regularizer`) of its layers
    lora        LoRAConfig fields the method fixes: rsLoRA's scaling, DoRA's magnitude, PiSSA's / LoRA-GA's init

Every entry point (the GLUE, instruction, NLG and T5 runs; loralib.hf's Trainer) asks this module for the
method's layers, optimizer (one device, DDP and DeepSpeed alike), regularizer and allocator, so a new method is
one entry here plus its layer or optimizer file.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .config import LoRAConfig

LAYERS = ("none", "lora", "adalora", "lora2")
OPTIMIZERS = ("adamw", "loraplus", "lorapro")
LORAPRO_MODES = ("full", "efficient")


@dataclass(frozen=True)
class MethodEntry:
    """One method: its result name, the other names it answers to, and what it is made of."""

    name: str
    summary: str
    aliases: Tuple[str, ...] = ()
    layer: str = "lora"
    optimizer: str = "adamw"
    allocates: bool = False
    lora: Mapping[str, Any] = field(default_factory=dict)

    @property
    def trains_adapter(self) -> bool:
        return self.layer != "none"


ENTRIES: Tuple[MethodEntry, ...] = (
    MethodEntry("full", "every weight trained with AdamW", aliases=("ft", "fft", "full_ft", "full-ft"), layer="none"),
    MethodEntry("lora", "B A beside each frozen projection, AdamW (Hu et al.)"),
    MethodEntry("rslora", "LoRA scaled by alpha / sqrt(r) instead of alpha / r", lora={"use_rslora": True}),
    MethodEntry("dora", "LoRA plus a trained magnitude per output row (loralib.dora)", lora={"use_dora": True}),
    MethodEntry("pissa", "LoRA from W0's top-r singular triplets, the residual frozen",
                lora={"init_lora_weights": "pissa"}),
    MethodEntry("lora-ga", "LoRA from the SVD of W0's gradient", aliases=("loraga", "lora_ga"),
                lora={"init_lora_weights": "lora_ga"}),
    MethodEntry("loraplus", "LoRA with B's learning rate x ratio (LoRA+)", aliases=("lora+", "lora-plus", "lora_plus"),
                optimizer="loraplus"),
    MethodEntry("adalora", "SVD-form factors, importance-driven rank allocation", layer="adalora", allocates=True),
    MethodEntry("lora2", "LoRA² planes, AdaLoRA's allocation on cheaper scores", aliases=("lora²", "lora-2"),
                layer="lora2", allocates=True),
    MethodEntry("lorapro", "LoRA trained on the equivalent full-rank gradient (LoRA-Pro)",
                aliases=("lora-pro", "lora-pro-full", "lora_pro", "lorapro-full"), optimizer="lorapro"),
    MethodEntry("rslora-pro", "LoRA-Pro with rsLoRA's scaling", aliases=("rslora-pro-full", "rslorapro"),
                optimizer="lorapro", lora={"use_rslora": True}),
)
REGISTRY: Dict[str, MethodEntry] = {e.name: e for e in ENTRIES}
_BY_ALIAS: Dict[str, MethodEntry] = {a: e for e in ENTRIES for a in (e.name,) + e.aliases}


def method_names() -> Tuple[str, ...]:
    return tuple(REGISTRY)


def method_entry(name: str) -> MethodEntry:
    """The entry for a name or alias (case-insensitive); ValueError listing the names otherwise."""
    entry = _BY_ALIAS.get(str(name).strip().lower())
    if entry is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(REGISTRY)} "
                         f"(aliases: {', '.join(a for e in ENTRIES for a in e.aliases)})")
    return entry


@dataclass
class Method:
    """A method with its settings, as one run trains it. lora is None for full fine-tuning.

    lorapro_mode: "full" | "efficient" (LoRA-Pro entries only); loraplus_ratio: B's learning-rate multiple
    (LoRA+ only); allocate: the rank allocator runs (AdaLoRA / LoRA² layers; False trains fixed-rank SVD-form
    factors); reg_orth_coef: weight of the orthogonal regularizer of SVD-form layers (0: none);
    target_rank: the allocator's average final rank per matrix."""

    entry: MethodEntry
    lora: Optional[LoRAConfig] = None
    lorapro_mode: Optional[str] = None
    loraplus_ratio: Optional[float] = None
    allocate: bool = False
    reg_orth_coef: float = 0.0
    target_rank: Optional[int] = None

    @property
    def name(self) -> str:
        """The name written in results (run_config.json "method")."""
        return self.entry.name


def make_method(name: str, lora: Optional[LoRAConfig], *, lorapro_mode: Optional[str] = None,
                loraplus_ratio: Optional[float] = None, allocate: Optional[bool] = None, reg_orth_coef: float = 0.0,
                target_rank: Optional[int] = None, init_lora_weights: Any = None) -> Method:
    """The Method `name` with `lora` completed by the entry's fixed fields (its layer, rsLoRA, DoRA, init).
    init_lora_weights, when given (a flag the user set), wins over the entry's init: `--lora pissa
    --init_lora_weights True` trains from LoRA's init, as the flags say. Settings that belong to another method,
    and combinations that do not compose, raise one ValueError."""
    entry = method_entry(name)
    if entry.layer == "none":
        if lora is not None:
            raise ValueError("full fine-tuning trains every weight: it takes no LoRA configuration")
    else:
        if lora is None:
            raise ValueError(f"method {entry.name!r} needs a LoRAConfig (rank, alpha, target modules)")
        lora = _with_entry_fields(entry, lora, init_lora_weights)
    if entry.optimizer == "lorapro":
        lorapro_mode = lorapro_mode or "full"
        if lorapro_mode not in LORAPRO_MODES:
            raise ValueError(f"lorapro_mode {lorapro_mode!r}: expected one of {LORAPRO_MODES}")
        if lora.use_dora:
            raise ValueError(f"DoRA does not compose with LoRA-Pro ({entry.name}): LoRA-Pro's equivalent gradient "
                             "is that of W0 + s B A, which DoRA rescales")
    elif lorapro_mode is not None:
        raise ValueError(f"lorapro_mode applies to LoRA-Pro, not to method {entry.name!r}")
    if entry.optimizer == "loraplus":
        loraplus_ratio = 16.0 if loraplus_ratio is None else loraplus_ratio
        if not loraplus_ratio > 0:
            raise ValueError(f"loraplus_lr_ratio must be > 0, got {loraplus_ratio}")
    elif loraplus_ratio is not None:
        raise ValueError(f"loraplus_lr_ratio applies to LoRA+ (loraplus), not to method {entry.name!r}")
    svd_form = entry.layer in ("adalora", "lora2")
    allocate = entry.allocates if allocate is None else allocate
    if allocate and not svd_form:
        raise ValueError(f"rank allocation needs SVD-form layers (adalora, lora2), not method {entry.name!r}")
    if reg_orth_coef < 0:
        raise ValueError(f"reg_orth_coef must be >= 0, got {reg_orth_coef}")
    if reg_orth_coef > 0 and not svd_form:
        raise ValueError(f"the orthogonal regularizer acts on SVD-form layers (adalora, lora2), not method "
                         f"{entry.name!r}")
    if target_rank is not None and not svd_form:
        raise ValueError(f"target_rank applies to adalora / lora2, not method {entry.name!r}")
    return Method(entry, lora, lorapro_mode, loraplus_ratio, bool(allocate), reg_orth_coef, target_rank)


def _with_entry_fields(entry: MethodEntry, lora: LoRAConfig, init_lora_weights: Any = None) -> LoRAConfig:
    changes: Dict[str, Any] = {"method": "lora" if entry.layer == "lora" else entry.layer}
    for key, value in entry.lora.items():
        if key == "init_lora_weights" and lora.init_lora_weights is not True:
            continue  # an init set in the config wins (e.g. pissa_niter_4 for "pissa")
        changes[key] = value
    if init_lora_weights is not None:
        changes["init_lora_weights"] = init_lora_weights
    if all(getattr(lora, k) == v for k, v in changes.items()):
        return lora
    try:
        return lora.replace(**changes)
    except ValueError as err:
        raise ValueError(f"method {entry.name!r}: {err}") from None


# -- the optimizer ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer's hyper-parameters, whatever the method. The lorapro_released_* rules are the released
    LoRA-Pro code's (loralib.optim.lorapro); released clipping applies max_grad_norm inside the optimizer.
    lorapro_decay_base_weight: LoRA-Pro's weight decay also shrinks the frozen W0 in place (loralib.hf's option).
    base_optimizer: (class, keyword arguments) the AdamW-family methods (adamw, loraplus) run instead of torch's
    AdamW with lr / betas / eps, e.g. what transformers' TrainingArguments.optim names (loralib.hf)."""

    lr: float
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 0.0
    loraplus_lr_embedding: Optional[float] = None
    lorapro_released_clipping: bool = False
    lorapro_released_weight_decay: bool = False
    lorapro_released_scaling: bool = False
    lorapro_decay_base_weight: bool = False
    base_optimizer: Optional[Tuple[Callable[..., torch.optim.Optimizer], Mapping[str, Any]]] = None
    # which AdamW an "adamw" method trains with: "torch" (torch.optim.AdamW, no decay on 1-d tensors) or
    # "lora-repo" (loralib.optim.gpt2ft: the LoRA paper's GPT-2 AdamW, bias correction only with
    # correct_bias, decay on every tensor but biases and LayerNorm weights under no_decay_bias)
    adamw: str = "torch"
    correct_bias: bool = True
    no_decay_bias: bool = False

    def lorapro_released(self) -> Dict[str, bool]:
        return {"clipping": self.lorapro_released_clipping, "weight_decay": self.lorapro_released_weight_decay,
                "scaling": self.lorapro_released_scaling}


def adamw_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """The trainable tensors in transformers' Trainer split: decay on matrices, none on 1-d tensors."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = ({"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, method: Method, settings: OptimizerSettings) -> torch.optim.Optimizer:
    """The method's optimizer over `model`'s trainable tensors (one process or DDP; see `training_hooks`
    for DeepSpeed)."""
    from .optim import LoRAProAdamW, create_loraplus_optimizer

    s = settings
    if s.adamw != "torch":
        return _lora_repo_adamw(model, method, s)
    if method.entry.optimizer == "lorapro":
        return LoRAProAdamW(model, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay,
                            mode=method.lorapro_mode, decay_base_weight=s.lorapro_decay_base_weight,
                            released_clip_norm=s.max_grad_norm if s.lorapro_released_clipping else 0.0,
                            released_weight_decay=s.lorapro_released_weight_decay,
                            released_scaling=s.lorapro_released_scaling)
    if s.lorapro_released_clipping or s.lorapro_released_weight_decay or s.lorapro_released_scaling:
        raise ValueError(f"the released LoRA-Pro rules apply to LoRA-Pro, not to method {method.name!r}")
    cls, kwargs = s.base_optimizer or (torch.optim.AdamW, {"lr": s.lr, "betas": s.betas, "eps": s.eps})
    if method.entry.optimizer == "loraplus":
        extra = {} if s.loraplus_lr_embedding is None else {"loraplus_lr_embedding": s.loraplus_lr_embedding}
        return create_loraplus_optimizer(model, cls, dict(kwargs), loraplus_lr_ratio=method.loraplus_ratio,
                                         weight_decay=s.weight_decay, **extra)
    return cls(adamw_groups(model, s.weight_decay), **kwargs)


def _lora_repo_adamw(model: nn.Module, method: Method, s: OptimizerSettings) -> torch.optim.Optimizer:
    from .optim.gpt2ft import GPT2FTAdamW, lora_repo_groups

    if s.adamw != "lora-repo":
        raise ValueError(f"OptimizerSettings.adamw {s.adamw!r}: expected 'torch' or 'lora-repo'")
    if method.entry.optimizer != "adamw":
        raise ValueError(f"the LoRA repo's AdamW (adamw='lora-repo') trains AdamW methods, not {method.name!r}")
    return GPT2FTAdamW(lora_repo_groups(model, s.weight_decay, s.no_decay_bias), lr=s.lr, betas=s.betas, eps=s.eps,
                       weight_decay=s.weight_decay, correct_bias=s.correct_bias)


def group_summary(optimizer: torch.optim.Optimizer) -> List[dict]:
    """What train_results.json records of an optimizer: each group's name, lr, weight decay and size."""
    return [{"name": g.get("name", f"group{i}"), "lr": g["lr"], "weight_decay": g.get("weight_decay", 0.0),
             "num_tensors": len(g["params"]), "numel": sum(p.numel() for p in g["params"])}
            for i, g in enumerate(optimizer.param_groups)]


def training_hooks(method: Method, config, settings: OptimizerSettings):
    """(config, optimizer_factory, callbacks, groups) for loralib.train.train: the method's optimizer on one
    device, under DDP and under DeepSpeed. `groups` fills with `group_summary` of the optimizer once it is
    built. Under DeepSpeed, LoRA-Pro runs as loralib.optim.deepspeed_lorapro says; an AdamW method with a
    DeepSpeed config that has its own 'optimizer' section gets DeepSpeed's optimizer (factory None)."""
    groups: List[dict] = []
    deepspeed = getattr(config, "deepspeed_config", None)
    if deepspeed is not None and method.entry.optimizer == "lorapro":
        from .optim.deepspeed_lorapro import lorapro_under_deepspeed

        config, factory, callbacks = lorapro_under_deepspeed(
            config, method.lorapro_mode, settings.betas, settings.eps, settings.lorapro_released_clipping,
            settings.lorapro_released_scaling)
        return config, factory, callbacks, groups
    if deepspeed is not None and method.entry.optimizer == "adamw" and _has_optimizer_section(deepspeed):
        return config, None, None, groups
    if settings.lorapro_released_clipping:  # LoRAProAdamW clips the direction (the released rule), not the loop
        config = dataclasses.replace(config, max_grad_norm=0.0)

    def factory(model: nn.Module) -> torch.optim.Optimizer:
        optimizer = build_optimizer(model, method, settings)
        groups[:] = group_summary(optimizer)
        return optimizer

    return config, factory, None, groups


def _has_optimizer_section(deepspeed) -> bool:
    from .train.distributed import read_deepspeed_config

    return "optimizer" in (deepspeed if isinstance(deepspeed, dict) else read_deepspeed_config(deepspeed))


# -- regularizer and rank allocator -----------------------------------------------------------------

def regularizer(method: Method) -> Optional[Callable[[nn.Module], torch.Tensor]]:
    """The orthogonal regularizer of the method's SVD-form layers (AdaLoRA's or LoRA²'s), None without one."""
    if method.reg_orth_coef <= 0:
        return None
    from .adalora import compute_orth_regu
    from .lora2 import compute_lora2_orth_regu

    orth = compute_lora2_orth_regu if method.entry.layer == "lora2" else compute_orth_regu
    return functools.partial(orth, regu_weight=method.reg_orth_coef)


@dataclass(frozen=True)
class AllocatorSchedule:
    """AdaLoRA's budget schedule in steps (methods.md §2): hold the initial budget init_warmup steps, shrink
    it cubically to the target, hold the target the last final_warmup steps; mask every mask_interval steps;
    importance EMAs beta1 / beta2. target_total_rank, when given, replaces target_rank x matrices."""

    total_steps: int
    init_warmup: int
    final_warmup: int
    mask_interval: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    target_total_rank: Optional[int] = None


def rank_allocator(model: nn.Module, method: Method, schedule: AllocatorSchedule):
    """The method's rank allocator over `model` (AdaLoRA's RankAllocator, or LoRA²'s on its cheaper scores);
    None when the method does not allocate."""
    if not method.allocate:
        return None
    from .adalora import RankAllocator
    from .lora2 import LoRA2RankAllocator

    cls = LoRA2RankAllocator if method.entry.layer == "lora2" else RankAllocator
    target = method.target_rank if method.target_rank is not None else 0
    return cls(model, lora_r=method.lora.r, target_rank=target, init_warmup=schedule.init_warmup,
               final_warmup=schedule.final_warmup, mask_interval=schedule.mask_interval, beta1=schedule.beta1,
               beta2=schedule.beta2, total_step=schedule.total_steps, target_total_rank=schedule.target_total_rank)
