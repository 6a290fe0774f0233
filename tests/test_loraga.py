"""LoRA-GA held to PEFT 0.21.2 (preprocess_loraga + init_lora_weights="lora_ga", LoraGAConfig defaults:
direction "ArB2r", scale "stable", stable_gamma 16): on the same train_step batches the initial s B A and the
adjusted W0 to 1e-5, the output at step 0 unchanged; then LoRA-Pro trains from it."""
import copy

import pytest
import torch

import loralib as lora
from test_dora import TARGETS, Tiny
from test_pissa import seeded_svd_lowrank

peft = pytest.importorskip("peft")

BATCHES = [torch.randn(6, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _train_step(model):
    def step():
        for x in BATCHES:
            (10 * model(x).pow(2).sum()).backward()  # a gradient large enough to test
    return step


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("ArBr", "gd_scale"), ("A2rBr", "unit"),
                                             ("ArB2r", "weight_svd")])
def test_initial_products_and_residuals_equal_peft(direction, scale, monkeypatch):
    seeded_svd_lowrank(monkeypatch)
    torch.manual_seed(0)
    base = Tiny()
    ga = peft.LoraGAConfig(direction=direction, scale=scale)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=ga)
    theirs_base = copy.deepcopy(base)
    peft.preprocess_loraga(theirs_base, config, _train_step(theirs_base))
    theirs = peft.get_peft_model(theirs_base, config)
    ours = lora.inject(copy.deepcopy(base), TARGETS, r=2, lora_alpha=4, init_lora_weights="lora_ga",
                       merge_weights=False)
    lora.loraga_init(ours, _train_step(ours), direction=direction, scale=scale)
    for name in TARGETS:
        mine, ref = getattr(ours, name), theirs.base_model.model.get_submodule(name)
        ba = mine.scaling * mine.lora_B @ mine.lora_A
        ref_ba = ref.scaling["default"] * ref.lora_B["default"].weight @ ref.lora_A["default"].weight
        torch.testing.assert_close(ba, ref_ba, rtol=0, atol=1e-5, msg=name)
        assert ba.abs().max() > 1e-3
        torch.testing.assert_close(mine.weight, ref.base_layer.weight, rtol=0, atol=1e-5, msg=name)
    x = torch.randn(4, 12)
    torch.testing.assert_close(ours(x), base(x), rtol=0, atol=1e-5)
    # every gradient was released, and what was frozen before is frozen again
    assert all(p.grad is None for p in ours.parameters())
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        f"{t}.{f}" for t in TARGETS for f in ("lora_A", "lora_B"))


def test_inject_runs_the_train_step_and_then_lora_pro_trains(monkeypatch):
    torch.manual_seed(0)
    base = Tiny()
    model = copy.deepcopy(base)
    lora.inject(model, TARGETS, r=2, lora_alpha=4, init_lora_weights="lora_ga", use_rslora=True,
                loraga_train_step=_train_step(model))
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), base(x), rtol=0, atol=1e-5)
    opt = lora.LoRAProAdamW(model, lr=1e-2)
    before = model.q.lora_A.detach().clone()
    for _ in range(2):
        (10 * model(x).pow(2).sum()).backward()  # a gradient large enough to test
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(model.q.lora_A, before)


def test_loraga_with_dora_keeps_the_base_output():
    torch.manual_seed(0)
    base = Tiny()
    model = copy.deepcopy(base)
    lora.inject(model, TARGETS, r=2, lora_alpha=4, init_lora_weights="lora_ga", use_dora=True,
                loraga_train_step=_train_step(model))
    assert model.q.lora_B.abs().sum() > 0
    x = torch.randn(4, 12)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-5)


def test_errors_name_the_fault():
    model = lora.inject(Tiny(), TARGETS, r=2)
    with pytest.raises(ValueError, match="no layer of the model was built with init_lora_weights='lora_ga'"):
        lora.loraga_init(model, lambda: None)
    model = lora.inject(Tiny(), TARGETS, r=2, init_lora_weights="lora_ga")
    with pytest.raises(ValueError, match="train_step ran no backward pass through 'q'"):
        lora.loraga_init(model, lambda: None)
    with pytest.raises(ValueError, match="direction='AB'"):
        lora.loraga_init(model, lambda: None, direction="AB")
    with pytest.raises(ValueError, match=r"LoRA-GA does not compose with LoRA²"):
        lora.LoRAConfig(method="lora2", init_lora_weights="lora_ga")
    with pytest.raises(ValueError, match="loraga_train_step is given but init_lora_weights"):
        lora.inject(Tiny(), TARGETS, loraga_train_step=lambda: None)


def test_a_loraga_adapter_loads_on_the_original_base_and_resumes(tmp_path):
    """The adapter carries A0, B0 (lora_A0 / lora_B0): loading it into a fresh model on the ORIGINAL weights
    puts the residual in place without estimating the gradient again; so does a PEFT export (rank 2r)."""
    torch.manual_seed(0)
    base = Tiny()
    model = copy.deepcopy(base)
    lora.inject(model, TARGETS, r=2, lora_alpha=4, init_lora_weights="lora_ga", loraga_train_step=_train_step(model),
                merge_weights=False)
    with torch.no_grad():
        model.q.lora_A.add_(0.05)  # "trained"
    x = torch.randn(4, 12)
    lora.save_adapter(model, tmp_path / "own")
    fresh = lora.load_adapter(copy.deepcopy(base), tmp_path / "own")
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-5)
    # loading it again (a resume) does not subtract twice
    fresh.load_state_dict(lora.lora_state_dict(model), strict=False)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-5)
    lora.export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-5)
