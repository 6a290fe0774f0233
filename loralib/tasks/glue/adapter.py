"""The adapter a GLUE run starts from or evaluates (--lora_path): microsoft's released NLU file
(`roberta_base_lora_mnli.bin`, ...) or one of our adapter folders (adapter/, best_adapter/, checkpoint-N/adapter).

    adapter = read_lora_path("out/mnli/adapter")       # tensors + the LoRAConfig it implies
    check_adapter_family(adapter, "roberta")           # refused before any model is built
    load_lora_path(model, adapter, num_labels=2, training=True)

Evaluating an adapter whose head has another label count, or that belongs to another model family or size, is
an error. Training from one (the LoRA paper's "MRPC, RTE, STS-B start from the MNLI LoRA checkpoint") keeps its
LoRA factors and starts a new head where the label count differs, and says so. PEFT folders are refused here.
(All of the adapter reading of the GLUE run is in this module, to be routed through one shared adapter opener.)
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ...adalora import apply_rank_pattern, trim_ranks
from ...adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError
from ...config import LoRAConfig

logger = logging.getLogger("loralib.glue")


@dataclass
class Adapter:
    """An adapter to load: microsoft's released file ("released") or one of our folders ("ours")."""

    kind: str
    path: Path
    tensors: Dict[str, torch.Tensor]
    lora: Optional[LoRAConfig]          # the config it implies
    rank_state: Optional[dict] = None   # AdaLoRA / LoRA² rank pattern saved with it
    run_config: Optional[dict] = None   # run_config.json of the run that made it, if found


def _find_upwards(folder: Path, name: str, levels: int = 3) -> Optional[Path]:
    for candidate in [folder, *list(folder.parents)[:levels - 1]]:
        if (candidate / name).is_file():
            return candidate / name
    return None


def read_lora_path(path: str) -> Adapter:
    from ...adapters import read_adapter_config
    from ...models.released_nlu import nlu_lora_config, read_nlu_adapter

    p = Path(path)
    if p.is_dir():
        config_file = p / ADAPTER_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"--lora_path {path!r}: folder without {ADAPTER_CONFIG}")
        if "peft_type" in json.loads(config_file.read_text()):
            raise AdapterError(f"--lora_path {path!r} is a PEFT adapter folder; load it with loralib.import_peft "
                               "on the model, or convert it with loralib.save_adapter")
        meta = read_adapter_config(p)
        weights = p / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"--lora_path {path!r}: {weights} is missing")
        tensors = load_file(str(weights))
        lora = LoRAConfig.from_dict(meta["lora"]) if meta.get("lora") else None
        rank_file = _find_upwards(p, "rank_pattern.json", 1)
        run_file = _find_upwards(p, "run_config.json")
        return Adapter("ours", p, tensors, lora,
                       json.loads(rank_file.read_text()) if rank_file else None,
                       json.loads(run_file.read_text()) if run_file else None)
    if not p.is_file():
        raise FileNotFoundError(f"--lora_path {path!r} does not exist")
    tensors = read_nlu_adapter(p)
    return Adapter("released", p, tensors, nlu_lora_config(tensors))


_FAMILY_PREFIX = {"roberta": "roberta", "bert": "bert", "deberta-v2": "deberta", "gpt2": "transformer", "llama": "model"}


def check_adapter_family(adapter: Adapter, model_type: str) -> None:
    """An adapter of another model family is refused before any model is built."""
    if adapter.kind == "released":
        prefixes = {k.split(".", 1)[0] for k in adapter.tensors if ".lora_" in k}
        want = _FAMILY_PREFIX.get(model_type)
        if prefixes and want not in prefixes:
            raise ValueError(f"--lora_path {str(adapter.path)!r} holds adapters of a {'/'.join(sorted(prefixes))} "
                             f"model; --model_name_or_path is a {model_type} model")
    elif adapter.run_config is not None:
        made_for = adapter.run_config.get("model_type")
        if made_for is not None and made_for != model_type:
            raise ValueError(f"--lora_path {str(adapter.path)!r} was trained on a {made_for} model "
                             f"({adapter.run_config.get('model_name_or_path')}); --model_name_or_path is a "
                             f"{model_type} model")


def _label_mismatch(key: str, got: tuple, want: tuple, num_labels: int) -> bool:
    """A head output tensor (its first dimension is the model's label count) sized for another label count."""
    return ("lora_" not in key and len(got) == len(want) and want[0] == num_labels and got[0] != want[0]
            and got[1:] == want[1:])


def load_lora_path(model: nn.Module, adapter: Adapter, num_labels: int, training: bool) -> List[str]:
    """Load the adapter into the model; returns the keys loaded. When training, head tensors whose label
    count differs are left out (a new head is trained); otherwise that is an error."""
    from ...models.released_nlu import load_nlu_adapter

    state = model.state_dict()
    tensors = dict(adapter.tensors)
    prefix = getattr(model, "base_model_prefix", "")
    mismatched = [k for k, v in tensors.items() if k in state and not k.startswith(prefix + ".")
                  and _label_mismatch(k, tuple(v.shape), tuple(state[k].shape), num_labels)]
    if mismatched:
        got, want = tuple(tensors[mismatched[0]].shape), tuple(state[mismatched[0]].shape)
        if not training:
            raise AdapterError(f"--lora_path {str(adapter.path)!r}: the adapter's head was trained for {got[0]} labels "
                               f"(key {mismatched[0]!r}), this task has {want[0]}")
        logger.warning("%s: head trained for %d labels, this task has %d: loading its LoRA factors and "
                       "training a new head (%s)", adapter.path, got[0], want[0], ", ".join(mismatched))
        for k in mismatched:
            del tensors[k]
    if adapter.kind == "released":
        return load_nlu_adapter(model, tensors)
    if adapter.rank_state and adapter.rank_state.get("trimmed"):
        trim_ranks(model, adapter.rank_state["rank_pattern"])
        state = model.state_dict()
    source = adapter.path / ADAPTER_WEIGHTS
    for key, value in tensors.items():
        if key not in state:
            raise AdapterError(f"{source}: key {key!r} is not in the model ({type(model).__name__}); the adapter "
                               "was made for another model or other LoRA targets")
        if tuple(value.shape) != tuple(state[key].shape):
            raise AdapterError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the model expects "
                               f"{tuple(state[key].shape)} (another model size, or another LoRA rank)")
    missing = [k for k in state if "lora_" in k.rsplit(".", 1)[-1] and k not in tensors]
    if missing:
        raise AdapterError(f"{source}: the model carries LoRA factors the adapter lacks, e.g. {missing[:3]} "
                           f"({len(missing)} in all): build it with the adapter's targets")
    model.load_state_dict(tensors, strict=False)
    if adapter.rank_state and not adapter.rank_state.get("trimmed"):
        apply_rank_pattern(model, adapter.rank_state["rank_pattern"])
    return sorted(tensors)

