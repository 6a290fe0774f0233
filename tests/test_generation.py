"""loralib.models.generate against transformers' generate: token-identical greedy, beam search and (same
seed) sampling on left-padded batches; the score processors against transformers' processors."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from _llama_fixtures import PAD, hf_model, left_padded_batch, save, smollm2_folder, tiny_config, transformers
from loralib.models import KVCache, ModelOutput, from_pretrained, generate, load_tokenizer
from loralib.models.generation import ban_repeated_ngrams, repetition_penalty, warp_for_sampling

NEW = 14
BATCH = dict(lengths=(7, 4, 1), seed=11)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """transformers' tiny Llama and ours loaded from its folder, plus a left-padded batch and two eos ids
    that greedy decoding does produce (so rows stop at different steps)."""
    ref = hf_model(tiny_config(vocab_size=64), seed=2)
    ours = from_pretrained(save(ref, tmp_path_factory.mktemp("tiny")))
    ids, mask = left_padded_batch(vocab=64, **BATCH)
    free = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD)
    new = free[:, ids.shape[1]:]
    eos = sorted({int(new[0, 4]), int(new[1, 7])})
    return ref, ours, ids, mask, eos


def _both(models, **kwargs):
    ref, ours, ids, mask, _ = models
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW, **kwargs)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, **kwargs)
    return expected, got


GREEDY = [
    {},
    {"repetition_penalty": 1.5},
    {"no_repeat_ngram_size": 2},
    {"no_repeat_ngram_size": 1, "repetition_penalty": 0.7},
]


@pytest.mark.parametrize("settings", GREEDY, ids=str)
@pytest.mark.parametrize("use_eos", [False, True])
def test_greedy_matches_transformers(models, settings, use_eos):
    eos = models[4] if use_eos else None
    expected, got = _both(models, do_sample=False, eos_token_id=eos, pad_token_id=PAD + 3, **settings)
    assert torch.equal(got, expected), (got, expected)
    if use_eos:  # the eos ids stop rows early and the rest is padding
        assert (got == PAD + 3).any() or got.shape[1] < models[2].shape[1] + NEW


BEAMS = [
    {"num_beams": 3},
    {"num_beams": 4, "length_penalty": 0.8, "no_repeat_ngram_size": 3},
    {"num_beams": 3, "length_penalty": 2.0, "repetition_penalty": 1.3},
    {"num_beams": 5, "length_penalty": -0.5, "early_stopping": True},
    {"num_beams": 4, "length_penalty": 1.5, "early_stopping": "never", "no_repeat_ngram_size": 2},
]


@pytest.mark.parametrize("settings", BEAMS, ids=str)
@pytest.mark.parametrize("use_eos", [False, True])
def test_beam_search_matches_transformers(models, settings, use_eos):
    eos = models[4] if use_eos else None
    expected, got = _both(models, do_sample=False, eos_token_id=eos, pad_token_id=PAD + 3, **settings)
    assert got.shape == expected.shape and torch.equal(got, expected), (got, expected)


@pytest.mark.parametrize("settings", [
    {"top_k": 0},
    {"top_k": 5, "temperature": 0.7},
    {"top_k": 0, "top_p": 0.6},
    {"top_k": 8, "top_p": 0.9, "temperature": 1.3, "repetition_penalty": 1.2},
    {"num_beams": 3, "top_k": 0, "temperature": 0.8},
], ids=str)
def test_sampling_matches_transformers_with_the_same_seed(models, settings):
    ref, ours, ids, mask, eos = models
    torch.manual_seed(7)
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, eos_token_id=eos,
                            pad_token_id=PAD, **settings)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, eos_token_id=eos,
                   pad_token_id=PAD, generator=torch.Generator().manual_seed(7), **settings)
    assert torch.equal(got, expected)


def test_sampling_is_reproducible_and_respects_top_k_top_p(models):
    _, ours, ids, mask, _ = models
    sample = lambda seed, new=NEW, **kw: generate(ours, ids, mask, max_new_tokens=new, do_sample=True,  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    greedy = generate(ours, ids, mask, max_new_tokens=NEW)
    assert torch.equal(sample(3, top_k=1), greedy)
    assert torch.equal(sample(4, top_p=1e-6), greedy)
    # Every sampled first token lies in the top 3 of its row.
    with torch.no_grad():
        top3 = ours(ids, attention_mask=mask).logits[:, -1].topk(3).indices
    firsts = torch.stack([sample(s, top_k=3, new=1)[:, -1] for s in range(30)], 1)  # (B, 30)
    assert all(set(firsts[b].tolist()) <= set(top3[b].tolist()) for b in range(ids.shape[0]))
    assert len(set(firsts[0].tolist())) > 1  # and it does sample


def test_processors_match_transformers():
    lp = transformers.generation.logits_process
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 12, (6, 15), generator=g)
    scores = torch.randn(6, 12, generator=g)
    starts = torch.tensor([0, 3, 5, 0, 14, 2])
    ref = lp.RepetitionPenaltyLogitsProcessor(1.7, prompt_ignore_length=starts)(seqs, scores.clone())
    assert torch.equal(repetition_penalty(seqs, scores, 1.7, starts), ref)
    for n in (1, 2, 3, 15, 16):
        ref = lp.NoRepeatNGramLogitsProcessor(n)(seqs, scores.clone())
        assert torch.equal(ban_repeated_ngrams(seqs, scores, n), ref), n
    for k, p, t in [(3, 1.0, 1.0), (0, 0.5, 1.0), (4, 0.8, 0.6)]:
        ref = scores.clone() / t
        if k:
            ref = lp.TopKLogitsWarper(k)(seqs, ref)
        if p < 1:
            ref = lp.TopPLogitsWarper(p)(seqs, ref)
        assert torch.equal(warp_for_sampling(scores, t, k, p), ref)


def test_bad_arguments_raise_value_errors(models):
    _, ours, ids, mask, _ = models
    for kwargs, name in [({"num_beams": 0}, "num_beams"), ({"top_p": 0.0}, "top_p"), ({"top_k": -1}, "top_k"),
                         ({"do_sample": True, "temperature": 0.0}, "temperature"),
                         ({"repetition_penalty": 0.0}, "repetition_penalty"),
                         ({"eos_token_id": [1, -2]}, "eos_token_id"), ({"early_stopping": "soon"}, "early_stopping")]:
        with pytest.raises(ValueError, match=name):
            generate(ours, ids, mask, **kwargs)
    with pytest.raises(ValueError, match="pad prompts on the left"):
        generate(ours, ids.flip(1), mask.flip(1))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        generate(ours, ids, mask[:, 1:])
    assert torch.equal(generate(ours, ids, mask, max_new_tokens=0), ids)


class _CountingLM(nn.Module):
    """Not a transformer: next-token logits from a running sum of token embeddings kept in the KVCache.
    Shows that generate needs only the model interface (and that it feeds the cache correctly)."""

    def __init__(self, vocab=20, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False, **unused):
        x = self.emb(input_ids) * attention_mask[:, -input_ids.shape[1]:, None]  # padding adds nothing
        cache = past_key_values if past_key_values is not None else (KVCache(1) if use_cache else None)
        if cache is not None:
            k, _ = cache.update(0, x[:, None], x[:, None])  # (B, 1, S, dim)
            cache.advance(input_ids.shape[1])
            x = k[:, 0]
        return ModelOutput(logits=self.head(x.cumsum(1)), past_key_values=cache)


def test_generate_works_on_any_model_with_the_interface():
    model = _CountingLM().eval()
    ids, mask = left_padded_batch(vocab=20, lengths=(5, 3), low=1)
    got = generate(model, ids, mask, max_new_tokens=6)
    seqs, m = ids, mask
    for _ in range(6):  # the same decoding without a cache: recompute everything each step
        nxt = model(seqs, attention_mask=m).logits[:, -1].argmax(-1, keepdim=True)
        seqs, m = torch.cat([seqs, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(got, seqs)
    assert generate(model, ids, mask, max_new_tokens=6, num_beams=3).shape[0] == 2


def test_generation_on_our_gpt2_matches_transformers(tmp_path):
    pytest.importorskip("loralib.models.gpt2")
    config = transformers.GPT2Config(vocab_size=64, n_positions=48, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(config).eval()
    ref.generation_config.eos_token_id = ref.generation_config.bos_token_id = None
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    ids, mask = left_padded_batch(vocab=64, **BATCH)
    for kwargs in ({}, {"num_beams": 3, "no_repeat_ngram_size": 2, "length_penalty": 0.8}):
        expected = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD, **kwargs)
        assert torch.equal(generate(ours, ids, mask, max_new_tokens=NEW, pad_token_id=PAD, **kwargs), expected)


def test_smollm2_chat_generation_matches_transformers():
    folder = smollm2_folder()
    ours = from_pretrained(folder)
    tok = load_tokenizer(folder, model_config=ours.hf_config)
    tok.padding_side = "left"
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("What is 2+2?", "Say hi.")]
    batch = tok(prompts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()  # the batch is left-padded
    got = generate(ours, ids, mask, max_new_tokens=10, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert torch.equal(got, expected)
    assert "4" in tok.decode(got[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """transformers' tiny GPT-2 and ours from its folder, a left-padded batch, and two eos ids taken
    from the beams transformers finds without eos (so inputs finish at different steps)."""
    pytest.importorskip("loralib.models.gpt2")
    config = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(3)
    ref = transformers.GPT2LMHeadModel(config).eval()
    ref.generation_config.eos_token_id = ref.generation_config.bos_token_id = None
    folder = tmp_path_factory.mktemp("gpt2")
    ref.save_pretrained(folder)
    ours = from_pretrained(folder)
    ids, mask = left_padded_batch(vocab=64, lengths=(9, 5, 2, 7), seed=5)
    free = ref.generate(ids, attention_mask=mask, max_new_tokens=20, num_beams=10, pad_token_id=PAD)
    new = free[:, ids.shape[1]:]
    eos = [int(new[0, 3]), int(new[2, 9])]
    return ref, ours, ids, mask, eos


class _RowCounter(nn.Module):
    """Wraps a model and records the batch size of every forward call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, []

    def forward(self, input_ids, **kwargs):
        self.rows.append(input_ids.shape[0])
        return self.model(input_ids, **kwargs)


