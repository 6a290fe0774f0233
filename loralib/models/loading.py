"""Load a local Hugging Face model folder into our model files.

    model = from_pretrained("models/SmolLM2-135M-Instruct", task="causal-lm", lora=LoRAConfig(r=8))

The folder holds config.json and the weights as model.safetensors, pytorch_model.bin, or shards listed in
model.safetensors.index.json / pytorch_model.bin.index.json. The model is built on the meta device (no
time spent initialising weights the checkpoint replaces), every checkpoint tensor is checked against the
shape the model expects and assigned in place, and only what the checkpoint lacks is initialised: LoRA
factors by their layer's own init, a new head (e.g. `score`) and any other missing weight like
transformers does (normal(0, initializer_range) matrices, ones for norm weights, zeros for biases).
What happened is logged and kept as `model.loading_info`:
    {"missing": backbone keys the checkpoint lacks, "newly_initialized": head keys it lacks,
     "unexpected": checkpoint keys the model has no place for, "adapter_initialized": LoRA keys it lacks}

Model files plug in through `build(hf_config, task, num_labels, lora)` and these class attributes:
`base_model_prefix` (checkpoints saved from the bare base model lack it), `ignored_checkpoint_keys`
(regexes of keys dropped silently, e.g. stale rotary buffers), and `rebuild_buffers()` on any module
whose non-persistent buffers are derived (called after loading).
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..files import read_json

logger = logging.getLogger(__name__)

# model_type in config.json -> module under loralib.models (imported only when asked for)
FAMILIES: Dict[str, str] = {
    "gpt2": "gpt2",
    "llama": "llama",
    "roberta": "roberta",
    "bert": "roberta",
    "deberta-v2": "deberta_v2",
    "t5": "t5",
}
TASKS = ("causal-lm", "sequence-classification", "seq2seq-lm", "base")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "spm.model")


class CheckpointShapeError(ValueError):
    """A checkpoint tensor whose shape differs from the model's."""


# -- config and dispatch ------------------------------------------------------------------------------

def read_config(path: Union[str, os.PathLike]) -> dict:
    """config.json of a model folder as a dict."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    return read_json(folder / "config.json", f"model folder {str(folder)!r} has no config.json")


def family_module(model_type: Optional[str], source: str = "config.json"):
    """The loralib.models module that implements `model_type`."""
    if model_type is None:
        raise ValueError(f"{source} has no 'model_type' key; supported model types: {sorted(FAMILIES)}")
    if model_type not in FAMILIES:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported; "
                         f"supported model types: {sorted(FAMILIES)}")
    return importlib.import_module(f"loralib.models.{FAMILIES[model_type]}")


def build_model(hf_config: dict, task: str = "causal-lm", num_labels: Optional[int] = None, lora=None,
                source: str = "config.json") -> nn.Module:
    """The randomly initialised model for a config.json dict (no weights read)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; choose one of {list(TASKS)}")
    return family_module(hf_config.get("model_type"), source).build(hf_config, task, num_labels, lora)


# -- checkpoint files ---------------------------------------------------------------------------------

