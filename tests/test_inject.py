"""loralib.inject on arbitrary models, held against PEFT's LoRA on the same weights."""
import copy

import pytest
import torch
import torch.nn as nn

import loralib as lora
from _tiny_hf import randomise_lora, tiny_gpt2, tiny_roberta, token_batch

peft = pytest.importorskip("peft")


def _copy_factors_into_peft(ours, peft_model):
    """Our lora_A / lora_B -> PEFT's lora_A.default.weight / lora_B.default.weight, module by module."""
    peft_modules = dict(peft_model.base_model.model.named_modules())
    n = 0
    with torch.no_grad():
        for path, layer in lora.lora_layers(ours):
            if not layer.has_lora:
                continue
            target = peft_modules[path]
            if isinstance(layer, lora.Embedding):
                target.lora_embedding_A["default"].copy_(layer.lora_A)
                target.lora_embedding_B["default"].copy_(layer.lora_B)
            else:
                target.lora_A["default"].weight.copy_(layer.lora_A)
                target.lora_B["default"].weight.copy_(layer.lora_B)
            n += 1
    assert n > 0


@pytest.mark.parametrize("use_rslora", [False, True])
def test_gpt2_conv1d_matches_peft(use_rslora):
    base = tiny_gpt2()
    targets = ["c_attn", "attn.c_proj", "c_fc"]
    ours = lora.inject(copy.deepcopy(base), targets, r=4, lora_alpha=8, use_rslora=use_rslora)
    randomise_lora(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True, use_rslora=use_rslora))
    _copy_factors_into_peft(ours, theirs)
    ids, mask = token_batch()
    ours.train(), theirs.train()  # unmerged; dropout is 0
    expected = theirs(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)
    ours.eval()  # merged
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)
    assert lora.count_parameters(ours) == tuple(
        (sum(p.numel() for p in theirs.parameters() if p.requires_grad),
         sum(p.numel() for p in theirs.parameters())))


def test_roberta_linear_and_embedding_match_peft():
    base = tiny_roberta()
    targets = ["query", "value", "word_embeddings"]
    ours = lora.inject(copy.deepcopy(base), targets, r=2, lora_alpha=4)
    randomise_lora(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    _copy_factors_into_peft(ours, theirs)
    ids, mask = token_batch()
    ours.train(), theirs.train()
    expected = theirs(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)


def test_inject_keeps_pretrained_tensors_and_freezes():
    base = tiny_roberta()
    q_weight = base.roberta.encoder.layer[0].attention.self.query.weight
    model = lora.inject(base, ["query"], r=2)
    layer = model.roberta.encoder.layer[0].attention.self.query
    assert isinstance(layer, lora.Linear) and layer.weight is q_weight  # shared, not copied
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert "trainable params" in lora.trainable_summary(model)


def test_inject_fused_projection_with_enable_lora():
    base = tiny_gpt2()
    ids, mask = token_batch()
    expected = base(input_ids=ids, attention_mask=mask).logits
    model = lora.inject(base, ["c_attn"], r=2, lora_alpha=4, enable_lora=[True, False, True])
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, lora.MergedLinear) and layer.fan_in_fan_out
    assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (32, 2)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected)  # B = 0


def test_inject_conv_and_embedding_in_a_plain_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x = torch.randn(2, 1, 8, 8)
    expected = net(x)
    lora.inject(net, ["0", "3"], r=2, lora_alpha=2)
    assert isinstance(net[0], lora.Conv2d) and isinstance(net[3], lora.Linear)
    torch.testing.assert_close(net(x), expected)
    randomise_lora(net)
    unmerged = net(x)
    lora.merge_lora(net)
    torch.testing.assert_close(net(x), unmerged, rtol=1e-5, atol=1e-5)
    lora.unmerge_lora(net)
    torch.testing.assert_close(net(x), unmerged, rtol=1e-5, atol=1e-5)


def test_inject_bf16_model_gets_bf16_factors():
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    lora.inject(model, ["0"], r=2)
    assert model[0].lora_A.dtype == torch.bfloat16
    assert model(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_target_matching_nothing_names_the_pattern():
    with pytest.raises(ValueError, match=r"\['qury'\]"):
        lora.inject(tiny_roberta(), ["query", "qury"], r=2)
    with pytest.raises(ValueError, match="pattern 'nothing.*' matches no module"):
        lora.inject(tiny_roberta(), "nothing.*", r=2)


def test_unsupported_module_type_is_named():
    net = nn.Sequential(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="'0' is a LayerNorm"):
        lora.inject(net, ["0"], r=2)


def test_invalid_rank_is_named():
    with pytest.raises(ValueError, match="r must be"):
        lora.inject(tiny_roberta(), ["query"], r=0.5)
