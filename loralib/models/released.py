"""microsoft's released GPT-2 NLG adapters (gpt2_{md,lg}_lora_{e2e,dart,webnlg}.pt) in our GPT-2.

Those files are torch.save'd dicts of LoRA factors of c_attn, a MergedLinear with q and v enabled:

    transformer.h.N.attn.c_attn.lora_A   (r * 2, n_embd)      = [A_q; A_v]
    transformer.h.N.attn.c_attn.lora_B   (n_embd * 2, r)      = [B_q; B_v]

possibly under a {"model_state_dict": ...} wrapper and/or with a "module." prefix (saved from a
DistributedDataParallel model). Our MergedLinear uses the same layout, so the factors load as they are.
The file does not record lora_alpha: the paper trained these with r = 4, alpha = 32 (`nlg_lora_config`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..config import LoRAConfig
from .gpt2_checkpoint import plain_state_dict, read_state_dict

Source = Union[str, os.PathLike, Dict[str, torch.Tensor]]

_LORA_KEY = re.compile(r"^(?:transformer\.)?h\.(\d+)\.attn\.c_attn\.lora_([AB])$")
_MASK_BUFFER = re.compile(r"\.attn\.(masked_)?bias$")
_GPT2_SIZES = {768: "gpt2", 1024: "gpt2-medium", 1280: "gpt2-large", 1600: "gpt2-xl"}
ENABLE_QV = (True, False, True)


class NLGAdapterShape(NamedTuple):
    """What an adapter file was trained for: LoRA rank r, and the GPT-2's n_layer and n_embd."""

    r: int
    n_layer: int
    n_embd: int

    @property
    def model_name(self) -> str:
        """The GPT-2 size with this width ("gpt2-medium", ...), or "unknown"."""
        return _GPT2_SIZES.get(self.n_embd, "unknown")


def read_gpt2_nlg_adapter(source: Source) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state dict with the wrapper and "module." prefixes removed, a name for messages)."""
    if isinstance(source, dict):
        return plain_state_dict(source, "<state dict>"), "<state dict>"
    name = os.fspath(source)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"GPT-2 NLG adapter file not found: {name}")
    return read_state_dict(Path(name)), name


def is_gpt2_nlg_adapter(state: Dict[str, torch.Tensor]) -> bool:
    """Whether a state dict (wrapper and "module." prefixes removed) holds GPT-2 c_attn LoRA factors."""
    return any(_LORA_KEY.match(key) for key in state)


def infer_gpt2_nlg_adapter_shape(source: Source) -> NLGAdapterShape:
    """(r, n_layer, n_embd) of a released adapter: lora_A is (2 r, n_embd), one pair per layer."""
    state, name = read_gpt2_nlg_adapter(source)
    layers, n_embd, r = set(), None, None
    for key, value in state.items():
        m = _LORA_KEY.match(key)
        if m is None:
            continue
        layers.add(int(m.group(1)))
        if m.group(2) == "A":
            if value.dim() != 2 or value.shape[0] % 2:
                raise ValueError(f"{name}: {key} has shape {tuple(value.shape)}; a q,v adapter's lora_A "
                                 f"is (2 r, n_embd)")
            if (r, n_embd) not in ((None, None), (value.shape[0] // 2, value.shape[1])):
                raise ValueError(f"{name}: {key} has shape {tuple(value.shape)}, unlike the other layers' "
                                 f"({2 * r}, {n_embd})")
            r, n_embd = value.shape[0] // 2, value.shape[1]
    if r is None:
        raise ValueError(f"{name}: no key like 'transformer.h.N.attn.c_attn.lora_A' in the file; "
                         f"keys: {sorted(state)[:5]}...")
    if layers != set(range(max(layers) + 1)):
        raise ValueError(f"{name}: layers {sorted(set(range(max(layers) + 1)) - layers)} have no LoRA factors")
    return NLGAdapterShape(r=r, n_layer=max(layers) + 1, n_embd=n_embd)


def nlg_lora_config(source: Source, lora_alpha: float = 32, lora_dropout: float = 0.0) -> LoRAConfig:
    """The LoRAConfig to build a GPT-2 for this adapter: its rank, q and v of c_attn, and lora_alpha
    (not stored in the file; 32 is what the LoRA paper used with r = 4)."""
    shape = infer_gpt2_nlg_adapter_shape(source)
    return LoRAConfig(r=shape.r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=("c_attn",), enable_lora=ENABLE_QV)


def load_gpt2_nlg_adapter(model: nn.Module, source: Source, name: Optional[str] = None) -> nn.Module:
    """Load a released GPT-2 NLG adapter (file path or state dict) into our GPT-2 in place; returns it.

    The model must be a GPT2LMHeadModel (or GPT2Model) of the adapter's size, built with LoRA on c_attn
    with q and v enabled at the adapter's rank, e.g. `nlg_lora_config(path)`. Every key and shape is
    checked before anything is copied; a mismatch raises ValueError naming the file (or `name`, for a state
    dict read elsewhere: loralib.adapter_files.open_adapter) and the key. Keys of base weights in the file
    (a full checkpoint) are loaded too.
    """
    state, read_as = read_gpt2_nlg_adapter(source)
    name = name or read_as
    shape = infer_gpt2_nlg_adapter_shape(state)
    config = getattr(model, "config", None)
    if config is not None and (config.n_embd, config.n_layer) != (shape.n_embd, shape.n_layer):
        raise ValueError(
            f"{name}: the adapter is for GPT-2 with n_embd={shape.n_embd}, n_layer={shape.n_layer} "
            f"({shape.model_name}), but the model has n_embd={config.n_embd}, n_layer={config.n_layer} "
            f"({_GPT2_SIZES.get(config.n_embd, 'unknown')})")

    own = model.state_dict()
    prefix = "transformer." if any(k.startswith("transformer.") for k in own) else ""
    for key in own:  # the model must have the adapter's LoRA factors, at the adapter's rank and chunks
        m = _LORA_KEY.match(key)
        if m and m.group(2) == "A":
            layer = model.get_submodule(key[: -len(".lora_A")])
            if getattr(layer, "enable_lora", None) != list(ENABLE_QV) or layer.r != shape.r:
                raise ValueError(
                    f"{name}: the adapter is LoRA r={shape.r} on q and v of c_attn; the model's {key[:-7]} "
                    f"has r={layer.r}, enable_lora={getattr(layer, 'enable_lora', None)}. Build the model with "
                    f"{nlg_lora_config(state)!r}")
    to_load = {}
    for key, value in state.items():
        if _MASK_BUFFER.search(key):  # the causal-mask buffers of old full checkpoints
            continue
        target = key if key in own else prefix + key
        if target not in own:
            if _LORA_KEY.match(key):
                raise ValueError(f"{name}: key {key!r} has no LoRA factor in the model; build it with LoRA on "
                                 f"c_attn (q, v), e.g. nlg_lora_config({name!r})")
            raise ValueError(f"{name}: key {key!r} is not a parameter of this GPT-2")
        if tuple(own[target].shape) != tuple(value.shape):
            raise ValueError(f"{name}: key {key!r} has shape {tuple(value.shape)}, the model's {target} has "
                             f"{tuple(own[target].shape)} (an adapter for another model size or rank?)")
        to_load[target] = value
    missing = sorted(k for k in own if _LORA_KEY.match(k) and k not in to_load)
    if missing:
        raise ValueError(f"{name}: the model's LoRA factors {missing[:4]} are not in the file")
    model.load_state_dict(to_load, strict=False)
    return model
