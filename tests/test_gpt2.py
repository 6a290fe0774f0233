"""Our GPT-2 (loralib.models.gpt2) against transformers' GPT-2 and PEFT, on tiny random models."""
from __future__ import annotations

import json

import pytest
import torch

import loralib
from loralib.models import gpt2, lm_head
from loralib.models.cache import KVCache

from _gpt2_fixtures import (PAD, VOCAB, hf_config, hf_model, left_padded_batch, mask_positions, ours_like,
                            randomise_lora, saved_config)

TOL = dict(atol=1e-5, rtol=1e-5)
QV = dict(r=4, lora_alpha=8, target_modules=("c_attn",), enable_lora=(True, False, True))


# -- config ------------------------------------------------------------------------------------------

def test_config_from_saved_config_json(tmp_path):
    hf = hf_model(n_inner=40, activation_function="relu", layer_norm_epsilon=1e-6)
    cfg = gpt2.GPT2Config.from_hf(saved_config(hf, tmp_path))
    assert (cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head) == (VOCAB, 48, 32, 2, 4)
    assert (cfg.d_ff, cfg.activation_function, cfg.layer_norm_epsilon) == (40, "relu", 1e-6)
    # aliases and the old n_ctx
    cfg = gpt2.GPT2Config.from_hf({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "n_ctx": 16})
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_positions, cfg.d_ff) == (8, 1, 2, 16, 32)


@pytest.mark.parametrize("change, message", [
    ({"n_head": None}, "'n_head'"),
    ({"model_type": "llama"}, "model_type"),
    ({"activation_function": "mish"}, "activation_function"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"n_head": 5}, "divisible"),
])
def test_config_errors_name_the_key(change, message):
    d = hf_config().to_dict()
    d.update(change)
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        gpt2.GPT2Config.from_hf(d)


def test_build_rejects_unknown_task():
    with pytest.raises(ValueError, match="task="):
        gpt2.build(hf_config().to_dict(), "token-classification")


def test_state_dict_keys_are_transformers_keys():
    import transformers

    for name, task in [("GPT2LMHeadModel", "causal-lm"), ("GPT2ForSequenceClassification", "sequence-classification"),
                       ("GPT2Model", "base")]:
        hf = getattr(transformers, name)(hf_config())
        ours = gpt2.build(hf.config.to_dict(), task)
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
               {k: tuple(v.shape) for k, v in hf.state_dict().items()}, name
    lm = gpt2.build(hf_config().to_dict(), "causal-lm")
    assert lm.lm_head.weight is lm.transformer.wte.weight


# -- parity with transformers ------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {},
    {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True},
    {"scale_attn_weights": False, "activation_function": "gelu", "n_inner": 40},
])
def test_lm_logits_and_loss_match_transformers_on_left_padded_batch(tmp_path, overrides):
    hf = hf_model(**overrides)
    ours = ours_like(hf, config_dict=saved_config(hf, tmp_path))
    ids, mask = left_padded_batch()
    # a label counts when it and the token before it are real (logits at pad slots are undefined)
    labels = ids.masked_fill((mask == 0) | (torch.nn.functional.pad(mask, (1, 0))[:, :-1] == 0), -100)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=mask_positions(mask), labels=labels)
        out = ours(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert out.logits.shape == ref.logits.shape
    torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    assert out.hidden_states.shape == (3, 9, 32)


def test_unpadded_batch_matches_transformers_without_mask():
    hf = hf_model()
    ours = ours_like(hf)
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **TOL)
        torch.testing.assert_close(ours(ids, attention_mask=torch.ones_like(ids)).logits, hf(ids).logits, **TOL)


def test_token_type_ids_are_embedded_with_the_token_table():
    hf = hf_model()
    ours = ours_like(hf)
    ids, types = torch.randint(3, VOCAB, (2, 7)), torch.randint(0, 4, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, token_type_ids=types).logits,
                                   hf(ids, token_type_ids=types).logits, **TOL)


