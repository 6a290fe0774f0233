"""Processes and data shards: torchrun's environment, DDP wrapping, and the deterministic batch order.

Under `torchrun --nproc_per_node N` (or `python -m torch.distributed.run`), RANK / WORLD_SIZE /
LOCAL_RANK are set; `setup()` joins the process group (nccl on GPU, gloo on CPU) unless the caller
already did. Without them everything runs as rank 0 of 1. A group joined here stays up for later calls
(DeepSpeed keeps references to it) and is destroyed when the process exits, as is the 1-process group that
DeepSpeed makes when `deepspeed_engine` runs without a launcher.

Data order (`ShardedBatches`): one permutation of the dataset per epoch, drawn from a generator seeded
with seed + epoch and nothing else, so a resumed run sees the same order. The permutation is cut into
global micro-batches of per_device_batch_size * world_size samples; rank r takes the r-th contiguous
block of each. A global batch thus holds the same samples for any world size, and N processes with
batch b match 1 process with batch N b (or batch b and N accumulation steps) whenever the dataset
divides evenly. Without drop_last the order is padded by wrapping around to a multiple of world_size
(as torch's DistributedSampler does), so every rank gets the same number of micro-batches; the last
one may be short.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist
import torch.nn as nn

from ..files import read_json


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device_type: str) -> DistContext:
    """Join the torchrun process group if the environment names one (gloo on CPU, nccl on GPU)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    _destroy_at_exit()
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, initialized_here=True)


def _destroy_at_exit() -> None:
    """Destroy the process group when the process exits (once), before interpreter finalization: a group
    left to be freed there can abort the process ("terminate called without an active exception")."""
    atexit.unregister(_destroy)  # registered at most once, however many groups or engines were made
    atexit.register(_destroy)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's value of obj on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if not ctx.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / ctx.world_size


def wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """DistributedDataParallel over the trainable parameters (frozen ones are skipped by DDP itself).

    DDP broadcasts rank 0's parameters and buffers on construction, so every rank starts equal."""
    if not ctx.distributed:
        return model
    device_ids = [device.index if device.index is not None else ctx.local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def no_sync(model: nn.Module, skip_sync: bool):
    """DDP's no_sync() on micro-steps that are not the last of an accumulation group."""
    if skip_sync and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


class ShardedBatches:
    """This rank's micro-batches (lists of dataset indices) of one epoch; see the module docstring."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 drop_last: bool = False, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError("train_dataset is empty")
        global_batch = batch_size * world_size
        if drop_last and num_samples < global_batch:
            raise ValueError(f"drop_last=True with {num_samples} samples and a global micro-batch of "
                             f"{global_batch} (per_device_batch_size={batch_size} x {world_size} processes) "
                             "leaves no batch")
        self.num_samples, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank
        self.seed, self.drop_last, self.shuffle = seed, drop_last, shuffle

    def _order(self, epoch: int) -> List[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        global_batch = self.batch_size * self.world_size
        if self.drop_last:
            return order[:(self.num_samples // global_batch) * global_batch]
        padded = -(-self.num_samples // self.world_size) * self.world_size
        while len(order) < padded:
            order += order[:padded - len(order)]
        return order

    def __len__(self) -> int:
        """Micro-batches per rank per epoch."""
        global_batch = self.batch_size * self.world_size
        if self.drop_last:
            return self.num_samples // global_batch
        per_rank = -(-self.num_samples // self.world_size)
        return -(-per_rank // self.batch_size)

    def batches(self, epoch: int) -> List[List[int]]:
        order = self._order(epoch)
        global_batch = self.batch_size * self.world_size
        out = []
        for start in range(0, len(order), global_batch):
            block = order[start:start + global_batch]
            share = len(block) // self.world_size  # == batch_size except in a short last block
            out.append(block[self.rank * share:(self.rank + 1) * share])
        return out


# -- DeepSpeed -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_deepspeed_config(source) -> dict:
    """A DeepSpeed config from a JSON file or a dict (a copy); a missing or malformed file is named."""
    if isinstance(source, dict):
        return json.loads(json.dumps(source))
    return read_json(source, f"deepspeed_config={str(source)!r}: no such file")


def zero_stage(source) -> int:
    """The ZeRO stage of a DeepSpeed config (file or dict); 0 when it names none."""
    ds = source if isinstance(source, dict) else read_deepspeed_config(source)
    return (ds.get("zero_optimization") or {}).get("stage", 0)


def deepspeed_config(config, world_size: int, has_factory: bool) -> dict:
    """The DeepSpeed config of `config.deepspeed_config` (a path or a dict), completed from the TrainConfig:
    batch sizes, accumulation, clipping and precision are the loop's; a value that contradicts them, a
    'scheduler' section, an 'optimizer' section next to optimizer_factory, or a ZeRO stage other than
    0-3 is a ValueError."""
    ds = read_deepspeed_config(config.deepspeed_config)
    ours = {"train_micro_batch_size_per_gpu": config.per_device_batch_size,
            "gradient_accumulation_steps": config.grad_accum_steps,
            "train_batch_size": config.per_device_batch_size * config.grad_accum_steps * world_size,
            "gradient_clipping": float(config.max_grad_norm or 0.0)}
    for key, value in ours.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ValueError(f"deepspeed_config {key}={ds[key]!r} contradicts TrainConfig, which gives {value!r} "
                             "(set it to \"auto\" or drop it)")
        ds[key] = value
    for key in ("bf16", "fp16"):
        section = dict(ds.get(key) or {})
        wanted = config.precision == key
        if section.get("enabled") not in (None, "auto") and bool(section["enabled"]) != wanted:
            raise ValueError(f"deepspeed_config {key}.enabled={section['enabled']!r} contradicts "
                             f"TrainConfig.precision={config.precision!r}")
        section["enabled"] = wanted
        ds[key] = section
    if "scheduler" in ds:
        raise ValueError("deepspeed_config has a 'scheduler' section: set the schedule with TrainConfig.schedule "
                         "and warmup_steps / warmup_ratio instead")
    if "optimizer" in ds and has_factory:
        raise ValueError("deepspeed_config has an 'optimizer' section and train() got optimizer_factory: "
                         "use one or the other")
    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed_config zero_optimization.stage={stage!r}: ZeRO stages are 0, 1, 2 and 3")
    return ds


def deepspeed_engine(model: nn.Module, optimizer, make_scheduler, ds: dict):
    """deepspeed.initialize with our optimizer (None: the config's 'optimizer' section) and our schedule,
    which DeepSpeed then steps and checkpoints. Returns (engine, its optimizer, the scheduler)."""
    import deepspeed

    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        # One process without a launcher: DeepSpeed still wants a process group.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    own_optimizer = "optimizer" in ds
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=None if own_optimizer else optimizer,
        model_parameters=[p for p in model.parameters() if p.requires_grad] if own_optimizer else None,
        lr_scheduler=make_scheduler, config=ds)
    _destroy_at_exit()  # also the 1-process group DeepSpeed has just made
    return engine, engine.optimizer, scheduler
