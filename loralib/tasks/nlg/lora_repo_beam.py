"""The beam search of the LoRA paper's own decoder (microsoft/LoRA examples/NLG/src/gpt2_beam.py), on our KV
cache with batched left padding. The paper's E2E / WebNLG / DART numbers were decoded with it, so
gpt2_beam.py uses it by default (`--decoding lora_repo`); `--decoding transformers` runs
loralib.models.generation.generate instead. Where the two differ:

                            this search (the LoRA repo's)                transformers' beam search
    candidates a step       the top K of the K x V extensions            the top 2K, so K keep running
    a beam ending in eos    scored, then its slot's score set to -inf    leaves the beam; a runner replaces it
                            (the slot is refilled by the next top K)
    finished beams kept     the best one                                 the best K
    stopping                after max_new_tokens steps (earlier only     when no running beam can beat the
                            when every slot is dead: nothing can change) worst finished one
    at the end              every live beam competes at length           running beams are not candidates
                            max_new_tokens                               (they hit the limit as finished)
    n-gram ban, repetition  over the generated tokens only               over the prompt too
    penalty

Scores: a beam's score is its sum of log-probabilities; a finished beam of n generated tokens (eos
included) competes with score / n ** length_penalty, and replaces the best so far only when strictly
better (ties: the earlier step, then the lower slot). Candidates with a score of -inf (dead slots) never
compete; the original could record one as an input's first candidate, which no finite beam could then
displace only if none ever appeared.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...models.generation import _Decoder, ban_repeated_ngrams, repetition_penalty


@torch.inference_mode()
def lora_repo_beam_search(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int,
                          max_new_tokens: int, length_penalty: float = 1.0, no_repeat_ngram_size: int = 4,
                          repetition: float = 1.0, eos_token_id: Sequence[int] = (50256,)) -> List[List[int]]:
    """Decode each row of input_ids (B, T), left-padded with attention_mask (B, T), as the LoRA repo did.

    Returns B lists: the best continuation of each row, up to and including its eos token (or
    max_new_tokens tokens without one)."""
    B, T = input_ids.shape
    K, device = num_beams, input_ids.device
    if K < 1 or max_new_tokens < 1:
        raise ValueError(f"num_beams={K} and max_new_tokens={max_new_tokens} must be >= 1")
    eos = torch.tensor(list(eos_token_id), dtype=torch.long, device=device)
    decoder = _Decoder(model, device, list(eos_token_id), 1.0, 0, capacity=T + max_new_tokens)

    logits = decoder.next_logits(input_ids, attention_mask)          # (B, V): the prompt once per input
    slots = torch.arange(B, device=device).repeat_interleave(K)      # (B*K,) the input of each slot
    decoder.cache.reorder(slots)
    logits, mask = logits[slots], attention_mask[slots]
    history = input_ids.new_empty((B * K, 0))                        # generated tokens of each slot
    beam_scores = torch.zeros((B, K), device=device)
    best_score = torch.full((B,), float("-inf"), device=device)
    best = input_ids.new_zeros((B, max_new_tokens))
    best_len = torch.zeros(B, dtype=torch.long, device=device)
    offsets = torch.arange(B, device=device)[:, None] * K

    def compete(candidates: torch.Tensor, length: int) -> None:
        """candidates (B, K) length-normalised scores (-inf: not a candidate) of the slots' histories."""
        top, slot = candidates.max(dim=1)                            # the first of equal scores
        better = top > best_score
        rows = (slot + offsets[:, 0])[better]
        best[better, :length] = history[rows]
        best_len[better] = length
        best_score[better] = top[better]

    for step in range(max_new_tokens):
        scores = logits.float()
        if step > 0 and repetition != 1.0:
            scores = repetition_penalty(history, scores, repetition)
        if no_repeat_ngram_size > 0:
            scores = ban_repeated_ngrams(history, scores, no_repeat_ngram_size)
        log_probs = F.log_softmax(scores, dim=-1)
        V = log_probs.shape[-1]
        if step == 0:  # K identical slots: extend the first only
            totals = log_probs.view(B, K, V)[:, 0]
        else:
            totals = (beam_scores[..., None] + log_probs.view(B, K, V)).view(B, K * V)
        beam_scores, picked = torch.topk(totals, K, dim=1)           # (B, K), best first
        source = (picked // V + offsets).view(-1)
        tokens = (picked % V).view(-1)
        history = torch.cat([history[source], tokens[:, None]], dim=1)

        ended = torch.isin(tokens, eos).view(B, K) & torch.isfinite(beam_scores)
        compete(torch.where(ended, beam_scores / (step + 1) ** length_penalty, float("-inf")), step + 1)
        beam_scores = beam_scores.masked_fill(ended, float("-inf"))
        if step + 1 == max_new_tokens:
            live = torch.isfinite(beam_scores)
            compete(torch.where(live, beam_scores / max_new_tokens ** length_penalty, float("-inf")), max_new_tokens)
        elif not bool(torch.isfinite(beam_scores).any()):
            break  # every slot is dead: no later step can add a candidate
        else:
            decoder.cache.reorder(source)
            mask = torch.cat([mask, mask.new_ones((B * K, 1))], dim=1)
            logits = decoder.next_logits(tokens[:, None], mask)
    return [best[b, :int(best_len[b])].tolist() for b in range(B)]
