"""loralib.models.grad_checkpoint: the same loss and gradients as without checkpointing (Llama and GPT-2,
LoRA with dropout so the recomputation must replay the RNG), fewer saved activations, and no change to
evaluation, generation with a KV cache, parameter names or state dicts."""
from __future__ import annotations

import pytest
import torch

from loralib import LoRAConfig, mark_only_lora_as_trainable
from loralib.models.cache import KVCache
from loralib.models.grad_checkpoint import (decoder_blocks, disable_gradient_checkpointing,
                                            enable_gradient_checkpointing, is_gradient_checkpointing)
from loralib.models.loading import build_model

CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                 resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
}
TARGETS = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"),
           "gpt2": ("c_attn", "c_proj", "c_fc")}


def _model(family: str):
    torch.manual_seed(0)
    lora = LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=TARGETS[family])
    model = build_model(dict(CONFIGS[family]), "causal-lm", lora=lora)
    with torch.no_grad():  # B = 0 at init would make every LoRA-A gradient zero: nothing to compare
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)
    mark_only_lora_as_trainable(model)
    return model.train()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _loss_and_grads(model, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout masks
    loss = model(**_batch()).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _saved_bytes(model) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass outside checkpointed blocks
    (inside one, checkpoint's own hooks take the tensors and store nothing)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**_batch()).loss
    return sum(seen.values())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradients_equal_and_saved_activations_drop(family):
    model = _model(family)
    loss_ref, grads_ref = _loss_and_grads(model)
    bytes_ref = _saved_bytes(model)
    keys_ref = list(model.state_dict())

    blocks = enable_gradient_checkpointing(model)
    assert blocks and blocks[0] is decoder_blocks(model)[0] and is_gradient_checkpointing(model)
    assert len(blocks) == 3
    loss, grads = _loss_and_grads(model)
    assert torch.allclose(loss, loss_ref, atol=1e-6, rtol=0)
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name in grads:
        assert torch.allclose(grads[name], grads_ref[name], atol=1e-6, rtol=1e-5), name
    assert list(model.state_dict()) == keys_ref
    saved = _saved_bytes(model)
    assert saved < 0.5 * bytes_ref, (saved, bytes_ref)

    disable_gradient_checkpointing(model)
    assert not is_gradient_checkpointing(model)
    assert _saved_bytes(model) == bytes_ref


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_checkpointing_is_skipped_in_eval_and_with_a_kv_cache(family, monkeypatch):
    import loralib.models.grad_checkpoint as gc

    calls = []
    real = gc.checkpoint
    monkeypatch.setattr(gc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _model(family)
    enable_gradient_checkpointing(model)
    enable_gradient_checkpointing(model)  # idempotent: one wrapper per block
    batch = _batch()
    model(**batch).loss.backward()
    assert len(calls) == 3
    calls.clear()
    with torch.no_grad():
        model(batch["input_ids"], batch["attention_mask"])
    model(batch["input_ids"], past_key_values=KVCache(), use_cache=True)  # training mode, but a cache
    model.eval()
    out = model(batch["input_ids"], batch["attention_mask"])
    assert calls == [] and out.logits.shape == (2, 12, 64)


def test_a_model_without_repeated_blocks_is_refused():
    with pytest.raises(ValueError, match="no ModuleList"):
        enable_gradient_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))
