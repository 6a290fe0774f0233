"""Microsoft's released GLUE adapters (LoRA paper, examples/NLU) loaded into our encoders.

The files are plain torch state dicts of fp32 tensors, nothing else:

- RoBERTa (`roberta_base_lora_{task}.bin`): `roberta.encoder.layer.N.attention.self.{query,value}.lora_A`
  (r, d) and `.lora_B` (d, r) with r = 8, plus the trained head `classifier.dense.{weight,bias}` and
  `classifier.out_proj.{weight,bias}` — 52 tensors for base.
- DeBERTa (`deberta_v2_xxlarge_lora_{task}.bin`): `deberta.encoder.layer.N.attention.self.{query_proj,
  value_proj}.lora_{A,B}` with r = 16, plus `pooler.dense.*` and `classifier.*`.

The files do not record lora_alpha; the paper used alpha = 2 r (8/16 and 16/32), which
`nlu_lora_config` assumes unless told otherwise. Typical use:

    sd = read_nlu_adapter("roberta_base_lora_mnli.bin")
    model = roberta.build(hf_config, "sequence-classification", num_labels=3, lora=nlu_lora_config(sd))
    (load the pretrained roberta-base weights into it), then load_nlu_adapter(model, sd)
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn

from ..config import LoRAConfig

StateDict = Dict[str, torch.Tensor]

# The settings of the released runs (the recipe tables of scripts/lora_*_glue.sh).
RELEASED_SETTINGS = {
    "roberta": dict(r=8, lora_alpha=16, target_modules=("query", "value")),
    "deberta": dict(r=16, lora_alpha=32, target_modules=("query_proj", "value_proj")),
}

_LORA_KEY = re.compile(r"^(?P<prefix>roberta|deberta|bert)\.encoder\.layer\.\d+\.attention\.self\."
                       r"(?P<proj>\w+)\.lora_[AB]$")
_HEAD_PREFIXES = ("classifier.", "pooler.")
_LABEL_KEYS = ("classifier.out_proj.weight", "classifier.out_proj.bias", "classifier.weight", "classifier.bias")


def read_nlu_adapter(path: Union[str, os.PathLike]) -> StateDict:
    """The adapter's state dict from a .bin/.pt (torch) or .safetensors file.

    A `model_state_dict` / `state_dict` wrapper and a DDP `module.` prefix are removed if present."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle with non-tensor objects, or not a torch file at all
            raise ValueError(f"{path}: not a torch state dict of tensors ({e})") from e
    return _plain_state_dict(sd, path)


def _plain_state_dict(sd, source: str) -> StateDict:
    if isinstance(sd, dict):
        for wrapper in ("model_state_dict", "state_dict"):
            if wrapper in sd and isinstance(sd[wrapper], dict):
                sd = sd[wrapper]
                break
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{source}: expected a non-empty dict of tensors, got {type(sd).__name__}")
    out = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: key {key!r} holds a {type(value).__name__}, not a tensor")
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


_FAMILY = {"roberta": "roberta", "deberta": "deberta-v2", "bert": "bert"}  # key prefix -> config.json model_type


def nlu_family(state_dict: StateDict) -> Optional[str]:
    """The model_type ("roberta", "deberta-v2", "bert") a released NLU state dict's LoRA keys belong to;
    None when it holds no `<model>.encoder.layer.N.attention.self.<proj>.lora_A` key (or keys of several)."""
    prefixes = {m["prefix"] for m in map(_LORA_KEY.match, state_dict) if m}
    return _FAMILY[prefixes.pop()] if len(prefixes) == 1 else None


