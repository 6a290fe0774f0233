"""loralib.models.llama against transformers' Llama: logits, losses, the KV cache, rope variants, LoRA."""
from __future__ import annotations

import pytest
import torch

from _llama_fixtures import (hf_model, hf_positions, left_padded_batch, max_diff_on_real, save, smollm2_folder,
                             tiny_config, transformers)
from loralib import LoRAConfig, lora_layers
from loralib.models import from_pretrained, llama
from loralib.models.cache import KVCache

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
}
ALL_SEVEN = ("q", "k", "v", "o", "gate", "up", "down")


def _rope_config(kind: str, **overrides):
    rope = ROPES[kind]
    return tiny_config(rope_parameters=dict(rope, rope_theta=500.0) if rope else None, **overrides)


@pytest.mark.parametrize("kind", list(ROPES))
@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_logits_match_transformers(tmp_path, kind, tied):
    # Positions up to 39 > max_position_embeddings = 32, so "dynamic" rescales and llama3/yarn blend bands.
    config = _rope_config(kind, tie_word_embeddings=tied)
    ref = hf_model(config)
    ours = from_pretrained(save(ref, tmp_path))
    ids, mask = left_padded_batch(lengths=(40, 23, 3))
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        got = ours(ids, attention_mask=mask)
    assert got.logits.shape == expected.shape == (3, 40, 96)
    assert max_diff_on_real(got.logits, expected, mask) < 1e-5
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied


def test_biases_mlp_act_and_head_dim_match_transformers(tmp_path):
    config = tiny_config(attention_bias=True, mlp_bias=True, head_dim=12, hidden_act="gelu_pytorch_tanh",
                         num_key_value_heads=1, rms_norm_eps=1e-5)
    ref = hf_model(config)
    ours = from_pretrained(save(ref, tmp_path))
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        assert max_diff_on_real(ours(ids, attention_mask=mask).logits, expected, mask) < 1e-5


def test_loss_matches_transformers(tmp_path):
    ref = hf_model(tiny_config())
    ours = from_pretrained(save(ref, tmp_path))
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    expected = ref(ids, attention_mask=mask, position_ids=hf_positions(mask), labels=labels).loss
    got = ours(ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("num_labels", [3, 1])
def test_sequence_classification_matches_transformers(tmp_path, padding, num_labels):
    config = tiny_config(num_labels=num_labels)
    ref = hf_model(config, "LlamaForSequenceClassification")
    ours = from_pretrained(save(ref, tmp_path), task="sequence-classification")
    assert ours.loading_info["newly_initialized"] == [] and ours.num_labels == num_labels
    ids, mask = left_padded_batch()
    if padding == "right":
        ids, mask = ids.flip(1), mask.flip(1)  # random tokens: order does not matter to the test
    labels = torch.tensor([0.5, -1.0, 2.0]) if num_labels == 1 else torch.tensor([2, 0, 1])
    positions = hf_positions(mask) if padding == "left" else None
    expected = ref(ids, attention_mask=mask, position_ids=positions, labels=labels)
    got = ours(ids, attention_mask=mask, labels=labels)
    assert got.logits.shape == (3, num_labels)
    assert torch.allclose(got.logits, expected.logits, atol=1e-5)
    assert torch.allclose(got.loss, expected.loss, atol=1e-5)
    # Without a mask, the last non-pad token is found from pad_token_id, as transformers does.
    assert torch.allclose(ours(ids).logits, ref(ids).logits, atol=1e-5)


def test_kv_cache_decoding_equals_full_forward(tmp_path):
    """Prefill, a 3-token chunk and single tokens through the cache give the full forward's logits."""
    ours = from_pretrained(save(hf_model(tiny_config()), tmp_path))
    ids, mask = left_padded_batch(lengths=(12, 8, 5))
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        cache = KVCache(2)
        parts = []
        for start, end in [(0, 6), (6, 9), (9, 10), (10, 11), (11, 12)]:
            out = ours(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache, use_cache=True)
            assert out.past_key_values is cache and cache.seq_len == end
            parts.append(out.logits)
    assert max_diff_on_real(torch.cat(parts, 1), full, mask) < 1e-5


def test_base_model_hidden_states_match_transformers(tmp_path):
    ref = hf_model(tiny_config(), "LlamaModel")
    ours = from_pretrained(save(ref, tmp_path), task="base")
    assert isinstance(ours, llama.LlamaModel)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=hf_positions(mask)).last_hidden_state
        assert max_diff_on_real(ours(ids, attention_mask=mask).hidden_states, expected, mask) < 1e-5


