"""DeepSpeed ZeRO-3 support for the loop: whole tensors out of a partitioned model, and back in.

Under ZeRO-3 every parameter, the LoRA factors included, lives in 1/world_size slices: `p.data` is an
empty tensor on every rank and DeepSpeed's hooks gather a module's parameters for the length of its
forward. What the loop needs whole it gathers here, one module at a time, on every rank together (the
gathers are collectives):

- `gathered_state_dict(model, keep)`: the model's state dict with the kept parameters whole, as CPU
  copies (the adapter files, and the full model of save_full_model), never more than one module's
  parameters gathered at once on the device;
- `writable(model, names)`: a context in which the named parameters are whole and rank 0's values are
  scattered back into the partitions on exit (loading the best adapter at the end of a run);
- `disable_merging(model)`: LoRA layers must not merge B A into W on eval(): W is a slice there.

Without ZeRO-3 (no parameter carries DeepSpeed's `ds_id`), each function is the plain operation.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn

from ..layers import LoRALayer


def is_partitioned(model: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the model's parameters."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _gather(params, modifier_rank: Optional[int] = None):
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def gathered_state_dict(model: nn.Module, keep: Callable[[str, nn.Parameter], bool] = lambda name, p: True
                        ) -> Dict[str, torch.Tensor]:
    """model.state_dict() with every parameter `keep(name, p)` accepts gathered whole (CPU copies); the
    others and the buffers as state_dict() gives them. Call on every rank of a ZeRO-3 model."""
    state = model.state_dict()
    if not is_partitioned(model):
        return state
    for prefix, module in model.named_modules():
        own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)]
        own = [(name, p) for name, p in own if name in state and keep(name, p)]
        if not own:
            continue
        with _gather([p for _, p in own]):
            for name, p in own:
                state[name] = p.detach().to("cpu", copy=True)
    return state


@contextlib.contextmanager
def writable(model: nn.Module, names: Iterable[str]):
    """Inside: the named parameters whole on every rank; on exit rank 0's values go back into the
    partitions. Without ZeRO-3, nothing to do."""
    wanted = set(names)
    params = [p for n, p in model.named_parameters() if n in wanted]
    with _gather(params, modifier_rank=0):
        yield


def disable_merging(model: nn.Module) -> int:
    """Keep every LoRA layer unmerged from now on (ZeRO-3: W is a partition, B A cannot be added to it).
    Returns the number of layers changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, LoRALayer) and module.merge_weights:
            module.merge_weights = False
            changed += 1
    return changed