def test_loading_through_from_pretrained(tmp_path):
    loading = pytest.importorskip("loralib.models.loading")
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    ours = loading.from_pretrained(tmp_path, task="causal-lm")
    assert isinstance(ours, gpt2.GPT2LMHeadModel)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=mask_positions(mask)).logits
        out = ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], **TOL)


def test_hub_layout_checkpoint_loads_through_from_pretrained(tmp_path):
    """The real `gpt2` repos hold the bare GPT2Model's keys (wte.weight, h.0.attn.c_attn.weight, ...), no
    lm_head (tied), and the old causal-mask buffers h.N.attn.bias / h.N.attn.masked_bias."""
    loading = pytest.importorskip("loralib.models.loading")
    from safetensors.torch import save_file

    hf = hf_model()
    state = {k[len("transformer."):]: v.contiguous() for k, v in hf.state_dict().items() if k.startswith("transformer.")}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 48, 48))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    ours = loading.from_pretrained(tmp_path, task="causal-lm")
    assert not ours.loading_info["unexpected"] and not ours.loading_info["missing"]
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=mask_positions(mask)).logits
        out = ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], **TOL)


def test_old_checkpoint_mask_buffers_are_ignored():
    hf = hf_model()
    state = hf.state_dict()
    for i in range(2):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 48, 48, dtype=torch.bool))
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    ours = gpt2.build(hf.config.to_dict(), "causal-lm")
    ours.load_state_dict(state)  # strict: the pre-hook drops them
    import re

    def ignored(key):
        return any(re.fullmatch(p, key) for p in ours.ignored_checkpoint_keys)

    assert ignored("transformer.h.0.attn.bias") and ignored("h.11.attn.masked_bias")
    assert not ignored("transformer.h.0.attn.c_attn.bias") and not ignored("h.0.ln_1.bias")


@pytest.mark.parametrize("num_labels", [3, 1])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_sequence_classification_matches_transformers(num_labels, padding):
    hf = hf_model("GPT2ForSequenceClassification", num_labels=num_labels, pad_token_id=PAD)
    ours = ours_like(hf, "sequence-classification", num_labels=num_labels)
    ids, mask = left_padded_batch()
    if padding == "right":
        ids, mask = ids.flip(-1), mask.flip(-1)
    labels = torch.tensor([0.5, -1.0, 2.0]) if num_labels == 1 else torch.tensor([2, 0, 1])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=mask_positions(mask), labels=labels)
        by_mask = ours(ids, attention_mask=mask, labels=labels)
        by_pad_id = ours(ids, position_ids=mask_positions(mask) if padding == "left" else None, labels=labels)
    assert by_mask.logits.shape == (3, num_labels)
    torch.testing.assert_close(by_mask.logits, ref.logits, **TOL)
    torch.testing.assert_close(by_mask.loss, ref.loss, **TOL)
    if padding == "right":  # without a mask, left-padded rows attend to their pads (as transformers' would)
        torch.testing.assert_close(by_pad_id.logits, ref.logits, **TOL)


def test_classifier_needs_mask_or_pad_id_for_batches():
    hf = hf_model("GPT2ForSequenceClassification", num_labels=2)
    ours = ours_like(hf, "sequence-classification", num_labels=2)
    ids = torch.randint(3, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        ours(ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[:1]).logits, hf(ids[:1]).logits, **TOL)


# -- KV cache ----------------------------------------------------------------------------------------

def test_incremental_decoding_with_cache_equals_full_forward():
    hf = hf_model()
    ours = ours_like(hf)
    ids, mask = left_padded_batch(T=12, pads=(0, 2, 5))
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        prefix = 7
        out = ours(ids[:, :prefix], attention_mask=mask[:, :prefix], use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, KVCache) and cache.seq_len == prefix
        steps = [out.logits]
        # one token at a time, then a chunk of two (a chunked prefill on a warm cache)
        for start, end in [(7, 8), (8, 9), (9, 10), (10, 12)]:
            out = ours(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache, use_cache=True)
            assert out.past_key_values is cache and cache.seq_len == end
            steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], **TOL)


