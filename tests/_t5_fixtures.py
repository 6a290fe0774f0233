"""Tiny random T5 models (transformers' T5ForConditionalGeneration) in both layouts, saved as Hugging Face folders."""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 60


def tiny_config(gated: bool = False, **overrides):
    """v1.0 (relu, tied head, rescale) or v1.1 (gated-gelu; the head is untied by `hf_model`)."""
    import transformers

    fields = dict(vocab_size=VOCAB, d_model=16, d_kv=6, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=3,
                  relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
                  feed_forward_proj="gated-gelu" if gated else "relu", decoder_start_token_id=0, pad_token_id=0,
                  eos_token_id=1)
    fields.update(overrides)
    return transformers.T5Config(**fields)


def hf_model(config, untied_head: bool = False, seed: int = 0):
    """transformers' T5 with random weights (norm weights and bias tables perturbed so they matter). untied_head:
    a separate random lm_head and no rescale, as google/t5-v1_1-* (transformers >= 5 ties it when building)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 0.5)
        if untied_head:
            model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model) * 0.3)
            model.config.scale_decoder_outputs = False
    return model


def save(model, folder: Path, untied_head: bool = False) -> Path:
    """model.save_pretrained(folder); untied_head: the hub's v1.1 layout instead (config tie_word_embeddings
    false, lm_head.weight in the file)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if not untied_head:
        model.save_pretrained(folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.update(tie_word_embeddings=False, model_type="t5")
    config.pop("scale_decoder_outputs", None)
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("embed_tokens.weight")}
    save_file(state, str(folder / "model.safetensors"))
    return folder


def padded_batch(seed: int = 1, lengths=(20, 12, 5), vocab: int = VOCAB):
    """Right-padded encoder ids (B, max) with their mask (T5 pads on the right)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def label_batch(seed: int = 2, lengths=(7, 4, 6), vocab: int = VOCAB):
    """Decoder labels padded with the pad id 0 (as LoRA-GA's collator leaves them) and their mask."""
    return padded_batch(seed, lengths, vocab)
