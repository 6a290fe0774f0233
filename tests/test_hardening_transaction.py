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


def _assert_unchanged(model, snapshot, params, x, before):
    after_state, after_tree, after_grads, after_attrs = _snapshot(model)
    state, tree, grads, attrs = snapshot
    assert after_tree == tree and after_grads == grads and after_attrs == attrs
    assert after_state.keys() == state.keys() and all(torch.equal(after_state[k], state[k]) for k in state)
    assert all(params[n] is p for n, p in model.named_parameters())  # the same Parameter objects
    assert not model.training and torch.equal(model(x), before)


def test_a_failed_import_peft_leaves_the_model_as_it_was(tmp_path):
    """import_peft runs inside model_transaction itself (it injected and merged three layers, then failed)."""
    adapter = _bad_adapter(tmp_path / "bad")
    x = torch.randn(4, 8)
    model = _model()
    before, snapshot = model(x), _snapshot(model)
    params = {n: p for n, p in model.named_parameters()}
    with pytest.raises(loralib.AdapterError, match="lora_B has shape"):
        loralib.import_peft(model, adapter)
    _assert_unchanged(model, snapshot, params, x, before)

    # the same inside an outer transaction (nested use is harmless)
    with pytest.raises(loralib.AdapterError, match="lora_B has shape"):
        with model_transaction(model):
            loralib.import_peft(model, adapter)
    _assert_unchanged(model, snapshot, params, x, before)


def test_a_failed_import_peft_into_merged_lora_layers_restores_their_weights(tmp_path):
    """Layers injected beforehand and merged (eval mode) are unmerged and re-merged by import_peft: a failure
    on the last module puts the first ones' factors and merged weights back."""
    adapter = _bad_adapter(tmp_path / "bad")
    x = torch.randn(4, 8)
    model = _model()
    loralib.inject(model, ["q_proj", "v_proj"], r=2, lora_alpha=4, freeze=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.train()
    model.eval()  # merges
    assert model.blocks[0].q_proj.merged
    before, snapshot = model(x), _snapshot(model)
    params = {n: p for n, p in model.named_parameters()}
    with pytest.raises(loralib.AdapterError, match="lora_B has shape"):
        loralib.import_peft(model, adapter)
    _assert_unchanged(model, snapshot, params, x, before)


def test_a_failed_load_adapter_undoes_its_injection(tmp_path):
    x = torch.randn(4, 8)
    trained = _model()
    loralib.inject(trained, ["q_proj", "v_proj"], r=2, lora_alpha=4)
    loralib.save_adapter(trained, tmp_path / "ours")
    other = Net()  # another model: same paths, a head of another width
    other.head = nn.Linear(8, 3)
    torch.manual_seed(1)
    loralib.inject(other, ["q_proj", "v_proj"], r=2, lora_alpha=4)
    other.head.weight.requires_grad = True
    loralib.save_adapter(other, tmp_path / "theirs")  # holds head.weight (trainable) of shape (3, 8)

    model = _model()
    before, snapshot = model(x), _snapshot(model)
    params = {n: p for n, p in model.named_parameters()}
    with pytest.raises(loralib.AdapterError, match="head.weight"):
        loralib.load_adapter(model, tmp_path / "theirs")
    _assert_unchanged(model, snapshot, params, x, before)
    loralib.load_adapter(model, tmp_path / "ours")  # a fitting one still loads
    assert isinstance(model.blocks[0].q_proj, loralib.LoRALayer)


def test_a_failed_inject_leaves_the_model_as_it_was():
    """PiSSA rewrites each matched weight in place; the BatchNorm it cannot adapt fails after the linears."""
    x = torch.randn(4, 8)
    model = _model()
    before, snapshot = model(x), _snapshot(model)
    params = {n: p for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="norm"):
        loralib.inject(model, r"blocks\.\d\.(q_proj|norm)", r=2, lora_alpha=4, init_lora_weights="pissa")
    _assert_unchanged(model, snapshot, params, x, before)


def test_bad_adapter_files_name_the_file_and_key(tmp_path):
    """Issue 13 class 6: a truncated safetensors file and a PEFT config without r are one AdapterError each."""
    adapter = _bad_adapter(tmp_path / "bad")
    weights = adapter / PEFT_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(loralib.AdapterError, match=f"{weights}: not a readable safetensors file"):
        loralib.import_peft(_model(), adapter)

    adapter = _bad_adapter(tmp_path / "no_r")
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    del config["r"]
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(loralib.AdapterError, match=r"adapter_config.json: key 'r' is missing"):
        loralib.import_peft(_model(), adapter)


def test_adapter_files_follow_the_umask(tmp_path):
    """Issue 13 class 8 for the API writers (safetensors itself writes 0600)."""
    import os

    model = _model()
    loralib.inject(model, ["q_proj"], r=2, lora_alpha=4)
    old = os.umask(0o022)
    try:
        loralib.save_adapter(model, tmp_path / "ours")
        loralib.export_peft(model, tmp_path / "peft")
    finally:
        os.umask(old)
    for path in (tmp_path / "ours" / "adapter.safetensors", tmp_path / "peft" / PEFT_WEIGHTS):
        assert path.stat().st_mode & 0o777 == 0o644, oct(path.stat().st_mode)


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