class _Checkpoint:
    """The tensors of a model folder, read lazily: key -> (file, shape) first, tensors on demand."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: Dict[str, Path] = {}        # key -> file holding it
        self._open: Dict[Path, object] = {}     # file -> safe_open handle or loaded .bin dict
        single_st, index_st, single_bin, index_bin = (folder / name for name in WEIGHT_FILES)
        if single_st.is_file():
            self._add_safetensors(single_st)
        elif index_st.is_file():
            for file in self._shards(index_st):
                self._add_safetensors(file)
        elif single_bin.is_file():
            self._add_bin(single_bin)
        elif index_bin.is_file():
            for file in self._shards(index_bin):
                self._add_bin(file)
        else:
            raise FileNotFoundError(f"model folder {str(folder)!r} has no weights: expected one of {list(WEIGHT_FILES)}")

    def _shards(self, index_file: Path) -> List[Path]:
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index_file}: not a shard index with a 'weight_map' ({e!r})") from None
        files = []
        for name in dict.fromkeys(weight_map.values()):
            file = self.folder / name
            if not file.is_file():
                raise FileNotFoundError(f"{index_file} lists shard {name!r}, which is not in {str(self.folder)!r}")
            files.append(file)
        return files

    def _add_safetensors(self, file: Path) -> None:
        from safetensors import safe_open
        handle = safe_open(str(file), framework="pt")
        self._open[file] = handle
        for key in handle.keys():
            self.files[key] = file

    def _add_bin(self, file: Path) -> None:
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{file}: expected a state dict, found {type(state).__name__}")
        self._open[file] = state
        for key in state:
            self.files[key] = file

    def shape(self, key: str) -> Tuple[int, ...]:
        handle = self._open[self.files[key]]
        if isinstance(handle, dict):
            return tuple(handle[key].shape)
        return tuple(handle.get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        handle = self._open[self.files[key]]
        return handle[key] if isinstance(handle, dict) else handle.get_tensor(key)


# -- loading ------------------------------------------------------------------------------------------

def _target_key(key: str, expected: Dict[str, torch.Size], prefix: str) -> Optional[str]:
    """Where checkpoint `key` goes in the model: itself, under the base-model prefix (a checkpoint of the
    bare base model loaded into a task model), or with the prefix removed (the reverse)."""
    if key in expected:
        return key
    if prefix and f"{prefix}.{key}" in expected:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
        return key[len(prefix) + 1:]
    return None


def _shared_parameters(model: nn.Module) -> List[List[str]]:
    """Groups of parameter names that are one tensor (tied weights), e.g. [embed_tokens.weight, lm_head.weight]."""
    groups: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[attr] = param


def _init_missing(model: nn.Module, missing: Iterable[str], device, dtype: torch.dtype, std: float) -> None:
    """Materialise the parameters the checkpoint did not provide (still on meta) and initialise them.

    LoRA-style layers (with `reset_lora_parameters`) initialise their own adapter parameters; factors
    that did come from the checkpoint are restored afterwards. Everything else gets transformers' init.
    Adapter factors are kept in fp32 (as PEFT does): their updates are small against the frozen weight."""
    by_module: Dict[str, List[str]] = {}
    for name in missing:
        module_name, _, attr = name.rpartition(".")
        by_module.setdefault(module_name, []).append(attr)
    for module_name, attrs in by_module.items():
        module = model.get_submodule(module_name) if module_name else model
        adapter = hasattr(module, "reset_lora_parameters")
        for attr in attrs:
            old = module._parameters[attr]
            is_adapter = adapter and attr not in ("weight", "bias")
            new_dtype = (torch.float32 if is_adapter else dtype) if old.is_floating_point() else old.dtype
            module._parameters[attr] = nn.Parameter(torch.empty(old.shape, device=device, dtype=new_dtype),
                                                    requires_grad=old.requires_grad)
        adapter_attrs = [a for a in attrs if adapter and a not in ("weight", "bias")]
        if adapter_attrs:
            loaded = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)
                      if n not in attrs and n not in ("weight", "bias")}
            with torch.no_grad():
                module.reset_lora_parameters()
                for n, value in loaded.items():
                    getattr(module, n).copy_(value)
        with torch.no_grad():
            for attr in attrs:
                if attr in adapter_attrs:
                    continue
                p = module._parameters[attr]
                if attr == "bias" or p.dim() == 0:
                    p.zero_()
                elif p.dim() == 1:
                    p.fill_(1.0)                        # norm weights
                else:
                    p.normal_(0.0, std)
                    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                        p[module.padding_idx].zero_()


def load_state_into(model: nn.Module, checkpoint: "_Checkpoint", dtype: Optional[torch.dtype] = None,
                    device: Union[str, torch.device] = "cpu", std: float = 0.02) -> dict:
    """Assign the checkpoint's tensors to a model built on the meta device; returns the loading_info."""
    expected = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    base_prefix = getattr(model, "base_model_prefix", "")
    head_prefix = "" if _is_base(model) else base_prefix  # task models: keys outside it are the head's
    ignored = [re.compile(p) for p in getattr(model, "ignored_checkpoint_keys", ())]
    tied = _shared_parameters(model)

    chosen, unexpected, wrong = {}, [], []  # chosen: model key -> checkpoint key
    for key in checkpoint.files:
        target = _target_key(key, expected, base_prefix)
        if target is None:
            if not any(p.fullmatch(key) for p in ignored):
                unexpected.append(key)
            continue
        shape = checkpoint.shape(key)
        if tuple(expected[target]) != shape:
            wrong.append(f"{checkpoint.files[key]}: key {key!r} has shape {shape} in the checkpoint but the "
                         f"model expects {tuple(expected[target])}")
            continue
        chosen[target] = key
    if wrong:
        more = f" (and {len(wrong) - 1} more: {wrong[1:4]})" if len(wrong) > 1 else ""
        raise CheckpointShapeError(wrong[0] + more)

    state = {}
    for target, key in chosen.items():
        tensor = checkpoint.tensor(key)
        if tensor.is_floating_point() and dtype is not None:
            tensor = tensor.to(dtype)
        state[target] = tensor.to(device)
    model.load_state_dict(state, strict=False, assign=True)

    # Tied weights: each group is one tensor, the member the checkpoint provided (else the first member,
    # initialised once); assign=True replaced only that member, so point the others at it again.
    provided = set(state)
    sources = []
    for group in tied:
        source = next((n for n in group if n in provided), group[0])
        sources.append((group, source))
        if source in provided:
            provided.update(group)
    aliases = {n for group, source in sources for n in group if n != source}
    missing_all = [k for k in expected if k not in provided and _is_parameter(model, k)]
    float_dtype = dtype or _first_float_dtype(state.values()) or torch.float32
    _init_missing(model, [k for k in missing_all if k not in aliases], device, float_dtype, std)
    for group, source in sources:
        for name in group:
            _set_parameter(model, name, model.get_parameter(source))

    for module in model.modules():
        if hasattr(module, "rebuild_buffers"):
            module.rebuild_buffers()
    model.to(device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"{type(model).__name__}: {leftover[:5]} are still on the meta device after loading; "
                           "the model file should rebuild them in rebuild_buffers()")

    is_adapter = [k for k in missing_all if "lora_" in k.rsplit(".", 1)[-1] or _is_adapter_param(model, k)]
    rest = [k for k in missing_all if k not in is_adapter]
    head = [k for k in rest if head_prefix and not k.startswith(head_prefix + ".")]
    info = {"missing": [k for k in rest if k not in head], "newly_initialized": head,
            "unexpected": unexpected, "adapter_initialized": is_adapter}
    return info


