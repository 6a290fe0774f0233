"""loralib.models.t5 against transformers' T5ForConditionalGeneration: encoder output, logits, loss, greedy
generation, the decoder cache, and LoRA (B = 0, merged = unmerged, PEFT parity)."""
from __future__ import annotations

import pytest
import torch

from _t5_fixtures import hf_model, label_batch, padded_batch, save, tiny_config
from loralib import LoRAConfig, lora_layers
from loralib.models import from_pretrained
from loralib.models.t5 import Seq2SeqCache, T5Config, relative_position_bucket

LAYOUTS = {"v1.0": dict(gated=False, untied=False), "v1.1": dict(gated=True, untied=True),
           "v1.1-transformers5": dict(gated=True, untied=False)}
ALL = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")


def _pair(tmp_path, layout, lora=None, **config):
    spec = LAYOUTS[layout]
    ref = hf_model(tiny_config(spec["gated"], **config), untied_head=spec["untied"])
    ours = from_pretrained(save(ref, tmp_path / "model", untied_head=spec["untied"]), "seq2seq-lm", lora=lora)
    return ref, ours


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_encoder_logits_and_loss_match_transformers(tmp_path, layout):
    # 3 decoder layers against 2 encoder layers: num_decoder_layers is read on its own
    ref, ours = _pair(tmp_path, layout, num_decoder_layers=3)
    info = ours.loading_info
    assert info["missing"] == info["unexpected"] == info["newly_initialized"] == []
    assert (ours.lm_head.weight is ours.shared.weight) == (layout != "v1.1")
    ids, mask = padded_batch()
    labels, dmask = label_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask)
        got = ours(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask)
        encoded = ours.encode(ids, mask)
    real = mask.bool()
    assert (encoded - expected.encoder_last_hidden_state)[real].abs().max() < 1e-5
    assert got.logits.shape == expected.logits.shape == (3, 7, 60)
    assert (got.logits - expected.logits)[dmask.bool()].abs().max() < 1e-5
    assert abs(got.loss.item() - expected.loss.item()) < 1e-5
    # -100 labels are skipped like transformers does
    ignored = labels.masked_fill(dmask == 0, -100)
    with torch.no_grad():
        assert abs(ours(input_ids=ids, attention_mask=mask, labels=ignored).loss.item()
                   - ref(input_ids=ids, attention_mask=mask, labels=ignored).loss.item()) < 1e-5


@pytest.mark.parametrize("layout", ["v1.0", "v1.1"])
def test_greedy_generation_is_token_identical(tmp_path, layout):
    ref, ours = _pair(tmp_path, layout)
    ids, mask = padded_batch(seed=5)
    probe = ours.generate(ids, mask, max_new_tokens=12)
    eos = int(probe[0, 4])  # a token row 0 emits: rows then stop at different steps and are padded
    got = ours.generate(ids, mask, max_new_tokens=12, eos_token_id=eos)
    expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1,
                            eos_token_id=eos, pad_token_id=0)
    assert got.tolist() == expected.tolist()
    assert (got[0, 5:] == 0).all()


