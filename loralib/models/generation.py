"""Generation for any of our causal LMs: greedy, sampling (temperature, top-k, top-p) and beam search,
batched with left padding, on a KV cache.

The model only needs the shared interface: `model(input_ids=..., attention_mask=..., past_key_values=...,
use_cache=True)` returning a ModelOutput with `logits` (B, T, vocab) and `past_key_values` (a KVCache).
Position ids are the model's business (derived from the attention mask). If its forward takes
`logits_to_keep`, only the last position's logits are computed.

The decoding rules follow transformers' `generate`, so outputs are token-identical to it:
- scores are processed in this order: repetition penalty (the prompt counts, left padding does not),
  no-repeat-n-gram ban (the prompt counts), then, when sampling, temperature, top-k and top-p;
- a row that produced an eos token is padded with pad_token_id from then on;
- beam search keeps, per input, the best `num_beams` running beams and the best `num_beams` finished
  ones, a finished beam scoring sum(log p) / (new tokens, eos included) ** length_penalty; it stops when
  no running beam can beat the worst finished one (early_stopping=False: judged at the current length;
  True: as soon as num_beams beams finished; "never": judged at the longest reachable length).

Speed (the outputs do not change): the prompt is run once per input, not once per beam; the cache is
sized for the final length up front and follows the beams by copying only its filled positions into a
spare buffer (no allocation per step); an input whose beams are done leaves the batch, so the model
runs on the inputs still decoding only; one host sync per step.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache

_NEG = -1.0e9  # "not a candidate" score, far below any sum of log-probabilities


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, num_beams: int = 1, length_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0,
             eos_token_id: Union[None, int, Sequence[int]] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None,
             early_stopping: Union[bool, str] = False) -> torch.Tensor:
    """Continue each row of input_ids (B, T), left-padded with attention_mask (B, T) 1/0.

    Returns (B, T + n) token ids: the prompt as given followed by up to max_new_tokens new tokens; rows
    that stopped early (an eos id) are filled with pad_token_id (default: the first eos id). With
    num_beams > 1, the best beam of each row. `generator` drives sampling (reproducible with a seed).
    The model's train/eval mode is left as it is: call model.eval() first for deterministic dropout.
    """
    eos = _as_id_list(eos_token_id, "eos_token_id")
    _check_args(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, num_beams,
                no_repeat_ngram_size, repetition_penalty, early_stopping)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    decoder = _Decoder(model, input_ids.device, eos, repetition_penalty, no_repeat_ngram_size,
                       capacity=input_ids.shape[1] + max_new_tokens)
    sampling = (temperature, top_k, top_p) if do_sample else None
    if max_new_tokens == 0:
        return input_ids.clone()
    if num_beams == 1:
        return _sample_or_greedy(decoder, input_ids, attention_mask.long(), max_new_tokens, sampling,
                                 pad_token_id, generator)
    return _beam_search(decoder, input_ids, attention_mask.long(), max_new_tokens, num_beams, length_penalty,
                        early_stopping, sampling, pad_token_id, generator)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask), both (B, T) long, pads on the left."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for row, s in enumerate(sequences):
        if len(s) == 0:
            raise ValueError(f"prompt {row} tokenises to nothing")
        ids[row, T - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[row, T - len(s):] = 1
    return ids, mask


def _as_id_list(ids, name: str) -> List[int]:
    if ids is None:
        return []
    ids = [ids] if isinstance(ids, int) else list(ids)
    if not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"{name} must be a non-negative int or a list of them, got {ids!r}")
    return ids


def _check_args(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, num_beams,
                no_repeat_ngram_size, repetition_penalty, early_stopping) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length>0), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                             f"{tuple(input_ids.shape)}")
        if not bool(attention_mask[:, -1].all()):
            rows = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
            raise ValueError(f"attention_mask: rows {rows} end in padding; pad prompts on the left for generation")
    checks = [
        (isinstance(max_new_tokens, int) and max_new_tokens >= 0, "max_new_tokens", max_new_tokens),
        (isinstance(num_beams, int) and num_beams >= 1, "num_beams", num_beams),
        (isinstance(top_k, int) and top_k >= 0, "top_k", top_k),
        (0.0 < top_p <= 1.0, "top_p", top_p),
        (not do_sample or temperature > 0.0, "temperature", temperature),
        (isinstance(no_repeat_ngram_size, int) and no_repeat_ngram_size >= 0, "no_repeat_ngram_size",
         no_repeat_ngram_size),
        (repetition_penalty > 0.0, "repetition_penalty", repetition_penalty),
        (early_stopping in (True, False, "never"), "early_stopping", early_stopping),
    ]
    for ok, name, value in checks:
        if not ok:
            raise ValueError(f"generate: invalid {name}={value!r}")


class _Decoder:
    """One forward step on the cache, and the score processing shared by every strategy."""

    def __init__(self, model, device, eos: List[int], repetition_penalty: float, ngram: int,
                 capacity: Optional[int] = None):
        self.model = model
        self.eos = torch.tensor(eos, device=device, dtype=torch.long) if eos else None
        self.repetition_penalty = repetition_penalty
        self.ngram = ngram
        try:
            self.last_only = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            self.last_only = False
        self.cache = KVCache(capacity=capacity)

    def next_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) new tokens, (B, S) mask over cached + new -> (B, vocab) fp32 logits of the last position."""
        extra = {"logits_to_keep": 1} if self.last_only else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=self.cache,
                         use_cache=True, **extra)
        if out.past_key_values is not None:
            self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def process(self, sequences: torch.Tensor, scores: torch.Tensor, prompt_start: torch.Tensor) -> torch.Tensor:
        """Penalise repeats and ban repeated n-grams. sequences (R, L) so far; scores (R, vocab);
        prompt_start (R,) index of each row's first real token (left padding is not text)."""
        if self.repetition_penalty != 1.0:
            scores = repetition_penalty(sequences, scores, self.repetition_penalty, prompt_start)
        if self.ngram > 0:
            scores = ban_repeated_ngrams(sequences, scores, self.ngram)
        return scores

    def is_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.eos is None:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, self.eos)


