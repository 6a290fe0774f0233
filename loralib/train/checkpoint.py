"""Checkpoints of the training loop: the adapter plus everything an exact resume needs, written atomically.

Layout under output_dir:

    checkpoint-<step>/
      adapter/                 loralib.save_adapter's folder: "lora_" tensors + other trainable parameters
      model_extra.pt           the model's persistent buffers (BatchNorm statistics, AdaLoRA's ranknum), or
                               the whole state dict with save_full_model (LoRA-Pro decays the frozen W0)
      training_state.pt        optimizer, lr scheduler, grad scaler, allocator, loop position, loss sums
                               (every rank's log window gathered: loralib.train.loss_tally)
      rng_state_<rank>.pt      python / numpy / torch CPU / CUDA generator states of each process
      callbacks_<rank>.pt      each process's callback state (callbacks with state_dict(), e.g. the
                               sharded moments of LoRA-Pro's full variant under DeepSpeed)
      deepspeed/               engine.save_checkpoint's folder (DeepSpeed runs: optimizer partitions)
      checkpoint.json          step, epoch, best metric; written last
    best_adapter/              the adapter of the best evaluation so far
    adapter/                   the final adapter

Atomicity: a checkpoint is written into `.tmp-checkpoint-<step>/`, every file is fsync'ed, and the
folder is renamed to `checkpoint-<step>` (rename is atomic on POSIX), then the parent is fsync'ed. Older
checkpoints are pruned only after that rename, so a crash at any moment leaves the last good checkpoint
as it was; a left-over `.tmp-*` folder is never taken for a checkpoint and is removed by the next save.
Everything is loaded with torch.load(weights_only=True): a checkpoint holds tensors and plain values. That
includes DeepSpeed's own files, which its engine would unpickle with weights_only=False (arbitrary code): they
are loaded weights_only with an allow-list of the four plain DeepSpeed types they hold (load_deepspeed).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ..adapters import ADAPTER_WEIGHTS, save_adapter
from ..files import apply_umask
from .distributed import DistContext, barrier
from .zero3 import gathered_state_dict

try:
    import numpy as np
except ImportError:  # numpy is optional for the loop
    np = None

PREFIX = "checkpoint-"
MARKER = "checkpoint.json"
TRAINING_STATE = "training_state.pt"
MODEL_EXTRA = "model_extra.pt"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)")


# -- files -----------------------------------------------------------------------------------------
def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            apply_umask(os.path.join(dirpath, name))  # safetensors and mkstemp write 0600
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """fsync `tmp` and rename it to `final`. An existing `final` is moved aside first and removed only
    after the new folder is in place."""
    _fsync_tree(tmp)
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def save_adapter_atomic(model: nn.Module, directory: Path, metadata: Optional[dict] = None,
                        state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """loralib.save_adapter into a temporary folder, published by one rename."""
    directory = Path(directory)
    tmp = _fresh_dir(directory.with_name(f".tmp-{directory.name}"))
    save_adapter(model, tmp, metadata=metadata, state_dict=state_dict)
    _publish(tmp, directory)
    return directory


# -- RNG -------------------------------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if np is not None and "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- model tensors ---------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, full: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict the adapter files read: under ZeRO-3 its LoRA factors and trainable parameters (all
    parameters with full) gathered whole. Call on every rank (collective under ZeRO-3)."""
    return gathered_state_dict(model, lambda name, p: full or "lora_" in name or p.requires_grad)


def _model_extra(model: nn.Module, full: bool, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Model tensors an exact resume needs beyond the adapter: persistent buffers, or everything."""
    if full:
        return state
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in state.items() if k not in params}


def _load_model_tensors(model: nn.Module, tensors: Dict[str, torch.Tensor], source: Path) -> None:
    state = model.state_dict()
    for key, value in tensors.items():
        if key not in state:
            raise ValueError(f"{source}: key {key!r} is not in the model ({type(model).__name__}); "
                             "the checkpoint was written for another model")
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(state[key].shape)}")
    model.load_state_dict(tensors, strict=False)


# -- save ------------------------------------------------------------------------------------------
def save_checkpoint(output_dir: Path, step: int, model: nn.Module, ctx: DistContext, training_state: dict,
                    meta: dict, engine=None, save_full_model: bool = False, total_limit: Optional[int] = None,
                    rank_state: Optional[dict] = None) -> Path:
    """Write checkpoint-<step> atomically. Call on every rank (collective under DDP / DeepSpeed).

    model: the unwrapped module; training_state: optimizer / scheduler / scaler / allocator state dicts
    and the loop position (rank 0's is written); meta: small JSON-able summary for checkpoint.json;
    rank_state: this process's own state (every rank's is written, as callbacks_<rank>.pt).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".tmp-{PREFIX}{step}"
    if ctx.is_main:
        _fresh_dir(tmp)
    barrier(ctx)
    torch.save(rng_state(), tmp / f"rng_state_{ctx.rank}.pt")
    if rank_state:
        torch.save(rank_state, tmp / f"callbacks_{ctx.rank}.pt")
    if engine is not None:
        engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False,
                               exclude_frozen_parameters=True)
    state = adapter_state_dict(model, full=save_full_model)
    if ctx.is_main:
        save_adapter(model, tmp / "adapter", metadata={"global_step": step}, state_dict=state)
        torch.save(_model_extra(model, save_full_model, state), tmp / MODEL_EXTRA)
        torch.save(training_state, tmp / TRAINING_STATE)
    barrier(ctx)  # every rank's files are in tmp
    if ctx.is_main:
        (tmp / MARKER).write_text(json.dumps(dict(meta, step=step, world_size=ctx.world_size), indent=2) + "\n")
        _publish(tmp, final)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-max(1, total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return final


# -- find and load ---------------------------------------------------------------------------------
def is_complete(path: Path) -> bool:
    path = Path(path)
    return (path.is_dir() and _NAME.fullmatch(path.name) is not None and (path / MARKER).is_file()
            and (path / TRAINING_STATE).is_file() and (path / "adapter" / ADAPTER_WEIGHTS).is_file())


def list_checkpoints(output_dir: Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints under output_dir, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(_NAME.fullmatch(p.name).group(1)), p) for p in output_dir.iterdir() if is_complete(p)]
    return sorted(found)


