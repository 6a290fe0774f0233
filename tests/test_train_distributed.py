"""Several processes: the deterministic sharding, and 2 CPU processes (gloo, loopback) launched with
torch.distributed.run == 1 process with the same global batch, through DDP and through DeepSpeed."""
from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import loralib
from loralib.train import ShardedBatches, TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _torchrun import DEEPSPEED_PRELUDE, torchrun, write_worker  # noqa: E402

IN, CLASSES, N_SAMPLES = 6, 3, 32


# -- sharding -----------------------------------------------------------------------------------------

def test_global_batches_are_the_same_for_any_world_size():
    one = ShardedBatches(20, batch_size=4, world_size=1, seed=3).batches(epoch=2)
    two = [ShardedBatches(20, batch_size=2, world_size=2, rank=r, seed=3).batches(epoch=2) for r in (0, 1)]
    assert len(two[0]) == len(two[1]) == len(one) == 5
    for k, global_batch in enumerate(one):
        assert two[0][k] + two[1][k] == global_batch
    assert sorted(i for b in one for i in b) == list(range(20))  # a permutation
    again = ShardedBatches(20, batch_size=4, world_size=1, seed=3)
    assert again.batches(2) == one and again.batches(1) != one  # a function of (seed, epoch) only


def test_padding_and_drop_last():
    shards = [ShardedBatches(7, batch_size=2, world_size=2, rank=r, seed=0) for r in (0, 1)]
    got = [s.batches(0) for s in shards]
    assert [len(b) for b in got[0]] == [len(b) for b in got[1]] == [2, 2]  # 7 padded to 8 by wrapping
    flat = [i for r in (0, 1) for b in got[r] for i in b]
    assert len(flat) == 8 and set(flat) == set(range(7))
    dropped = ShardedBatches(7, batch_size=2, world_size=2, rank=0, seed=0, drop_last=True)
    assert len(dropped) == len(dropped.batches(0)) == 1
    with pytest.raises(ValueError, match="drop_last"):
        ShardedBatches(3, batch_size=2, world_size=2, drop_last=True)


# -- the same run on 1 and 2 processes ----------------------------------------------------------------

def build(dtype, adalora=False):
    """LoRA layers with B non-zero, or AdaLoRA's SVD-form layers with E non-zero (so masking changes the
    output); a trained head."""
    from loralib.adalora import SVDLinear

    torch.manual_seed(11)
    model = nn.Sequential()
    if adalora:
        model.l1, model.l2 = SVDLinear(IN, 12, r=4, lora_alpha=8), SVDLinear(12, 8, r=4, lora_alpha=4)
    else:
        model.l1, model.l2 = loralib.Linear(IN, 12, r=4, lora_alpha=8), loralib.Linear(12, 8, r=2, lora_alpha=2)
    model.head = nn.Linear(8, CLASSES)
    loralib.mark_only_lora_as_trainable(model)
    for p in model.head.parameters():
        p.requires_grad = True
    with torch.no_grad():
        for layer in (model.l1, model.l2):
            (layer.lora_E.normal_(std=0.5) if adalora else layer.lora_B.normal_(std=0.3))
    return Classifier(model).to(dtype)


class Classifier(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x, labels):
        b = self.body
        logits = b.head(torch.tanh(b.l2(torch.tanh(b.l1(x)))))
        return {"loss": F.cross_entropy(logits, labels)}


def make_data(dtype):
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(N_SAMPLES, IN, generator=gen).to(dtype), torch.randint(0, CLASSES, (N_SAMPLES,), generator=gen)
    return [{"x": x[i], "labels": y[i]} for i in range(N_SAMPLES)]


def collate(items):
    return {"x": torch.stack([d["x"] for d in items]), "labels": torch.stack([d["labels"] for d in items])}


def train_once(out_dir, batch_size, dtype=torch.float64, deepspeed_config=None, resume_from=None, callbacks=(),
               adalora=False):
    """Global batch 8 per step: batch_size x processes x 2 accumulation steps; 2 epochs, eval every 3 steps.
    adalora: SVD-form layers with AdaLoRA's rank allocator (8 ranks -> 4) and its orthogonal regulariser."""
    from loralib.adalora import RankAllocator, compute_orth_regu

    model = build(dtype, adalora)
    allocator = RankAllocator(model, lora_r=4, target_rank=2, init_warmup=1, final_warmup=2, mask_interval=1,
                              beta1=0.85, beta2=0.85) if adalora else None
    regularizer = (lambda m: compute_orth_regu(m, 0.1)) if adalora else None
    config = TrainConfig(output_dir=str(out_dir), num_epochs=2, per_device_batch_size=batch_size, grad_accum_steps=2,
                         lr=2e-2, weight_decay=0.05, warmup_steps=2, max_grad_norm=1.0, eval_every=3,
                         metric_for_best="loss", save_every=4, progress_bar=False, log_every=2,
                         deepspeed_config=deepspeed_config, device="cpu", resume_from=resume_from)
    items = collate(make_data(dtype))

    def eval_fn(m):
        with torch.no_grad():
            return {"loss": m(**items)["loss"].item()}

    return train(model, make_data(dtype), collate, config, eval_fn=eval_fn, callbacks=callbacks, allocator=allocator,
                 regularizer=regularizer)


class RecordPartitioning:
    """Writes <out>/partitioned.txt: whether the model's own parameters were ZeRO-3 partitioned in training."""

    def __init__(self, out):
        self.out = Path(out)

    def on_before_optimizer_step(self, state, engine, optimizer):
        from loralib.train.zero3 import is_partitioned

        if int(os.environ.get("RANK", "0")) == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "partitioned.txt").write_text(str(is_partitioned(engine.module)))


class StopAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state, logs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import test_train_distributed as t
    out, mode = sys.argv[1], sys.argv[2]
    if mode == "ddp":
        t.train_once(out, batch_size=2)
    else:
        # ZeRO-3: every parameter partitioned and released after use (see test_zero3.ZERO3)
        ds = {{"zero_optimization": {{"stage": int(mode[-1]), "stage3_param_persistence_threshold": 0,
                                      "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}},
               "train_batch_size": "auto"}}
        adalora = "adalora" in mode
        try:  # stopped after step 5, resumed from checkpoint-4 in the same processes
            t.train_once(out, batch_size=2, dtype=torch.float32, deepspeed_config=ds, callbacks=[t.StopAt(5)],
                         adalora=adalora)
        except KeyboardInterrupt:
            pass
        t.train_once(out, batch_size=2, dtype=torch.float32, deepspeed_config=ds, resume_from="latest",
                     callbacks=[t.RecordPartitioning(out)], adalora=adalora)
""")


def _torchrun(tmp_path, mode):
    script = write_worker(tmp_path / "worker.py", SCRIPT.format(tests=str(Path(__file__).parent)),
                          deepspeed=mode != "ddp")
    out = tmp_path / "two"
    torchrun(script, [out, mode])
    return out


def _assert_close(two_dir, one_dir, atol):
    two = load_file(str(two_dir / "adapter" / "adapter.safetensors"))
    one = load_file(str(one_dir / "adapter" / "adapter.safetensors"))
    assert two.keys() == one.keys() and any("lora_" in k for k in one)
    for key in one:
        assert torch.allclose(two[key], one[key], atol=atol, rtol=0), (key, (two[key] - one[key]).abs().max())
    start = {k: v for k, v in build(one[next(iter(one))].dtype).state_dict().items() if k in one}
    assert any(not torch.allclose(start[k], one[k]) for k in one)  # training moved the adapter


def test_ddp_two_processes_equal_one(tmp_path):
    two = _torchrun(tmp_path, "ddp")
    one_result = train_once(tmp_path / "one", batch_size=4)
    _assert_close(two, tmp_path / "one", atol=1e-10)
    assert one_result.global_step == 8
    last = sorted(two.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    assert last.name == "checkpoint-8"
    assert (last / "rng_state_0.pt").is_file() and (last / "rng_state_1.pt").is_file()
    assert (two / "best_adapter" / "adapter.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes_equal_one_across_a_resume(stage, tmp_path):
    """ZeRO-2, and ZeRO-3 where the adapter itself is partitioned: the adapter folders (final, best and
    each checkpoint's) are written whole, and the resume restores the partitions."""
    pytest.importorskip("deepspeed")
    two = _torchrun(tmp_path, f"deepspeed{stage}")
    train_once(tmp_path / "one", batch_size=4, dtype=torch.float32)
    _assert_close(two, tmp_path / "one", atol=2e-6)
    assert (two / "checkpoint-8" / "deepspeed").is_dir()
    assert (two / "partitioned.txt").read_text() == str(stage == 3)
    for folder in (two / "best_adapter", two / "checkpoint-8" / "adapter"):
        saved = load_file(str(folder / "adapter.safetensors"))
        assert saved.keys() == load_file(str(two / "adapter" / "adapter.safetensors")).keys()
        assert all(t.numel() > 0 for t in saved.values())


@pytest.mark.slow
def test_adalora_rank_allocation_under_deepspeed_on_two_processes_equals_one_across_a_resume(tmp_path):
    """AdaLoRA's allocator under ZeRO-2 (it reads the gradients DeepSpeed keeps partitioned and zeroes in
    engine.step(), and masks E, which DeepSpeed's fp32 master copy must follow): the same masks and factors as
    one plain process, across a stop and resume."""
    pytest.importorskip("deepspeed")
    two = _torchrun(tmp_path, "deepspeed-adalora2")
    train_once(tmp_path / "one", batch_size=4, dtype=torch.float32, adalora=True)
    _assert_close(two, tmp_path / "one", atol=2e-6)  # E included: the same triplets masked
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter.safetensors"))
    two_E = load_file(str(two / "adapter" / "adapter.safetensors"))
    masked = {k: (one[k] == 0).flatten() for k in one if k.endswith("lora_E")}
    assert 0 < sum(int(m.sum()) for m in masked.values()) < 8  # ranks were pruned, so the masking mattered
    for key, zero in masked.items():  # exactly 0 in DeepSpeed's run too: its fp32 master copy stayed masked
        assert torch.all(two_E[key].flatten()[zero] == 0), key


@pytest.mark.slow
def test_the_group_deepspeed_makes_for_one_process_is_destroyed_at_exit(tmp_path):
    """One process without a launcher: DeepSpeed makes the (1-process) group itself; the loop has it destroyed
    when the process exits, before interpreter finalization would free it."""
    pytest.importorskip("deepspeed")
    import subprocess

    script = tmp_path / "one.py"
    script.write_text(DEEPSPEED_PRELUDE + textwrap.dedent(f"""
        import atexit, sys, torch, torch.distributed as dist
        atexit.register(lambda: print("at exit:", dist.is_initialized()))  # registered first, so it runs last
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_train_distributed as t
        t.train_once(sys.argv[1], batch_size=4, dtype=torch.float32,
                     deepspeed_config={{"zero_optimization": {{"stage": 2}}, "train_batch_size": "auto"}})
        print("after training:", dist.is_initialized())
    """))
    launcher_keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # set by in-process runs
    env = {k: v for k, v in os.environ.items() if k not in launcher_keys}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "after training: True" in proc.stdout and "at exit: False" in proc.stdout, proc.stdout[-2000:]
