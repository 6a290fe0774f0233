"""One opener for every adapter a path can name: `open_adapter(path) -> AdapterSource`.

It is the one place that decides what a path is: loralib.adapters' load_adapter_source, load_adapter and
import_peft read through it, and so do (once wired) the entry points' --lora_path / --init_checkpoint.

    path                                             format           tensors read from
    a folder with adapter_config.json of ours        "loralib"        adapter.safetensors (save_adapter)
    a folder with adapter_config.json of PEFT's      "peft"           adapter_model.safetensors | .bin
    checkpoint-<step>/ of the training loop          "loralib"        its adapter/ (step set, model_extra.pt)
    a run's output folder                            "loralib"        its adapter/, else its newest checkpoint
    microsoft's released NLU .bin/.pt/.safetensors   "microsoft-nlu"  the file (RoBERTa / DeBERTa / BERT)
    microsoft's released GPT-2 .pt (or gpt2_ft.py's  "microsoft-nlg"  the file (c_attn with q and v)
      model.<step>.pt)
    a weights file inside an adapter folder          as its folder

Every source is described the same way (AdapterSource): the format, the LoRAConfig it implies, per-layer
ranks, the tensors under the MODEL's state-dict names ("<module>.lora_A", "<module>.lora_B", DoRA's
"<module>.lora_magnitude_vector", head tensors as they are), the model family when known, and the paths.
PEFT's names ("base_model.model.<module>.lora_A.weight", "lora_embedding_A", ...) are mapped to ours, and
a PEFT AdaLoRA adapter is read as the exact plain LoRA it equals (A' = E * A, B' = B, alpha' = s r'
with s = lora_alpha / (ranknum + 1e-5), ranknum = its init_r, ranks with E = 0 left out). A path that is
none of these is one error naming it (FileNotFoundError when nothing is there, AdapterError otherwise).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from safetensors.torch import load_file

from .config import WHOLE_PROJECTION, LoRAConfig
from .files import read_json

FORMAT = "loralib-adapter"
FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
CHECKPOINT_MARKER = "checkpoint.json"    # loralib.train.checkpoint.MARKER (not imported: train imports us)
MODEL_EXTRA = "model_extra.pt"           # loralib.train.checkpoint.MODEL_EXTRA
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
_TENSOR_FILES = (".bin", ".pt", ".pth", ".safetensors")
_FOLDER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN)  # name their folder

PathLike = Union[str, os.PathLike]

class AdapterError(ValueError):
    """An adapter file that does not fit the model (names the file and the key)."""


@dataclass
class AdapterSource:
    """What an adapter path holds, whatever its format (see the module docstring)."""

    format: str                          # "loralib" | "peft" | "microsoft-nlu" | "microsoft-nlg"
    path: Path                           # the folder or file the tensors were read from
    tensors: Dict[str, torch.Tensor]     # model state-dict names: LoRA factors + head / extra tensors
    lora: Optional[LoRAConfig]           # the config that builds layers for it (None: ours recorded none)
    ranks: Dict[str, int]                # module path -> its rank
    family: Optional[str] = None         # model_type it was made for ("roberta", "gpt2", ...), when known
    given: Optional[Path] = None         # the path as given (a run folder, a checkpoint, a weights file)
    weights: Optional[Path] = None       # the tensor file (for messages)
    alphas: Dict[str, float] = field(default_factory=dict)  # PEFT: module path -> its lora_alpha
    config: dict = field(default_factory=dict)    # the adapter_config.json as read (ours or PEFT's)
    rank_state: Optional[dict] = None    # AdaLoRA / LoRA²: rank_pattern.json saved with it
    run_config: Optional[dict] = None    # run_config.json of the run that made it, if found
    step: Optional[int] = None           # a checkpoint's step
    model_extra: Optional[Path] = None   # a checkpoint's model_extra.pt (buffers, or the whole model)

    @property
    def lora_to_build(self) -> Optional[LoRAConfig]:
        """The LoRAConfig to build the model with before loading: None for PEFT, whose layers the load injects
        module by module with their own ranks and alphas (rank_pattern / alpha_pattern)."""
        return None if self.format == "peft" else self.lora

    @property
    def lora_keys(self) -> List[str]:
        return sorted(k for k in self.tensors if "lora_" in k.rsplit(".", 1)[-1])

    @property
    def extra_keys(self) -> List[str]:
        """Tensors besides the LoRA factors (a trained classifier head, a pooler)."""
        return sorted(k for k in self.tensors if "lora_" not in k.rsplit(".", 1)[-1])

    def check_family(self, model_type: Optional[str], flag: str = "--lora_path") -> None:
        """An adapter made for another model family is refused, naming the path (before a model is built)."""
        if self.family is not None and model_type is not None and self.family != model_type:
            made_with = (self.run_config or {}).get("model_name_or_path")
            raise ValueError(f"{flag} {str(self.given or self.path)!r} holds adapters of a {self.family} model"
                             + (f" ({made_with})" if made_with else "") + f"; the model is a {model_type} model")


# -- reading ---------------------------------------------------------------------------------------
def load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """A safetensors file, or one error naming it (a truncated or foreign file is a SafetensorError)."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError and OSError subclasses
        raise AdapterError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None


