"""loralib.models.deberta_v2 (DeBERTa-v2/v3) held against transformers' DebertaV2 models."""
from __future__ import annotations

import pytest
import torch

from loralib import LoRAConfig
from loralib.models import deberta_v2
from loralib.utils import merge_lora, unmerge_lora

from _encoder_fixtures import hf_config, lora_paths, padded_batch, randomise_lora_B, reference_model, save_and_read

ATOL = 1e-5
TASKS = ("base", "sequence-classification")

# Each variant switches on a different part of the attention; a sequence of 30 tokens reaches past
# the buckets and past max_relative_positions, so bucketing and clamping both take effect.
VARIANTS = {
    "absolute-only": dict(),
    "c2p|p2c": dict(relative_attention=True, pos_att_type="p2c|c2p", max_relative_positions=8, type_vocab_size=2),
    "v3-like": dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
                    max_relative_positions=20, share_att_key=True, norm_rel_ebd="layer_norm",
                    position_biased_input=False),
    "xxlarge-like-conv": dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=8,
                              share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
                              conv_kernel_size=3, conv_act="gelu", hidden_act="gelu"),
    "c2p-only-conv-tanh": dict(relative_attention=True, pos_att_type="c2p", position_buckets=4, conv_kernel_size=3),
    "p2c-only-embed-proj": dict(relative_attention=True, pos_att_type="p2c", embedding_size=24),
}


def _ours(variant, task, tmp_path, lora=None, **extra):
    ref = reference_model(hf_config("deberta-v2", **VARIANTS[variant], **extra), task)
    config, state = save_and_read(ref, tmp_path)
    ours = deberta_v2.build(config, task, None, lora)
    result = ours.load_state_dict(state, strict=lora is None)
    assert not result.unexpected_keys and all("lora_" in k for k in result.missing_keys)
    return ref, ours.eval()


def _assert_outputs_match(ref, ours, task, labels=None):
    ids, mask, types = padded_batch(ref.config.pad_token_id)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        got = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    if task == "base":
        real = mask.bool()
        torch.testing.assert_close(got.hidden_states[real], expected.last_hidden_state[real], atol=ATOL, rtol=0)
    else:
        # transformers flattens a regression head's logits to (B,) when labels are given; ours stay (B, 1).
        torch.testing.assert_close(got.logits, expected.logits.view(got.logits.shape), atol=ATOL, rtol=0)
    if labels is not None:
        torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("task", TASKS)
def test_matches_transformers_on_padded_batch(variant, task, tmp_path):
    ref, ours = _ours(variant, task, tmp_path)
    assert set(ours.state_dict()) == set(ref.state_dict())
    _assert_outputs_match(ref, ours, task, labels=None if task == "base" else torch.tensor([2, 0, 1]))


def test_regression_head(tmp_path):
    ref, ours = _ours("v3-like", "sequence-classification", tmp_path, num_labels=1)
    _assert_outputs_match(ref, ours, "sequence-classification", labels=torch.tensor([0.5, 3.0, -1.0]))


@pytest.mark.parametrize("buckets,max_position", [(256, 512), (8, 20), (4, 64)])
def test_log_buckets_match_reference(buckets, max_position):
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    rel = torch.arange(-3 * max_position, 3 * max_position)
    expected = make_log_bucket_position(rel, buckets, max_position).long()
    assert torch.equal(deberta_v2.log_bucket(rel, buckets, max_position), expected)
    assert len(expected.unique()) > buckets // 2  # far distances really are bucketed, not just clamped


def test_relative_index_is_the_reference_relative_position_shifted_and_clamped():
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    cfg = deberta_v2.DebertaV2Config.from_hf(hf_config("deberta-v2", **VARIANTS["v3-like"]).to_dict())
    T = 40
    x = torch.zeros(1, T, 4)
    rel = build_relative_position(x, x, bucket_size=cfg.position_buckets, max_position=cfg.max_relative)[0]
    k = cfg.att_span
    assert torch.equal(deberta_v2.relative_index(T, cfg, "cpu"), (rel + k).clamp(0, 2 * k - 1))


