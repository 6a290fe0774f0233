"""Regressions from a review of loralib used as a library on a user's own model: each case once gave wrong
outputs or a broken file with no error, or an error that did not say what was wrong.

- an adapter loaded into layers built with another lora_alpha / rsLoRA setting (silently another function);
- a PEFT LoRA imported into AdaLoRA's SVD-form layers (B diag(E) A instead of B A);
- export_peft's default modules_to_save (the whole backbone when a LoRA layer's bias was trainable, a folder
  PEFT cannot load);
- LoRA-Pro on a non-finite gradient (NaN written into every factor, then a linear-algebra error) and on a
  model without LoRA layers (plain AdamW on every weight);
- merged_state_dict of an AdaLoRA model (its ranknum buffers left in: the plain model refused it);
- an adapter saved from loralib.models.from_pretrained(..., lora=...) (no LoRAConfig recorded);
- inject's enable_lora error (it did not name the module).
"""
import copy
import json

import pytest
import torch
import torch.nn as nn

import loralib as lora
from loralib.adapter_files import AdapterError, read_adapter_config
from _tiny_hf import randomise_lora, tiny_gpt2, tiny_roberta, token_batch

peft = pytest.importorskip("peft")


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _trained_roberta(tmp_path, **inject_kwargs):
    model = lora.inject(tiny_roberta(), ["query", "value"], r=4, lora_alpha=8, **inject_kwargs)
    randomise_lora(model)
    lora.save_adapter(model, tmp_path / "adapter")
    return model


@pytest.mark.parametrize("other", [dict(lora_alpha=16), dict(lora_alpha=8, use_rslora=True)])
def test_an_adapter_is_refused_by_layers_of_another_scaling(tmp_path, other):
    _trained_roberta(tmp_path)
    target = lora.inject(tiny_roberta(), ["query", "value"], r=4, **other)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(AdapterError, match=r"trained with lora_alpha=8; the model's layer has lora_alpha="):
        lora.load_adapter(target, tmp_path / "adapter")
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # left as it was
    # layers built with the adapter's own config take it, to the exact outputs
    ids, mask = token_batch()
    same = lora.load_adapter(lora.inject(tiny_roberta(), ["query", "value"], r=4, lora_alpha=8),
                             tmp_path / "adapter")
    bare = lora.load_adapter(tiny_roberta(), tmp_path / "adapter")
    torch.testing.assert_close(_logits(same, ids, mask), _logits(bare, ids, mask), rtol=0, atol=0)


def test_a_peft_lora_is_refused_by_svd_form_layers(tmp_path):
    theirs = peft.get_peft_model(tiny_roberta(), peft.LoraConfig(r=4, lora_alpha=8,
                                                                 target_modules=["query", "value"]))
    randomise_lora(theirs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    adaptive = lora.inject(tiny_roberta(), ["query", "value"], r=4, lora_alpha=8, method="adalora")
    with pytest.raises(AdapterError, match="SVDLinear .*AdaLoRA / LoRA² SVD form"):
        lora.import_peft(adaptive, tmp_path / "peft")


def test_export_peft_refuses_a_trainable_lora_layer_bias_before_writing(tmp_path):
    model = _trained_roberta(tmp_path, bias="lora_only")
    assert model.roberta.encoder.layer[0].attention.self.query.bias.requires_grad
    with pytest.raises(AdapterError, match=r"trainable parameters \['roberta.encoder.layer.0.attention.self.query.bias'"):
        lora.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_export_peft_saves_the_trained_modules_peft_can_load(tmp_path):
    """The classifier (all trainable) and one layer norm inside the backbone: each saved whole, by its path,
    and PEFT's model gives our outputs."""
    model = _trained_roberta(tmp_path)
    norm = model.roberta.encoder.layer[1].output.LayerNorm
    with torch.no_grad():
        norm.weight.mul_(1.5)
        model.classifier.out_proj.bias.add_(0.5)
    for p in [norm.weight, norm.bias, *model.classifier.parameters()]:
        p.requires_grad_(True)
    lora.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier", "roberta.encoder.layer.1.output.LayerNorm"]
    loaded = peft.PeftModel.from_pretrained(tiny_roberta(), str(tmp_path / "peft")).eval()
    ids, mask = token_batch()
    torch.testing.assert_close(_logits(loaded, ids, mask), _logits(model.eval(), ids, mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda m: lora.LoRAProAdamW(m, lr=0.1, mode="efficient"),
                                  lambda m: lora.LoRAProAdamW(m, lr=0.1, mode="full"),
                                  lambda m: lora.LoRAProSGD(m, lr=0.1)], ids=["efficient", "full", "sgd"])
def test_lorapro_stops_on_a_non_finite_gradient_before_changing_anything(make):
    torch.manual_seed(0)
    model = lora.inject(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)), ["0", "2"], r=2)
    optimizer = make(model)
    model(torch.randn(5, 8)).pow(2).sum().backward()
    optimizer.step()  # a finite step passes
    optimizer.zero_grad()
    model(torch.randn(5, 8)).pow(2).sum().backward()
    model[2].lora_B.grad[0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FloatingPointError, match=r"the gradient of 2\.lora_B is not finite"):
        optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lorapro_refuses_a_model_without_lora_layers():
    with pytest.raises(ValueError, match="has no trainable LoRA layer"):
        lora.LoRAProAdamW(nn.Sequential(nn.Linear(4, 4)), lr=0.1)


