"""The pretrained GPT-2 of the LoRA paper's NLG runs: --model_card sizes, the default models/<name> folder, and
a loader that reads a Hugging Face folder, a model.safetensors / pytorch_model.bin file (the original's
gpt2-medium-pytorch_model.bin, bare GPT2Model keys) or a file gpt2_ft.py wrote ({"model_state_dict": ...},
DDP's "module." prefixes), asserting every backbone weight and the card's size.

    model = load_gpt2("models/gpt2-medium", "gpt2.md", lora)      # GPT2LMHeadModel, float32, CPU, eval mode
    state = read_state_dict(Path("model.26289.pt"))                # flat {key: tensor}, wrappers removed

`flag` names the command-line flag the path came from in every error (--init_checkpoint, --base_checkpoint).
"""
from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Optional

import torch

from ..config import LoRAConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
# --model_card -> (hub name, n_embd, n_layer, n_head)
MODEL_CARDS = {"gpt2.sm": ("gpt2", 768, 12, 12), "gpt2.md": ("gpt2-medium", 1024, 24, 16),
               "gpt2.lg": ("gpt2-large", 1280, 36, 20)}
_KNOWN_SIZES = {(e, l): card for card, (_, e, l, _) in MODEL_CARDS.items()} | {(1600, 48): "gpt2-xl"}
_LAYER = re.compile(r"^(?:transformer\.)?h\.(\d+)\.")


def default_checkpoint(model_card: str) -> str:
    """models/<hub name> for the card, under the working directory or the repository."""
    name = MODEL_CARDS[model_card][0]
    for root in (Path("models"), REPO_ROOT / "models"):
        if (root / name).is_dir():
            return str(root / name)
    raise FileNotFoundError(f"no --init_checkpoint given and models/{name} does not exist: download it with "
                            f"`python -m loralib.models.hub {name}` or pass the GPT-2 checkpoint")


