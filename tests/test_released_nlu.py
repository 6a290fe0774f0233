"""Microsoft's released NLU adapter files (RoBERTa and DeBERTa GLUE) written in their exact key formats,
loaded by loralib.models.released_nlu, and checked against transformers with the update folded in."""
from __future__ import annotations

import pytest
import torch

from loralib.models import deberta_v2, roberta
from loralib.models.released_nlu import load_nlu_adapter, nlu_lora_config, read_nlu_adapter
from loralib.utils import unmerge_lora

from _encoder_fixtures import hf_config, padded_batch, reference_model, save_and_read

ATOL = 1e-5
LAYERS = 2
FORMATS = {
    # family: (module, hf family, projections, r, lora_alpha, head keys -> shape given (hidden, labels))
    "roberta": (roberta, "roberta", ("query", "value"), 8, 16,
                {"classifier.dense.weight": lambda d, n: (d, d), "classifier.dense.bias": lambda d, n: (d,),
                 "classifier.out_proj.weight": lambda d, n: (n, d), "classifier.out_proj.bias": lambda d, n: (n,)}),
    "deberta": (deberta_v2, "deberta-v2", ("query_proj", "value_proj"), 16, 32,
                {"pooler.dense.weight": lambda d, n: (d, d), "pooler.dense.bias": lambda d, n: (d,),
                 "classifier.weight": lambda d, n: (n, d), "classifier.bias": lambda d, n: (n,)}),
}
DEBERTA_XXL_LIKE = dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=8, share_att_key=True,
                        norm_rel_ebd="layer_norm", position_biased_input=False, conv_kernel_size=3, conv_act="gelu")


def released_file(family, hidden=32, labels=3, r=None, seed=0):
    """A state dict in exactly the released layout: per layer lora_A (r, d) and lora_B (d, r) of the
    two adapted projections, then the head; every tensor fp32."""
    _, _, projections, default_r, _, head = FORMATS[family]
    r = r or default_r
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(LAYERS):
        for proj in projections:
            base = f"{family}.encoder.layer.{i}.attention.self.{proj}"
            sd[f"{base}.lora_A"] = 0.3 * torch.randn(r, hidden, generator=g)
            sd[f"{base}.lora_B"] = 0.3 * torch.randn(hidden, r, generator=g)
    for key, shape in head.items():
        sd[key] = 0.3 * torch.randn(shape(hidden, labels), generator=g)
    return sd


def _models(family, tmp_path, labels=3, lora=None):
    """(transformers reference, ours with the released LoRA settings) sharing the pretrained weights."""
    module, hf_family, projections, r, alpha, _ = FORMATS[family]
    extra = DEBERTA_XXL_LIKE if family == "deberta" else {}
    ref = reference_model(hf_config(hf_family, num_labels=labels, **extra), "sequence-classification")
    config, state = save_and_read(ref, tmp_path)
    if lora is None:
        lora = nlu_lora_config(released_file(family))
    ours = module.build(config, "sequence-classification", None, lora)
    ours.load_state_dict(state, strict=False)
    return ref, ours


@pytest.mark.parametrize("family", list(FORMATS))
def test_released_file_loads_and_equals_transformers_with_the_update_folded_in(family, tmp_path):
    _, _, projections, r, alpha, head = FORMATS[family]
    sd = released_file(family)
    assert len(sd) == 2 * len(projections) * LAYERS + 4  # 52 for a 12-layer base model
    path = tmp_path / f"{family}_lora_mnli.bin"
    torch.save(sd, path)

    config = nlu_lora_config(read_nlu_adapter(path))
    assert (config.r, config.lora_alpha, config.target_modules) == (r, alpha, tuple(sorted(projections)))
    ref, ours = _models(family, tmp_path / "model")
    assert load_nlu_adapter(ours, path) == sorted(sd)
    ours.eval()  # merges the adapter

    body = "roberta" if family == "roberta" else "deberta"
    with torch.no_grad():
        for i in range(LAYERS):
            attn = getattr(ref, body).encoder.layer[i].attention.self
            for proj in projections:
                key = f"{body}.encoder.layer.{i}.attention.self.{proj}"
                getattr(attn, proj).weight += (sd[f"{key}.lora_B"] @ sd[f"{key}.lora_A"]) * (alpha / r)
        ref.load_state_dict({k: v for k, v in sd.items() if k in head}, strict=False)
        ids, mask, types = padded_batch(ref.config.pad_token_id)
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, mask, token_type_ids=types).logits
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

        # Loading equals setting the factors directly.
        _, direct = _models(family, tmp_path / "direct")
        for name, p in direct.named_parameters():
            if name in sd:
                p.copy_(sd[name])
        torch.testing.assert_close(direct.eval()(ids, mask, token_type_ids=types).logits, got, atol=ATOL, rtol=0)


