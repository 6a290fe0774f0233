"""One adapter opener (loralib.adapter_files.open_adapter): each kind of adapter path built on disk with tiny
models is recognised, described the same way, and loads (load_adapter_source) exactly as its own loader does."""
import copy
import json
import re
import shutil

import pytest
import torch

import loralib as lora
from loralib.adapter_files import AdapterError, open_adapter
from loralib.adapters import load_adapter_source
from loralib.models.released import load_gpt2_nlg_adapter
from loralib.models.released_nlu import load_nlu_adapter, nlu_lora_config
from _tiny_hf import randomise_lora, tiny_roberta, token_batch

peft = pytest.importorskip("peft")


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _trained_roberta():
    model = lora.inject(tiny_roberta(), ["query", "value"], r=2, lora_alpha=4)
    randomise_lora(model)
    for p in model.classifier.parameters():  # a trained head
        p.requires_grad = True
        with torch.no_grad():
            p.add_(0.5)
    return model


# -- ours --------------------------------------------------------------------------------------------
def test_our_folder_is_recognised_and_loads_as_load_adapter(tmp_path):
    model = _trained_roberta()
    lora.save_adapter(model, tmp_path / "ad")
    (tmp_path / "run_config.json").write_text(json.dumps({"model_type": "roberta"}))
    source = open_adapter(tmp_path / "ad")
    assert source.format == "loralib" and source.path == tmp_path / "ad" and source.family == "roberta"
    assert source.lora_to_build == source.lora
    assert source.lora == model.loralib_config
    assert set(source.ranks.values()) == {2} and len(source.ranks) == 4  # query and value of 2 layers
    assert source.extra_keys == sorted(k for k in model.state_dict() if k.startswith("classifier."))
    state = model.state_dict()
    for key, value in source.tensors.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    ids, mask = token_batch()
    by_old = lora.load_adapter(tiny_roberta(), tmp_path / "ad")
    by_opener = load_adapter_source(tiny_roberta(), tmp_path / "ad")
    torch.testing.assert_close(_logits(by_opener, ids, mask), _logits(by_old, ids, mask), rtol=0, atol=0)
    torch.testing.assert_close(_logits(by_opener, ids, mask), _logits(model, ids, mask), rtol=1e-5, atol=1e-5)
    # the weights file names its folder
    assert open_adapter(tmp_path / "ad" / "adapter.safetensors").path == tmp_path / "ad"
    with pytest.raises(ValueError, match=r"ad'.* holds adapters of a roberta model"):
        source.check_family("gpt2")


def test_trimmed_adalora_folder_rebuilds_its_ranks(tmp_path):
    """An AdaLoRA adapter saved trimmed, with the rank_pattern.json the GLUE run writes next to it, loads into
    a model built with the initial r: the ranks are trimmed first (as the GLUE driver's load did)."""
    config = lora.LoRAConfig(r=4, lora_alpha=8, target_modules=("query", "value"), method="adalora")
    model = lora.inject(tiny_roberta(), None, config=config)
    randomise_lora(model)
    with torch.no_grad():
        for _, layer in lora.rank_adaptive_layers(model):
            layer.lora_E[1:3] = 0
    for _, layer in lora.rank_adaptive_layers(model):
        layer.rank_mask = layer.lora_E.view(-1) != 0
    ids, mask = token_batch()
    expected = _logits(model.eval(), ids, mask)
    lora.trim_ranks(model)
    lora.save_adapter(model, tmp_path / "ad")
    (tmp_path / "ad" / "rank_pattern.json").write_text(json.dumps(lora.adalora_state(model)))
    source = open_adapter(tmp_path / "ad")
    assert source.rank_state["trimmed"] is True
    fresh = load_adapter_source(lora.inject(tiny_roberta(), None, config=config), source)
    torch.testing.assert_close(_logits(fresh.eval(), ids, mask), expected, rtol=1e-5, atol=1e-5)