def test_state_dict_keys_are_the_checkpoint_names():
    config = tiny_config(tie_word_embeddings=True)
    ref = hf_model(config)
    ours = llama.build(config.to_dict(), "causal-lm")
    assert set(ours.state_dict()) == set(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key


def test_lora_on_seven_projections_b_zero_equals_plain_and_merge_equals_unmerged(tmp_path):
    folder = save(hf_model(tiny_config()), tmp_path)
    plain = from_pretrained(folder)
    adapted = from_pretrained(folder, lora=LoRAConfig(r=4, lora_alpha=8, target_modules=ALL_SEVEN))
    adapters = [(name, layer) for name, layer in lora_layers(adapted) if layer.has_lora]
    assert len(adapters) == 7 * 2
    assert {name.rsplit(".", 1)[-1] for name, _ in adapters} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = plain(ids, attention_mask=mask).logits
        adapted.train()  # unmerged: the low-rank path runs, with B = 0
        assert max_diff_on_real(adapted(ids, attention_mask=mask).logits, expected, mask) == 0.0
        torch.manual_seed(3)
        for _, layer in adapters:
            layer.lora_B.normal_(0, 0.5)
        unmerged = adapted(ids, attention_mask=mask).logits
        adapted.eval()  # merge_weights folds B A into W
        assert all(layer.merged for _, layer in adapters)
        merged = adapted(ids, attention_mask=mask).logits
    assert max_diff_on_real(unmerged, expected, mask) > 1e-3  # the adapters do change the output
    assert max_diff_on_real(merged, unmerged, mask) < 1e-5


def test_lora_matches_peft(tmp_path):
    """The same A and B in PEFT's LoRA on transformers' Llama give the same logits."""
    peft = pytest.importorskip("peft")
    ref = hf_model(tiny_config())
    ours = from_pretrained(save(ref, tmp_path), lora=LoRAConfig(r=4, lora_alpha=8, target_modules=ALL_SEVEN))
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    theirs = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=names)).eval()
    ours.train()  # unmerged before B changes (a merged layer would unmerge with the new B)
    torch.manual_seed(4)
    peft_state = theirs.state_dict()
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            if layer.has_lora:
                layer.lora_B.normal_(0, 0.5)
                peft_state[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A)
                peft_state[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        assert max_diff_on_real(ours(ids, attention_mask=mask).logits, expected, mask) < 1e-5


def test_rope_type_errors_name_the_key():
    config = tiny_config().to_dict()
    with pytest.raises(ValueError, match=r"rope_scaling\.rope_type='longrope'"):
        llama.LlamaConfig.from_hf(dict(config, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}))
    with pytest.raises(ValueError, match=r"rope_scaling\.factor"):
        llama.LlamaConfig.from_hf(dict(config, rope_parameters=None, rope_scaling={"type": "linear"}))
    # transformers 4.x layout: rope_scaling with "type" and a top-level rope_theta
    old = llama.LlamaConfig.from_hf(dict(config, rope_parameters=None, rope_theta=123.0,
                                         rope_scaling={"type": "linear", "factor": 2.0}))
    assert old.rope_type == "linear" and old.rope_theta == 123.0
    with pytest.raises(ValueError, match="hidden_size"):
        llama.LlamaConfig.from_hf({k: v for k, v in config.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="task='translation'"):
        llama.build(config, "translation")


def test_smollm2_real_weights_match_transformers():
    """SmolLM2-135M-Instruct: logits and final hidden states equal transformers' within 1e-4 (fp32)."""
    folder = smollm2_folder()
    ours = from_pretrained(folder)
    assert ours.loading_info == {"missing": [], "newly_initialized": [], "unexpected": [],
                                 "adapter_initialized": []}
    assert ours.config.num_key_value_heads == 3 and ours.config.tie_word_embeddings
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids, mask = left_padded_batch(vocab=49152, lengths=(12, 7), seed=5)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=hf_positions(mask), output_hidden_states=True)
        got = ours(ids, attention_mask=mask)
    assert max_diff_on_real(got.logits, expected.logits, mask) < 1e-4
    assert max_diff_on_real(got.hidden_states, expected.hidden_states[-1], mask) < 1e-4


def test_decode_step_accepts_a_strided_attention_output(tmp_path, monkeypatch):
    """Regression: CUDA's SDPA kernels may return a non-contiguous output for the one-token GQA path
    (queries packed as (B, G, H/G, D)); reshaping it back must not assume contiguity."""
    ours = from_pretrained(save(hf_model(tiny_config()), tmp_path))
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = ours(ids, attention_mask=mask).logits[:, -1]
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def strided_sdpa(*args, **kwargs):
            out = sdpa(*args, **kwargs)
            return out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (B, G, n, D) strides

        monkeypatch.setattr(llama.F, "scaled_dot_product_attention", strided_sdpa)
        cache = KVCache()
        ours(ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache, use_cache=True)
        got = ours(ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
    assert torch.allclose(got, expected, atol=1e-5)


def test_lora_training_gradients_match_peft(tmp_path):
    """The hand-written backward pieces (SwiGLU gate, RMSNorm, chunked LM-head loss) against autograd
    through transformers + PEFT: same loss and same gradients of every LoRA factor and norm weight."""
    peft = pytest.importorskip("peft")
    ref = hf_model(tiny_config())
    ours = from_pretrained(save(ref, tmp_path), lora=LoRAConfig(r=4, lora_alpha=8, target_modules=ALL_SEVEN)).train()
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    theirs = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=names)).train()
    torch.manual_seed(4)
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            if layer.has_lora:
                layer.lora_B.normal_(0, 0.5)
                peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A)
                peft_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B)
    norms = [n for n, _ in ours.named_parameters() if n.endswith("norm.weight")]
    for n, p in ours.named_parameters():
        p.requires_grad = "lora_" in n or n in norms
    for n, p in theirs.named_parameters():
        p.requires_grad = "lora_" in n or n.replace("base_model.model.", "") in norms
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, -1] = -100
    our_loss = ours(ids, attention_mask=mask, labels=labels).loss
    their_loss = theirs(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask), labels=labels).loss
    torch.testing.assert_close(our_loss, their_loss, rtol=1e-5, atol=1e-6)
    our_loss.backward()
    their_loss.backward()
    compared = 0
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        # ...q_proj.lora_A -> base_model.model....q_proj.lora_A.default.weight; norms keep their names
        key = f"base_model.model.{name}" + (".default.weight" if "lora_" in name else "")
        torch.testing.assert_close(p.grad, peft_params[key].grad, rtol=1e-4, atol=1e-6, msg=name)
        compared += 1
    assert compared == 2 * 7 * tiny_config().num_hidden_layers + len(norms)
