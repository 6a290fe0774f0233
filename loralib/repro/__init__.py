"""Reproductions: the registry of released adapters and reported numbers, `loralib download`, `loralib compare`.

    from loralib.repro import load_registry, download_adapter
    reg = load_registry()                                  # registry.json, checked
    reg.find(model="roberta-base", method="lora", task="rte", metric="accuracy")
    download_adapter("roberta_base_lora_mnli", "models/adapters")
"""
from .compare import compare_rows, markdown_table, read_runs, write_chart
from .download import (ChecksumMismatchError, DownloadError, InterruptedDownloadError, UnreachableError,
                       download_adapter)
from .registry import (Adapter, Registry, RegistryError, Reported, TensorSpec, UnknownAdapterError,
                       check_state_dict, expand_pattern, load_registry, parse_registry)

__all__ = ["Adapter", "Registry", "RegistryError", "Reported", "TensorSpec", "UnknownAdapterError",
           "check_state_dict", "expand_pattern", "load_registry", "parse_registry",
           "ChecksumMismatchError", "DownloadError", "InterruptedDownloadError", "UnreachableError",
           "download_adapter", "compare_rows", "markdown_table", "read_runs", "write_chart"]
