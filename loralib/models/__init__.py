"""Model files (one per family, adapters inline), Hugging Face checkpoint loading, and generation.

    from loralib.models import from_pretrained, load_tokenizer, generate

Imported lazily, so `import loralib` stays cheap and needs neither transformers nor safetensors.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "from_pretrained": "loading",
    "load_tokenizer": "loading",
    "check_tokenizer_fits": "loading",
    "read_config": "loading",
    "build_model": "loading",
    "generate": "generation",
    "download_model": "hub",
    "HubUnreachableError": "hub",
    "load_nlu_adapter": "released_nlu",
    "read_nlu_adapter": "released_nlu",
    "nlu_lora_config": "released_nlu",
    "load_gpt2_nlg_adapter": "released",
    "read_gpt2_nlg_adapter": "released",
    "nlg_lora_config": "released",
    "infer_gpt2_nlg_adapter_shape": "released",
    "KVCache": "cache",
    "ModelOutput": "outputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
