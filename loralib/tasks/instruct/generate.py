"""Batched text generation for the evaluations: left padding WITH an attention mask.

    generate_texts(model, tokenizer, prompts, max_new_tokens=512, batch_size=16)   # -> [new text per prompt]

Why the mask matters: LoRA-Pro's original GSM8K script padded batches on the left but called generate
without the attention mask, so shorter prompts attended to pad tokens (and got shifted positions), which
brought its GSM8K accuracy down to about 15% (issue 7). Here every batch is left padded with
its mask and goes through loralib.models.generation.generate, which derives positions from the mask: a
batched run gives the same tokens as running the prompts one by one (tests/test_instruct_eval.py).
"""
from __future__ import annotations

from typing import Sequence

from loralib.models.generation import generate, left_pad


def _pad_id(tokenizer, eos_ids: list[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    if eos_ids:
        return eos_ids[0]
    raise ValueError("the tokenizer has neither a pad nor an eos token; pass pad_token_id")


def _cut_at_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i]
    return tokens


def generate_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 512, batch_size: int = 8,
                   add_special_tokens: bool = True, device=None, **generate_kwargs) -> list[str]:
    """The new text the model writes after each prompt (special tokens and what follows eos removed), in the
    order of `prompts`. Prompts are sorted by length inside so a batch wastes little padding.

    add_special_tokens: whether the tokenizer adds its own (Llama's <s>) to each prompt; pass False for
    prompts rendered by a chat template, which hold them already. generate_kwargs go to
    loralib.models.generation.generate (do_sample, temperature, num_beams, ...); eos_token_id and
    pad_token_id default to the tokenizer's.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    eos = generate_kwargs.pop("eos_token_id", tokenizer.eos_token_id)
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad_id = generate_kwargs.pop("pad_token_id", None)
    pad_id = _pad_id(tokenizer, eos_ids) if pad_id is None else pad_id
    if device is None:
        device = next(model.parameters()).device
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    texts: list[str | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask = left_pad([encoded[i] for i in rows], pad_id)
            out = generate(model, ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                           eos_token_id=eos_ids or None, pad_token_id=pad_id, **generate_kwargs)
            new = out[:, ids.shape[1]:].tolist()
            for i, tokens in zip(rows, new):
                texts[i] = tokenizer.decode(_cut_at_eos(tokens, eos_ids), skip_special_tokens=True)
    finally:
        model.train(was_training)
    return texts