def _read_config(path: Path) -> dict:
    return read_json(path, f"{path}: no such adapter config", AdapterError)


def read_adapter_config(directory: PathLike) -> dict:
    """Our adapter_config.json, checked (format and version); a PEFT one is named as such."""
    path = Path(directory) / ADAPTER_CONFIG
    meta = _read_config(path)
    if meta.get("format") != FORMAT:
        hint = " (it looks like a PEFT adapter: use import_peft)" if "peft_type" in meta else ""
        raise AdapterError(f"{path}: not a loralib adapter config{hint}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{path}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}")
    return meta


def _find_upwards(folder: Path, name: str, levels: int) -> Optional[dict]:
    """The JSON file `name` in folder or one of its levels - 1 parents, read; None if there is none."""
    for candidate in [folder, *list(folder.parents)[:levels - 1]]:
        if (candidate / name).is_file():
            return json.loads((candidate / name).read_text())
    return None


def _run_family(run_config: Optional[dict], meta: dict) -> Optional[str]:
    return (run_config or {}).get("model_type") or (meta.get("metadata") or {}).get("model_type")


# -- the opener ------------------------------------------------------------------------------------
def open_adapter(path: PathLike) -> AdapterSource:
    """Recognise what `path` is and read it (see the module docstring); one error naming it otherwise."""
    given = Path(path).expanduser()
    found = given.parent if given.is_file() and given.name in _FOLDER_FILES else given
    if found.is_dir():
        source = _open_folder(found)
    elif found.is_file():
        source = _open_released(found)
    else:
        raise FileNotFoundError(f"{given} does not exist (an adapter is a folder with {ADAPTER_CONFIG}, a run or "
                                "checkpoint-<step> folder, or a released .bin/.pt file)")
    source.given = Path(path)
    return source


def open_flagged(path: PathLike, flag: str) -> AdapterSource:
    """open_adapter(path) for an entry point: its errors name the flag that gave the path."""
    try:
        return open_adapter(path)
    except (FileNotFoundError, AdapterError) as err:
        raise type(err)(f"{flag} {str(path)!r}: {err}") from None


def _open_folder(folder: Path) -> AdapterSource:
    config_file = folder / ADAPTER_CONFIG
    if config_file.is_file():
        raw = _read_config(config_file)
        return _open_peft(folder, raw) if "peft_type" in raw else _open_ours(folder)
    if (folder / CHECKPOINT_MARKER).is_file() and (folder / "adapter" / ADAPTER_CONFIG).is_file():
        source = _open_ours(folder / "adapter")
        match = _CHECKPOINT_NAME.fullmatch(folder.name)
        source.step = int(match.group(1)) if match else json.loads((folder / CHECKPOINT_MARKER).read_text()).get("step")
        source.model_extra = folder / MODEL_EXTRA if (folder / MODEL_EXTRA).is_file() else None
        return source
    if (folder / "adapter" / ADAPTER_CONFIG).is_file():  # a finished run's output folder
        return _open_ours(folder / "adapter")
    checkpoints = _checkpoints(folder)
    if checkpoints:  # an interrupted run: its newest complete checkpoint
        return _open_folder(checkpoints[-1][1])
    raise AdapterError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG}, no adapter/, no complete "
                       "checkpoint-<step>/)")


