"""Regression: a PEFT LoRA on GPT-2's fused c_attn (one update over q|k|v: A (r, C), B (3 C, r)) imported into
our GPT-2 and saved in our format loads back into a GPT-2 built from the saved config, and through the adapter
opener, with exactly PEFT's outputs. It did not: the saved config said enable_lora=None, which the model file
reads as "every chunk" (a 3-chunk MergedLinear, A (3 r, C)) while inject and PEFT put one LoRA on the whole
projection. Both now record enable_lora=WHOLE_PROJECTION, (True,); the LoRA paper's chunked configs build as
before."""
import copy

import pytest
import torch

import loralib as lora
from loralib.adapter_files import open_adapter, read_adapter_config
from loralib.adapters import load_adapter_source
from loralib.config import WHOLE_PROJECTION, LoRAConfig
from _gpt2_fixtures import VOCAB, hf_model, ours_like

peft = pytest.importorskip("peft")
C, R = 32, 4  # hf_model's n_embd; the adapter's rank


def _peft_gpt2(hf, **patterns):
    """PEFT's LoRA on hf (c_attn fused, c_proj plain), every factor random and non-zero."""
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=R, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_dropout=0.0,
        **patterns))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return theirs.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids():
    return torch.randint(3, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))


def _check_whole_c_attn(model):
    c_attn = model.transformer.h[0].attn.c_attn
    assert type(c_attn) is lora.Linear, type(c_attn).__name__
    assert tuple(c_attn.lora_A.shape) == (R, C) and tuple(c_attn.lora_B.shape) == (3 * C, R)


@pytest.mark.parametrize("patterns", [{}, {"rank_pattern": {"c_proj": 2}, "alpha_pattern": {"c_attn": 12}}])
def test_peft_c_attn_adapter_round_trips_through_our_folder(tmp_path, patterns):
    hf = hf_model()
    theirs = _peft_gpt2(hf, **patterns)
    theirs.save_pretrained(str(tmp_path / "peft"))
    expected = _logits(theirs, _ids())

    imported = lora.import_peft(ours_like(hf).train(), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(imported, _ids()), expected, rtol=1e-5, atol=1e-5)
    lora.save_adapter(imported, tmp_path / "ours")
    saved = read_adapter_config(tmp_path / "ours")
    assert saved["lora"]["enable_lora"] == [True]
    assert saved["layers"]["transformer.h.0.attn.c_attn"]["type"] == "Linear"
    if patterns:  # each module's own rank and alpha are recorded, by path
        assert saved["lora"]["rank_pattern"]["transformer.h.1.mlp.c_proj"] == 2
        assert saved["lora"]["alpha_pattern"] == {f"transformer.h.{i}.attn.c_attn": 12 for i in (0, 1)}
    else:
        assert "rank_pattern" not in saved["lora"] and "alpha_pattern" not in saved["lora"]

    # (a) a fresh GPT-2 built from the saved config has exactly the saved layers
    config = LoRAConfig.from_dict(saved["lora"])
    assert config.enable_lora == WHOLE_PROJECTION
    fresh = ours_like(hf, lora=config).train()
    _check_whole_c_attn(fresh)
    lora.load_adapter(fresh, tmp_path / "ours")
    torch.testing.assert_close(_logits(fresh.eval(), _ids()), expected, rtol=1e-5, atol=1e-5)

    # (b) the opener: build with lora_to_build, load_adapter_source
    source = open_adapter(tmp_path / "ours")
    assert source.format == "loralib" and source.lora_to_build == config
    built = ours_like(hf, lora=source.lora_to_build).train()
    _check_whole_c_attn(built)
    load_adapter_source(built, source)
    torch.testing.assert_close(_logits(built.eval(), _ids()), expected, rtol=1e-5, atol=1e-5)


