"""LoRA-Pro under data parallelism on CPU (gloo, loopback): 2 processes == 1 process with the same global
batch. DDP (torchrun's engine) for LoRAProAdamW's two modes; DeepSpeed ZeRO-1/2/3 (CPU accelerator) for the
gradient-adjustment path of loralib.optim.deepspeed_lorapro."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import loralib
from loralib.optim import LoRAProAdamW

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _torchrun import free_port  # noqa: E402

GLOBAL_BATCH, STEPS = 8, 3


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(loralib.Linear(6, 8, r=2, lora_alpha=4), nn.Tanh(),
                          loralib.MergedLinear(8, 9, r=2, lora_alpha=2, enable_lora=[True, False, True]),
                          nn.Tanh(), loralib.Linear(9, 5, r=3, lora_alpha=3, use_rslora=True), nn.Tanh(),
                          nn.Linear(5, 3))
    loralib.mark_only_lora_as_trainable(model)
    for p in model[6].parameters():
        p.requires_grad = True
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            layer.lora_B.normal_(std=0.3)
    return model.to(dtype)


def _batch(step, dtype):
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(GLOBAL_BATCH, 6, generator=gen).to(dtype),
            torch.randn(GLOBAL_BATCH, 3, generator=gen).to(dtype))


def _reference(mode, dtype):
    """One process, the whole global batch per step."""
    model = _model(dtype)
    opt = LoRAProAdamW(model, lr=1e-2, mode=mode, weight_decay=0.0)
    for step in range(STEPS):
        x, y = _batch(step, dtype)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _assert_same(got, want, atol):
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], atol=atol, rtol=0), key
    moved = _model(next(iter(want.values())).dtype).state_dict()
    assert any(not torch.equal(moved[k], want[k]) for k in want if "lora_" in k)  # training did something


# -- DDP ------------------------------------------------------------------------------------------

def _ddp_worker(rank, world, port, mode, out):
    _env(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_model(torch.float64))
        opt = LoRAProAdamW(model, lr=1e-2, mode=mode)  # finds the pairs through the DDP wrapper
        for step in range(STEPS):
            x, y = (t.chunk(world)[rank] for t in _batch(step, torch.float64))
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()  # DDP all-reduces (averages) the gradients here
            opt.step()
        if rank == 0:
            torch.save({k: v.detach() for k, v in model.module.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_ddp_two_processes_equal_one(mode, tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, free_port(), mode, out), nprocs=2, join=True)
    _assert_same(torch.load(out), _reference(mode, torch.float64), atol=1e-12)


# -- DeepSpeed ----------------------------------------------------------------------------------------

def _train_engine(engine, world, rank, accumulation, step_fn):
    """STEPS global batches, this rank's micro-batches of each, step_fn(engine) after every backward."""
    for step in range(STEPS):
        x, y = _batch(step, torch.float32)
        shards = list(zip(x.chunk(world * accumulation), y.chunk(world * accumulation)))
        for k in range(accumulation):
            xs, ys = shards[rank * accumulation + k]
            engine.backward(F.mse_loss(engine(xs), ys))
            step_fn(engine)


def _deepspeed_worker(rank, world, port, out):
    _env(rank, world, port)
    import deepspeed
    import deepspeed.ops

    # Test-machine choice, not part of the method: skip the JIT build of DeepSpeed's shared-memory
    # all-reduce op (minutes of g++ on a fresh machine); DeepSpeed then uses plain gloo, as off Linux.
    deepspeed.ops.__compatible_ops__ = dict(deepspeed.ops.__compatible_ops__, deepspeed_shm_comm=False)
    deepspeed.init_distributed(dist_backend="gloo")
    from loralib.optim.deepspeed_lorapro import ZeROLoRAProFull, lorapro_zero_step, sgd_for_full_mode
    from loralib.train.zero3 import gathered_state_dict, is_partitioned

    results = {}
    micro = GLOBAL_BATCH // 2                       # per-rank micro-batch
    accumulation = GLOBAL_BATCH // (micro * world)  # 1 process: two micro-batches accumulated
    for stage in (1, 2, 3):
        model = _model(torch.float32)
        client = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        # DeepSpeed clips at norm 1.0 unless told otherwise; the reference does not clip.
        config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
                  "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,  # see test_zero3
                                        "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0},
                  "gradient_clipping": 0.0}
        engine, *_ = deepspeed.initialize(model=model, optimizer=client, config=config)
        _train_engine(engine, world, rank, accumulation, lorapro_zero_step)
        assert is_partitioned(engine.module) == (stage == 3)  # ZeRO-3 partitions A and B themselves
        results[stage] = {k: v.detach().clone() for k, v in gathered_state_dict(engine.module).items()}

        # The full variant: its m x n moments sharded by pair over the ranks, DeepSpeed running plain SGD.
        model = _model(torch.float32)
        config = dict(config, zero_allow_untested_optimizer=True)
        engine, *_ = deepspeed.initialize(model=model, optimizer=sgd_for_full_mode(model, lr=1e-2), config=config)
        full = ZeROLoRAProFull()

        def full_step(engine):
            if engine.is_gradient_accumulation_boundary():
                assert full.adjust(engine) == 3
            engine.step()

        _train_engine(engine, world, rank, accumulation, full_step)
        results[f"full{stage}"] = {k: v.detach().clone() for k, v in gathered_state_dict(engine.module).items()}
        results[f"full{stage}-units"] = sorted(full.state)  # this rank's share of the moments

    # What does not work, and must say so: LoRAProAdamW as ZeRO's client optimizer (ZeRO flattens its
    # parameters into partitions; the released code then paired A and B by position in them).
    model = _model(torch.float32)
    try:
        config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
                  "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, optimizer=LoRAProAdamW(model, lr=1e-2), config=config)
        x, y = _batch(0, torch.float32)
        for _ in range(accumulation):  # up to the first real optimizer step
            engine.backward(F.mse_loss(engine(x[:micro]), y[:micro]))
            engine.step()
        results["client"] = "ran"
    except RuntimeError as err:
        results["client"] = str(err)
    if rank == 0:
        torch.save(results, out)
    # Leave together, with the group torn down: a rank that exits while the other still talks to it, or with
    # gloo's threads alive, can abort ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_deepspeed_zero_stages_one_to_three_one_and_two_processes(world, tmp_path):
    pytest.importorskip("deepspeed")
    out = str(tmp_path / "ds.pt")
    mp.spawn(_deepspeed_worker, args=(world, free_port(), out), nprocs=world, join=True)
    results = torch.load(out)
    want = _reference("efficient", torch.float32)  # efficient LoRA-Pro = adjusted gradients + Adam
    for stage in (1, 2, 3):
        _assert_same(results[stage], want, atol=2e-6)
    full = _reference("full", torch.float32)   # LoRAProAdamW(mode="full") on one process
    for stage in (1, 2, 3):
        _assert_same(results[f"full{stage}"], full, atol=2e-6)
        # rank 0 holds part of the state when there are two ranks, all of it alone (3 pairs + the head's 2)
        assert len(results[f"full{stage}-units"]) == (5 if world == 1 else 2)
    assert "ZeRO" in results["client"]