def _checkpoints(folder: Path) -> List[Tuple[int, Path]]:
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(child.name)
        if match and (child / CHECKPOINT_MARKER).is_file() and (child / "adapter" / ADAPTER_WEIGHTS).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _open_ours(folder: Path) -> AdapterSource:
    meta = read_adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: adapter weights missing")
    run_config = _find_upwards(folder, "run_config.json", 3)  # adapter/, checkpoint-N/adapter
    lora = _as_saved(LoRAConfig.from_dict(meta["lora"]) if meta.get("lora") else None, meta.get("layers") or {})
    return AdapterSource(
        "loralib", folder, load_tensors(weights), lora,
        {path: info["r"] for path, info in (meta.get("layers") or {}).items()}, _run_family(run_config, meta),
        weights=weights, config=meta, rank_state=_find_upwards(folder, "rank_pattern.json", 1),
        run_config=run_config)


def _as_saved(lora: Optional[LoRAConfig], layers: Dict[str, dict]) -> Optional[LoRAConfig]:
    """The config that rebuilds the layers a folder records. Folders written by inject / import_peft before
    WHOLE_PROJECTION existed say enable_lora=None for their one-LoRA-per-projection layers, which a model file
    reads as "every chunk" of a fused projection (GPT-2's c_attn). A folder that records no chunked
    (*MergedLinear) layer holds only whole projections, so it is rebuilt with WHOLE_PROJECTION."""
    if lora is None or lora.enable_lora is not None or not layers:
        return lora
    if any(str(info.get("type", "")).endswith("MergedLinear") for info in layers.values()):
        return lora
    return lora.replace(enable_lora=WHOLE_PROJECTION)


def _open_released(file: Path) -> AdapterSource:
    """microsoft's released files: a torch (or safetensors) state dict of LoRA factors (+ a head)."""
    from .models.released import is_gpt2_nlg_adapter, nlg_lora_config
    from .models.released_nlu import nlu_family, nlu_lora_config, read_nlu_adapter

    if not file.name.endswith(_TENSOR_FILES):
        raise AdapterError(f"{file}: not an adapter file (a released adapter is a {'/'.join(_TENSOR_FILES)} file)")
    state = read_nlu_adapter(file)  # unwraps model_state_dict / state_dict and DDP's "module." prefix
    ranks = {key[:-len(".lora_A")]: value.shape[0] for key, value in state.items() if key.endswith(".lora_A")}
    family = nlu_family(state)
    if family is not None:
        return AdapterSource("microsoft-nlu", file, state, nlu_lora_config(state), ranks, family, weights=file)
    if is_gpt2_nlg_adapter(state):
        config = nlg_lora_config(state)  # c_attn's lora_A stacks q's and v's: (2 r, n_embd)
        return AdapterSource("microsoft-nlg", file, state, config, {path: config.r for path in ranks}, "gpt2",
                             weights=file)
    raise AdapterError(f"{file}: holds no LoRA factors of a known layout (microsoft's NLU "
                       "'<model>.encoder.layer.N.attention.self.<proj>.lora_A' or GPT-2 "
                       f"'transformer.h.N.attn.c_attn.lora_A'); keys: {sorted(state)[:4]}...")


# -- PEFT ------------------------------------------------------------------------------------------
_PEFT_FACTORS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_embedding_A": "lora_A",
                 "lora_embedding_B": "lora_B", "lora_magnitude_vector": "lora_magnitude_vector",
                 "lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"}  # the last three: AdaLoRA's
_PEFT_KEY = re.compile(r"(.*)\.(" + "|".join(re.escape(n) for n in _PEFT_FACTORS) + ")")