def test_inject_without_enable_lora_round_trips_into_a_built_gpt2(tmp_path):
    """The same root through inject: enable_lora=None there is one LoRA on the whole c_attn, and is recorded so."""
    hf = hf_model()
    model = lora.inject(ours_like(hf).train(), ["c_attn"], r=R, lora_alpha=8)
    assert model.loralib_config.enable_lora == WHOLE_PROJECTION
    _check_whole_c_attn(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    expected = _logits(model.eval(), _ids())
    lora.save_adapter(model, tmp_path / "ours")
    source = open_adapter(tmp_path / "ours")
    built = ours_like(hf, lora=source.lora_to_build).train()
    load_adapter_source(built, source)
    torch.testing.assert_close(_logits(built.eval(), _ids()), expected, rtol=0, atol=0)


def test_a_folder_saved_before_whole_projection_still_builds_its_layers(tmp_path):
    """Regression: folders that inject / import_peft wrote before WHOLE_PROJECTION existed record
    enable_lora=None beside a whole-projection ("Linear") c_attn. The opener rebuilds them unchunked; a folder
    that records a chunked MergedLinear keeps None (every chunk)."""
    import json

    hf = hf_model()
    model = lora.inject(ours_like(hf).train(), ["c_attn"], r=R, lora_alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(6)))
    expected = _logits(model.eval(), _ids())
    lora.save_adapter(model, tmp_path / "old")
    config_file = tmp_path / "old" / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["lora"]["enable_lora"] = None  # as written before the change
    config_file.write_text(json.dumps(saved))
    source = open_adapter(tmp_path / "old")
    assert source.lora_to_build.enable_lora == WHOLE_PROJECTION
    built = ours_like(hf, lora=source.lora_to_build).train()
    _check_whole_c_attn(built)
    load_adapter_source(built, source)
    torch.testing.assert_close(_logits(built.eval(), _ids()), expected, rtol=0, atol=0)

    every_chunk = LoRAConfig(r=R, lora_alpha=8, target_modules=("c_attn",))
    lora.save_adapter(ours_like(hf, lora=every_chunk), tmp_path / "chunked", config=every_chunk)
    assert read_adapter_config(tmp_path / "chunked")["lora"]["enable_lora"] is None
    assert open_adapter(tmp_path / "chunked").lora_to_build.enable_lora is None


@pytest.mark.parametrize("enable, n_enabled", [((True, False, True), 2), (None, 3)])
def test_chunked_c_attn_configs_build_as_before(enable, n_enabled):
    """The LoRA paper's q and v (and None = every chunk) still build a MergedLinear: A (n r, C), B (n C, r)."""
    model = ours_like(hf_model(), lora=LoRAConfig(r=R, lora_alpha=32, target_modules=("c_attn",),
                                                  enable_lora=enable))
    c_attn = model.transformer.h[1].attn.c_attn
    assert type(c_attn) is lora.MergedLinear
    assert c_attn.enable_lora == list(enable or (True, True, True))
    assert tuple(c_attn.lora_A.shape) == (n_enabled * R, C) and tuple(c_attn.lora_B.shape) == (n_enabled * C, R)


def test_whole_projection_leaves_plain_projections_alone():
    """enable_lora=(True,) on a config that also targets an unfused projection gives it the usual layer."""
    config = LoRAConfig(r=R, target_modules=("c_attn", "c_fc"), enable_lora=[True])
    assert config.enable_lora == WHOLE_PROJECTION  # a list read from JSON compares equal
    model = ours_like(hf_model(), lora=config)
    _check_whole_c_attn(model)
    c_fc = model.transformer.h[0].mlp.c_fc
    assert type(c_fc) is lora.Linear and tuple(c_fc.lora_A.shape) == (R, C)


def test_peft_rank_and_alpha_patterns_survive_a_save_into_a_bare_model(tmp_path):
    """A PEFT adapter with rank_pattern / alpha_pattern (and an embedding), imported and saved in our format,
    loads into a bare transformers model (layers injected from the saved config) with PEFT's outputs: the
    per-module ranks and scalings are recorded, not just the global ones."""
    from _tiny_hf import tiny_roberta, token_batch
    from test_adapters import peft_roberta_with_patterns

    base = tiny_roberta()
    theirs = peft_roberta_with_patterns(base).eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    ids, mask = token_batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
    lora.save_adapter(lora.import_peft(copy.deepcopy(base), tmp_path / "peft"), tmp_path / "ours")
    config = LoRAConfig.from_dict(read_adapter_config(tmp_path / "ours")["lora"])
    value = "roberta.encoder.layer.0.attention.self.value"
    assert (config.for_module(value).r, config.for_module(value).lora_alpha) == (3, 9)
    back = lora.load_adapter(copy.deepcopy(base), tmp_path / "ours").eval()
    assert back.roberta.encoder.layer[1].attention.self.value.lora_A.shape[0] == 3
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)
