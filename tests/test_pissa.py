"""PiSSA held to PEFT 0.21.2's init_lora_weights="pissa" / "pissa_niter_N": s B A and the residual weight to
1e-5 (products, so singular-vector signs do not matter), the base output at step 0, and the trained adapter
as a rank-2r LoRA on the ORIGINAL weights (PEFT's conversion), in both adapter formats."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import loralib as lora
from test_dora import TARGETS, Tiny

peft = pytest.importorskip("peft")


def _products(model, peft_model=None):
    """{name: (s B A laid out (out, in), frozen weight laid out (out, in))}."""
    out = {}
    for name in TARGETS:
        if peft_model is None:
            layer = getattr(model, name)
            ba = layer.scaling * layer.lora_B @ layer.lora_A
            w = layer.weight.t() if layer.fan_in_fan_out else layer.weight
        else:
            layer = peft_model.base_model.model.get_submodule(name)
            ba = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            w = layer.base_layer.weight
            w = w.t() if layer.fan_in_fan_out else w
        out[name] = (ba.detach(), w.detach())
    return out


def seeded_svd_lowrank(monkeypatch):
    """torch.svd_lowrank with the generator reseeded at every call, in torch and where PEFT bound it, so that
    both sides draw the same random projections even though they consume the global RNG differently."""
    import peft.tuners.lora.layer as peft_layer

    original = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(1234)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_products_and_residuals_equal_peft(init, use_rslora, monkeypatch):
    seeded_svd_lowrank(monkeypatch)
    torch.manual_seed(0)
    base = Tiny()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=3, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, use_rslora=use_rslora))
    ours = lora.inject(copy.deepcopy(base), TARGETS, r=3, lora_alpha=8, init_lora_weights=init,
                       use_rslora=use_rslora)
    mine, ref = _products(ours), _products(None, theirs)
    for name in TARGETS:
        torch.testing.assert_close(mine[name][0], ref[name][0], rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(mine[name][1], ref[name][1], rtol=0, atol=1e-5, msg=name)
        assert mine[name][0].abs().max() > 0.05  # a real principal part, not zero
    x = torch.randn(4, 12)
    torch.testing.assert_close(ours(x), base(x), rtol=0, atol=1e-5)  # step 0: the base model's output


def test_full_svd_pissa_is_the_best_rank_r_part():
    layer = lora.Linear(10, 8, r=3, lora_alpha=6, init_lora_weights="pissa", merge_weights=False)
    original = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    S = torch.linalg.svdvals(original.detach())
    torch.testing.assert_close(torch.linalg.svdvals((layer.scaling * layer.lora_B @ layer.lora_A).detach())[:3],
                               S[:3], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.linalg.svdvals(layer.weight.detach())[:5], S[3:], rtol=0, atol=1e-5)


def _train_a_little(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("use_dora", [False, True])
def test_trained_adapter_converted_to_lora_loads_in_peft_on_the_original_weights(tmp_path, use_dora):
    torch.manual_seed(0)
    base = Tiny()
    ours = lora.inject(copy.deepcopy(base), TARGETS, r=3, lora_alpha=8, init_lora_weights="pissa_niter_2",
                       use_dora=use_dora, merge_weights=False)
    _train_a_little(ours)
    x = torch.randn(5, 12)
    lora.export_peft(ours, tmp_path / "as_lora")
    cfg = json.loads((tmp_path / "as_lora" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"], cfg["use_dora"]) == (6, 16, True, use_dora)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "as_lora")
    torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=1e-5)
    back = lora.import_peft(copy.deepcopy(base), tmp_path / "as_lora")
    torch.testing.assert_close(back(x), ours(x), rtol=0, atol=1e-5)


def test_conversion_equals_peft_own_conversion(tmp_path):
    torch.manual_seed(0)
    base = Tiny()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=3, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa"))
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial copy
    theirs.save_pretrained(tmp_path / "init")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    ours = lora.inject(copy.deepcopy(base), TARGETS, r=3, lora_alpha=8, init_lora_weights="pissa")
    _train_a_little(ours)
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                path, _, leaf = name.rpartition(".")
                peft_params[f"base_model.model.{path}.{leaf}.default.weight"].copy_(p)
    theirs.save_pretrained(tmp_path / "peft_conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    lora.export_peft(ours, tmp_path / "ours_conv")
    from safetensors.torch import load_file
    a = load_file(tmp_path / "peft_conv" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours_conv" / "adapter_model.safetensors")
    assert set(a) == set(b)
    for key in a:  # factors differ by singular-vector signs only through A0, B0: compare products
        if key.endswith("lora_A.weight"):
            kb = key.replace("lora_A", "lora_B")
            torch.testing.assert_close(b[kb] @ b[key], a[kb] @ a[key], rtol=0, atol=1e-5)


def test_unconverted_pissa_adapter_reinitialises_on_the_original_weights(tmp_path):
    torch.manual_seed(0)
    base = Tiny()
    ours = lora.inject(copy.deepcopy(base), TARGETS, r=3, lora_alpha=8, init_lora_weights="pissa")
    _train_a_little(ours)
    x = torch.randn(5, 12)
    lora.export_peft(ours, tmp_path / "raw", convert_to_lora=False)
    cfg = json.loads((tmp_path / "raw" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["init_lora_weights"]) == (3, "pissa")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "raw")
    torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=1e-5)
    back = lora.import_peft(copy.deepcopy(base), tmp_path / "raw")
    torch.testing.assert_close(back(x), ours(x), rtol=0, atol=1e-5)
    # our own format: load_adapter on the original model redoes the SVD, then loads the trained factors
    lora.save_adapter(ours, tmp_path / "own")
    again = lora.load_adapter(copy.deepcopy(base), tmp_path / "own")
    torch.testing.assert_close(again(x), ours(x), rtol=0, atol=1e-5)


def test_pissa_in_our_llama_model_file_keeps_the_base_output(tmp_path):
    from _llama_fixtures import hf_model, save, tiny_config
    from loralib.models.loading import from_pretrained

    hf = hf_model(tiny_config())
    save(hf, tmp_path / "m")
    ours = from_pretrained(tmp_path / "m", lora=lora.LoRAConfig(r=4, lora_alpha=8, target_modules=("q_proj", "o_proj"),
                                                                 init_lora_weights="pissa", merge_weights=False))
    q = ours.model.layers[0].self_attn.q_proj
    assert (q.lora_B.abs().sum() > 0) and q.initial_factors_set
    ids = torch.randint(4, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_bad_combinations_name_both():
    with pytest.raises(ValueError, match=r"PiSSA.*AdaLoRA"):
        lora.LoRAConfig(method="adalora", init_lora_weights="pissa")
    with pytest.raises(ValueError, match=r"PiSSA.*swapped"):
        lora.LoRAConfig(init_lora_weights="pissa_niter_4", init_swapped=True)
    with pytest.raises(ValueError, match=r"init_lora_weights='olora' is not one of"):
        lora.LoRAConfig(init_lora_weights="olora")


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_fused_projection_is_initialised_chunk_by_chunk_as_peft_does_separate_projections(tmp_path, fan_in_fan_out):
    """A MergedLinear (q|k|v, LoRA on q and v) gets PEFT's PiSSA of q and v as two projections of their own;
    the step-0 output is the base's, and the converted adapter (a whole-projection LoRA of rank 2 (2r), zero
    rows for k) loads in PEFT on the original fused weight."""
    torch.manual_seed(0)
    fused = lora.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True], fan_in_fan_out=fan_in_fan_out,
                              merge_weights=False)
    W0 = (fused.weight.t() if fan_in_fan_out else fused.weight).detach().clone()  # (out, in)
    bias = fused.bias.detach().clone()
    pissa = lora.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True], fan_in_fan_out=fan_in_fan_out,
                              init_lora_weights="pissa", merge_weights=False)
    pissa.load_state_dict({"weight": fused.weight, "bias": bias}, strict=False)  # an original weight: no residual
    pissa.reset_lora_parameters()  # PiSSA of the weight it now holds
    x = torch.randn(3, 8)
    torch.testing.assert_close(pissa(x), x @ W0.t() + bias, rtol=0, atol=1e-5)
    for g, rows in ((0, slice(0, 4)), (2, slice(8, 12))):
        sep = nn.Sequential(nn.Linear(8, 4, bias=False))
        with torch.no_grad():
            sep[0].weight.copy_(W0[rows])
        ref = peft.get_peft_model(sep, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights="pissa"))
        layer = ref.base_model.model[0]
        ref_ba = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        ours_ba = pissa.delta_weight()
        ours_ba = (ours_ba.t() if fan_in_fan_out else ours_ba)[rows]
        torch.testing.assert_close(ours_ba, ref_ba, rtol=0, atol=1e-5)
    with torch.no_grad():
        pissa.lora_A.add_(0.1), pissa.lora_B.add_(0.1)
    model = nn.Sequential(pissa)
    lora.mark_only_lora_as_trainable(model)
    lora.export_peft(model, tmp_path / "conv")
    plain = nn.Sequential(nn.Linear(8, 12))
    with torch.no_grad():
        plain[0].weight.copy_(W0), plain[0].bias.copy_(bias)
    loaded = peft.PeftModel.from_pretrained(plain, tmp_path / "conv")
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-5)