# -- PEFT ---------------------------------------------------------------------------------------------
def test_peft_lora_folder_with_patterns(tmp_path):
    from test_adapters import peft_roberta_with_patterns

    base = tiny_roberta()
    theirs = peft_roberta_with_patterns(base)
    theirs.save_pretrained(str(tmp_path / "peft"))
    source = open_adapter(tmp_path / "peft")
    assert source.format == "peft" and source.family is None and source.lora_to_build is None
    value = "roberta.encoder.layer.0.attention.self.value"
    query = "roberta.encoder.layer.0.attention.self.query"
    assert (source.ranks[value], source.alphas[value]) == (3, 9) and (source.ranks[query], source.alphas[query]) == (2, 6)
    assert f"{value}.lora_A" in source.tensors and "roberta.embeddings.word_embeddings.lora_B" in source.tensors
    assert "classifier.out_proj.weight" in source.extra_keys
    assert (source.lora.r, source.lora.lora_alpha) == (2, 6)
    ids, mask = token_batch()
    by_old = lora.import_peft(copy.deepcopy(base), tmp_path / "peft")
    by_opener = load_adapter_source(copy.deepcopy(base), source)
    torch.testing.assert_close(_logits(by_opener, ids, mask), _logits(by_old, ids, mask), rtol=0, atol=0)
    torch.testing.assert_close(_logits(by_opener, ids, mask), _logits(theirs, ids, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_rank_pattern", [False, True])
def test_peft_adalora_folder_is_the_plain_lora_it_equals(tmp_path, with_rank_pattern):
    """PEFT's AdaLoRA folder, before its final allocation (every triplet saved, one E zero) and after it
    (rank_pattern in the config, the pruned triplet cut from the saved tensors), loads as PEFT loads it."""
    base = tiny_roberta()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, target_modules=["query", "value"], total_step=10))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
                if "lora_E" in name:
                    p[1] = 0  # a pruned triplet
    theirs.eval()
    if with_rank_pattern:  # what PEFT's allocator records at its final step: the kept triplets per layer
        theirs.peft_config["default"].rank_pattern = {
            f"roberta.encoder.layer.{i}.attention.self.{proj}.lora_E": [True, False, True, True]
            for i in range(2) for proj in ("query", "value")}
    theirs.save_pretrained(str(tmp_path / "ada"))
    if with_rank_pattern:
        saved = json.loads((tmp_path / "ada" / "adapter_config.json").read_text())
        assert saved["rank_pattern"] and saved["peft_type"] == "ADALORA"
        from safetensors.torch import load_file
        key = "base_model.model.roberta.encoder.layer.0.attention.self.query.lora_A"
        assert load_file(str(tmp_path / "ada" / "adapter_model.safetensors"))[key].shape[0] == 3  # cut by PEFT
    source = open_adapter(tmp_path / "ada")
    assert source.format == "peft" and set(source.ranks.values()) == {3}
    ids, mask = token_batch()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ada")).eval()
    ours = lora.import_peft(copy.deepcopy(base), tmp_path / "ada")
    torch.testing.assert_close(_logits(ours, ids, mask), _logits(loaded, ids, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(ours, ids, mask), _logits(theirs, ids, mask), rtol=1e-5, atol=1e-5)


# -- microsoft's released files ------------------------------------------------------------------------
def _nlu_file(path, hidden=16, r=8, labels=3):
    """A state dict in the released RoBERTa layout (keys and shapes of roberta_base_lora_*.bin)."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(2):
        for proj in ("query", "value"):
            sd[f"roberta.encoder.layer.{i}.attention.self.{proj}.lora_A"] = 0.3 * torch.randn(r, hidden, generator=g)
            sd[f"roberta.encoder.layer.{i}.attention.self.{proj}.lora_B"] = 0.3 * torch.randn(hidden, r, generator=g)
    for key, shape in {"classifier.dense.weight": (hidden, hidden), "classifier.dense.bias": (hidden,),
                       "classifier.out_proj.weight": (labels, hidden), "classifier.out_proj.bias": (labels,)}.items():
        sd[key] = 0.3 * torch.randn(shape, generator=g)
    torch.save(sd, path)
    return sd


def test_released_nlu_file_loads_as_load_nlu_adapter(tmp_path):
    sd = _nlu_file(tmp_path / "roberta_base_lora_mnli.bin")
    source = open_adapter(tmp_path / "roberta_base_lora_mnli.bin")
    assert source.format == "microsoft-nlu" and source.family == "roberta"
    assert (source.lora.r, source.lora.lora_alpha, source.lora.target_modules) == (8, 16, ("query", "value"))
    assert source.extra_keys == sorted(k for k in sd if k.startswith("classifier."))
    old = lora.inject(tiny_roberta(), None, config=nlu_lora_config(sd))
    load_nlu_adapter(old, tmp_path / "roberta_base_lora_mnli.bin")
    new = load_adapter_source(tiny_roberta(), source)  # no LoRA layers yet: injected from source.lora
    ids, mask = token_batch()
    torch.testing.assert_close(_logits(new, ids, mask), _logits(old, ids, mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match="roberta_base_lora_mnli.bin.* of a roberta model"):
        source.check_family("deberta-v2")
    _nlu_file(tmp_path / "wide.bin", hidden=32)  # for another model size: refused, the injection undone
    bare = tiny_roberta()
    with pytest.raises(ValueError, match="wide.bin: key .* has shape"):
        load_adapter_source(bare, tmp_path / "wide.bin")
    assert not list(lora.lora_layers(bare))


def test_released_gpt2_file_loads_as_load_gpt2_nlg_adapter(tmp_path):
    from _gpt2_fixtures import hf_model, left_padded_batch, ours_like

    g = torch.Generator().manual_seed(0)
    factors = {}
    for i in range(2):
        factors[f"module.transformer.h.{i}.attn.c_attn.lora_A"] = 0.3 * torch.randn(8, 32, generator=g)
        factors[f"module.transformer.h.{i}.attn.c_attn.lora_B"] = 0.3 * torch.randn(64, 4, generator=g)
    torch.save({"model_state_dict": factors}, tmp_path / "gpt2_md_lora_e2e.pt")
    source = open_adapter(tmp_path / "gpt2_md_lora_e2e.pt")
    assert source.format == "microsoft-nlg" and source.family == "gpt2"
    assert (source.lora.r, source.lora.lora_alpha, tuple(source.lora.enable_lora)) == (4, 32, (True, False, True))
    hf = hf_model()
    old = load_gpt2_nlg_adapter(ours_like(hf, lora=source.lora), tmp_path / "gpt2_md_lora_e2e.pt")
    new = load_adapter_source(ours_like(hf, lora=source.lora), source)
    ids, mask = left_padded_batch()
    torch.testing.assert_close(_logits(new, ids, mask), _logits(old, ids, mask), rtol=0, atol=0)


# -- the training loop's checkpoints and run folders ---------------------------------------------------
def test_checkpoint_and_run_folder_open_their_adapter(tmp_path):
    from loralib.train import TrainConfig, train
    from test_train_loop import IN, build, collate, data

    model = build()
    train(model, data(16), collate, TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_batch_size=4,
                                                 lr=1e-2, progress_bar=False, save_strategy="steps", save_every=1,
                                                 device="cpu"))
    checkpoint = open_adapter(tmp_path / "run" / "checkpoint-2")
    assert checkpoint.format == "loralib" and checkpoint.step == 2
    assert checkpoint.path == tmp_path / "run" / "checkpoint-2" / "adapter"
    assert checkpoint.model_extra == tmp_path / "run" / "checkpoint-2" / "model_extra.pt"
    assert open_adapter(tmp_path / "run" / "checkpoint-1").step == 1
    run = open_adapter(tmp_path / "run")
    assert run.path == tmp_path / "run" / "adapter" and run.step is None
    final = {k: v for k, v in model.state_dict().items() if "lora_" in k or k.startswith("head")}
    for source in (checkpoint, run):
        assert sorted(source.tensors) == sorted(final)
        for key, value in final.items():
            torch.testing.assert_close(source.tensors[key], value, rtol=0, atol=0)
    x = torch.randn(5, IN)
    fresh = lora.load_adapter(build(), tmp_path / "run" / "checkpoint-2")  # load_adapter takes checkpoints too
    torch.testing.assert_close(fresh.eval()(x)["logits"], model.eval()(x)["logits"], rtol=0, atol=0)
    # an interrupted run (no adapter/ yet): its newest checkpoint
    shutil.rmtree(tmp_path / "run" / "adapter")
    assert open_adapter(tmp_path / "run").step == 2


# -- what is none of these ----------------------------------------------------------------------------
def test_a_path_that_is_no_adapter_is_one_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nothing'} does not exist")):
        open_adapter(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=re.escape(f"{tmp_path / 'empty'}: not an adapter folder")):
        open_adapter(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(AdapterError, match="notes.txt: not an adapter file"):
        open_adapter(tmp_path / "notes.txt")
    torch.save({"wte.weight": torch.zeros(2, 2)}, tmp_path / "model.bin")
    with pytest.raises(AdapterError, match="model.bin: holds no LoRA factors of a known layout"):
        open_adapter(tmp_path / "model.bin")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(AdapterError, match="other/adapter_config.json: peft_type is 'PROMPT_TUNING'"):
        open_adapter(tmp_path / "other")