def read_state_dict(path: Path, flag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """A torch or safetensors file as a flat dict of tensors: the "model_state_dict" wrapper and DDP's
    "module." prefixes removed. A file that is neither is one ValueError starting with `flag` (the
    command-line flag it came from) and the path."""
    name = f"{flag} {path}" if flag else str(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as e:  # a corrupt or foreign file
            raise ValueError(f"{name}: not a safetensors file ({type(e).__name__}: {e})") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{name}: not a PyTorch checkpoint ({_why_unreadable(path, e)})") from None
    return plain_state_dict(state, name)


def _why_unreadable(path: Path, err: Exception) -> str:
    """A short reason torch.load(weights_only=True) failed. Its own message advises re-running with
    weights_only=False, which would run the file's code: wrong advice for a file that is not a checkpoint
    (and unsafe for one from elsewhere), so it is not passed on."""
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(err, EOFError):
        return "the file ends early"
    if "weights_only" in str(err):
        if zipfile.is_zipfile(path):
            return "a torch archive that holds objects other than tensors, which are not loaded"
        with open(path, "rb") as f:
            text = f.read(64).decode("utf-8", "replace").lstrip()
        looks = ": it starts like JSON text" if text.startswith(("{", "[")) else ""
        return f"neither a torch zip archive nor a pickle of tensors{looks}"
    first = next(iter(str(err).splitlines()), "")
    return f"{type(err).__name__}: {first[:200]}"


def plain_state_dict(state, name: str) -> Dict[str, torch.Tensor]:
    """A loaded checkpoint as a flat dict of tensors: the "model_state_dict" wrapper and DDP's "module."
    prefixes removed; anything else is a ValueError naming `name`."""
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{name}: expected a dict of tensors (optionally under 'model_state_dict')")
    return {re.sub(r"^(module\.)+", "", k): v for k, v in state.items()}


def size_name(n_embd: int, n_layer: int) -> Optional[str]:
    """The --model_card (or "gpt2-xl") of a GPT-2 of this width and depth; None for other sizes."""
    return _KNOWN_SIZES.get((n_embd, n_layer))


def check_card(model_card: str, n_embd: int, n_layer: int, source: str, flag: str, strict: bool) -> None:
    """A GPT-2 of width n_embd and depth n_layer must be the card's. strict (a bare file): any other size is
    refused; otherwise (a folder with its config.json) a known other size is refused and a non-standard one,
    e.g. a tiny test model, is used as it is, with a warning."""
    _, want_embd, want_layer, _ = MODEL_CARDS[model_card]
    if (n_embd, n_layer) == (want_embd, want_layer):
        return
    found = size_name(n_embd, n_layer)
    if strict or found is not None:
        raise ValueError(f"{flag} {source} holds a GPT-2 with n_embd={n_embd}, n_layer={n_layer}"
                         f"{f' ({found})' if found else ''}, but --model_card {model_card} is n_embd={want_embd}, "
                         f"n_layer={want_layer}: pass the --model_card of the checkpoint")
    warnings.warn(f"{flag} {source}: a GPT-2 of non-standard size (n_embd={n_embd}, n_layer={n_layer}); "
                  f"its config.json is used and --model_card {model_card} is ignored", stacklevel=3)


def check_gpt2_folder(folder: Path, flag: str) -> None:
    """A model folder given for a GPT-2 must hold one: its config.json's model_type is "gpt2" (checked
    before its weights are read; a Llama's config has no n_embd to check against the card)."""
    from .loading import read_config

    try:
        config = read_config(folder)
    except FileNotFoundError:
        raise ValueError(f"{flag} {folder}: not a GPT-2 model folder (it has no config.json)") from None
    except ValueError as e:  # config.json is not JSON
        raise ValueError(f"{flag} {folder}: not a GPT-2 model folder ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "gpt2":
        what = f"a {model_type} model" if model_type else "a model folder whose config.json names no model_type"
        raise ValueError(f"{flag} {folder} is {what}, not a GPT-2")


def model_record(model_card: str, config, source: str) -> dict:
    """What a run records as its model: {"model_name_or_path": the card's hub name} when the GPT-2 loaded is
    that card's size (n_layer, n_embd, n_head), so `loralib compare` holds it against the paper's row for
    that model; otherwise the checkpoint it came from (`source`) with "model_size", e.g. a tiny test model
    that --model_card does not describe. config: the loaded model's (n_layer, n_embd, n_head)."""
    name, n_embd, n_layer, n_head = MODEL_CARDS[model_card]
    size = {"n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head}
    if size == {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head}:
        return {"model_name_or_path": name}
    return {"model_name_or_path": str(source), "model_size": size}


class _TensorCheckpoint:
    """A state dict in the shape loralib.models.loading.load_state_into reads (files / shape / tensor)."""

    def __init__(self, state: Dict[str, torch.Tensor], source: Path):
        self.state = state
        self.files = {k: source for k in state}

    def shape(self, key: str):
        return tuple(self.state[key].shape)

    def tensor(self, key: str) -> torch.Tensor:
        return self.state[key]


def load_gpt2(source: str, model_card: str, lora: Optional[LoRAConfig], flag: str = "--init_checkpoint"):
    """Our GPT2LMHeadModel with the pretrained weights of `source` (folder or file) and LoRA per `lora`
    (factors freshly initialised). Every backbone weight must be in the checkpoint; its size must be the
    card's; a folder must hold a GPT-2 (config.json's model_type). Returns the model in eval mode, float32,
    on the CPU, with `gpt2_source` = `source`."""
    from . import gpt2
    from .loading import from_pretrained, load_state_into

    path = Path(source).expanduser()
    if path.is_dir():
        check_gpt2_folder(path, flag)
        model = from_pretrained(path, "causal-lm", lora=lora, dtype=torch.float32)
        cfg = model.config
        check_card(model_card, cfg.n_embd, cfg.n_layer, str(path), flag, strict=False)
        info = model.loading_info
    elif path.is_file():
        state = read_state_dict(path, flag)
        state.pop("lm_head.weight", None)  # tied to wte: the original's files hold it as lm_head.decoder.weight
        state.pop("lm_head.decoder.weight", None)
        wte = state.get("wte.weight", state.get("transformer.wte.weight"))
        if wte is None:
            lora_keys = [k for k in state if "lora_" in k]
            what = "LoRA factors only (an adapter: give it to gpt2_beam.py --init_checkpoint)" if lora_keys else \
                f"keys {sorted(state)[:4]}"
            raise ValueError(f"{flag} {path}: not a pretrained GPT-2 (no wte.weight); it holds {what}")
        layers = {int(m.group(1)) for m in map(_LAYER.match, state) if m}
        n_layer, n_embd = (max(layers) + 1 if layers else 0), wte.shape[1]
        check_card(model_card, n_embd, n_layer, str(path), flag, strict=True)
        _, _, _, n_head = MODEL_CARDS[model_card]
        wpe = state.get("wpe.weight", state.get("transformer.wpe.weight"))
        hf_config = {"model_type": "gpt2", "vocab_size": wte.shape[0], "n_embd": n_embd, "n_layer": n_layer,
                     "n_head": n_head, "n_positions": wpe.shape[0] if wpe is not None else 1024}
        with torch.device("meta"):
            model = gpt2.build(hf_config, "causal-lm", None, lora)
        info = load_state_into(model, _TensorCheckpoint(state, path), torch.float32, "cpu")
        model.hf_config = hf_config
        model.eval()
    else:
        raise FileNotFoundError(f"{flag} {source}: no such file or folder")
    if info["missing"] or info["newly_initialized"]:
        missing = info["missing"] + info["newly_initialized"]
        raise ValueError(f"{flag} {source}: the checkpoint lacks GPT-2 weights {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}")
    if info["unexpected"]:
        raise ValueError(f"{flag} {source}: keys the GPT-2 has no place for: {info['unexpected'][:4]} "
                         "(a fine-tuned file? pass the pretrained model)")
    model.gpt2_source = str(source)  # what a run records as its model when it is not the card's (model_record)
    return model