def test_merged_state_dict_of_adalora_loads_into_the_plain_model():
    plain = tiny_roberta()
    model = lora.inject(copy.deepcopy(plain), ["query", "value"], r=4, lora_alpha=8, method="adalora")
    randomise_lora(model)
    ids, mask = token_batch()
    expected = _logits(model.eval(), ids, mask)
    plain.load_state_dict(lora.merged_state_dict(model), strict=True)
    torch.testing.assert_close(_logits(plain, ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_an_adapter_saved_from_our_model_file_records_its_config(tmp_path):
    """from_pretrained(..., lora=...) then save_adapter: the folder rebuilds its layers in a bare model."""
    from loralib.models import from_pretrained

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    config = lora.LoRAConfig(r=4, lora_alpha=12, target_modules=("c_attn",), enable_lora=(True, False, True))
    model = from_pretrained(tmp_path / "gpt2", lora=config).train()  # unmerged while the factors change
    randomise_lora(model)
    lora.save_adapter(model, tmp_path / "adapter")
    assert read_adapter_config(tmp_path / "adapter")["lora"]["lora_alpha"] == 12
    reloaded = lora.load_adapter(from_pretrained(tmp_path / "gpt2"), tmp_path / "adapter")
    ids, _ = token_batch()
    torch.testing.assert_close(_logits(reloaded.eval(), ids), _logits(model.eval(), ids), rtol=0, atol=0)


def test_inject_names_the_module_whose_chunks_do_not_divide():
    with pytest.raises(ValueError, match=r"module 'transformer.h.0.mlp.c_fc' .*enable_lora has 3 entries"):
        lora.inject(tiny_gpt2(), ["c_attn", "c_fc"], r=2, enable_lora=[True, False, True])


def test_a_folder_without_lora_factors_loads_back(tmp_path):
    """save_adapter of a model without LoRA layers (full fine-tuning: its trainable tensors are the "extras")
    loads back into a bare model; it was refused for recording no LoRAConfig."""
    trained = tiny_roberta()
    with torch.no_grad():
        trained.classifier.out_proj.bias.add_(1.0)
    for name, p in trained.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    lora.save_adapter(trained, tmp_path / "full")
    reloaded = lora.load_adapter(tiny_roberta(), tmp_path / "full")
    ids, mask = token_batch()
    torch.testing.assert_close(_logits(reloaded, ids, mask), _logits(trained, ids, mask), rtol=0, atol=0)


def test_from_pretrained_refuses_a_lora_config_that_adapts_nothing(tmp_path):
    from loralib.models import from_pretrained

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"target_modules=\('bogus',\) match no projection of this gpt2 model"):
        from_pretrained(tmp_path / "gpt2", lora=lora.LoRAConfig(r=4, target_modules=("bogus",)))


@pytest.mark.parametrize("write", [lora.save_adapter, lora.export_peft], ids=["save_adapter", "export_peft"])
def test_non_finite_weights_are_not_written(tmp_path, write):
    model = lora.inject(tiny_roberta(), ["query", "value"], r=4, lora_alpha=8)
    with torch.no_grad():
        model.roberta.encoder.layer[1].attention.self.value.lora_B[0, 0] = float("nan")
    with pytest.raises(AdapterError, match=r"roberta\.encoder\.layer\.1\.attention\.self\.value\.lora_B[.a-z]* holds "
                                           r"non-finite values"):
        write(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
