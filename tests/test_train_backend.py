"""The loop's backends (loralib.train.backend): the fp16 scaler's skipped step, which the GPU-only loop
tests cannot reach on a CPU machine, and the two backends' common face (choice, checkpoint entries)."""
from __future__ import annotations

import warnings

import torch

from loralib.train import TrainConfig
from loralib.train.backend import DeepSpeedBackend, TorchBackend, make_backend
from loralib.train.distributed import DistContext
from test_train_loop import build, collate, data


class Recorder:
    """An allocator that records the steps it is called at."""

    def __init__(self):
        self.steps = []

    def update_and_mask(self, model, step):
        self.steps.append(step)


def config(tmp_path, **kw):
    return TrainConfig(output_dir=str(tmp_path / "run"), max_steps=4, per_device_batch_size=4, lr=1e-2,
                       device="cpu", **kw)


def test_an_fp16_step_the_scaler_rejects_is_not_taken(tmp_path):
    model, allocator = build(), Recorder()
    backend = TorchBackend(config(tmp_path, precision="fp16"), DistContext(), torch.device("cpu"), allocator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler("cuda") on a CPU-only machine disables itself
        backend.build(model, None, total_steps=4)
    backend.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)  # the CUDA scaler's logic, on the CPU
    backend.wrap(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = collate(data()[:4])

    backend.backward(model(**batch)["loss"] * float("inf"))
    taken, _ = backend.step(model, 0, lambda module: None)
    assert not taken
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert backend.scheduler.last_epoch == 0 and allocator.steps == []  # no schedule step, no allocation
    assert all(p.grad is None for p in model.parameters())
    assert backend.scaler.get_scale() == 2.0 ** 7

    backend.backward(model(**batch)["loss"])
    taken, grad_norm = backend.step(model, 1, lambda module: None)
    assert taken and torch.isfinite(grad_norm)
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert backend.scheduler.last_epoch == 1 and allocator.steps == [1]


def test_both_backends_hand_a_checkpoint_the_same_entries(tmp_path):
    ds = config(tmp_path, deepspeed_config={"zero_optimization": {"stage": 2}})
    assert isinstance(make_backend(ds, DistContext(), torch.device("cpu")), DeepSpeedBackend)
    torch_backend = make_backend(config(tmp_path), DistContext(), torch.device("cpu"))
    assert isinstance(torch_backend, TorchBackend)
    torch_backend.build(build(), None, total_steps=4)
    deepspeed_state = DeepSpeedBackend(ds, DistContext(), torch.device("cpu")).training_state()
    assert list(torch_backend.training_state()) == list(deepspeed_state) == ["optimizer", "scheduler", "scaler"]
    assert torch_backend.training_state()["scaler"] is None and set(deepspeed_state.values()) == {None}
