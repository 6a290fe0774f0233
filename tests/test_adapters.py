"""Adapter files: our format round trip, PEFT export -> PEFT load, PEFT save -> our import, bad files."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import loralib as lora
from _tiny_hf import randomise_lora, tiny_gpt2, tiny_roberta, token_batch

peft = pytest.importorskip("peft")


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


def test_own_format_round_trip_into_a_plain_model(tmp_path):
    base = tiny_roberta()
    model = lora.inject(copy.deepcopy(base), ["query", "value"], r=2, lora_alpha=4)
    randomise_lora(model)
    for p in model.classifier.parameters():  # a trained head is saved with the adapter
        p.requires_grad = True
        with torch.no_grad():
            p.add_(1.0)
    ids, mask = token_batch()
    expected = _logits(model, ids, mask)
    lora.save_adapter(model, tmp_path / "ad", metadata={"task": "tiny"})
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["lora"]["target_modules"] == ["query", "value"] and meta["metadata"] == {"task": "tiny"}
    assert set(meta["extra_keys"]) == {k for k in base.state_dict() if k.startswith("classifier.")}
    assert not list(tmp_path.glob("ad/*.tmp"))

    fresh = copy.deepcopy(base)  # no LoRA layers yet: injected from the recorded config
    lora.load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(_logits(fresh, ids, mask), expected, rtol=1e-5, atol=1e-5)
    fresh.eval()
    torch.testing.assert_close(_logits(fresh, ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_export_peft_loads_in_peft_with_same_outputs(tmp_path):
    base = tiny_roberta()
    model = lora.inject(copy.deepcopy(base), ["query", "value", "word_embeddings"], r=2, lora_alpha=4)
    randomise_lora(model)
    for p in model.classifier.parameters():  # a trained head: PEFT's modules_to_save
        p.requires_grad = True
        with torch.no_grad():
            p.mul_(2.0)
    ids, mask = token_batch()
    expected = _logits(model, ids, mask)
    lora.export_peft(model, tmp_path / "peft", task_type="SEQ_CLS")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    torch.testing.assert_close(_logits(loaded, ids, mask), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_export_peft_fused_qv_projection_is_exact(tmp_path, use_rslora):
    """GPT-2's c_attn with LoRA on q and v only becomes a rank-2r PEFT LoRA with zero k rows."""
    base = tiny_gpt2()
    model = lora.inject(copy.deepcopy(base), ["c_attn"], r=2, lora_alpha=8, use_rslora=use_rslora,
                        enable_lora=[True, False, True])
    randomise_lora(model)
    ids, mask = token_batch()
    expected = _logits(model, ids, mask)
    lora.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(cfg["rank_pattern"].values()) == {4} and cfg["fan_in_fan_out"] is True
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    torch.testing.assert_close(_logits(loaded, ids, mask), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["adalora", "lora2"])
def test_export_peft_of_rank_adaptive_layers_is_an_exact_plain_lora(tmp_path, method):
    """AdaLoRA and LoRA² layers, some AdaLoRA triplets pruned (E = 0) and one layer pruned whole, become a
    plain PEFT LoRA with the same outputs; loaded back by PEFT and by import_peft."""
    base = tiny_gpt2()
    model = lora.inject(copy.deepcopy(base), None, config=lora.LoRAConfig(
        r=4, lora_alpha=6, target_modules=("c_attn", "c_proj", "c_fc"), method=method, lora2_k=2))
    randomise_lora(model)
    layers = [layer for _, layer in lora.lora_layers(model) if layer.has_lora]
    with torch.no_grad():
        layers[0].lora_E[1:3] = 0  # two triplets pruned: rank 2 left
        layers[1].lora_E.zero_()   # every triplet pruned: nothing to export
        layers[2].lora_E[1:] = 0   # rank 1 left (for LoRA², below its inner rank k = 2)
    model.eval()
    ids, mask = token_batch()
    expected = _logits(model, ids, mask)
    lora.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    paths = [path for path, layer in lora.lora_layers(model) if layer.has_lora]
    assert cfg["peft_type"] == "LORA" and paths[1] not in cfg["target_modules"]
    assert len(cfg["target_modules"]) == len(paths) - 1
    if method == "adalora":
        assert cfg["rank_pattern"] == {paths[0]: 2, paths[2]: 1}  # the others keep r = 4
    else:  # LoRA²'s update has rank min(k = 2, ranks left)
        assert cfg["rank_pattern"] == {p: 1 if p == paths[2] else 2 for p in cfg["target_modules"]}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    torch.testing.assert_close(_logits(loaded, ids, mask), expected, rtol=1e-5, atol=1e-5)
    back = lora.import_peft(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(_logits(back, ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_export_peft_refuses_an_adapter_with_every_triplet_pruned(tmp_path):
    model = lora.inject(tiny_gpt2(), None, config=lora.LoRAConfig(r=2, target_modules=("c_attn",), method="adalora"))
    with pytest.raises(lora.AdapterError, match="rank 0 left"):
        lora.export_peft(model, tmp_path / "peft")  # E = 0 at initialisation
    assert not (tmp_path / "peft").exists()


def peft_roberta_with_patterns(base):
    """PEFT's LoRA on a copy of `base` with a rank_pattern, an alpha_pattern, an embedding and a trained head."""
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"],
        rank_pattern={"value": 3}, alpha_pattern={"value": 9}, task_type="SEQ_CLS"))
    randomise_lora(theirs)
    with torch.no_grad():
        for p in theirs.base_model.model.classifier.parameters():
            p.add_(0.5)
    return theirs


def test_import_peft_adapter_with_head_and_embedding(tmp_path):
    base = tiny_roberta()
    theirs = peft_roberta_with_patterns(base)
    ids, mask = token_batch()
    expected = _logits(theirs, ids, mask)
    theirs.save_pretrained(str(tmp_path / "peft"))

    ours = lora.import_peft(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours, ids, mask), expected, rtol=1e-5, atol=1e-5)
    value = ours.roberta.encoder.layer[0].attention.self.value
    assert value.r == 3 and value.scaling == pytest.approx(3.0)
    assert ours.classifier.out_proj.weight.requires_grad


