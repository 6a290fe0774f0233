"""loralib.tasks.nlg.lora_repo_beam (gpt2_beam.py --decoding lora_repo) against a slow, literal reading of the
LoRA repo's beam search written here: one prompt at a time, the whole sequence through the model at every
step (no cache, no padding), Python lists and loops."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loralib.models.generation import left_pad
from loralib.models.gpt2 import GPT2Config, GPT2LMHeadModel
from loralib.tasks.nlg.lora_repo_beam import lora_repo_beam_search

VOCAB, EOS_IDS = 40, (3, 7, 11)


def tiny_gpt2():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2, n_head=2,
                                       embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, initializer_range=0.4))
    return model.double().eval()


def reference(model, prompt, K, steps, length_penalty, ngram, eos):
    """The original algorithm, read literally."""
    slots = [([], 0.0)] * K
    best, best_score = None, -math.inf

    def offer(history, score, length):
        nonlocal best, best_score
        if math.isfinite(score) and score / length ** length_penalty > best_score:
            best, best_score = list(history), score / length ** length_penalty

    for i in range(steps):
        candidates = []
        for s, (history, score) in enumerate(slots[:1] if i == 0 else slots):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + history])).logits[0, -1].float()
            if ngram > 0 and len(history) >= ngram - 1:
                prefix = tuple(history[len(history) - ngram + 1:])
                grams = [tuple(history[j:j + ngram]) for j in range(len(history) - ngram + 1)]
                for g in grams:
                    if g[:-1] == prefix:
                        logits[g[-1]] = -math.inf
            log_probs = F.log_softmax(logits, dim=-1).tolist()
            candidates += [(score + lp, s, token) for token, lp in enumerate(log_probs)]
        candidates.sort(key=lambda c: -c[0])  # stable: equal scores keep slot, then token order
        slots = [(slots[s][0] + [token], score) for score, s, token in candidates[:K]]
        for k, (history, score) in enumerate(slots):
            if history[-1] in eos and math.isfinite(score):
                offer(history, score, i + 1)
                slots[k] = (history, -math.inf)
        if not any(math.isfinite(score) for _, score in slots):
            break
    for history, score in slots:
        offer(history, score, steps)
    return best


def test_batched_left_padded_search_equals_the_literal_reading():
    model = tiny_gpt2()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(12, VOCAB, (n,), generator=gen).tolist() for n in (3, 9, 5, 6, 4)]
    prompts[2][1:3] = [20, 21]  # a prompt bigram the search may repeat: the ban counts generated tokens only
    ids, mask = left_pad(prompts, 0)
    ended, ran_out = 0, 0
    for K, steps, lp, ngram in [(4, 12, 0.8, 2), (3, 10, 1.0, 3), (1, 8, 0.8, 0), (5, 6, 0.5, 1)]:
        got = lora_repo_beam_search(model, ids, mask, num_beams=K, max_new_tokens=steps, length_penalty=lp,
                                    no_repeat_ngram_size=ngram, eos_token_id=EOS_IDS)
        want = [reference(model, p, K, steps, lp, ngram, EOS_IDS) for p in prompts]
        assert got == want, (K, steps, lp, ngram)
        ended += sum(g[-1] in EOS_IDS for g in got)
        ran_out += sum(len(g) == steps and g[-1] not in EOS_IDS for g in got)
    assert ended and ran_out  # both ways of ending were exercised


def test_the_ngram_ban_ignores_the_prompt():
    """A prompt made of one repeated token: transformers' ban (prompt included) forbids it at once; the
    LoRA repo's ban only once the generated tokens hold the n-gram."""
    model = tiny_gpt2()
    with torch.no_grad():  # make token 25 the model's favourite after anything
        model.lm_head.weight[25] *= 0.0
        model.transformer.ln_f.bias.zero_()
        model.lm_head.weight[25] += 50.0 * torch.ones(16, dtype=torch.float64) / 4
        model.transformer.ln_f.bias += 1.0
    prompt = [25, 25, 25]
    ids, mask = left_pad([prompt], 0)
    got = lora_repo_beam_search(model, ids, mask, num_beams=2, max_new_tokens=4, no_repeat_ngram_size=2,
                                eos_token_id=EOS_IDS)[0]
    assert got[:2] == [25, 25] and got[2] != 25  # (25, 25) is banned only after it was generated
    from loralib.models.generation import generate

    hf_style = generate(model, ids, mask, max_new_tokens=4, num_beams=2, no_repeat_ngram_size=2,
                        eos_token_id=list(EOS_IDS))[0, len(prompt):].tolist()
    assert hf_style[0] != 25
