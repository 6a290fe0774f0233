"""LoRA+: parameter groups against PEFT's create_loraplus_optimizer and the original's rules; both inits."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import loralib
from loralib.optim import apply_swapped_init, create_loraplus_optimizer, loraplus_param_groups

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer as peft_create_loraplus_optimizer  # noqa: E402


class TinyBase(nn.Module):
    """Embedding -> q, v, fc -> LayerNorm -> head: every kind of parameter LoRA+ sorts."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(self.ln(self.fc(self.q(h) + self.v(h))))


def _peft_model():
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "q", "v"], modules_to_save=["head"])
    model = peft.get_peft_model(TinyBase(), config)
    # Trainable LayerNorm and a trainable bias exercise the no-decay split.
    for p in model.base_model.model.ln.parameters():
        p.requires_grad = True
    model.base_model.model.fc.bias.requires_grad = True
    return model


class TinyOurs(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = loralib.Embedding(20, 8, r=4, lora_alpha=8)
        self.q = loralib.Linear(8, 8, r=4, lora_alpha=8)
        self.qkv = loralib.MergedLinear(8, 24, r=2, enable_lora=[True, False, True])
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)


def _ours():
    model = TinyOurs()
    loralib.mark_only_lora_as_trainable(model, bias="lora_only")
    for p in list(model.ln.parameters()) + list(model.head.parameters()):
        p.requires_grad = True
    return model


def _summary(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in groups]


def test_groups_equal_peft_keyword_call():
    model = _peft_model()
    kwargs = dict(lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5, loraplus_weight_decay=0.1)
    ref = peft_create_loraplus_optimizer(model, torch.optim.AdamW, **kwargs)
    ours = create_loraplus_optimizer(model, torch.optim.AdamW, **kwargs)
    assert _summary(model, ours.param_groups) == _summary(model, ref.param_groups)
    summary = _summary(model, ours.param_groups)
    # Not vacuous: every group has members, the embedding group holds PEFT's embedding factors.
    assert all(members for members, _, _ in summary)
    assert all("lora_embedding_" in n for n in summary[1][0])
    assert any("lora_B" in n for n in summary[2][0]) and any(".ln." in n for n in summary[3][0])
    assert [g["lr"] for g in ours.param_groups] == [1e-3, 1e-5, 16e-3, 16e-3]


def test_groups_equal_peft_default_embedding_lr_and_other_optimizers():
    model = _peft_model()
    for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop):
        ref = peft_create_loraplus_optimizer(model, cls, lr=2e-4, loraplus_lr_ratio=4)
        ours = create_loraplus_optimizer(model, cls, lr=2e-4, loraplus_lr_ratio=4)
        assert type(ours) is cls
        assert _summary(model, ours.param_groups) == _summary(model, ref.param_groups)
        assert ours.param_groups[1]["lr"] == 1e-6


def test_our_layers_groups():
    model = _ours()
    groups = loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=8, weight_decay=0.01)
    assert _summary(model, groups) == [
        (["head.weight", "q.lora_A", "qkv.lora_A"], 1e-3, 0.01),
        (["emb.lora_A", "emb.lora_B"], 1e-6, 0.01),
        (["q.lora_B", "qkv.lora_B"], 8e-3, 0.01),
        (["head.bias", "ln.bias", "ln.weight", "q.bias", "qkv.bias"], 8e-3, 0.0),
    ]
    assert [g["name"] for g in groups] == ["lora_A", "embedding", "lora_B", "lora_B_nd"]


def test_both_call_styles_agree_and_original_weight_decay():
    model = _ours()
    original = create_loraplus_optimizer(model, torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.05,
                                                                    "eps": 1e-6}, 16, 3e-6)
    keyword = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                        loraplus_lr_embedding=3e-6, weight_decay=0.05, eps=1e-6)
    assert _summary(model, original.param_groups) == _summary(model, keyword.param_groups)
    # The original applies optimizer_kwargs' weight decay to every group but the no-decay one.
    assert [g["weight_decay"] for g in original.param_groups] == [0.05, 0.05, 0.05, 0.0]
    assert [g["lr"] for g in original.param_groups] == [1e-3, 3e-6, 16e-3, 16e-3]
    assert all(g["eps"] == 1e-6 for g in original.param_groups)


def test_optimizer_steps_with_group_learning_rates():
    model = _ours()
    opt = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.allclose(model.q.lora_A, before["q.lora_A"] - 0.1)
    assert torch.allclose(model.q.lora_B, before["q.lora_B"] - 1.0)
    assert torch.allclose(model.emb.lora_B, before["emb.lora_B"] - 1e-6)
    assert torch.equal(model.q.weight, before["q.weight"])  # frozen


@pytest.mark.parametrize("call, message", [
    (lambda m: create_loraplus_optimizer(m, torch.optim.AdamW, loraplus_lr_ratio=4), "learning rate"),
    (lambda m: create_loraplus_optimizer(m, torch.optim.AdamW, lr=1e-3), "loraplus_lr_ratio"),
    (lambda m: create_loraplus_optimizer(m, torch.optim.AdamW, {"lr": 1e-3}, 4, lr=2e-3), "'lr' given twice"),
    (lambda m: create_loraplus_optimizer(m, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=-1), "positive"),
    (lambda m: create_loraplus_optimizer(m, torch.optim.AdamW, 1e-3, 4), "optimizer_kwargs must be a dict"),
])
def test_bad_calls(call, message):
    with pytest.raises(ValueError, match=message):
        call(_ours())


def test_swapped_init_ours_and_config():
    model = _ours()
    x = torch.randn(5, 8)
    before = model.q(x)
    emb_B = model.emb.lora_B.detach().clone()
    assert apply_swapped_init(model) == 2  # q and qkv; the embedding keeps its (already A = 0) init
    for layer in (model.q, model.qkv):
        assert torch.count_nonzero(layer.lora_A) == 0 and torch.count_nonzero(layer.lora_B) > 0
    assert torch.equal(model.emb.lora_B, emb_B)
    assert torch.allclose(model.q(x), before)  # B A is still zero
    # LoRAConfig(init_swapped=True) builds the same kind of layer.
    layer = loralib.LoRAConfig(r=4, target_modules=["q"], init_swapped=True).make_linear("q", 8, 8)
    assert torch.count_nonzero(layer.lora_A) == 0 and torch.count_nonzero(layer.lora_B) > 0
    bound = 1 / 4 ** 0.5  # kaiming-uniform(a=sqrt 5) on (8, 4): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_B.abs().max() <= bound and model.q.lora_B.abs().max() <= bound


def test_swapped_init_peft():
    model = _peft_model()
    assert apply_swapped_init(model) == 2  # q and v (PEFT's embedding keeps A = 0, B normal)
    q = model.base_model.model.q
    assert torch.count_nonzero(q.lora_A["default"].weight) == 0
    assert torch.count_nonzero(q.lora_B["default"].weight) > 0
