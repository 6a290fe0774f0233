"""Exact resume and atomic checkpoints: a run stopped at any point (an exception, SIGKILL, a crash in the
middle of a save) and resumed from its newest complete checkpoint ends with bit-identical adapters."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import loralib
from loralib.adalora import RankAllocator, SVDLinear, compute_orth_regu
from loralib.train import TrainConfig, list_checkpoints, train
from loralib.train import checkpoint as ckpt

IN, CLASSES, N_SAMPLES = 6, 3, 26  # 26 / 4 -> 7 micro-batches per epoch: accumulation groups 2, 2, 2, 1


class AdaNet(nn.Module):
    """An AdaLoRA layer (rank allocation), a LoRA layer that merges in eval mode, dropout, a head."""

    def __init__(self, adalora: bool = True):
        super().__init__()
        self.l1 = (SVDLinear(IN, 16, r=4, lora_alpha=8, lora_dropout=0.1) if adalora
                   else loralib.Linear(IN, 16, r=4, lora_alpha=8, lora_dropout=0.1))
        self.l2 = loralib.Linear(16, 8, r=2, lora_alpha=4, lora_dropout=0.1, merge_weights=True)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x, labels=None):
        logits = self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def build(adalora: bool = True):
    torch.manual_seed(3)
    model = AdaNet(adalora)
    loralib.mark_only_lora_as_trainable(model)
    for p in model.head.parameters():
        p.requires_grad = True
    return model


def data():
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(N_SAMPLES, IN, generator=gen), torch.randint(0, CLASSES, (N_SAMPLES,), generator=gen)
    return [{"x": x[i], "labels": y[i]} for i in range(N_SAMPLES)]


def collate(items):
    return {"x": torch.stack([d["x"] for d in items]), "labels": torch.stack([d["labels"] for d in items])}


def eval_fn(model):
    items = collate(data())
    with torch.no_grad():
        out = model(**items)
    return {"accuracy": (out["logits"].argmax(-1) == items["labels"]).float().mean().item(),
            "noise": torch.rand(()).item()}  # eval may draw random numbers: training must not notice


def run(out_dir, resume=None, callbacks=(), optimizer="adamw"):
    """12 steps over 3+ epochs: warmup + linear decay, accumulation 2, clipping, dropout, eval every 5
    steps with best selection; AdamW with AdaLoRA's regularizer and rank allocator, or LoRA-Pro on LoRA."""
    adalora = optimizer == "adamw"
    model = build(adalora)
    allocator = RankAllocator(model, lora_r=4, target_rank=2, init_warmup=2, final_warmup=3, mask_interval=2,
                              beta1=0.85, beta2=0.85) if adalora else None
    config = TrainConfig(output_dir=str(out_dir), max_steps=12, per_device_batch_size=4, grad_accum_steps=2,
                         lr=5e-2, weight_decay=0.01, warmup_steps=3, max_grad_norm=0.5, eval_every=5,
                         metric_for_best="accuracy", save_every=3, log_every=1, progress_bar=False,
                         resume_from=resume, device="cpu")
    factory = None
    if optimizer == "lorapro":
        from loralib.optim import LoRAProAdamW
        factory = lambda m: LoRAProAdamW(m, lr=5e-2, mode="full")  # noqa: E731
    regularizer = (lambda m: compute_orth_regu(m, 0.1)) if adalora else None
    train(model, data(), collate, config, eval_fn=eval_fn, regularizer=regularizer, allocator=allocator,
          optimizer_factory=factory,
          callbacks=list(callbacks))
    return model


def tensors(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class Crash(Exception):
    pass


class CrashAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state, logs):
        if state.global_step == self.step:
            raise Crash(f"stopped at step {state.global_step}")


def losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval_accuracy")) for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, tensors(run(out))


def test_resume_after_an_exception_is_bit_identical(tmp_path, uninterrupted):
    ref_dir, ref = uninterrupted
    with pytest.raises(Crash):
        run(tmp_path, callbacks=[CrashAt(8)])  # last checkpoint: step 6 (mid-epoch, after an eval at 5)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 6]
    resumed = run(tmp_path, resume="latest")
    assert_identical(tensors(resumed), ref)
    assert losses(tmp_path) == losses(ref_dir)  # the crashed run's records after step 6 were dropped
    ranks = resumed.l1.rank_mask
    assert 0 < int(ranks.sum()) < 4  # the allocator did prune (so its state mattered)


def test_resume_from_a_finished_run_does_nothing(tmp_path, uninterrupted):
    ref_dir, ref = uninterrupted
    import shutil
    shutil.copytree(ref_dir, tmp_path / "copy")
    model = run(tmp_path / "copy", resume="latest")
    assert_identical(tensors(model), ref)