def test_cached_decoding_equals_one_pass(tmp_path):
    _, ours = _pair(tmp_path, "v1.0")
    ids, mask = padded_batch()
    dec = torch.randint(2, 60, (3, 6))
    with torch.no_grad():
        full = ours(ids, mask, decoder_input_ids=dec).logits
        cache = Seq2SeqCache(2)
        steps = [ours(ids, mask, decoder_input_ids=dec[:, :2], past_key_values=cache, use_cache=True).logits]
        steps += [ours(ids, mask, decoder_input_ids=dec[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                  for t in range(2, 6)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-40, 41)[None, :]
    for bidirectional in (True, False):
        expected = T5Attention._relative_position_bucket(rel, bidirectional, 32, 128)
        assert torch.equal(relative_position_bucket(rel, bidirectional, 32, 128), expected)


def test_lora_b_zero_equals_plain_and_merged_equals_unmerged(tmp_path):
    ref, plain = _pair(tmp_path, "v1.1")
    adapted = from_pretrained(tmp_path / "model", "seq2seq-lm", lora=LoRAConfig(r=4, target_modules=ALL))
    layers = [path for path, layer in lora_layers(adapted) if layer.has_lora]
    # q, k, v, o of 2 encoder self-, 2 decoder self- and 2 cross-attentions; wi_0, wi_1, wo of 4 blocks
    assert len(layers) == 4 * 6 + 3 * 4
    ids, mask = padded_batch()
    labels, dmask = label_batch()
    with torch.no_grad():
        base = plain(ids, mask, labels=labels, decoder_attention_mask=dmask).logits
        assert (adapted.train()(ids, mask, labels=labels, decoder_attention_mask=dmask).logits - base).abs().max() == 0
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.2)
        unmerged = adapted.train()(ids, mask, labels=labels, decoder_attention_mask=dmask).logits
        merged = adapted.eval()(ids, mask, labels=labels, decoder_attention_mask=dmask).logits
    assert (unmerged - base).abs().max() > 1e-3
    assert (merged - unmerged).abs().max() < 1e-5


def test_peft_lora_parity_both_ways(tmp_path):
    import peft

    ref, _ = _pair(tmp_path, "v1.0")
    targets = ["q", "v", "wi", "wo"]
    peft_model = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                          task_type="SEQ_2_SEQ_LM")).eval()
    ours = from_pretrained(tmp_path / "model", "seq2seq-lm", lora=LoRAConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(3)
    copied = 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
                ours_name = name.removeprefix("base_model.model.").replace(".default.weight", "")
                ours.get_parameter(ours_name).copy_(p)
                copied += 1
    assert copied == 2 * (6 * 2 + 4 * 2)  # A and B; q, v in 6 attentions; wi, wo in 4 blocks
    ids, mask = padded_batch()
    labels, dmask = label_batch()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask).logits
        got = ours.train()(ids, mask, labels=labels, decoder_attention_mask=dmask).logits
        assert (got - expected).abs().max() < 1e-5
        assert (ours.eval()(ids, mask, labels=labels, decoder_attention_mask=dmask).logits - expected).abs().max() < 1e-5

    # and our adapter, exported, loads in PEFT on a fresh transformers T5 with the same logits
    from loralib import mark_only_lora_as_trainable
    from loralib.adapters import export_peft

    mark_only_lora_as_trainable(ours)
    export_peft(ours, tmp_path / "peft", task_type="SEQ_2_SEQ_LM")
    fresh = peft.PeftModel.from_pretrained(hf_model(tiny_config()), tmp_path / "peft").eval()
    with torch.no_grad():
        reloaded = fresh(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask).logits
    assert (reloaded - expected).abs().max() < 1e-5


def test_bad_configs_and_tasks_are_refused(tmp_path):
    base = dict(vocab_size=8, d_model=4, d_kv=2, d_ff=8, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config.from_hf(dict(base, feed_forward_proj="gated-nope"))
    with pytest.raises(ValueError, match="'d_kv'"):
        T5Config.from_hf({k: v for k, v in base.items() if k != "d_kv"})
    _, _ = _pair(tmp_path, "v1.0")
    with pytest.raises(ValueError, match="not a T5 task"):
        from_pretrained(tmp_path / "model", "causal-lm")


def test_base_task_gives_the_decoder_states(tmp_path):
    from loralib.models.t5 import T5Model, shift_right

    ref, _ = _pair(tmp_path, "v1.0")
    base = from_pretrained(tmp_path / "model", "base")
    assert type(base) is T5Model and not hasattr(base, "lm_head")
    ids, mask = padded_batch()
    labels, dmask = label_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask,
                       output_hidden_states=True).decoder_hidden_states[-1]
        got = base(ids, mask, decoder_input_ids=shift_right(labels, 0, 0), decoder_attention_mask=dmask).hidden_states
    assert (got - expected)[dmask.bool()].abs().max() < 1e-5
