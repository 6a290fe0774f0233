"""The adapter a GLUE run starts from or evaluates (--lora_path): anything loralib.adapter_files.open_adapter
recognises - microsoft's released NLU file (`roberta_base_lora_mnli.bin`, ...), one of our adapter folders
(adapter/, best_adapter/), a run's output folder or its checkpoint-<step>/, or a PEFT LoRA / AdaLoRA folder
(a sequence classifier's, its head saved through modules_to_save).

    adapter = open_lora_path("out/mnli/adapter")       # an AdapterSource: tensors + the LoRAConfig it implies
    adapter.check_family("roberta")                    # refused before any model is built
    model = build(lora=adapter.lora_to_build)          # PEFT: built bare, the load injects its layers
    load_lora_path(model, adapter, num_labels=2, training=True)

Evaluating an adapter whose head has another label count, or that belongs to another model family or size, is
an error naming --lora_path. Training from one (the LoRA paper's "MRPC, RTE, STS-B start from the MNLI LoRA
checkpoint") keeps its LoRA factors and starts a new head where the label count differs, and says so.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional

import torch.nn as nn

from ...adapter_files import AdapterError, AdapterSource, open_flagged
from ...adapters import load_adapter_source
from ...config import LoRAConfig

logger = logging.getLogger("loralib.glue")
FLAG = "--lora_path"


def open_lora_path(path: str) -> AdapterSource:
    """open_adapter(path) (adapter_files.open_flagged), its errors naming the flag."""
    return open_flagged(path, FLAG)


def check_fits(adapter: AdapterSource, lora: Optional[LoRAConfig]) -> None:
    """A PEFT adapter brings its own layers (its ranks and alphas, injected when it is loaded): LoRA flags that
    ask for other ones are refused rather than ignored. (The other formats load into the layers the flags
    build, so a rank that differs is a shape error when loading.)"""
    if adapter.format != "peft" or lora is None:
        return
    fields = ("r", "lora_alpha", "use_rslora", "use_dora")
    has = tuple(getattr(adapter.lora, f) for f in fields)
    asked = tuple(getattr(lora, f) for f in fields)
    if has != asked:
        show = lambda values: ", ".join(f"{f}={v}" for f, v in zip(fields, values))  # noqa: E731
        raise ValueError(f"{FLAG} {str(adapter.given or adapter.path)!r} is a PEFT adapter with {show(has)}; "
                         f"the LoRA flags ask for {show(asked)}: leave them out (the adapter's are used) or "
                         "match them")


def _label_mismatch(key: str, got: tuple, want: tuple, num_labels: int) -> bool:
    """A head output tensor (its first dimension is the model's label count) sized for another label count."""
    return ("lora_" not in key and len(got) == len(want) and want[0] == num_labels and got[0] != want[0]
            and got[1:] == want[1:])


def load_lora_path(model: nn.Module, adapter: AdapterSource, num_labels: int, training: bool) -> List[str]:
    """Load the adapter into the model (all or nothing: loralib.adapters.load_adapter_source, which re-applies
    an AdaLoRA / LoRA² rank pattern saved with it); returns the keys loaded. When training, head tensors whose
    label count differs are left out (a new head is trained); otherwise that is an error."""
    name = str(adapter.given or adapter.path)
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    mismatched = [k for k, v in adapter.tensors.items() if k in state and not k.startswith(prefix + ".")
                  and _label_mismatch(k, tuple(v.shape), tuple(state[k].shape), num_labels)]
    if mismatched:
        got, want = tuple(adapter.tensors[mismatched[0]].shape), tuple(state[mismatched[0]].shape)
        if not training:
            raise AdapterError(f"{FLAG} {name!r}: the adapter's head was trained for {got[0]} labels "
                               f"(key {mismatched[0]!r}), this task has {want[0]}")
        logger.warning("%s: head trained for %d labels, this task has %d: loading its LoRA factors and "
                       "training a new head (%s)", name, got[0], want[0], ", ".join(mismatched))
    tensors = {k: v for k, v in adapter.tensors.items() if k not in mismatched}
    try:
        load_adapter_source(model, dataclasses.replace(adapter, tensors=tensors))
    except AdapterError as err:
        raise AdapterError(f"{FLAG} {name!r}: {err}") from None
    return sorted(tensors)
