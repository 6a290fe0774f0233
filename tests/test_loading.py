"""loralib.models.from_pretrained / load_tokenizer / download_model on Hugging Face folders saved by transformers."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _llama_fixtures import hf_model, hf_positions, left_padded_batch, max_diff_on_real, save, tiny_config, \
    transformers
from loralib import LoRAConfig, lora_state_dict
from loralib.models import check_tokenizer_fits, from_pretrained, hub, load_tokenizer, loading


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("how", ["safetensors", "bin", "sharded", "sharded-bin"])
def test_every_checkpoint_layout_loads(tmp_path, how):
    ref = hf_model(tiny_config(tie_word_embeddings=how.startswith("sharded")))
    folder = save(ref, tmp_path, how)
    names = sorted(p.name for p in folder.iterdir())
    if how.startswith("sharded"):
        assert any(n.endswith(".index.json") for n in names) and len(names) > 4, names
    ours = from_pretrained(folder)
    assert ours.loading_info == {"missing": [], "newly_initialized": [], "unexpected": [],
                                 "adapter_initialized": []}
    assert not any(t.is_meta for t in list(ours.parameters()) + list(ours.buffers()))
    assert not ours.training
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    assert max_diff_on_real(_logits(ours, ids, mask), expected, mask) < 1e-5


def test_base_model_checkpoint_loads_into_causal_lm_and_back(tmp_path, caplog):
    base = hf_model(tiny_config(tie_word_embeddings=True), "LlamaModel")
    folder = save(base, tmp_path / "base")
    with caplog.at_level(logging.INFO, logger="loralib.models.loading"):
        lm = from_pretrained(folder)
    # Keys without the `model.` prefix are mapped; the tied head needs no key of its own.
    assert lm.loading_info["missing"] == [] and lm.loading_info["newly_initialized"] == []
    assert torch.equal(lm.model.embed_tokens.weight, base.embed_tokens.weight)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight

    full = hf_model(tiny_config())
    bare = from_pretrained(save(full, tmp_path / "full"), task="base")
    assert bare.loading_info["unexpected"] == ["lm_head.weight"]
    assert torch.equal(bare.layers[1].mlp.up_proj.weight, full.model.layers[1].mlp.up_proj.weight)


def test_new_head_and_missing_keys_are_reported_by_name(tmp_path, caplog):
    ref = hf_model(tiny_config())
    folder = save(ref, tmp_path)
    with caplog.at_level(logging.INFO, logger="loralib.models.loading"):
        cls = from_pretrained(folder, task="sequence-classification", num_labels=5)
    info = cls.loading_info
    assert info["newly_initialized"] == ["score.weight"]
    assert info["unexpected"] == ["lm_head.weight"] and info["missing"] == []
    assert "score.weight" in caplog.text and "lm_head.weight" in caplog.text
    assert cls.score.weight.shape == (5, 32) and 0.005 < cls.score.weight.std().item() < 0.05  # normal(0, 0.02)

    # A checkpoint that lost a backbone tensor: loaded anyway, the tensor named as missing.
    state = {k: v for k, v in ref.state_dict().items() if k != "model.layers.1.post_attention_layernorm.weight"}
    from safetensors.torch import save_file
    (tmp_path / "model.safetensors").unlink()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loralib.models.loading"):
        lm = from_pretrained(tmp_path)
    assert lm.loading_info["missing"] == ["model.layers.1.post_attention_layernorm.weight"]
    assert "model.layers.1.post_attention_layernorm.weight" in caplog.text
    assert torch.equal(lm.model.layers[1].post_attention_layernorm.weight, torch.ones(32))


def test_lora_factors_are_initialised_and_checkpoint_factors_loaded(tmp_path):
    folder = save(hf_model(tiny_config()), tmp_path)
    lora = LoRAConfig(r=2, lora_alpha=4, target_modules=("q_proj", "v_proj"))
    model = from_pretrained(folder, lora=lora)
    info = model.loading_info
    assert len(info["adapter_initialized"]) == 2 * 2 * 2  # layers x projections x (A, B)
    assert "model.layers.0.self_attn.q_proj.lora_A" in info["adapter_initialized"]
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert layer.lora_A.dtype == torch.float32 and not layer.weight.requires_grad

    # A full state dict with trained factors loads them instead.
    model.train()
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_()
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    save_file(state, str(tmp_path / "model.safetensors"))
    again = from_pretrained(tmp_path, lora=lora).train()
    assert again.loading_info["adapter_initialized"] == []
    for key, value in lora_state_dict(model).items():
        assert torch.equal(again.state_dict()[key], value), key


def test_dtype_and_stale_rotary_keys(tmp_path):
    ref = hf_model(tiny_config(tie_word_embeddings=True))
    state = dict(ref.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # as transformers < 4.31 saved
    state.pop("lm_head.weight")
    ref.config.save_pretrained(tmp_path)
    from safetensors.torch import save_file
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()},
              str(tmp_path / "model.safetensors"))
    assert from_pretrained(tmp_path).lm_head.weight.dtype == torch.float32  # default: fp32
    auto = from_pretrained(tmp_path, dtype="auto")
    assert auto.loading_info["unexpected"] == []
    assert {p.dtype for p in auto.parameters()} == {torch.bfloat16}
    assert auto.lm_head.weight is auto.model.embed_tokens.weight
    assert from_pretrained(tmp_path, dtype=torch.float16).model.norm.weight.dtype == torch.float16


def test_folder_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nope")


def test_folder_without_weights(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(tmp_path)


def test_unsupported_model_type_lists_the_supported(tmp_path):
    config = tiny_config().to_dict()
    config["model_type"] = "mamba"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type='mamba'.*\['bert', 'deberta-v2', 'gpt2', 'llama', 'roberta', 't5'\]"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="task='summarize'"):
        from_pretrained(tmp_path, task="summarize")


def test_wrong_shape_names_file_key_and_shapes(tmp_path):
    save(hf_model(tiny_config(intermediate_size=40)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        from_pretrained(tmp_path)
    message = str(err.value)
    assert "model.safetensors" in message and "model.layers.0.mlp.down_proj.weight" in message
    assert "(32, 40)" in message and "(32, 48)" in message


def test_wrong_shape_in_a_shard(tmp_path):
    save(hf_model(tiny_config()), tmp_path, "sharded")
    config = json.loads((tmp_path / "config.json").read_text())
    config["vocab_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model-\d+-of-\d+\.safetensors: key 'model\.embed_tokens\.weight' "
                                         r"has shape \(96, 32\).*expects \(100, 32\)"):
        from_pretrained(tmp_path)


# -- tokenizers ---------------------------------------------------------------------------------------

def _save_tokenizer(folder, n_words: int):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(n_words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return len(vocab)


def test_load_tokenizer_and_vocabulary_check(tmp_path):
    size = _save_tokenizer(tmp_path, 50)
    tiny_config(vocab_size=96).save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path, model_config=json.loads((tmp_path / "config.json").read_text()))
    assert len(tok) == size and tok("w3 w7")["input_ids"] == [5, 9]

    too_small = tiny_config(vocab_size=40).to_dict()
    with pytest.raises(ValueError, match=rf"tokenizer .*tokenizer\.json has {size} tokens.*vocab_size is 40"):
        load_tokenizer(tmp_path, model_config=too_small)
    with pytest.raises(ValueError, match=f"has {size} tokens"):
        check_tokenizer_fits(tok, too_small)

    from tokenizers import Tokenizer
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="vocab_size is 40"):
        check_tokenizer_fits(raw, too_small, "tokenizer.json")
    check_tokenizer_fits(raw, {"vocab_size": size})


def test_load_tokenizer_without_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


# -- hub ------------------------------------------------------------------------------------------------

def test_download_model_with_mocked_transport(tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, revision, local_dir, allow_patterns):
        calls.append((repo_id, local_dir, tuple(allow_patterns)))
        save(hf_model(tiny_config()), Path(local_dir))
        return local_dir

    monkeypatch.setattr(hub, "_snapshot_download", fake_snapshot_download)
    folder = hub.download_model("org/tiny-llama", dest_root=tmp_path / "models")
    assert folder == tmp_path / "models" / "org" / "tiny-llama"
    assert calls[0][0] == "org/tiny-llama" and "*.safetensors" in calls[0][2] and "config.json" in calls[0][2]
    assert from_pretrained(folder).loading_info["missing"] == []


def test_download_model_says_the_hub_is_unreachable(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(**kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError(
            "An error happened while trying to locate the files on the Hub.\nPlease check your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match="hub is unreachable") as err:
        hub.download_model("org/tiny-llama", dest_root=tmp_path)
    assert isinstance(err.value, hub.HubUnreachableError) and "\n" not in str(err.value)

    def missing(**kwargs):
        response = SimpleNamespace(headers={}, request=None)
        raise huggingface_hub.errors.RepositoryNotFoundError("404 Client Error", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(ValueError, match="no model 'org/none'"):
        hub.download_model("org/none", dest_root=tmp_path)
    assert hub.main(["org/tiny-llama", "--dest-root", str(tmp_path)]) == 1


def test_dispatch_table_names_every_family():
    assert loading.FAMILIES == {"gpt2": "gpt2", "llama": "llama", "roberta": "roberta", "bert": "roberta",
                                "deberta-v2": "deberta_v2", "t5": "t5"}


def test_swapped_init_survives_loading(tmp_path):
    """LoRAConfig(init_swapped=True), LoRA+'s init: B random, A zero, also after from_pretrained."""
    folder = save(hf_model(tiny_config()), tmp_path)
    lora = LoRAConfig(r=2, lora_alpha=4, target_modules=("q_proj",), init_swapped=True)
    layer = from_pretrained(folder, lora=lora).model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lora_A) == 0 and torch.count_nonzero(layer.lora_B) > 0


def test_config_overrides_reach_the_model(tmp_path):
    folder = save(hf_model(tiny_config()), tmp_path)
    model = from_pretrained(folder, config_overrides={"rms_norm_eps": 0.5})
    assert model.hf_config["rms_norm_eps"] == 0.5 and model.model.norm.eps == 0.5
