"""The training loop (loralib.train): step order, accumulation, schedules against transformers, methods'
plug-ins, evaluation and best-adapter selection, logs, and the errors of impossible configurations."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import loralib
from loralib.train import TrainConfig, train
from loralib.train.schedules import build_scheduler

N_SAMPLES, IN, CLASSES = 48, 6, 3


class TinyNet(nn.Module):
    """Two LoRA layers and a trainable head; forward(x, labels) -> {"loss", "logits"}."""

    def __init__(self, dropout: float = 0.0, extra_loss=None):
        super().__init__()
        self.l1 = loralib.Linear(IN, 16, r=4, lora_alpha=8, lora_dropout=dropout)
        self.l2 = loralib.Linear(16, 8, r=2, lora_alpha=4)
        self.head = nn.Linear(8, CLASSES)
        self.extra_loss = extra_loss
        self.calls = []

    def forward(self, x, labels=None):
        self.calls.append("forward")
        logits = self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        if loss is not None and self.extra_loss is not None:
            loss = loss + self.extra_loss(self)
        return {"loss": loss, "logits": logits}


def build(dropout=0.0, extra_loss=None):
    torch.manual_seed(1)
    model = TinyNet(dropout, extra_loss)
    loralib.mark_only_lora_as_trainable(model)
    for p in model.head.parameters():
        p.requires_grad = True
    with torch.no_grad():  # B = 0 at init would make the first steps trivial
        for layer in (model.l1, model.l2):
            layer.lora_B.normal_(std=0.2)
    return model


def data(n=N_SAMPLES):
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(n, IN, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def collate(items):
    return {"x": torch.stack([d["x"] for d in items]), "labels": torch.stack([d["labels"] for d in items])}


def adapter(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or k.startswith("head")}


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=6, per_device_batch_size=4, lr=1e-2,
                progress_bar=False, log_every=1, save_strategy="no", device="cpu")
    base.update(kw)
    return TrainConfig(**base)


# -- step order --------------------------------------------------------------------------------------

class RecordingSGD(torch.optim.SGD):
    def __init__(self, params, events, lr):
        super().__init__(params, lr=lr)
        self.events = events

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"]]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        self.events.append(("optimizer.step", float(norm), self.param_groups[0]["lr"]))
        return super().step(closure)


class RecordingAllocator:
    def __init__(self, model, optimizer_box, events):
        self.model, self.box, self.events = model, optimizer_box, events
        self.total_step = None

    def set_total_step(self, total):
        self.total_step = total

    def update_and_mask(self, model, step):
        assert model is self.model
        grads_present = all(p.grad is not None for p in model.parameters() if p.requires_grad)
        self.events.append(("allocator", step, grads_present, self.box[0].param_groups[0]["lr"]))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_step_order_clip_accumulation_and_allocator(tmp_path):
    events, box = [], []
    model = build()

    def factory(m):
        box.append(RecordingSGD([p for p in m.parameters() if p.requires_grad], events, lr=0.1))
        return box[0]

    def regularizer(m):
        events.append(("regularizer", len(m.calls)))
        return 0.0 * m.l1.lora_A.sum()

    class Order:
        def on_before_optimizer_step(self, state, model_, optimizer):
            events.append(("before_step", all(p.grad is not None for p in model.parameters() if p.requires_grad)))

    alloc = RecordingAllocator(model, box, events)
    cfg = config(tmp_path, max_steps=4, grad_accum_steps=3, max_grad_norm=1e-3, schedule="linear", warmup_steps=2)
    train(model, data(), collate, cfg, optimizer_factory=factory, regularizer=regularizer, allocator=alloc,
          callbacks=[Order()])
    assert alloc.total_step == 4  # filled in by the loop
    # Per step: 3 x (forward, regularizer after that forward) -> clip -> step -> scheduler -> allocator.
    kinds = [e[0] for e in events]
    assert kinds == (["regularizer"] * 3 + ["before_step", "optimizer.step", "allocator"]) * 4
    assert [e[1] for e in events if e[0] == "regularizer"][:3] == [1, 2, 3]
    steps = [e for e in events if e[0] == "optimizer.step"]
    allocs = [e for e in events if e[0] == "allocator"]
    for k, ((_, norm, lr_at_step), (_, step, grads_present, lr_after)) in enumerate(zip(steps, allocs)):
        assert norm == pytest.approx(1e-3, rel=1e-4)                  # clipped before the step
        assert lr_at_step == pytest.approx(0.1 * min(k / 2, (4 - k) / 2))  # schedule at step k
        assert lr_after == pytest.approx(0.1 * min((k + 1) / 2, (4 - k - 1) / 2))  # scheduler stepped first
        assert step == k and grads_present                            # allocator before zero_grad
    assert all(p.grad is None for p in model.parameters())            # zero_grad last


def test_accumulation_equals_the_big_batch(tmp_path):
    """4 x 2 accumulation == batch 8: the same samples per optimizer step, loss scaled by 1/accum."""
    small = build()
    train(small, data(), collate, config(tmp_path / "a", per_device_batch_size=4, grad_accum_steps=2,
                                         weight_decay=0.1, warmup_ratio=0.2))
    big = build()
    train(big, data(), collate, config(tmp_path / "b", per_device_batch_size=8, grad_accum_steps=1,
                                       weight_decay=0.1, warmup_ratio=0.2))
    for key, value in adapter(big).items():
        assert torch.allclose(adapter(small)[key], value, atol=1e-6), key
    assert any(not torch.equal(value, adapter(build())[key]) for key, value in adapter(big).items())


def test_regularizer_is_added_to_the_loss_before_backward(tmp_path):
    def reg(m):
        return 0.5 * (m.l1.lora_A ** 2).sum()

    with_arg = build()
    train(with_arg, data(), collate, config(tmp_path / "a"), regularizer=reg)
    inside = build(extra_loss=reg)  # the same term inside the model's loss
    train(inside, data(), collate, config(tmp_path / "b"))
    plain = build()
    train(plain, data(), collate, config(tmp_path / "c"))
    for key, value in adapter(inside).items():
        assert torch.equal(adapter(with_arg)[key], value), key
    assert not torch.equal(adapter(plain)["l1.lora_A"], adapter(inside)["l1.lora_A"])


def test_default_optimizer_is_adamw_without_decay_on_1d_parameters(tmp_path):
    cfg = config(tmp_path, max_steps=3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, max_grad_norm=None,
                 schedule="constant")
    ours = build()
    train(ours, data(), collate, cfg)
    # Reference: torch's AdamW with the same groups, fed the same batches in the same order.
    ref = build()
    decay = [p for p in ref.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in ref.parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    items = data()
    order = torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    for step in range(3):
        batch = collate([items[i] for i in order[4 * step:4 * step + 4]])
        ref(**batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    for key, value in adapter(ref).items():
        assert torch.equal(adapter(ours)[key], value), key


def test_loraplus_groups_keep_their_ratio_under_the_schedule(tmp_path):
    from loralib.optim import create_loraplus_optimizer

    box = []

    def factory(m):
        box.append(create_loraplus_optimizer(m, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16))
        return box[0]

    seen = []

    class Watch:
        def on_step_end(self, state, logs):
            seen.append({g["name"]: g["lr"] for g in box[0].param_groups if g["params"]})

    train(build(), data(), collate, config(tmp_path, schedule="cosine", warmup_steps=2), optimizer_factory=factory,
          callbacks=[Watch()])
    for lrs in seen[:-1]:  # the cosine ends at lr 0
        assert lrs["lora_B"] == pytest.approx(16 * lrs["lora_A"])
    assert seen[1]["lora_A"] == pytest.approx(1e-3)  # end of warmup


# -- schedules against transformers --------------------------------------------------------------------

@pytest.mark.parametrize("kind,hf_name", [("linear", "linear"), ("cosine", "cosine"),
                                          ("constant", "constant_with_warmup")])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_match_transformers(kind, hf_name, warmup):
    from transformers import get_scheduler

    def lrs(make):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
        sched = make(opt)
        out = []
        for _ in range(12):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: build_scheduler(o, kind, total_steps=10, warmup_steps=warmup))
    theirs = lrs(lambda o: get_scheduler(hf_name, o, num_warmup_steps=warmup, num_training_steps=10))
    assert ours == pytest.approx(theirs, abs=1e-12)
    ratio = lrs(lambda o: build_scheduler(o, kind, total_steps=10, warmup_ratio=0.25))
    assert ratio == pytest.approx(lrs(lambda o: build_scheduler(o, kind, total_steps=10, warmup_steps=3)))


# -- evaluation, best adapter, logs -------------------------------------------------------------------

def test_best_adapter_follows_the_metric_and_eval_keeps_weights_exact(tmp_path):
    scores = iter([0.5, 0.9, 0.7, 0.6])
    snapshots = {}

    def eval_fn(m):
        assert not m.training
        snapshots[len(snapshots) + 1] = adapter(m)
        return {"accuracy": next(scores), "note": "ok"}

    model = build(dropout=0.1)
    frozen = model.l1.weight.detach().clone()
    cfg = config(tmp_path, max_steps=8, eval_every=2, metric_for_best="accuracy", log_every=4)
    result = train(model, data(), collate, cfg, eval_fn=eval_fn)
    assert result.best_step == 4 and result.best_metric == 0.9
    best = load_file(str(tmp_path / "run" / "best_adapter" / "adapter.safetensors"))
    for key, value in snapshots[2].items():
        assert torch.equal(best[key], value), key
    meta = json.loads((tmp_path / "run" / "best_adapter" / "adapter_config.json").read_text())
    assert meta["metadata"]["global_step"] == 4
    assert torch.equal(model.l1.weight, frozen)  # evaluation never merged B A into W

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_accuracy" in r] == [2, 4, 6, 8]
    train_logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_logs] == [4, 8]
    assert all(math.isfinite(r["loss"]) and "lr" in r and "samples_per_s" in r for r in train_logs)


def test_greater_is_better_false_and_load_best_at_end(tmp_path):
    losses = iter([3.0, 1.0, 2.0])
    snapshots = []

    def eval_fn(m):
        snapshots.append(adapter(m))
        return {"eval_loss": next(losses)}

    model = build()
    cfg = config(tmp_path, max_steps=6, eval_every=2, metric_for_best="loss", load_best_at_end=True)
    result = train(model, data(), collate, cfg, eval_fn=eval_fn)
    assert result.best_step == 4 and result.best_metric == 1.0
    for key, value in snapshots[1].items():
        assert torch.equal(adapter(model)[key], value), key
    final = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    assert torch.equal(final["l1.lora_A"], snapshots[1]["l1.lora_A"])


def test_eval_per_epoch_and_checkpoints_per_epoch(tmp_path):
    seen = []
    cfg = config(tmp_path, max_steps=None, num_epochs=2, per_device_batch_size=10, eval_strategy="epoch",
                 save_strategy="epoch")
    result = train(build(), data(), collate, cfg, eval_fn=lambda m: seen.append(1) or {"x": 1.0})
    assert result.global_step == 10  # 48 samples / 10 -> 5 micro-batches (the last of 8) per epoch
    assert len(seen) == 2
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]


def test_bf16_autocast_on_cpu(tmp_path):
    model = build()
    result = train(model, data(), collate, config(tmp_path, precision="bf16"))
    assert math.isfinite(result.train_loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(adapter(model)["l1.lora_A"], adapter(build())["l1.lora_A"])


def test_tensorboard_flag(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
        has_tb = True
    except ImportError:
        has_tb = False
    if has_tb:
        train(build(), data(), collate, config(tmp_path, max_steps=2, tensorboard=True))
        assert any((tmp_path / "run" / "tensorboard").iterdir())
    else:
        with pytest.warns(UserWarning, match="tensorboard package is not installed"):
            train(build(), data(), collate, config(tmp_path, max_steps=2, tensorboard=True))
        assert (tmp_path / "run" / "metrics.jsonl").is_file()


# -- errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,field", [
    (dict(max_steps=None, num_epochs=None), "max_steps or num_epochs"),
    (dict(warmup_ratio=1.5), "warmup_ratio"),
    (dict(warmup_ratio=-0.1), "warmup_ratio"),
    (dict(schedule="polynomial"), "schedule"),
    (dict(precision="fp8"), "precision"),
    (dict(eval_strategy="steps"), "eval_strategy"),
    (dict(grad_accum_steps=0), "grad_accum_steps"),
    (dict(betas=(0.9, 1.5)), "betas"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(load_best_at_end=True), "load_best_at_end"),
])
def test_bad_config_names_the_field(tmp_path, changes, field):
    with pytest.raises(ValueError, match=field):
        config(tmp_path, **changes)


def test_bad_combinations_at_train_time(tmp_path):
    with pytest.raises(ValueError, match="precision='fp16' needs a GPU"):
        train(build(), data(), collate, config(tmp_path, precision="fp16", device="cpu"))
    with pytest.raises(ValueError, match="metric_for_best"):
        train(build(), data(), collate, config(tmp_path, metric_for_best="accuracy"))
    (tmp_path / "empty" / ".tmp-checkpoint-3").mkdir(parents=True)  # half-written: not a checkpoint
    with pytest.raises(ValueError, match="resume_from"):
        train(build(), data(), collate, config(tmp_path, output_dir=str(tmp_path / "empty"), resume_from="latest"))
    with pytest.raises(ValueError, match="resume_from"):
        train(build(), data(), collate, config(tmp_path, resume_from=str(tmp_path / "empty")))
    with pytest.raises(KeyError, match="metric_for_best='f1'"):
        train(build(), data(), collate, config(tmp_path, eval_every=2, metric_for_best="f1"),
              eval_fn=lambda m: {"accuracy": 1.0})
    with pytest.raises(ValueError, match="no loss"):
        train(build(), data(), lambda items: {"x": collate(items)["x"]}, config(tmp_path))
    frozen = build()
    for p in frozen.parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="no trainable parameter"):
        train(frozen, data(), collate, config(tmp_path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_gpu_trains_and_resumes(tmp_path, precision):
    cfg = dict(max_steps=8, precision=precision, device="cuda", save_every=4)
    full = build()
    train(full, data(), collate, config(tmp_path / "full", **cfg))
    assert full.l1.lora_A.is_cuda and full.l1.lora_A.dtype == torch.float32

    class Stop:
        def on_step_end(self, state, logs):
            if state.global_step == 6:
                raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        train(build(), data(), collate, config(tmp_path / "cut", **cfg), callbacks=[Stop()])
    state = torch.load(tmp_path / "cut" / "checkpoint-4" / "training_state.pt", weights_only=True)
    assert (state["scaler"] is not None) == (precision == "fp16")
    resumed = build()
    train(resumed, data(), collate, config(tmp_path / "cut", resume_from="latest", **cfg))
    for key, value in adapter(full).items():
        assert torch.allclose(adapter(resumed)[key], value, atol=1e-6), key
    assert not torch.equal(adapter(full)["l1.lora_A"].cpu(), adapter(build())["l1.lora_A"])