@pytest.mark.parametrize("settings", [
    {"length_penalty": 0.8},                                   # the LoRA paper's NLG decoding
    {"length_penalty": 1.0, "early_stopping": True},
    {"length_penalty": 0.8, "early_stopping": "never"},
], ids=str)
def test_paper_beam_search_on_gpt2_matches_transformers(tiny_gpt2, settings):
    """num_beams 10, no_repeat_ngram_size 4, two eos ids, left padding: token-identical output, and
    inputs whose beams are done leave the batch (the model runs on fewer rows afterwards)."""
    ref, ours, ids, mask, eos = tiny_gpt2
    kwargs = dict(attention_mask=mask, max_new_tokens=20, num_beams=10, no_repeat_ngram_size=4,
                  repetition_penalty=1.0, eos_token_id=eos, pad_token_id=PAD + 3, **settings)
    # (pad PAD + 3: transformers' beam search pads with eos_token_id[0] when pad_token_id is 0)
    expected = ref.generate(ids, do_sample=False, **kwargs)
    counter = _RowCounter(ours)
    got = generate(counter, ids, **kwargs)
    assert got.shape == expected.shape and torch.equal(got, expected), (got, expected)
    if settings == {"length_penalty": 0.8}:
        assert torch.isin(got[:, ids.shape[1]:], torch.tensor(eos)).any()  # eos did end the best beams
    assert counter.rows[0] == ids.shape[0] and counter.rows[1] == 10 * ids.shape[0]  # prefill once per input
    if settings.get("early_stopping") != "never":
        assert min(counter.rows) < 10 * ids.shape[0], counter.rows  # a finished input left the batch


