"""microsoft's released GPT-2 NLG adapter files (gpt2_{md,lg}_lora_*.pt) loaded into our GPT-2.

The files are written here in exactly the released layout: MergedLinear factors of c_attn with q and v
enabled, keys `transformer.h.N.attn.c_attn.lora_{A,B}`, under a `model_state_dict` wrapper and/or with
the `module.` prefix of a DistributedDataParallel model.
"""
from __future__ import annotations

import pytest
import torch

import loralib
from loralib.models import gpt2
from loralib.models.released import (NLGAdapterShape, infer_gpt2_nlg_adapter_shape, load_gpt2_nlg_adapter,
                                     nlg_lora_config)

from _gpt2_fixtures import hf_config, hf_model, left_padded_batch, ours_like

R, ALPHA = 4, 32


def released_factors(n_layer=2, n_embd=32, r=R, seed=0):
    """{transformer.h.N.attn.c_attn.lora_A: (2 r, n_embd), ...lora_B: (2 n_embd, r)} with random values."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(n_layer):
        state[f"transformer.h.{i}.attn.c_attn.lora_A"] = 0.3 * torch.randn(2 * r, n_embd, generator=g)
        state[f"transformer.h.{i}.attn.c_attn.lora_B"] = 0.3 * torch.randn(2 * n_embd, r, generator=g)
    return state


def write_released(path, factors, wrapper: bool, module_prefix: bool):
    state = {("module." + k if module_prefix else k): v for k, v in factors.items()}
    torch.save({"model_state_dict": state} if wrapper else state, path)
    return path


def qv_model(hf, r=R):
    return ours_like(hf, lora=loralib.LoRAConfig(r=r, lora_alpha=ALPHA, target_modules=("c_attn",),
                                                 enable_lora=(True, False, True)))


@pytest.mark.parametrize("wrapper", [False, True])
@pytest.mark.parametrize("module_prefix", [False, True])
def test_released_file_loads_like_directly_set_factors(tmp_path, wrapper, module_prefix):
    hf = hf_model()
    factors = released_factors()
    path = write_released(tmp_path / "gpt2_md_lora_e2e.pt", factors, wrapper, module_prefix)

    direct = qv_model(hf).train()  # unmerged while the factors are set
    with torch.no_grad():
        for key, value in factors.items():
            direct.get_parameter(key).copy_(value)
    direct.eval()

    loaded = load_gpt2_nlg_adapter(qv_model(hf), path)
    assert not loaded.training  # left in eval mode (merged), and the load re-merged the new factors
    ids, mask = left_padded_batch()
    with torch.no_grad():
        want = direct(ids, attention_mask=mask).logits
        got = loaded(ids, attention_mask=mask).logits
        plain = ours_like(hf)(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (want[real] - plain[real]).abs().max() > 1e-2  # the adapter does change the outputs
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    for key, value in factors.items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_state_dict_source_and_a_bare_base_model():
    hf = hf_model("GPT2Model")
    factors = {k[len("transformer."):]: v for k, v in released_factors().items()}  # keys "h.N..."
    base = gpt2.GPT2Model(gpt2.GPT2Config.from_hf(hf.config.to_dict()),
                          loralib.LoRAConfig(r=R, lora_alpha=ALPHA, target_modules=("c_attn",),
                                             enable_lora=(True, False, True)))
    load_gpt2_nlg_adapter(base, {"model_state_dict": {"module." + k: v for k, v in factors.items()}})
    torch.testing.assert_close(base.h[1].attn.c_attn.lora_B, factors["h.1.attn.c_attn.lora_B"])


def test_infer_shape_and_config(tmp_path):
    path = write_released(tmp_path / "adapter.pt", released_factors(n_layer=3, n_embd=16, r=2), True, True)
    shape = infer_gpt2_nlg_adapter_shape(path)
    assert shape == NLGAdapterShape(r=2, n_layer=3, n_embd=16) and shape.model_name == "unknown"
    assert NLGAdapterShape(4, 24, 1024).model_name == "gpt2-medium"
    assert NLGAdapterShape(4, 36, 1280).model_name == "gpt2-large"
    cfg = nlg_lora_config(path)
    assert (cfg.r, cfg.lora_alpha, cfg.enable_lora, cfg.target_modules) == (2, 32, (True, False, True), ("c_attn",))
    # a model built from that config takes the file
    model = gpt2.build(hf_config(n_embd=16, n_layer=3).to_dict(), "causal-lm", lora=cfg)
    load_gpt2_nlg_adapter(model, path)


def test_adapter_for_another_model_size_is_refused(tmp_path):
    # a "GPT-2 L" adapter (wider, deeper) into a "GPT-2 M" model
    path = write_released(tmp_path / "gpt2_lg_lora_e2e.pt", released_factors(n_layer=3, n_embd=40), True, True)
    with pytest.raises(ValueError, match=r"gpt2_lg_lora_e2e\.pt.*n_embd=40, n_layer=3.*n_embd=32, n_layer=2"):
        load_gpt2_nlg_adapter(qv_model(hf_model()), path)


def test_adapter_with_another_rank_or_chunks_is_refused(tmp_path):
    path = write_released(tmp_path / "r4.pt", released_factors(r=4), True, False)
    with pytest.raises(ValueError, match=r"r4\.pt.*r=4.*transformer\.h\.0\.attn\.c_attn has r=8"):
        load_gpt2_nlg_adapter(qv_model(hf_model(), r=8), path)
    all_chunks = ours_like(hf_model(), lora=loralib.LoRAConfig(r=4, target_modules=("c_attn",)))
    with pytest.raises(ValueError, match=r"enable_lora=\[True, True, True\]"):
        load_gpt2_nlg_adapter(all_chunks, path)
    with pytest.raises(ValueError, match=r"r4\.pt.*transformer\.h\.0\.attn\.c_attn\.lora_A.*no LoRA factor"):
        load_gpt2_nlg_adapter(ours_like(hf_model()), path)


def test_broken_files_raise_clear_errors(tmp_path):
    model = qv_model(hf_model())
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_gpt2_nlg_adapter(model, tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.pt"):
        load_gpt2_nlg_adapter(model, tmp_path / "text.pt")

    factors = released_factors()
    del factors["transformer.h.1.attn.c_attn.lora_B"]
    with pytest.raises(ValueError, match=r"partial\.pt.*transformer\.h\.1\.attn\.c_attn\.lora_B"):
        load_gpt2_nlg_adapter(model, write_released(tmp_path / "partial.pt", factors, True, False))

    factors = released_factors()
    factors["transformer.h.0.attn.c_attn.lora_B"] = torch.zeros(64, 3)
    with pytest.raises(ValueError, match=r"odd\.pt.*transformer\.h\.0\.attn\.c_attn\.lora_B.*\(64, 3\)"):
        load_gpt2_nlg_adapter(model, write_released(tmp_path / "odd.pt", factors, False, False))

    factors = released_factors()
    factors["transformer.h.0.attn.c_attn.lora_C"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"extra\.pt.*lora_C"):
        load_gpt2_nlg_adapter(model, write_released(tmp_path / "extra.pt", factors, False, False))

    with pytest.raises(ValueError, match="no key like"):
        infer_gpt2_nlg_adapter_shape({"transformer.wte.weight": torch.zeros(3, 2)})