def _is_base(model: nn.Module) -> bool:
    """True for the bare base model (its keys carry no base_model_prefix)."""
    prefix = getattr(model, "base_model_prefix", "")
    return not (prefix and isinstance(getattr(model, prefix, None), nn.Module))


def _is_parameter(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return attr in module._parameters


def _is_adapter_param(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return hasattr(module, "reset_lora_parameters") and attr not in ("weight", "bias")


def _first_float_dtype(tensors: Iterable[torch.Tensor]) -> Optional[torch.dtype]:
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


def _resolve_dtype(dtype, config: dict) -> Optional[torch.dtype]:
    """None -> float32; "auto" -> the checkpoint's own (None here: tensors keep their dtype)."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return None
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype")
        return resolved
    return dtype


def from_pretrained(path: Union[str, os.PathLike], task: str = "causal-lm", num_labels: Optional[int] = None,
                    lora=None, dtype: Union[None, str, torch.dtype] = None,
                    device: Union[str, torch.device] = "cpu",
                    config_overrides: Optional[dict] = None) -> nn.Module:
    """Our model for the Hugging Face folder `path`, weights loaded, in eval() mode.

    task: "causal-lm", "sequence-classification" (a new `score`/`classifier` head unless the checkpoint
    has one), "seq2seq-lm" (encoder-decoder families: T5) or "base". num_labels: the head's outputs (default: config.json's). lora: a LoRAConfig, or
    None for the plain model. dtype: None for float32, "auto" for the checkpoint's dtype, or a torch
    dtype. config_overrides: config.json entries replaced before the model is built (e.g. cls_dropout).
    Returns the model with `model.loading_info` (see the module docstring) and `model.hf_config`.
    """
    folder = Path(path)
    hf_config = read_config(folder)
    hf_config.update(config_overrides or {})
    config_file = str(folder / "config.json")
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; choose one of {list(TASKS)}")
    module = family_module(hf_config.get("model_type"), config_file)
    checkpoint = _Checkpoint(folder)
    with torch.device("meta"):
        model = module.build(hf_config, task, num_labels, lora)
    if lora is not None and not any(getattr(m, "has_lora", False) for m in model.modules()):
        raise ValueError(f"from_pretrained({str(folder)!r}): lora.target_modules={lora.target_modules!r} match no "
                         f"projection of this {hf_config.get('model_type')} model, so nothing would be adapted")
    info = load_state_into(model, checkpoint, _resolve_dtype(dtype, hf_config), device,
                           std=hf_config.get("initializer_range", 0.02))
    if lora is not None and getattr(lora, "init_swapped", False):
        _swap_new_factors(model, info["adapter_initialized"])
    _report(folder, model, info)
    model.loading_info = info
    model.hf_config = hf_config
    if lora is not None:
        model.loralib_config = lora  # what save_adapter records, so that the adapter rebuilds its layers
    return model.eval()


def _swap_new_factors(model: nn.Module, adapter_keys: Iterable[str]) -> None:
    """LoRAConfig(init_swapped=True): the layers' own reset gave LoRA's init (A kaiming, B zero) to the
    factors the checkpoint lacked; give them LoRA+'s swapped one instead (B kaiming, A zero)."""
    from ..config import _swap_init
    from ..layers import Linear, MergedLinear

    for module_name in sorted({key.rpartition(".")[0] for key in adapter_keys}):
        module = model.get_submodule(module_name)
        if isinstance(module, (Linear, MergedLinear)) and module.has_lora:
            with torch.no_grad():
                _swap_init(module)


def _report(folder: Path, model: nn.Module, info: dict) -> None:
    name = type(model).__name__
    if info["missing"]:
        logger.warning("%s: weights of %s not found in the checkpoint, initialised at random: %s",
                       folder, name, info["missing"])
    if info["newly_initialized"]:
        logger.info("%s: %s head weights are newly initialised (train them): %s",
                    folder, name, info["newly_initialized"])
    if info["unexpected"]:
        logger.warning("%s: checkpoint keys not used by %s: %s", folder, name, info["unexpected"])
    if info["adapter_initialized"]:
        logger.info("%s: %d adapter tensors initialised", folder, len(info["adapter_initialized"]))


# -- tokenizers ---------------------------------------------------------------------------------------

def load_tokenizer(path: Union[str, os.PathLike], model_config=None):
    """The tokenizer of a model folder: transformers' AutoTokenizer when transformers is installed, else
    a `tokenizers.Tokenizer` from tokenizer.json. With model_config (config.json dict, a config object or
    a model), checks that every token id fits the model's embedding (`check_tokenizer_fits`)."""
    folder = Path(path)
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not present:
        raise FileNotFoundError(f"model folder {str(folder)!r} has no tokenizer files; "
                                f"expected one of {list(TOKENIZER_FILES)}")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        if "tokenizer.json" not in present:
            raise FileNotFoundError(f"{folder}: without transformers only tokenizer.json can be read") from None
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if model_config is not None:
        check_tokenizer_fits(tokenizer, model_config, str(folder / present[0]))
    return tokenizer


def tokenizer_size(tokenizer) -> int:
    """Number of token ids the tokenizer can emit (added tokens included)."""
    if hasattr(tokenizer, "get_vocab_size"):        # tokenizers.Tokenizer
        return tokenizer.get_vocab_size(with_added_tokens=True)
    return len(tokenizer)


def _vocab_size(model_config) -> int:
    if isinstance(model_config, dict):
        if "vocab_size" not in model_config:
            raise ValueError("model config has no 'vocab_size' key")
        return int(model_config["vocab_size"])
    for obj in (model_config, getattr(model_config, "config", None)):
        if obj is not None and getattr(obj, "vocab_size", None) is not None:
            return int(obj.vocab_size)
    raise ValueError(f"cannot find vocab_size on {type(model_config).__name__}")


def check_tokenizer_fits(tokenizer, model_config, tokenizer_file: Optional[str] = None) -> None:
    """ValueError if the tokenizer can emit ids the model's embedding has no row for."""
    n_tokens, vocab = tokenizer_size(tokenizer), _vocab_size(model_config)
    if n_tokens > vocab:
        source = tokenizer_file or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ValueError(f"tokenizer {source} has {n_tokens} tokens but the model's vocab_size is {vocab}: "
                         f"ids >= {vocab} have no embedding row (resize the embedding or use the model's own tokenizer)")


def check_targets(hf_config: dict, lora, flag: str) -> None:
    """Every LoRA target of `lora` (a LoRAConfig) must name at least one projection of the model described by
    `hf_config` (checked on the meta device: nothing is allocated); ValueError naming `flag` otherwise."""
    from ..config import LoRAConfig

    if isinstance(lora.target_modules, str):
        return
    module = family_module(hf_config.get("model_type"))
    for target in lora.target_modules:
        probe = LoRAConfig(r=1, lora_alpha=1, target_modules=(target,))
        with torch.device("meta"):
            model = module.build(hf_config, "base", None, probe)
        if not any(getattr(m, "has_lora", False) for m in model.modules()):
            raise ValueError(f"{flag}: {target!r} matches no projection of this {hf_config.get('model_type')} model")