def pattern_value(pattern: dict, path: str, default):
    """PEFT's per-module override: a key matches a module path ending in it (the key may be a regex)."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?({key})", path):
            return value
    return default


def _check_peft_config(cfg: dict, config_path: Path) -> None:
    if cfg.get("peft_type") not in ("LORA", "ADALORA"):
        raise AdapterError(f"{config_path}: peft_type is {cfg.get('peft_type')!r}; only LORA and ADALORA "
                           "adapters import")
    numbers = ("r", "lora_alpha") if cfg["peft_type"] == "LORA" else ("init_r", "lora_alpha")
    for key in numbers:
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise AdapterError(f"{config_path}: key {key!r} " + ("is missing" if key not in cfg else
                               f"is {cfg[key]!r}, not a number") + f" (a PEFT {cfg['peft_type']} config has "
                               f"{' and '.join(numbers)})")


def _peft_init(cfg: dict, config_path: Path):
    from . import init_methods

    init = cfg.get("init_lora_weights", True)
    init = True if init is True or init == "lora_ga" or init is None else init  # PEFT: LoRA-GA loads as plain
    try:
        init_methods.check_init(init)
    except ValueError as err:
        raise AdapterError(f"{config_path}: {err}") from None
    return init


def _peft_tensors(folder: Path) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, torch.Tensor], Path]:
    """(factors per module path, other tensors under the model's names, the weights file)."""
    weights = folder / PEFT_WEIGHTS
    if weights.is_file():
        tensors = load_tensors(weights)
    elif (folder / PEFT_WEIGHTS_BIN).is_file():
        weights = folder / PEFT_WEIGHTS_BIN
        tensors = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder}: neither {PEFT_WEIGHTS} nor {PEFT_WEIGHTS_BIN}")
    factors: Dict[str, Dict[str, torch.Tensor]] = {}
    extras: Dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{weights}: key {key!r} does not start with {PEFT_PREFIX!r}")
        inner = key[len(PEFT_PREFIX):]
        match = _PEFT_KEY.fullmatch(inner)
        if match:
            factors.setdefault(match.group(1), {})[_PEFT_FACTORS[match.group(2)]] = value
        else:
            extras[inner] = value
    return factors, extras, weights


def _adalora_as_lora(factors: Dict[str, Dict[str, torch.Tensor]], cfg: dict, weights: Path):
    """PEFT AdaLoRA factors as the exact plain LoRA they equal: {path: (A', B', alpha')} (see the docstring)."""
    init_r = cfg["init_r"]
    scale = (cfg["lora_alpha"] if cfg["lora_alpha"] > 0 else float(init_r)) / (init_r + 1e-5)
    plain = {}
    for path, pair in factors.items():
        if not {"lora_A", "lora_B", "lora_E"} <= set(pair):
            raise AdapterError(f"{weights}: AdaLoRA module {path!r} lacks its lora_A, lora_B or lora_E")
        kept = pair["lora_E"].view(-1) != 0
        if int(kept.sum()):
            plain[path] = {"lora_A": (pair["lora_E"] * pair["lora_A"])[kept], "lora_B": pair["lora_B"][:, kept]}
            plain[path]["alpha"] = scale * int(kept.sum())
    return plain


def _open_peft(folder: Path, cfg: dict) -> AdapterSource:
    config_path = folder / ADAPTER_CONFIG
    _check_peft_config(cfg, config_path)
    init = _peft_init(cfg, config_path)
    use_dora = bool(cfg.get("use_dora", False))
    factors, extras, weights = _peft_tensors(folder)
    if cfg["peft_type"] == "ADALORA":
        factors = _adalora_as_lora(factors, cfg, weights)
        cfg = dict(cfg, r=cfg["init_r"], use_rslora=False)
    tensors, ranks, alphas = dict(extras), {}, {}
    for path, pair in factors.items():
        if "lora_A" not in pair or "lora_B" not in pair:
            raise AdapterError(f"{weights}: module {path!r} lacks its lora_A or lora_B")
        if use_dora != ("lora_magnitude_vector" in pair):
            raise AdapterError(f"{weights}: module {path!r} " + (
                "lacks its lora_magnitude_vector (the config says use_dora=true)" if use_dora else
                "has a lora_magnitude_vector but the config says use_dora=false"))
        ranks[path] = pair["lora_A"].shape[0]
        alphas[path] = pair.get("alpha", pattern_value(cfg.get("alpha_pattern") or {}, path, cfg["lora_alpha"]))
        tensors.update({f"{path}.{name}": value for name, value in pair.items() if name != "alpha"})
    try:
        lora = LoRAConfig(r=int(cfg["r"]), lora_alpha=float(cfg["lora_alpha"]), target_modules=tuple(sorted(factors)),
                          lora_dropout=float(cfg.get("lora_dropout") or 0.0), use_rslora=bool(cfg.get("use_rslora")),
                          use_dora=use_dora, init_lora_weights=init)
    except (TypeError, ValueError) as err:  # a config value out of range, or no factor at all
        raise AdapterError(f"{config_path}: {err}") from None
    run_config = _find_upwards(folder, "run_config.json", 2)  # a run's peft_adapter/
    return AdapterSource("peft", folder, tensors, lora, ranks, _run_family(run_config, {}), weights=weights,
                         alphas=alphas, config=cfg, run_config=run_config)