def test_kv_cache_reorder():
    """reorder = index_select of the filled positions (the batch may shrink or grow; later updates
    append after them, in every layer); `capacity` sizes the buffer once."""
    g = torch.Generator().manual_seed(0)
    cache = KVCache(capacity=12)
    k, v = torch.randn(4, 2, 5, 3, generator=g), torch.randn(4, 2, 5, 3, generator=g)
    cache.update(0, k, v)
    cache.update(1, 2 * k, 2 * v)
    cache.advance(5)
    assert cache._k[0].shape[2] == 12
    for index in (torch.tensor([2, 2, 0, 1]), torch.tensor([3, 1]), torch.tensor([1, 0, 0, 1, 1, 0])):
        cache.reorder(index)
        k, v = k[index], v[index]
        new_k, new_v = torch.randn(len(index), 2, 1, 3, generator=g), torch.randn(len(index), 2, 1, 3, generator=g)
        got_k, got_v = cache.update(0, new_k, new_v)
        k, v = torch.cat([k, new_k], 2), torch.cat([v, new_v], 2)
        assert torch.equal(got_k, k) and torch.equal(got_v, v)
        got_k, got_v = cache.update(1, 2 * new_k, 2 * new_v)
        assert torch.equal(got_k, 2 * k) and torch.equal(got_v, 2 * v)
        cache.advance(1)
    assert cache._k[0].shape[2] == 12  # never regrown
