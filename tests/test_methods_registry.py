"""loralib.methods, the method registry: names and aliases, what each entry fixes in the LoRA config, the
combinations it refuses, and the optimizer, regularizer and allocator it builds (held against building each
by hand, the way the drivers did before the registry)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import loralib as lora
from loralib.adalora import RankAllocator, compute_orth_regu
from loralib.config import LoRAConfig
from loralib.lora2 import LoRA2RankAllocator
from loralib.methods import (REGISTRY, AllocatorSchedule, OptimizerSettings, build_optimizer, group_summary,
                             make_method, method_entry, rank_allocator, regularizer, training_hooks)
from loralib.optim import LoRAProAdamW, create_loraplus_optimizer
from loralib.train import TrainConfig

TARGETS = ("q", "v")


class Block(nn.Module):
    """Two projections named like attention's, LoRA from `config` (LoRAConfig.make_linear), a 1-d bias-free norm."""

    def __init__(self, config: LoRAConfig):
        super().__init__()
        self.q = config.make_linear("q", 8, 8)
        self.v = config.make_linear("v", 8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.q(x) + self.v(x))


def _model(method):
    torch.manual_seed(0)
    model = Block(method.lora)
    lora.mark_only_lora_as_trainable(model, bias="none")
    model.norm.weight.requires_grad = True
    return model


def _config(**kw) -> LoRAConfig:
    return LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw)


@pytest.mark.parametrize("alias, name", [("lora-pro", "lorapro"), ("LoRA-Pro-Full", "lorapro"), ("lora+", "loraplus"),
                                         ("loraga", "lora-ga"), ("FT", "full"), ("lora²", "lora2"),
                                         ("rslora-pro-full", "rslora-pro")])
def test_aliases_name_one_entry(alias, name):
    assert method_entry(alias).name == name


def test_unknown_name_lists_the_methods():
    with pytest.raises(ValueError, match="unknown method 'lorra'.*lora, rslora"):
        method_entry("lorra")


def test_entries_fix_their_layer_fields():
    assert make_method("rslora", _config()).lora.use_rslora
    assert make_method("dora", _config()).lora.use_dora
    assert make_method("pissa", _config()).lora.init_lora_weights == "pissa"
    assert make_method("pissa", _config(init_lora_weights="pissa_niter_4")).lora.init_lora_weights == "pissa_niter_4"
    assert make_method("pissa", _config(), init_lora_weights=True).lora.init_lora_weights is True  # the flag wins
    assert make_method("adalora", _config()).lora.method == "adalora" and make_method("adalora", _config()).allocate
    assert make_method("lora2", _config()).lora.method == "lora2"
    assert make_method("lorapro", _config()).lorapro_mode == "full"
    assert make_method("loraplus", _config()).loraplus_ratio == 16.0
    assert set(REGISTRY) == {"full", "lora", "rslora", "dora", "pissa", "lora-ga", "loraplus", "adalora", "lora2",
                             "lorapro", "rslora-pro"}


