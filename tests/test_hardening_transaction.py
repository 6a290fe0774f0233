"""Issue 13, class 7: a call that fails half-way leaves the model as it was, inside model_transaction.
The regression: import_peft of an adapter whose last module does not fit injected (and merged) the others."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import loralib
from loralib.adapters import ADAPTER_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS
from loralib.transaction import model_transaction


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.norm(self.v_proj(torch.tanh(self.q_proj(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _bad_adapter(folder):
    """A PEFT adapter for all four projections whose last lora_B has the wrong rank."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {}
    paths = [f"blocks.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    for n, path in enumerate(paths):
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = torch.randn(2, 8, generator=g)
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = torch.randn(8, 3 if n == len(paths) - 1 else 2, generator=g)
    save_file(tensors, str(folder / PEFT_WEIGHTS))
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                     "target_modules": ["q_proj", "v_proj"]}))
    return folder


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()}, dict(model.__dict__).keys())


def _model():
    torch.manual_seed(0)
    model = Net()
    model.head.weight.requires_grad = False
    model(torch.randn(16, 8))  # BatchNorm statistics move off their init
    return model.eval()


def test_a_failed_import_peft_inside_a_transaction_leaves_the_model_as_it_was(tmp_path):
    adapter = _bad_adapter(tmp_path / "bad")
    x = torch.randn(4, 8)

    bare = _model()
    before = bare(x)
    with pytest.raises(loralib.AdapterError, match="lora_B has shape"):
        loralib.import_peft(bare, adapter)
    assert any(isinstance(m, loralib.LoRALayer) for m in bare.modules())  # the defect the transaction undoes

    model = _model()
    state, tree, grads, attrs = _snapshot(model)
    params = {n: p for n, p in model.named_parameters()}
    with pytest.raises(loralib.AdapterError, match="lora_B has shape"):
        with model_transaction(model):
            loralib.import_peft(model, adapter)
    after_state, after_tree, after_grads, after_attrs = _snapshot(model)
    assert after_tree == tree and after_grads == grads and after_attrs == attrs
    assert after_state.keys() == state.keys() and all(torch.equal(after_state[k], state[k]) for k in state)
    assert all(params[n] is p for n, p in model.named_parameters())  # the same Parameter objects
    assert not model.training and torch.equal(model(x), before)


def test_a_transaction_keeps_what_a_successful_call_did_and_restores_in_place_writes():
    model = _model()
    with model_transaction(model):
        loralib.inject(model, ["q_proj"], r=2, lora_alpha=4)
    assert isinstance(model.blocks[0].q_proj, loralib.LoRALayer)

    model = _model()
    weight = model.head.weight
    original = weight.detach().clone()
    with pytest.raises(RuntimeError, match="midway"):
        with model_transaction(model, copy_device="cpu"):
            with torch.no_grad():
                weight.mul_(0)  # an in-place merge into a frozen weight
            model.head = nn.Linear(8, 2)
            model.train()
            raise RuntimeError("midway")
    assert model.head.weight is weight and torch.equal(weight, original) and not model.training