def test_wrapped_and_ddp_prefixed_file_loads(tmp_path):
    sd = released_file("roberta")
    path = tmp_path / "wrapped.pt"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    _, ours = _models("roberta", tmp_path / "model")
    assert load_nlu_adapter(ours, path) == sorted(sd)
    unmerge_lora(ours)
    assert torch.equal(ours.roberta.encoder.layer[1].attention.self.value.lora_B, sd[
        "roberta.encoder.layer.1.attention.self.value.lora_B"])


@pytest.mark.parametrize("family,key", [("roberta", "classifier.out_proj.weight"), ("deberta", "classifier.weight")])
def test_wrong_label_count_names_file_key_and_shapes(family, key, tmp_path):
    path = tmp_path / "two_labels.bin"
    torch.save(released_file(family, labels=2), path)
    _, ours = _models(family, tmp_path / "model", labels=3)
    with pytest.raises(ValueError) as err:
        load_nlu_adapter(ours, path)
    message = str(err.value)
    assert str(path) in message and repr(key) in message
    assert "(2, 32)" in message and "(3, 32)" in message and "2 labels" in message


def test_wrong_hidden_size_and_rank_are_named(tmp_path):
    _, ours = _models("roberta", tmp_path)
    with pytest.raises(ValueError, match=r"lora_A'.*\(8, 48\).*\(8, 32\).*hidden sizes differ"):
        load_nlu_adapter(ours, released_file("roberta", hidden=48))
    with pytest.raises(ValueError, match=r"lora_A'.*\(4, 32\).*\(8, 32\).*rank r=4"):
        load_nlu_adapter(ours, released_file("roberta", r=4))


def test_model_without_the_file_targets_is_refused(tmp_path):
    from loralib import LoRAConfig

    _, only_query = _models("roberta", tmp_path, lora=LoRAConfig(r=8, lora_alpha=16, target_modules=("query",)))
    with pytest.raises(ValueError, match=r"value\.lora_A'.*no LoRA on that projection"):
        load_nlu_adapter(only_query, released_file("roberta"))
    _, with_key = _models("roberta", tmp_path / "k", lora=LoRAConfig(r=8, target_modules=("query", "key", "value")))
    with pytest.raises(ValueError, match="LoRA factors the file lacks"):
        load_nlu_adapter(with_key, released_file("roberta"))
    _, deberta = _models("deberta", tmp_path / "d")
    with pytest.raises(ValueError, match="belongs to a roberta model"):
        load_nlu_adapter(deberta, released_file("roberta"))


def test_bare_encoder_takes_lora_but_refuses_a_head(tmp_path):
    config = hf_config("roberta").to_dict()
    bare = roberta.build(config, "base", None, nlu_lora_config(released_file("roberta")))
    lora_only = {k: v for k, v in released_file("roberta").items() if ".lora_" in k}
    assert load_nlu_adapter(bare, lora_only) == sorted(k.removeprefix("roberta.") for k in lora_only)
    with pytest.raises(ValueError, match="task='sequence-classification'"):
        load_nlu_adapter(bare, released_file("roberta"))


def test_missing_or_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_nlu_adapter(tmp_path / "nope.bin")
    (tmp_path / "junk.bin").write_text("not a torch file")
    with pytest.raises(ValueError, match="junk.bin"):
        read_nlu_adapter(tmp_path / "junk.bin")
    with pytest.raises(ValueError, match="no `<model>.encoder"):
        nlu_lora_config({"classifier.weight": torch.zeros(2, 2)})