# -- score processors ---------------------------------------------------------------------------------

def repetition_penalty(sequences: torch.Tensor, scores: torch.Tensor, penalty: float,
                       prompt_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CTRL's penalty (Keskar et al., 2019) on every token already in the row: a positive score is divided
    by `penalty`, a negative one multiplied (so the token always becomes less likely)."""
    R, V = scores.shape
    ids = sequences.clamp(max=V)  # ids the head cannot emit go to the spare column
    if prompt_start is not None:  # left padding goes there too
        ids = ids.masked_fill(torch.arange(ids.shape[1], device=ids.device) < prompt_start[:, None], V)
    seen = torch.zeros((R, V + 1), dtype=torch.bool, device=scores.device).scatter_(1, ids, True)[:, :V]
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def ban_repeated_ngrams(sequences: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid any token that would complete an n-gram already present in the row (-inf score)."""
    R, L = sequences.shape
    V = scores.shape[1]
    if L < n:
        return scores
    if n == 1:
        banned_ids = sequences.clamp(max=V)
    else:
        tail = sequences[:, L - n + 1:]                         # (R, n-1): the n-gram's would-be prefix
        windows = sequences.unfold(1, n, 1)                      # (R, L-n+1, n): every n-gram so far
        same_prefix = (windows[..., :-1] == tail[:, None]).all(-1)
        banned_ids = torch.where(same_prefix, windows[..., -1].clamp(max=V), V)
    banned = torch.zeros((R, V + 1), dtype=torch.bool, device=scores.device).scatter_(1, banned_ids, True)
    return scores.masked_fill(banned[:, :V], float("-inf"))


def warp_for_sampling(scores: torch.Tensor, temperature: float, top_k: int, top_p: float,
                      keep_at_least: int = 1) -> torch.Tensor:
    """Temperature, then top-k (ties at the k-th score kept), then top-p (nucleus: the smallest set of
    most likely tokens whose probability reaches top_p); filtered tokens get -inf."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k > 0:
        k = min(max(top_k, keep_at_least), scores.shape[-1])
        kth_best = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        mass_below = ascending.softmax(-1).cumsum(-1)
        drop = mass_below <= 1 - top_p                          # the unlikely tail holding <= 1 - top_p
        drop[..., -keep_at_least:] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


# -- greedy and sampling ------------------------------------------------------------------------------

def _sample_or_greedy(decoder: _Decoder, input_ids, attention_mask, max_new_tokens, sampling, pad_token_id,
                      generator) -> torch.Tensor:
    B = input_ids.shape[0]
    prompt_start = attention_mask.argmax(-1)
    sequences, mask, step_ids = input_ids, attention_mask, input_ids
    running = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        scores = decoder.process(sequences, decoder.next_logits(step_ids, mask), prompt_start)
        if sampling is not None:
            probs = warp_for_sampling(scores, *sampling).softmax(-1)
            next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_ids = scores.argmax(-1)
        next_ids = torch.where(running, next_ids, pad_token_id)
        sequences = torch.cat([sequences, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)
        running &= ~decoder.is_eos(next_ids)
        if decoder.eos is not None and not bool(running.any()):
            break
        step_ids = next_ids[:, None]
    return sequences


# -- beam search --------------------------------------------------------------------------------------

@dataclass
class _BeamSetup:
    """What stays fixed during one beam search. K beams per input; C = max(2, 1 + #eos) * K candidates
    kept per step, so that K of them still run even if many end in eos; T prompt length."""

    K: int
    C: int
    T: int
    max_new_tokens: int
    n_eos: int
    length_penalty: float
    early_stopping: Union[bool, str]
    sampling: Optional[tuple]
    pad_token_id: int
    generator: Optional[torch.Generator]

    @property
    def max_len(self) -> int:
        return self.T + self.max_new_tokens


@dataclass
class _Beams:
    """The state of the A inputs still decoding; `alive` (A,) are their indices in the batch.

    running (A, K, L) running beams (never ending in eos) and running_scores (A, K) their total
    log-probabilities; finished (A, K, max_len) the K best finished beams so far, with finished_scores
    (A, K) (length-normalised), finished_len (A, K) new tokens, is_finished (A, K) whether the slot holds
    one; improvable (A, 1) whether a running beam may still enter the finished ones; mask (A K, L) and
    prompt_start (A K,) per beam row."""

    alive: torch.Tensor
    running: torch.Tensor
    running_scores: torch.Tensor
    finished: torch.Tensor
    finished_scores: torch.Tensor
    finished_len: torch.Tensor
    is_finished: torch.Tensor
    improvable: torch.Tensor
    mask: torch.Tensor
    prompt_start: torch.Tensor

    def keep(self, kept: torch.Tensor, K: int) -> None:
        """Keep only the inputs `kept` (indices into the A inputs) and their beam rows."""
        for name in ("alive", "running", "running_scores", "improvable", "finished", "finished_scores",
                     "finished_len", "is_finished"):
            setattr(self, name, getattr(self, name)[kept])
        beam_rows = (kept[:, None] * K + torch.arange(K, device=kept.device)).flatten()
        self.mask, self.prompt_start = self.mask[beam_rows], self.prompt_start[beam_rows]


@dataclass
class _Candidates:
    """The C candidates per input of one step: scores (A, C) total log-probabilities, beam (A, C) the
    running beam each extends, token (A, C) the token it appends, seqs (A, C, L + 1), ends (A, C)
    whether it ends (eos, or the length limit)."""

    scores: torch.Tensor
    beam: torch.Tensor
    token: torch.Tensor
    seqs: torch.Tensor
    ends: torch.Tensor


def _beam_search(decoder: _Decoder, input_ids, attention_mask, max_new_tokens, K, length_penalty,
                 early_stopping, sampling, pad_token_id, generator) -> torch.Tensor:
    """Per input b: K running beams (never ending in eos) and the K best finished beams so far.

    Each step, the running beams' continuations are ranked by total log-probability; the best
    C = max(2, 1 + #eos) * K are kept so that K of them still run even if many end in eos. Candidates
    that end (eos, or the length limit) among the first K ranks become finished beams with the
    length-normalised score; the K best non-ending candidates run on.

    An input whose finished beams can no longer change is done: its best beam is written out and its
    rows leave the batch (the model then runs on fewer rows). (Sampling keeps every input: dropping some
    would change how the random stream is consumed, and so the samples.)"""
    B, T = input_ids.shape
    device = input_ids.device
    n_eos = 0 if decoder.eos is None else decoder.eos.numel()
    setup = _BeamSetup(K, max(2, 1 + n_eos) * K, T, max_new_tokens, n_eos, length_penalty, early_stopping,
                       sampling, pad_token_id, generator)
    beams, logits = _start_beams(decoder, input_ids, attention_mask, setup)
    top_ranks = torch.arange(setup.C, device=device) < K                # (C,)
    best = torch.full((B, setup.max_len), pad_token_id, dtype=torch.long, device=device)
    best_len = torch.zeros(B, dtype=torch.long, device=device)

    for step in range(max_new_tokens):
        A, new_len = beams.running.shape[0], step + 1
        cand = _candidates(decoder, beams, logits, setup)
        source_beam = _run_on(beams, cand, setup)
        _finish(beams, cand, top_ranks & beams.improvable, new_len, setup)
        done = _inputs_done(beams, new_len, setup)

        # One host sync per step: is every input done, did every candidate end, is some input done?
        all_done, all_end, some_done = torch.stack([done.all(), cand.ends.all(), done.any()]).tolist()
        if all_done or all_end:
            break
        rows = source_beam + torch.arange(A, device=device)[:, None] * K  # cache row of each new beam
        if sampling is None and some_done:
            gone, kept = done.nonzero().flatten(), (~done).nonzero().flatten()
            best[beams.alive[gone]] = beams.finished[gone, 0]
            best_len[beams.alive[gone]] = beams.finished_len[gone, 0]
            beams.keep(kept, K)
            rows, A = rows[kept], kept.numel()
        decoder.cache.reorder(rows.flatten())
        beams.mask = torch.cat([beams.mask, beams.mask.new_ones((A * K, 1))], dim=1)
        logits = decoder.next_logits(beams.running[:, :, -1].reshape(A * K, 1), beams.mask)

    best[beams.alive], best_len[beams.alive] = beams.finished[:, 0], beams.finished_len[:, 0]
    return best[:, :T + int(best_len.max())]


def _start_beams(decoder: _Decoder, input_ids, attention_mask, setup: _BeamSetup):
    """Prefill once per input, then copy the cache to its K beams: (the beams, their logits (B K, V))."""
    B, T = input_ids.shape
    device, K = input_ids.device, setup.K
    logits = decoder.next_logits(input_ids, attention_mask)
    beam_rows = torch.arange(B, device=device).repeat_interleave(K)
    decoder.cache.reorder(beam_rows)
    mask = attention_mask[beam_rows]                                   # (B*K, T)
    # Only beam 0 may extend at the first step, or the K identical beams would pick the same tokens.
    running_scores = torch.full((B, K), _NEG, device=device)
    running_scores[:, 0] = 0.0
    beams = _Beams(
        alive=torch.arange(B, device=device),
        running=input_ids[beam_rows].view(B, K, T),
        running_scores=running_scores,
        finished=torch.full((B, K, setup.max_len), setup.pad_token_id, dtype=torch.long, device=device),
        finished_scores=torch.full((B, K), _NEG, device=device),
        finished_len=torch.zeros((B, K), dtype=torch.long, device=device),
        is_finished=torch.zeros((B, K), dtype=torch.bool, device=device),
        improvable=torch.ones((B, 1), dtype=torch.bool, device=device),
        mask=mask,
        prompt_start=mask.argmax(-1))
    return beams, logits[beam_rows]


def _candidates(decoder: _Decoder, beams: _Beams, logits: torch.Tensor, setup: _BeamSetup) -> _Candidates:
    """The C best continuations (or C samples) of each input's running beams, from logits (A K, V)."""
    A, K, cur_len = beams.running.shape
    C = setup.C
    flat = beams.running.view(A * K, cur_len)
    log_probs = decoder.process(flat, F.log_softmax(logits, dim=-1), beams.prompt_start)
    if setup.sampling is not None:
        log_probs = warp_for_sampling(log_probs, *setup.sampling, keep_at_least=1 + max(setup.n_eos, 1))
    V = log_probs.shape[-1]
    total = (log_probs.view(A, K, V) + beams.running_scores[:, :, None]).view(A, K * V)
    if setup.sampling is not None:
        picked = torch.multinomial(total.softmax(-1), C, generator=setup.generator)
        scores = total.gather(1, picked)
    else:
        scores, picked = torch.topk(total, C, dim=1)                   # (A, C), best first
    beam, token = picked // V, picked % V
    seqs = torch.cat([beams.running.gather(1, beam[..., None].expand(A, C, cur_len)),
                      token[..., None]], dim=2)                        # (A, C, cur_len + 1)
    ends = decoder.is_eos(token) | (cur_len + 1 >= setup.max_len)
    return _Candidates(scores, beam, token, seqs, ends)


def _run_on(beams: _Beams, cand: _Candidates, setup: _BeamSetup) -> torch.Tensor:
    """The K best candidates that do not end become the running beams; returns the beam (A, K) each
    one extends."""
    A, C, length = cand.seqs.shape
    keep_scores, keep = torch.topk(cand.scores + cand.ends.float() * _NEG, setup.K, dim=1)
    beams.running = cand.seqs.gather(1, keep[..., None].expand(A, setup.K, length))
    beams.running_scores = keep_scores
    return cand.beam.gather(1, keep)


def _finish(beams: _Beams, cand: _Candidates, may_finish: torch.Tensor, new_len: int, setup: _BeamSetup) -> None:
    """Ending candidates that may finish (A, C) (among the first K ranks, of an input still improvable)
    compete with the finished beams for the K finished slots, scored sum(log p) / new_len ** length_penalty."""
    A, C, length = cand.seqs.shape
    K, max_len = setup.K, setup.max_len
    eligible = cand.ends & may_finish
    if setup.early_stopping is True:
        eligible &= ~beams.is_finished.all(dim=1, keepdim=True)
    final_scores = torch.where(eligible, cand.scores / (new_len ** setup.length_penalty), _NEG)
    pool_scores = torch.cat([beams.finished_scores, final_scores], dim=1)  # (A, K + C)
    pool_seqs = torch.cat([beams.finished, F.pad(cand.seqs, (0, max_len - length), value=setup.pad_token_id)], 1)
    pool_len = torch.cat([beams.finished_len, torch.full((A, C), new_len, device=cand.seqs.device)], dim=1)
    pool_done = torch.cat([beams.is_finished, eligible], dim=1)
    beams.finished_scores, best = torch.topk(pool_scores, K, dim=1)
    beams.finished = pool_seqs.gather(1, best[..., None].expand(A, K, max_len))
    beams.finished_len = pool_len.gather(1, best)
    beams.is_finished = pool_done.gather(1, best)


def _inputs_done(beams: _Beams, new_len: int, setup: _BeamSetup) -> torch.Tensor:
    """(A,) whether each input's finished beams can no longer change: no running beam can beat the
    worst finished one (judged at the length early_stopping names), or, with early_stopping=True,
    K beams have finished."""
    if setup.early_stopping == "never" and setup.length_penalty > 0.0:
        best_len_reachable = setup.max_new_tokens
    else:
        best_len_reachable = new_len
    best_running = beams.running_scores[:, :1] / (best_len_reachable ** setup.length_penalty)
    worst_finished = torch.where(beams.is_finished, beams.finished_scores.min(dim=1, keepdim=True).values, _NEG)
    beams.improvable &= (best_running > worst_finished).any(dim=1, keepdim=True)
    done = ~beams.improvable[:, 0]
    if setup.early_stopping is True:
        done |= beams.is_finished.all(dim=1)
    return done
