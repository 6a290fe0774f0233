"""loralib.models.lm_head: the LM head shared by GPT-2 and Llama picks the chunked loss only for a plain head."""
from __future__ import annotations

import torch
import torch.nn as nn

import loralib
from loralib.models import gpt2
from loralib.models.lm_head import causal_lm_loss, head_logits_and_loss


def _batch(V=40, C=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, C, generator=g, requires_grad=True), torch.randint(0, V, (2, 5), generator=g)


def test_a_head_with_lora_or_bias_is_run_as_a_module():
    """Regression (GPT-2 before issue 12): a replaced lm_head took the chunked path on its weight alone,
    dropping its LoRA delta (or bias) from the loss. Llama already ran such a head as a module."""
    h, labels = _batch()
    lora_head = loralib.Linear(16, 40, r=4, lora_alpha=8, bias=False)
    nn.init.normal_(lora_head.lora_B)
    for head in (lora_head, nn.Linear(16, 40, bias=True)):
        logits, loss = head_logits_and_loss(head, h, labels)
        torch.testing.assert_close(loss, causal_lm_loss(head(h), labels))
        torch.testing.assert_close(logits, head(h))


def test_gpt2_with_a_lora_lm_head_trains_its_factors():
    config = gpt2.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = gpt2.GPT2LMHeadModel(config).train()
    model.lm_head = loralib.Linear(16, 40, r=4, lora_alpha=8, bias=False)
    nn.init.normal_(model.lm_head.lora_B)
    ids = torch.randint(0, 40, (2, 6))
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, causal_lm_loss(model.lm_head(out.hidden_states), ids))
    out.loss.backward()
    assert model.lm_head.lora_A.grad is not None