def test_crash_in_the_middle_of_a_save_keeps_the_last_good_checkpoint(tmp_path, uninterrupted, monkeypatch):
    _, ref = uninterrupted
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "checkpoint-9" in str(path) and str(path).endswith(ckpt.TRAINING_STATE):
            raise OSError("disk full")  # adapter and rng files of step 9 are written, the state is not
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert (tmp_path / ".tmp-checkpoint-9").is_dir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 6]
    assert ckpt.resolve_resume("latest", tmp_path).name == "checkpoint-6"
    resumed = run(tmp_path, resume="latest")
    assert_identical(tensors(resumed), ref)
    assert not (tmp_path / ".tmp-checkpoint-9").exists()


def test_lorapro_optimizer_state_resumes_exactly(tmp_path):
    full = tensors(run(tmp_path / "full", optimizer="lorapro"))
    with pytest.raises(Crash):
        run(tmp_path / "cut", callbacks=[CrashAt(4)], optimizer="lorapro")
    resumed = run(tmp_path / "cut", resume="latest", optimizer="lorapro")
    assert_identical(tensors(resumed), full)


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import test_train_resume as t
    from loralib.train import checkpoint as ckpt

    mode, out = sys.argv[1], sys.argv[2]
    if mode == "kill-during-save":
        real = ckpt._fsync_tree
        def fsync_then_die(root):
            real(root)
            if root.name == ".tmp-checkpoint-9":
                os.kill(os.getpid(), signal.SIGKILL)  # everything written, nothing renamed yet
        ckpt._fsync_tree = fsync_then_die
        t.run(out)
    else:
        class Kill:
            def on_step_end(self, state, logs):
                if state.global_step == 7:
                    os.kill(os.getpid(), signal.SIGKILL)
        t.run(out, callbacks=[Kill()])
""")


@pytest.mark.parametrize("mode", ["kill-at-step", "kill-during-save"])
def test_sigkilled_process_resumes_bit_identical(tmp_path, uninterrupted, mode):
    _, ref = uninterrupted
    script = tmp_path / "victim.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), mode, str(out)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(out)] == [3, 6]
    assert_identical(tensors(run(out, resume="latest")), ref)


def test_changed_batch_geometry_is_refused(tmp_path):
    with pytest.raises(Crash):
        run(tmp_path, callbacks=[CrashAt(4)])
    model = build()
    config = TrainConfig(output_dir=str(tmp_path), max_steps=12, per_device_batch_size=2, grad_accum_steps=2,
                         progress_bar=False, resume_from="latest", device="cpu")
    with pytest.raises(ValueError, match="per_device_batch_size=4"):
        train(model, data(), collate, config)
    with pytest.raises(ValueError, match="allocator"):  # the checkpoint holds allocator state
        train(build(), data(), collate, TrainConfig(output_dir=str(tmp_path), max_steps=12, per_device_batch_size=4,
                                                    grad_accum_steps=2, progress_bar=False, resume_from="latest",
                                                    device="cpu"))


def test_save_total_limit_and_stale_folders(tmp_path):
    model = build()
    config = TrainConfig(output_dir=str(tmp_path), max_steps=7, per_device_batch_size=4, save_every=2,
                         save_total_limit=2, progress_bar=False, device="cpu")
    train(model, data(), collate, config)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 7]
    # A crash between the two renames of a republish leaves only ".old-<name>": it is the good copy.
    best = tmp_path / "adapter"
    os.rename(best, tmp_path / ".old-adapter")
    ckpt.remove_stale(tmp_path)
    assert (best / "adapter.safetensors").is_file()


class StepCounter:
    """A callback with state: the optimizer steps it saw, as a tensor."""

    def __init__(self):
        self.seen = torch.zeros(())

    def on_before_optimizer_step(self, state, model, optimizer):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen.clone()}

    def load_state_dict(self, saved):
        self.seen = saved["seen"].clone()


def test_a_callback_state_is_checkpointed_per_process_and_restored(tmp_path):
    counter = StepCounter()
    with pytest.raises(Crash):
        run(tmp_path, callbacks=[counter, CrashAt(8)])
    assert int(counter.seen) == 8
    saved = torch.load(tmp_path / "checkpoint-6" / "callbacks_0.pt", weights_only=True)
    assert int(saved["0:StepCounter"]["seen"]) == 6
    resumed = StepCounter()
    run(tmp_path, resume="latest", callbacks=[resumed])
    assert int(resumed.seen) == 12  # 6 restored + the 6 steps after the checkpoint


def test_resuming_with_a_stateful_callback_the_checkpoint_lacks_is_refused(tmp_path):
    with pytest.raises(Crash):
        run(tmp_path, callbacks=[CrashAt(4)])
    with pytest.raises(ValueError, match="no state for callback '0:StepCounter'"):
        run(tmp_path, resume="latest", callbacks=[StepCounter()])
