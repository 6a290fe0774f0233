"""Tiny random GPT-2s (transformers as the reference) shared by the GPT-2 tests."""
from __future__ import annotations

import json

import torch

VOCAB = 97
PAD = 0  # a token id the batches use only for padding


def hf_config(**overrides):
    from transformers import GPT2Config

    kw = dict(vocab_size=VOCAB, n_positions=48, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
              embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return GPT2Config(**kw)


def hf_model(cls_name="GPT2LMHeadModel", seed=0, **overrides):
    """A transformers GPT-2 class with random weights (biases and LayerNorms too), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(hf_config(**overrides)).eval()
    with torch.no_grad():  # transformers initialises biases to 0 and LayerNorms to 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def saved_config(hf, tmp_path) -> dict:
    """The config.json dict that save_pretrained writes for `hf`."""
    hf.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def ours_like(hf, task="causal-lm", lora=None, num_labels=None, config_dict=None):
    """Our model built from hf's config dict, loaded with hf's state dict (LoRA factors excepted)."""
    from loralib.models import gpt2

    model = gpt2.build(config_dict or hf.config.to_dict(), task, num_labels, lora)
    result = model.load_state_dict(hf.state_dict(), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all("lora_" in k for k in result.missing_keys), result.missing_keys
    return model.eval()


def left_padded_batch(B=3, T=9, seed=1, pads=(0, 3, 6)):
    """ids (B, T) and mask (B, T); row b has pads[b] pad tokens on the left."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, n in enumerate(pads[:B]):
        mask[b, :n] = 0
        ids[b, :n] = PAD
    return ids, mask


def mask_positions(mask):
    """The position ids our model derives from a mask (transformers takes them as an argument)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def randomise_lora(model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