def test_cache_without_mask_and_logits_to_keep():
    ours = ours_like(hf_model())
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        full = ours(ids).logits
        out = ours(ids[:, :4], use_cache=True, logits_to_keep=1)
        assert out.logits.shape == (2, 1, VOCAB)
        torch.testing.assert_close(out.logits[:, 0], full[:, 3], **TOL)
        out = ours(ids[:, 4:], past_key_values=out.past_key_values, use_cache=True)
    torch.testing.assert_close(out.logits, full[:, 4:], **TOL)


def test_generation_module_drives_the_model():
    generation = pytest.importorskip("loralib.models.generation")
    hf = hf_model()
    ours = ours_like(hf)
    ids, mask = left_padded_batch(pads=(0, 3, 1))
    got = generation.generate(ours, ids, mask, max_new_tokens=5, pad_token_id=PAD)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    assert torch.equal(got, want)


def test_bad_inputs_raise_clear_errors():
    ours = ours_like(hf_model())
    ids = torch.randint(3, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ours(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="n_positions=48"):
        ours(torch.randint(3, VOCAB, (1, 49)))
    with pytest.raises(ValueError, match="logits_to_keep"):
        ours(ids, labels=ids, logits_to_keep=1)


# -- LoRA --------------------------------------------------------------------------------------------

def _lora_paths(model):
    return sorted(name for name, layer in loralib.lora_layers(model) if layer.has_lora)


@pytest.mark.parametrize("targets, expected", [
    (("c_attn",), ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
    (("c_proj",), ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
                   "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]),
    (("attn.c_proj", "c_fc"), ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                               "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc"]),
    (("mlp.c_proj",), ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]),
    (r"transformer\.h\.1\.attn\.c_attn", ["transformer.h.1.attn.c_attn"]),
])
def test_target_modules_match_real_module_paths(targets, expected):
    model = gpt2.build(hf_config().to_dict(), "causal-lm", lora=loralib.LoRAConfig(r=2, target_modules=targets))
    assert _lora_paths(model) == expected


def test_c_attn_lora_has_per_chunk_enable_lora():
    model = gpt2.build(hf_config().to_dict(), "causal-lm", lora=loralib.LoRAConfig(**QV))
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, loralib.MergedLinear) and c_attn.enable_lora == [True, False, True]
    assert c_attn.lora_A.shape == (8, 32) and c_attn.lora_B.shape == (64, 4)
    assert c_attn.weight.shape == (32, 96)  # (in, out), as Conv1D stores it