@pytest.mark.parametrize("call, message", [
    (lambda: make_method("full", _config()), "takes no LoRA configuration"),
    (lambda: make_method("lora", None), "needs a LoRAConfig"),
    (lambda: make_method("lora", _config(), lorapro_mode="full"), "lorapro_mode applies to LoRA-Pro"),
    (lambda: make_method("lora", _config(), loraplus_ratio=4.0), "applies to LoRA\\+"),
    (lambda: make_method("loraplus", _config(), loraplus_ratio=0.0), "must be > 0"),
    (lambda: make_method("lorapro", _config(), lorapro_mode="fast"), "lorapro_mode 'fast'"),
    (lambda: make_method("dora", _config(), lorapro_mode=None) and make_method("lorapro", _config(use_dora=True)),
     "DoRA does not compose with LoRA-Pro"),
    (lambda: make_method("lora", _config(), allocate=True), "rank allocation needs SVD-form layers"),
    (lambda: make_method("lora", _config(), reg_orth_coef=0.1), "orthogonal regularizer"),
    (lambda: make_method("adalora", _config(use_dora=True)), "DoRA"),
])
def test_refused_combinations(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _same_groups(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    assert type(a) is type(b) and len(a.param_groups) == len(b.param_groups)
    for ga, gb in zip(a.param_groups, b.param_groups):
        assert [id(p) for p in ga["params"]] == [id(p) for p in gb["params"]]
        assert {k: v for k, v in ga.items() if k != "params"} == {k: v for k, v in gb.items() if k != "params"}


def test_adamw_splits_decay_as_transformers_trainer():
    method = make_method("lora", _config())
    model = _model(method)
    built = build_optimizer(model, method, OptimizerSettings(lr=1e-3, weight_decay=0.1, eps=1e-6))
    matrices = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    by_hand = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
                                lr=1e-3, eps=1e-6)
    _same_groups(built, by_hand)
    assert [g["weight_decay"] for g in group_summary(built)] == [0.1, 0.0]


def test_loraplus_and_lorapro_optimizers_equal_their_constructors():
    plus = make_method("loraplus", _config(), loraplus_ratio=8.0)
    model = _model(plus)
    built = build_optimizer(model, plus, OptimizerSettings(lr=2e-4, weight_decay=0.01))
    _same_groups(built, create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=8.0,
                                                  weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8))
    pro = make_method("lorapro", _config(), lorapro_mode="efficient")
    model = _model(pro)
    built = build_optimizer(model, pro, OptimizerSettings(lr=2e-5, lorapro_released_weight_decay=True))
    assert isinstance(built, LoRAProAdamW) and built.mode == "efficient" and built.released_weight_decay
    with pytest.raises(ValueError, match="released LoRA-Pro rules apply to LoRA-Pro"):
        build_optimizer(model, make_method("lora", _config()), OptimizerSettings(lr=1.0, lorapro_released_scaling=True))


def test_training_hooks_one_device_and_deepspeed(tmp_path):
    method = make_method("lorapro", _config())
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, max_grad_norm=1.0)
    settings = OptimizerSettings(lr=1e-3, max_grad_norm=1.0, lorapro_released_clipping=True)
    new_config, factory, callbacks, groups = training_hooks(method, config, settings)
    assert new_config.max_grad_norm == 0.0  # the optimizer clips (the released rule), the loop must not
    assert callbacks is None and groups == []
    optimizer = factory(_model(method))
    assert optimizer.released_clip_norm == 1.0 and groups == group_summary(optimizer)

    ds_file = tmp_path / "ds.json"
    ds_file.write_text('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}')
    ds_config = TrainConfig(output_dir=str(tmp_path), max_steps=1, deepspeed_config=str(ds_file))
    _, factory, _, _ = training_hooks(make_method("lora", _config()), ds_config, OptimizerSettings(lr=1e-3))
    assert factory is None  # DeepSpeed's own optimizer section is honoured for plain AdamW methods
    ds_file.write_text('{"zero_optimization": {"stage": 2}}')
    _, factory, _, _ = training_hooks(make_method("lora", _config()), ds_config, OptimizerSettings(lr=1e-3))
    assert factory is not None


def test_regularizer_and_allocator_follow_the_layers():
    assert regularizer(make_method("lora", _config())) is None
    ada = make_method("adalora", _config(), reg_orth_coef=0.3, target_rank=2)
    model = _model(ada)
    assert torch.allclose(regularizer(ada)(model), compute_orth_regu(model, regu_weight=0.3))
    schedule = AllocatorSchedule(total_steps=100, init_warmup=10, final_warmup=20, mask_interval=5)
    allocator = rank_allocator(model, ada, schedule)
    assert type(allocator) is RankAllocator and allocator.total_step == 100
    assert allocator.target_rank == 2 * len(TARGETS)  # the budget b_T: target rank x adapted matrices
    lora2 = make_method("lora2", _config(lora2_k=2), target_rank=2)
    assert type(rank_allocator(_model(lora2), lora2, schedule)) is LoRA2RankAllocator
    fixed = make_method("adalora", _config(), allocate=False)
    assert rank_allocator(_model(fixed), fixed, schedule) is None