@pytest.mark.parametrize("variant", ["c2p|p2c", "v3-like"])
def test_lora_zero_B_is_plain_and_merged_equals_unmerged(variant, tmp_path):
    lora = LoRAConfig(r=8, lora_alpha=16, target_modules=("query", "value"))
    ref, plain = _ours(variant, "sequence-classification", tmp_path)
    _, adapted = _ours(variant, "sequence-classification", tmp_path / "x", lora=lora)
    assert lora_paths(adapted) == [f"deberta.encoder.layer.{i}.attention.self.{p}"
                                   for i in (0, 1) for p in ("query_proj", "value_proj")]
    ids, mask, types = padded_batch(ref.config.pad_token_id)
    run = lambda m: m(ids, mask, token_type_ids=types).logits  # noqa: E731

    with torch.no_grad():
        unmerge_lora(adapted)
        torch.testing.assert_close(run(adapted), run(plain), atol=1e-6, rtol=0)
        randomise_lora_B(adapted)
        unmerged = run(adapted)
        assert (unmerged - run(plain)).abs().max() > 1e-2
        merge_lora(adapted)
        torch.testing.assert_close(run(adapted), unmerged, atol=ATOL, rtol=0)

        # transformers with W + (alpha / r) B A folded in (with share_att_key the adapted query_proj
        # also projects the relative embeddings, in both models alike).
        for mine, theirs in zip(adapted.deberta.encoder.layer, ref.deberta.encoder.layer):
            for name in ("query_proj", "value_proj"):
                layer = getattr(mine.attention.self, name)
                getattr(theirs.attention.self, name).weight += (layer.lora_B @ layer.lora_A) * layer.scaling
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(unmerged, expected, atol=ATOL, rtol=0)


def test_adalora_targets_reach_all_six_projections():
    lora = LoRAConfig(target_modules=("query", "key", "value", "intermediate", "layer.output", "attention.output"))
    model = deberta_v2.build(hf_config("deberta-v2", **VARIANTS["v3-like"]).to_dict(), "base", None, lora)
    per_layer = ["attention.output.dense", "attention.self.key_proj", "attention.self.query_proj",
                 "attention.self.value_proj", "intermediate.dense", "output.dense"]
    assert lora_paths(model) == [f"encoder.layer.{i}.{p}" for i in (0, 1) for p in per_layer]


def test_padding_does_not_change_real_tokens(tmp_path):
    _, ours = _ours("xxlarge-like-conv", "base", tmp_path)
    ids, mask, types = padded_batch(0)
    with torch.no_grad():
        batched = ours(ids, mask).hidden_states[0, :23]
        alone = ours(ids[:1, :23]).hidden_states[0]
    torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("task", TASKS)
def test_through_from_pretrained(task, tmp_path):
    loading = pytest.importorskip("loralib.models.loading")
    ref = reference_model(hf_config("deberta-v2", **VARIANTS["xxlarge-like-conv"]), task)
    ref.save_pretrained(tmp_path)
    ours = loading.from_pretrained(tmp_path, task=task)
    info = ours.loading_info
    assert info["missing"] == [] and info["unexpected"] == [] and info["newly_initialized"] == []
    _assert_outputs_match(ref, ours, task)


def test_bad_configs_raise_clear_errors():
    good = hf_config("deberta-v2", **VARIANTS["c2p|p2c"]).to_dict()
    with pytest.raises(ValueError, match="pos_att_type"):
        deberta_v2.DebertaV2Config.from_hf({**good, "pos_att_type": "c2p|x2y"})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        deberta_v2.DebertaV2Config.from_hf({k: v for k, v in good.items() if k != "num_hidden_layers"})
    with pytest.raises(ValueError, match="model_type"):
        deberta_v2.DebertaV2Config.from_hf({**good, "model_type": "deberta"})
    with pytest.raises(ValueError, match="conv_act"):
        deberta_v2.DebertaV2Config.from_hf({**good, "conv_act": "nope"})
    with pytest.raises(ValueError, match="task"):
        deberta_v2.build(good, "causal-lm", None, None)
