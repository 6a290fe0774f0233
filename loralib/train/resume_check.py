"""Resume that cannot lie: a resumed run must be the run its checkpoint belongs to.

Restoring the optimizer's state brings back the checkpoint's learning rate, betas and weight decay whatever
the new command says, while the entry point records the new command in run_config.json; a changed LoRA
alpha would silently rescale the loaded factors. So before anything is restored, every setting that changes
the result is compared with the checkpoint's, and the run is refused with each difference named:

    config_differences(saved_config, config)     TrainConfig fields (checkpoint.json "config")
    layer_differences(saved_layers, model)       r, alpha and scaling of every LoRA layer
    optimizer_differences(saved_groups, groups)  the optimizer's hyperparameters per parameter group
                                                 (catches a changed LoRA+ ratio or LoRA-Pro mode too)

Settings that do not change the result (logging, progress bar, checkpoint cadence, workers) may change, and
so may those listed in TrainConfig.resume_overrides: `apply_overrides` then applies them to the restored state.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import torch.nn as nn

from ..layers import LoRALayer

# TrainConfig fields whose change changes the trained weights or the adapter the run ends with
RESULT_SETTINGS = ("lr", "weight_decay", "betas", "eps", "schedule", "warmup_steps", "warmup_ratio",
                   "max_grad_norm", "precision", "eval_strategy", "eval_every", "metric_for_best",
                   "greater_is_better", "load_best_at_end", "merge_lora_for_eval")
# optimizer group entries that are bookkeeping or implementation choices, not hyperparameters
_NOT_HYPER = {"params", "lr", "foreach", "fused", "capturable", "differentiable", "maximize"}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def config_differences(saved: Dict[str, Any], config) -> List[str]:
    """The differing result-changing settings, less those config.resume_overrides allows."""
    now = config.to_dict()
    return [f"{key} (checkpoint {saved[key]!r}, now {now[key]!r})" for key in RESULT_SETTINGS
            if key in saved and not _same(saved[key], now[key]) and key not in config.resume_overrides]


# an allowed override -> the optimizer group entry it shows up in
_GROUP_KEY = {"lr": "initial_lr", "weight_decay": "weight_decay", "betas": "betas", "eps": "eps"}


def apply_overrides(saved: Dict[str, Any], config, optimizer, scheduler) -> Dict[str, list]:
    """After the optimizer and schedule state are restored: apply the allowed changes the restored state would
    undo. lr scales every group's base and current rate (LoRA+ groups keep their ratio); weight_decay, betas and
    eps replace the old value in the groups that had it. The schedule itself (schedule, warmup) is rebuilt from
    the new config anyway. Returns {setting: [checkpoint value, new value]} of what changed (to be logged)."""
    now = config.to_dict()
    changed = {k: [saved[k], now[k]] for k in config.resume_overrides if k in saved and not _same(saved[k], now[k])}
    if "lr" in changed:
        ratio = now["lr"] / saved["lr"] if saved["lr"] else None
        if ratio is None:
            raise ValueError("resume_overrides=('lr',): the checkpoint's lr is 0, a new rate cannot be scaled from it")
        for group in optimizer.param_groups:
            group["initial_lr"], group["lr"] = group["initial_lr"] * ratio, group["lr"] * ratio
        scheduler.base_lrs = [base * ratio for base in scheduler.base_lrs]
    for key in ("weight_decay", "betas", "eps"):
        if key in changed:
            for group in optimizer.param_groups:
                if _same(group.get(key), saved[key]):
                    group[key] = tuple(now[key]) if key == "betas" else now[key]
    return changed


def layer_signature(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """{module name: {"r", "lora_alpha", "scaling"}} of the LoRA layers (what decides how factors are read)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            scaling = getattr(module, "scaling", None)
            out[name] = {"r": getattr(module, "r", None), "lora_alpha": getattr(module, "lora_alpha", None),
                         "scaling": float(scaling) if isinstance(scaling, (int, float)) else None}
    return out


def layer_differences(saved: Dict[str, Dict[str, Any]], model: nn.Module) -> List[str]:
    now = layer_signature(model)
    if set(saved) != set(now):
        gone, new = sorted(set(saved) - set(now)), sorted(set(now) - set(saved))
        return [f"LoRA layers (checkpoint only: {gone[:3]}, now only: {new[:3]})"]
    out = []
    for name in saved:
        for key, value in saved[name].items():
            if not _same(value, now[name].get(key)):
                out.append(f"{name}.{key} (checkpoint {value!r}, now {now[name].get(key)!r})")
    return out[:10] + ([f"... and {len(out) - 10} more"] if len(out) > 10 else [])


def optimizer_differences(saved_groups: Sequence[dict], groups: Sequence[dict], overrides: Sequence[str] = ()) -> List[str]:
    """Compare the checkpoint's optimizer param_groups with the new optimizer's, before loading the state.
    The scheduled "lr" is not compared; "initial_lr" (the schedule's base, set by the scheduler) is, unless
    "lr" is an allowed override (likewise weight_decay, betas, eps)."""
    skip = _NOT_HYPER | {_GROUP_KEY[k] for k in overrides if k in _GROUP_KEY}
    if len(saved_groups) != len(groups):
        return [f"optimizer parameter groups (checkpoint {len(saved_groups)}, now {len(groups)})"]
    out = []
    for i, (old, new) in enumerate(zip(saved_groups, groups)):
        label = new.get("name", f"group {i}")
        if len(old["params"]) != len(new["params"]):
            out.append(f"optimizer {label}: tensors (checkpoint {len(old['params'])}, now {len(new['params'])})")
        for key in sorted(set(old) & set(new) - skip):
            if not _same(old[key], new[key]):
                out.append(f"optimizer {label}: {key} (checkpoint {old[key]!r}, now {new[key]!r})")
    return out


def refuse_if_different(resume_path, differences: List[str]) -> None:
    if differences:
        raise ValueError(
            f"resume_from={str(resume_path)!r}: this run differs from the checkpoint's in settings that change "
            f"the result: {'; '.join(differences)}. Resume with the checkpoint's settings (see its checkpoint.json), "
            "or train into a new output folder")
