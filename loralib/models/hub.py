"""Fetch a model from the Hugging Face hub into models/NAME (when the hub can be reached).

    python -m loralib.models.hub HuggingFaceTB/SmolLM2-135M-Instruct      # -> models/HuggingFaceTB/SmolLM2-135M-Instruct

Only what our loader reads is fetched: config.json, the weights (safetensors preferred, else .bin), shard
indexes, tokenizer files and generation_config.json. Without network access the hub is unreachable and
`download_model` raises `HubUnreachableError` with one plain line saying so.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import List, Optional

CONFIG_PATTERNS = ["config.json", "generation_config.json", "*.index.json", "tokenizer*", "vocab.*", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "*.model", "chat_template.jinja"]


class HubUnreachableError(RuntimeError):
    """The Hugging Face hub could not be reached (no network, offline mode, DNS, timeout)."""


def _snapshot_download(**kwargs) -> str:
    from huggingface_hub import snapshot_download  # imported here so tests can replace it
    return snapshot_download(**kwargs)


def _unreachable_errors() -> tuple:
    errors: List[type] = [ConnectionError, TimeoutError]
    try:
        from huggingface_hub import errors as hub_errors
        errors += [hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled]
    except ImportError:
        pass
    for module_name, attr in (("httpx", "TransportError"), ("requests.exceptions", "ConnectionError")):
        try:
            errors.append(getattr(importlib.import_module(module_name), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _not_found_errors() -> tuple:
    try:
        from huggingface_hub import errors as hub_errors
        return (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError)
    except ImportError:
        return ()


def download_model(name: str, dest_root: str = "models", revision: Optional[str] = None,
                   prefer_safetensors: bool = True) -> Path:
    """Download hub repo `name` (e.g. "HuggingFaceTB/SmolLM2-135M-Instruct") into dest_root/name and
    return that folder. RuntimeError (HubUnreachableError) if the hub cannot be reached; ValueError if
    the hub has no such model."""
    if not name or name.startswith("/") or ".." in Path(name).parts:
        raise ValueError(f"model name {name!r} is not a hub repo id like 'org/model'")
    dest = Path(dest_root) / name
    weights = ["*.safetensors"] if prefer_safetensors else ["*.bin"]
    try:
        _snapshot_download(repo_id=name, revision=revision, local_dir=str(dest),
                           allow_patterns=CONFIG_PATTERNS + weights)
        if prefer_safetensors and not any(dest.glob("*.safetensors")):  # older repos ship only .bin
            _snapshot_download(repo_id=name, revision=revision, local_dir=str(dest),
                               allow_patterns=CONFIG_PATTERNS + ["*.bin"])
    except _not_found_errors() as e:
        raise ValueError(f"the Hugging Face hub has no model {name!r}"
                         + (f" at revision {revision!r}" if revision else "") + f" ({type(e).__name__})") from None
    except _unreachable_errors() as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HubUnreachableError(f"cannot download {name!r}: the Hugging Face hub is unreachable from this "
                                  f"machine ({first_line}); copy the model folder to {dest} by other means") from None
    if not (dest / "config.json").is_file():
        raise FileNotFoundError(f"downloaded {name!r} into {dest}, but it has no config.json")
    return dest


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="loralib download-model", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="hub repo id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--dest-root", default="models")
    parser.add_argument("--revision", default=None)
    args = parser.parse_args(argv)
    try:
        print(download_model(args.name, args.dest_root, args.revision))
    except (HubUnreachableError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
