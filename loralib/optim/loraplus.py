"""LoRA+ (Hayou, Ghosh, Yu, ICML 2024): a larger learning rate for B than for A.

With W = W0 + s B A, LoRA+ trains B with lr_B = ratio * lr_A. The optimizer is an ordinary one; only its
parameter groups change (over the trainable parameters, in this order):

    group      members                                          lr                 weight decay
    lora_A     everything not listed below                      lr                 wd
    embedding  LoRA factors of embedding layers                 lr_embedding       wd
    lora_B     names containing "lora_B", and every 1-D param   lr * ratio         wd
    lora_B_nd  the part of lora_B that takes no decay           lr * ratio         0
               (biases, LayerNorm parameters)

"Embedding LoRA factors" are `lora_A`/`lora_B` of a `loralib.Embedding` and PEFT's `lora_embedding_A`/
`lora_embedding_B`. The groups equal PEFT's `peft.optimizers.create_loraplus_optimizer` (tested).

Two deliberate differences from the released code:
- The original `get_module` looked two levels up for any name containing "lora", so it never found the
  embedding of microsoft's loralib (`emb.lora_A` sits directly on the layer); here both layouts work.
- PEFT's keyword version overrides every group's weight decay with `loraplus_weight_decay` (default 0),
  silently dropping `weight_decay=`; here `weight_decay` applies as in the original, and
  `loraplus_weight_decay`, when given, takes precedence.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Type

import torch
import torch.nn as nn

from .. import layers
from ..config import _swap_init

DEFAULT_LR_EMBEDDING = 1e-6
# transformers' ALL_LAYERNORM_LAYERS, which both reference implementations use for the no-decay split.
NO_DECAY_LAYER_TYPES = (nn.LayerNorm,)
_EIGHT_BIT = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def _no_decay_names(model: nn.Module) -> set:
    """Names of parameters that take no weight decay: biases and parameters inside a LayerNorm."""
    inside_norm = set()
    for module in model.modules():
        if module is not model and isinstance(module, NO_DECAY_LAYER_TYPES):
            inside_norm.update(id(p) for p in module.parameters())
    return {name for name, p in model.named_parameters() if "bias" in name or id(p) in inside_norm}


def _is_embedding_factor(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    if "lora_embedding_A" in parts or "lora_embedding_B" in parts:  # PEFT's lora.Embedding
        return True
    if parts[-1] not in ("lora_A", "lora_B"):
        return False
    owner = model.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else model
    return isinstance(owner, layers.Embedding)


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float,
                          loraplus_lr_embedding: Optional[float] = None,
                          weight_decay: float = 0.0) -> List[Dict[str, Any]]:
    """The four LoRA+ parameter groups (see the module docstring), for any optimizer or training loop.

    Each group is {"name", "params", "lr", "weight_decay"}; empty groups are kept so that group i always
    means the same thing (as in both reference implementations).
    """
    if loraplus_lr_ratio is None:
        raise ValueError("loraplus_lr_ratio is required (lr_B / lr_A, e.g. 16)")
    if not (isinstance(loraplus_lr_ratio, (int, float)) and math.isfinite(loraplus_lr_ratio)
            and loraplus_lr_ratio > 0):
        raise ValueError(f"loraplus_lr_ratio must be a positive number, got {loraplus_lr_ratio!r}")
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"lr must be a non-negative number, got lr={lr!r}")
    lr_embedding = DEFAULT_LR_EMBEDDING if loraplus_lr_embedding is None else loraplus_lr_embedding
    no_decay = _no_decay_names(model)

    members: Dict[str, List[torch.Tensor]] = {"lora_A": [], "embedding": [], "lora_B": [], "lora_B_nd": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _is_embedding_factor(model, name):
            members["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            members["lora_B_nd" if name in no_decay else "lora_B"].append(param)
        else:
            members["lora_A"].append(param)

    lr_B = lr * loraplus_lr_ratio
    return [
        {"name": "lora_A", "params": members["lora_A"], "lr": lr, "weight_decay": weight_decay},
        {"name": "embedding", "params": members["embedding"], "lr": lr_embedding, "weight_decay": weight_decay},
        {"name": "lora_B", "params": members["lora_B"], "lr": lr_B, "weight_decay": weight_decay},
        {"name": "lora_B_nd", "params": members["lora_B_nd"], "lr": lr_B, "weight_decay": 0.0},
    ]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: Type[torch.optim.Optimizer],
                              optimizer_kwargs: Optional[Dict[str, Any]] = None,
                              loraplus_lr_ratio: Optional[float] = None,
                              loraplus_lr_embedding: Optional[float] = None,
                              **kwargs) -> torch.optim.Optimizer:
    """An `optimizer_cls` over the LoRA+ groups of `model`. Both call styles work:

        create_loraplus_optimizer(model, torch.optim.AdamW, {"lr": 2e-4, "weight_decay": 0.01}, 16)   # original
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16, eps=1e-6)  # PEFT's

    Every other keyword (betas, eps, ...) goes to the optimizer. `loraplus_lr_embedding` defaults to 1e-6;
    `loraplus_weight_decay` (PEFT's name) overrides `weight_decay` for the decayed groups.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"create_loraplus_optimizer: model must be an nn.Module, got {type(model).__name__}")
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
        raise ValueError("create_loraplus_optimizer: optimizer_kwargs must be a dict such as {'lr': 2e-4}, "
                         f"got {type(optimizer_kwargs).__name__}")
    opt_kwargs = dict(optimizer_kwargs or {})
    for key, value in kwargs.items():
        if key in opt_kwargs and opt_kwargs[key] != value:
            raise ValueError(f"create_loraplus_optimizer: {key!r} given twice with different values "
                             f"({opt_kwargs[key]!r} in optimizer_kwargs, {value!r} as a keyword)")
        opt_kwargs[key] = value
    if "lr" not in opt_kwargs:
        raise ValueError("create_loraplus_optimizer: no learning rate; pass optimizer_kwargs={'lr': ...} or lr=...")
    lr_embedding = opt_kwargs.pop("loraplus_lr_embedding", None)
    if loraplus_lr_embedding is not None:
        lr_embedding = loraplus_lr_embedding
    loraplus_wd = opt_kwargs.pop("loraplus_weight_decay", None)
    weight_decay = loraplus_wd if loraplus_wd is not None else opt_kwargs.get("weight_decay", 0.0)

    groups = loraplus_param_groups(model, opt_kwargs["lr"], loraplus_lr_ratio, lr_embedding, weight_decay)
    optimizer = optimizer_cls(groups, **opt_kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT:
        # 8-bit state is unstable for embeddings; both references keep them in 32 bits.
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def apply_swapped_init(model: nn.Module) -> int:
    """Re-initialise every LoRA linear/conv layer the LoRA+ experiments' way: B kaiming-uniform, A zeros.

    Covers loralib's Linear, MergedLinear and Conv layers and PEFT's LoRA Linear. Embeddings are left as
    they are: their default already has A = 0 and B random. `LoRAConfig(init_swapped=True)` does the same
    at construction. Returns the number of layers re-initialised.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, (layers.Linear, layers.MergedLinear, layers.ConvLoRA)) and module.has_lora:
            _swap_init(module)
            count += 1
        elif isinstance(getattr(module, "lora_A", None), nn.ModuleDict):  # PEFT: one nn.Linear per adapter
            for key, down in module.lora_A.items():
                if key in module.lora_B:
                    with torch.no_grad():
                        nn.init.zeros_(down.weight)
                        nn.init.kaiming_uniform_(module.lora_B[key].weight, a=math.sqrt(5))
                    count += 1
    return count
