"""Every method works on our model files (LoRAConfig picks it) and on any model through loralib.inject:
the adapted model starts equal to the plain one, its factors get gradients, and the method's own
machinery (allocator, regularizer, optimizer) runs a step on it."""
import copy

import pytest
import torch

import loralib as lora
from _encoder_fixtures import hf_config
from _tiny_hf import tiny_roberta, token_batch

TARGETS = ("query", "key", "value", "attention.output", "intermediate", "layer.output")
LAYER_TYPES = {"lora": lora.Linear, "adalora": lora.SVDLinear, "lora2": lora.LoRA2Linear}


def _our_deberta(lora_config):
    from loralib.models import deberta_v2

    config = hf_config("deberta-v2", relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
                       max_relative_positions=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return deberta_v2.build(config.to_dict(), "sequence-classification", 3, lora_config)


def _one_method_step(model, method):
    """Loss (+ regularizer) -> backward -> optimizer -> allocator, as the training loop orders them."""
    ids, mask = token_batch(vocab=64)
    labels = torch.tensor([0, 1, 2])
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    loss = out.loss if hasattr(out, "loss") else out["loss"]
    if method == "adalora":
        loss = loss + lora.compute_orth_regu(model, 0.1)
    elif method == "lora2":
        loss = loss + lora.compute_lora2_orth_regu(model, 0.1)
    loss.backward()
    factors = {n: p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
    assert factors and all(p.grad is not None for p in factors.values())
    if method == "lora":
        optimizer = lora.LoRAProAdamW(model, lr=1e-3)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    optimizer.step()
    if method != "lora":
        allocator_cls = lora.RankAllocator if method == "adalora" else lora.LoRA2RankAllocator
        allocator = allocator_cls(model, lora_r=4, target_rank=2, init_warmup=0, final_warmup=1, mask_interval=1,
                                  beta1=0.85, beta2=0.85, total_step=3)
        allocator.update_and_mask(model, 1)
        pattern = lora.rank_pattern(model)
        assert pattern and sum(sum(kept) for kept in pattern.values()) < 4 * len(pattern)
    optimizer.zero_grad()


@pytest.mark.parametrize("method", ["lora", "adalora", "lora2"])
def test_method_on_our_deberta(method):
    plain = _our_deberta(None).eval()
    adapted = _our_deberta(lora.LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, method=method, lora2_k=2))
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("lora_" in k or "ranknum" in k for k in missing)
    layers = [m for _, m in lora.lora_layers(adapted) if m.has_lora]
    assert len(layers) == 2 * 6 and all(type(m) is LAYER_TYPES[method] for m in layers)
    lora.mark_only_lora_as_trainable(adapted)
    ids, mask = token_batch(vocab=64)
    adapted.eval()
    torch.testing.assert_close(adapted(input_ids=ids, attention_mask=mask).logits,
                               plain(input_ids=ids, attention_mask=mask).logits)
    for p in adapted.classifier.parameters():
        p.requires_grad = True
    _one_method_step(adapted, method)


@pytest.mark.parametrize("method", ["lora", "adalora", "lora2"])
def test_method_through_inject(method):
    base = tiny_roberta()
    ids, mask = token_batch()
    expected = base(input_ids=ids, attention_mask=mask).logits
    model = lora.inject(copy.deepcopy(base), ["query", "value"], r=4, lora_alpha=8, method=method)
    layers = [m for _, m in lora.lora_layers(model) if m.has_lora]
    assert len(layers) == 4 and all(type(m) is LAYER_TYPES[method] for m in layers)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected)
    _one_method_step(model, method)