def resolve_resume(resume_from, output_dir: Path) -> Path:
    """The checkpoint folder `resume_from` names: "latest" (the newest complete one under output_dir),
    a checkpoint folder, or a folder holding checkpoints (its newest)."""
    if resume_from == "latest" or resume_from is True:
        found = list_checkpoints(output_dir)
        if not found:
            raise ValueError(f"resume_from='latest': no complete checkpoint under output_dir={str(output_dir)!r}")
        return found[-1][1]
    path = Path(resume_from)
    if is_complete(path):
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1][1]
    raise ValueError(f"resume_from={str(resume_from)!r}: not a complete checkpoint folder and holds none "
                     f"(a complete one is named {PREFIX}<step> and contains {MARKER})")


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / MARKER).read_text())


def load_adapter_weights(folder: Path, model: nn.Module) -> None:
    """The tensors of a save_adapter folder into `model`, every key and shape checked (no injection:
    the model already has the layers it was trained with)."""
    weights = Path(folder) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: adapter weights missing")
    _load_model_tensors(model, load_file(str(weights)), weights)


def load_model(path: Path, model: nn.Module) -> None:
    """Adapter tensors and the extra model tensors of checkpoint `path` into `model`."""
    path = Path(path)
    load_adapter_weights(path / "adapter", model)
    extra = path / MODEL_EXTRA
    if extra.is_file():
        _load_model_tensors(model, torch.load(extra, map_location="cpu", weights_only=True), extra)


def load_training_state(path: Path) -> dict:
    return torch.load(Path(path) / TRAINING_STATE, map_location="cpu", weights_only=True)


def load_rng(path: Path, rank: int) -> None:
    file = Path(path) / f"rng_state_{rank}.pt"
    if not file.is_file():
        raise ValueError(f"{file}: missing; the checkpoint was written by fewer processes than this run's rank "
                         f"{rank} needs (exact resume needs the same world size)")
    set_rng_state(torch.load(file, map_location="cpu", weights_only=True))


def load_rank_state(path: Path, rank: int) -> dict:
    """This process's callbacks_<rank>.pt of checkpoint `path` ({} when the run had none)."""
    file = Path(path) / f"callbacks_{rank}.pt"
    return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else {}


def _deepspeed_safe_types() -> list:
    """The non-tensor types DeepSpeed 0.19's ZeRO-0..3 checkpoints of this loop hold (found by loading them
    with weights_only=True): plain classes, an enum and a namedtuple, rebuilt from data without running code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _weights_only_loads():
    """Every torch.load inside the block (DeepSpeed's checkpoint engine passes weights_only=False) runs with
    weights_only=True and the allow-list; a file that needs another type is refused, naming it."""
    real_load = torch.load
    allowed = _deepspeed_safe_types()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return real_load(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            raise ValueError(f"{f}: refused: unpickling it would build {found.group(1) if found else 'a type'} "
                             "that is not on the allow-list of plain types (a DeepSpeed checkpoint must not run "
                             "code when loaded; if this file is yours and DeepSpeed changed its format, add the "
                             "type to loralib.train.checkpoint._deepspeed_safe_types)") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = real_load


def load_deepspeed(path: Path, engine) -> None:
    """engine.load_checkpoint of the checkpoint's deepspeed/ folder, with every file loaded weights_only."""
    folder = Path(path) / DEEPSPEED_DIR
    if not folder.is_dir():
        raise ValueError(f"{folder}: missing; the checkpoint was not written by a DeepSpeed run")
    with _weights_only_loads():
        engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)


def remove_stale(output_dir: Path) -> None:
    """Remove half-written folders a crash left behind (never a complete checkpoint)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    for p in output_dir.iterdir():
        if not p.is_dir():
            continue
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".old-"):
            final = p.with_name(p.name[len(".old-"):])
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:  # the crash fell between the two renames of _publish: the old folder is the good one
                os.rename(p, final)
