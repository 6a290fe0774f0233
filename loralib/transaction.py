"""All or nothing for calls that change a model in place (inject, import_peft, load_adapter, merges):

    with model_transaction(model):
        import_peft(model, "adapters/bad")     # raises half-way: the model is as it was before the block

What is snapshot on entry, and put back when the block raises (then the exception propagates):
  - the module tree: every module's children, parameters and buffers (the objects themselves, so a layer the
    call swapped in is dropped and the original module, with its original Parameter objects, is back);
  - the values of every parameter and buffer (copies; restored into the same Parameter objects, so optimizers
    and references held outside stay valid), and every parameter's requires_grad (also where `tensors`
    leaves its value uncopied);
  - every module's plain attributes (training mode, LoRA's merged / scaling / r, model.loralib_config, ...),
    dict-valued ones (hooks) copied one level deep.
Cost: one copy of the tensors the `tensors` filter selects (all by default), on `copy_device` (default: where
each tensor lives; "cpu" spares accelerator memory). Not covered: changes outside the model (files, global
state) and in-place changes inside non-tensor attribute objects.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

_TREE = ("_modules", "_parameters", "_buffers")


def _module_state(module: nn.Module) -> Tuple[dict, dict, dict, dict]:
    attrs = {k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items() if k not in _TREE}
    return attrs, dict(module._modules), dict(module._parameters), dict(module._buffers)


@contextlib.contextmanager
def model_transaction(model: nn.Module, tensors: Optional[Callable[[str, torch.Tensor], bool]] = None,
                      copy_device: Optional[str] = None):
    """Restore `model` exactly (tree, values, flags) if the block raises. tensors(name, tensor) -> bool limits
    which values are copied (default all: a call that merges writes into the frozen weights)."""
    modules: List[nn.Module] = list(model.modules())
    states = [(m, _module_state(m)) for m in modules]
    copies: Dict[int, Tuple[torch.Tensor, torch.Tensor, bool]] = {}
    # every parameter's flag, copied or not (freezing is cheap to undo and a failed call may have frozen all)
    flags = [(p, p.requires_grad) for p in {id(p): p for p in model.parameters()}.values()]
    for prefix, module in model.named_modules(remove_duplicate=True):
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(module, kind).items():
                full = f"{prefix}.{name}" if prefix else name
                if t is None or id(t) in copies or (tensors is not None and not tensors(full, t)):
                    continue
                saved = t.detach().to(copy_device, copy=True) if copy_device else t.detach().clone()
                copies[id(t)] = (t, saved, t.requires_grad)
    try:
        yield model
    except BaseException:
        for module, (attrs, children, params, buffers) in states:
            for key in [k for k in module.__dict__ if k not in _TREE and k not in attrs]:
                del module.__dict__[key]  # attributes the call added (model.loralib_config, ...)
            module.__dict__.update(attrs)
            for kind, saved in zip(_TREE, (children, params, buffers)):
                current = getattr(module, kind)
                current.clear()
                current.update(saved)
        with torch.no_grad():
            for t, saved, requires_grad in copies.values():
                t.data = saved.to(t.device) if saved.device != t.device else saved
                if isinstance(t, nn.Parameter):
                    t.requires_grad_(requires_grad)
            for p, requires_grad in flags:
                p.requires_grad_(requires_grad)
        raise