def nlu_lora_config(state_dict: StateDict, lora_alpha: Optional[float] = None, **overrides) -> LoRAConfig:
    """The LoRAConfig a model needs to receive this adapter: r read from the lora_A shapes, target
    modules from the key names; lora_alpha defaults to 2 r, as in the released runs."""
    ranks, projections = set(), set()
    for key, value in state_dict.items():
        m = _LORA_KEY.match(key)
        if m:
            projections.add(m["proj"])
            if key.endswith("lora_A"):
                ranks.add(value.shape[0])
    if not projections:
        raise ValueError("adapter state dict holds no `<model>.encoder.layer.N.attention.self.<proj>.lora_A/B` key")
    if len(ranks) != 1:
        raise ValueError(f"adapter state dict: lora_A keys disagree on the rank r: {sorted(ranks)}")
    r = ranks.pop()
    return LoRAConfig(r=r, lora_alpha=2 * r if lora_alpha is None else lora_alpha,
                      target_modules=tuple(sorted(projections)), **overrides)


def load_nlu_adapter(model: nn.Module, path_or_state_dict: Union[str, os.PathLike, StateDict],
                     name: Optional[str] = None) -> List[str]:
    """Load a released NLU adapter into `model` (a RoBERTa or DeBERTa-v2 model of ours) and return the
    keys loaded.

    Every key of the file must exist in the model with the same shape, and every LoRA factor the
    model carries must be in the file; anything else is a ValueError naming the file, the key and the
    shapes (a label count or hidden size that does not fit is said so in plain words). A bare encoder
    (task "base") accepts the LoRA keys without its prefix but refuses a file that carries a head.
    name: how errors call a state dict read elsewhere (its file: loralib.adapter_files.open_adapter).
    """
    if isinstance(path_or_state_dict, dict):
        source = name or "adapter state dict"
        sd = _plain_state_dict(path_or_state_dict, source)
    else:
        source, sd = os.fspath(path_or_state_dict), read_nlu_adapter(path_or_state_dict)

    target = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    bare = not any(k.startswith(prefix + ".") for k in target)  # keys "encoder.layer..." with no prefix
    mapped: StateDict = {}
    for key, value in sd.items():
        m = _LORA_KEY.match(key)
        if m and m["prefix"] != prefix:
            raise ValueError(f"{source}: key {key!r} belongs to a {m['prefix']} model; "
                             f"this model is a {prefix} model ({type(model).__name__})")
        name = key[len(prefix) + 1:] if bare and key.startswith(prefix + ".") else key
        if name not in target:
            raise ValueError(f"{source}: key {key!r} has no place in {type(model).__name__}: "
                             + _why_missing(key, bare))
        want = tuple(target[name].shape)
        if tuple(value.shape) != want:
            raise ValueError(f"{source}: key {key!r} has shape {tuple(value.shape)} in the file but "
                             f"{want} in the model; " + _why_mismatch(key, tuple(value.shape), want))
        mapped[name] = value

    missing_lora = sorted(k for k in target if ".lora_" in k and k not in mapped)
    if missing_lora:
        raise ValueError(f"{source}: the model carries LoRA factors the file lacks, e.g. {missing_lora[:3]} "
                         f"({len(missing_lora)} in all); build the model with the file's targets "
                         "(see nlu_lora_config)")
    result = model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # every key was checked above
    return sorted(mapped)


def _why_missing(key: str, bare: bool) -> str:
    if ".lora_" in key:
        return ("the model carries no LoRA on that projection (build it with LoRAConfig(target_modules=...) "
                "naming it; see nlu_lora_config)")
    if key.startswith(_HEAD_PREFIXES):
        if bare:
            return "the file carries a classification head; build the model with task='sequence-classification'"
        return "the model's head has no such parameter (a RoBERTa head is classifier.dense/out_proj, DeBERTa's pooler + classifier)"
    return "not a LoRA factor or head parameter"


def _why_mismatch(key: str, got: tuple, want: tuple) -> str:
    if key in _LABEL_KEYS:
        return f"the adapter was trained for {got[0]} labels, the model has num_labels={want[0]}"
    if key.endswith("lora_A") and got[0] != want[0]:
        return f"the adapter has rank r={got[0]}, the model's LoRAConfig r={want[0]}"
    if key.endswith("lora_B") and got[1] != want[1]:
        return f"the adapter has rank r={got[1]}, the model's LoRAConfig r={want[1]}"
    return f"hidden sizes differ (adapter {max(got)} vs model {max(want)}): the adapter is for another model size"