def test_lora_with_zero_B_equals_plain_model_and_merged_equals_unmerged():
    hf = hf_model()
    plain = ours_like(hf)
    lora = ours_like(hf, lora=loralib.LoRAConfig(**QV, merge_weights=True))
    ids, mask = left_padded_batch()
    real = mask.bool()
    lora.train()  # unmerged (dropouts are 0)
    with torch.no_grad():
        torch.testing.assert_close(lora(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits,
                                   atol=0, rtol=0)
        randomise_lora(lora)
        unmerged = lora(ids, attention_mask=mask).logits
        assert (unmerged[real] - plain(ids, attention_mask=mask).logits[real]).abs().max() > 1e-2
        lora.eval()  # merges B A into c_attn
        assert all(layer.merged for _, layer in loralib.lora_layers(lora) if layer.has_lora)
        merged = lora(ids, attention_mask=mask).logits
    torch.testing.assert_close(merged[real], unmerged[real], **TOL)
    # the state dict keeps the unmerged weights under transformers' names plus the LoRA factors
    state = lora.state_dict()
    torch.testing.assert_close(state["transformer.h.0.attn.c_attn.weight"], hf.state_dict()["transformer.h.0.attn.c_attn.weight"])
    assert sorted(k for k in state if "lora_" in k) == [f"transformer.h.{i}.attn.c_attn.lora_{m}"
                                                      for i in range(2) for m in "AB"]


def test_lora_training_step_updates_only_lora():
    ours = ours_like(hf_model(), lora=loralib.LoRAConfig(**QV))
    loralib.mark_only_lora_as_trainable(ours)
    ours.train()
    ids, mask = left_padded_batch()
    ours(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    grads = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert grads == {f"transformer.h.{i}.attn.c_attn.lora_{m}" for i in range(2) for m in "AB"}
    # B = 0 at the start, so only B gets a gradient on the first step (as in LoRA)
    assert all(p.grad.abs().sum() > 0 for n, p in ours.named_parameters() if n.endswith("lora_B"))


@pytest.mark.parametrize("shape, expected", [((1024, 24, 16), 393_216), ((1280, 36, 20), 737_280)])
def test_lora_parameter_count_of_gpt2_medium_and_large(shape, expected):
    n_embd, n_layer, n_head = shape
    d = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": n_embd, "n_layer": n_layer,
         "n_head": n_head}
    with torch.device("meta"):  # shapes only, nothing allocated
        model = gpt2.build(d, "causal-lm", lora=loralib.LoRAConfig(r=4, lora_alpha=32, target_modules=["c_attn"],
                                                                   enable_lora=[True, False, True]))
    loralib.mark_only_lora_as_trainable(model)
    trainable, _ = loralib.count_parameters(model)
    assert trainable == expected


def test_lora_matches_peft_on_c_attn():
    peft = pytest.importorskip("peft")
    hf = hf_model()
    ours = ours_like(hf, lora=loralib.LoRAConfig(r=4, lora_alpha=8, target_modules=("c_attn",)))
    reference = peft.get_peft_model(hf_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                                fan_in_fan_out=True, lora_dropout=0.0)).eval()
    randomise_lora(reference, seed=3)
    # PEFT adapts all of c_attn with one A (r, C) and B (3C, r); ours has a factor pair per chunk:
    # A_g = A for every chunk and B_g = B's rows of chunk g give the same update.
    ours.train()  # unmerged, so that the factors can be set in place
    with torch.no_grad():
        for i in range(2):
            peft_layer = reference.base_model.model.transformer.h[i].attn.c_attn
            A, B = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
            mine = ours.transformer.h[i].attn.c_attn
            mine.lora_A.copy_(A.repeat(3, 1))
            mine.lora_B.copy_(B)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask)).logits
        out = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ref[real] - hf(ids, attention_mask=mask, position_ids=mask_positions(mask)).logits[real]).abs().max() > 1e-2
    torch.testing.assert_close(out[real], ref[real], **TOL)


# -- training loss -----------------------------------------------------------------------------------

def test_training_loss_and_gradients_match_transformers():
    hf = hf_model().train()  # dropouts are 0
    ours = ours_like(hf).train()
    ids, mask = left_padded_batch(pads=(0, 0, 0))
    labels = ids.clone()
    labels[1, 4:6] = -100
    ref_loss = hf(ids, labels=labels).loss
    ref_loss.backward()
    loss = ours(ids, labels=labels).loss  # the fused head + loss path (every weight trains)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    ref_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():  # wte's gradient includes the tied head's
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("weight_trains", [False, True])
def test_fused_head_loss_equals_plain_cross_entropy(weight_trains):
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(2, 7, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (2, 7), generator=g)
    labels[0, 2:5] = -100

    def run(fused):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_(weight_trains)
        if fused:
            logits, loss = lm_head.lm_head_with_loss(h, w, labels, chunk_rows=3)
        else:
            logits = h @ w.t()
            loss = lm_head.causal_lm_loss(logits, labels)
        (loss + 0.1 * logits.square().mean()).backward()  # a second loss on the logits too
        return loss, logits, h.grad, w.grad

    want, got = run(False), run(True)
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # no counted label: nan, as F.cross_entropy gives
    _, loss = lm_head.lm_head_with_loss(h0.requires_grad_(), w0, torch.full((2, 7), -100))
    assert torch.isnan(loss)