def test_import_peft_into_layers_built_beforehand_takes_the_alpha_pattern(tmp_path):
    """LoRA layers built from the adapter's global r / alpha (as lorapro/evaluate.py does) take each
    module's own alpha_pattern value when the factors are imported."""
    base = tiny_roberta()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["query", "value"], alpha_pattern={"value": 9}))
    randomise_lora(theirs)
    ids, mask = token_batch()
    expected = _logits(theirs, ids, mask)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = lora.inject(copy.deepcopy(base), ["query", "value"], r=2, lora_alpha=6)
    lora.import_peft(ours, tmp_path / "peft")
    assert ours.roberta.encoder.layer[0].attention.self.value.scaling == pytest.approx(4.5)
    torch.testing.assert_close(_logits(ours, ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_peft_round_trip_through_both_formats(tmp_path):
    base = tiny_gpt2()
    model = lora.inject(copy.deepcopy(base), ["c_attn", "c_proj"], r=2, lora_alpha=4)
    randomise_lora(model)
    ids, mask = token_batch()
    expected = _logits(model, ids, mask)
    lora.export_peft(model, tmp_path / "p")
    back = lora.import_peft(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(_logits(back, ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_adapter_with_wrong_shapes_names_file_and_key(tmp_path):
    model = lora.inject(tiny_roberta(), ["query"], r=2)
    lora.save_adapter(model, tmp_path / "ad")
    other = lora.inject(tiny_roberta(), ["query"], r=4)
    with pytest.raises(lora.AdapterError, match=r"adapter.safetensors: key 'roberta.*query.lora_A' has shape \(2, 16\)"):
        lora.load_adapter(other, tmp_path / "ad")


def test_adapter_for_another_model_names_the_key(tmp_path):
    model = lora.inject(tiny_roberta(), ["query"], r=2)
    lora.save_adapter(model, tmp_path / "ad")
    tensors = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    tensors["transformer.h.0.attn.c_attn.lora_A"] = torch.zeros(2, 16)
    save_file(tensors, str(tmp_path / "ad" / "adapter.safetensors"))
    with pytest.raises(lora.AdapterError, match="c_attn.lora_A' is not in the model"):
        lora.load_adapter(lora.inject(tiny_roberta(), ["query"], r=2), tmp_path / "ad")


def test_peft_adapter_with_wrong_shapes_is_refused(tmp_path):
    base = tiny_roberta()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    theirs.save_pretrained(str(tmp_path / "peft"))
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = torch.zeros(99, 2)
    save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(lora.AdapterError, match=r"lora_B has shape \(99, 2\)"):
        lora.import_peft(copy.deepcopy(base), tmp_path / "peft")


def test_missing_or_foreign_config_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(tiny_roberta(), tmp_path / "nothing")
    base = tiny_roberta()
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query"])).save_pretrained(str(tmp_path / "p"))
    with pytest.raises(lora.AdapterError, match="looks like a PEFT adapter"):
        lora.load_adapter(tiny_roberta(), tmp_path / "p")


def test_import_peft_into_our_own_model_file(tmp_path):
    """Our model files build every projection as a rank-0 loralib Linear; a PEFT adapter must still import
    (a regression: import_peft only injected into modules that were not loralib layers)."""
    peft = pytest.importorskip("peft")
    from _llama_fixtures import hf_model, save, tiny_config
    from loralib.models import from_pretrained

    hf = hf_model(tiny_config())
    save(hf, tmp_path / "base")
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomise_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = from_pretrained(tmp_path / "base", task="causal-lm")
    lora.import_peft(ours, tmp_path / "adapter")
    assert type(ours.model.layers[0].self_attn.q_proj).__name__ == "Linear" and ours.model.layers[0].self_attn.q_proj.r == 4
    ids = torch.randint(3, 90, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
