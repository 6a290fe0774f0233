"""BLEU and NIST as the E2E NLG Challenge's ``measure_scores.py -p`` computes them (its pymteval module).

pymteval is a Python port of mteval-v13a.pl; the facts it fixes, which this module follows:

- Tokenisation: mteval-v13a's (sacrebleu's ``13a`` tokenizer is the same rules); then every token is
  lower-cased (case-insensitive matching). A blank sentence is ONE empty token (length 1), because the
  port splits ``""`` on a space.
- BLEU (4-grams), corpus level: clipped n-gram hits against the per-n-gram maximum over the references;
  the n-gram total of a sentence is ``len - n + 1`` WITHOUT clipping at zero (a 2-token sentence adds -2 to
  the 4-gram total); reference length = the reference closest in length, the shorter one on a tie;
  ``BP = exp(1 - r / c)`` when ``c <= r``; precisions floored at 1e-15 / 1e-9 so the score is never undefined.
- NIST (5-grams): information weight of an n-gram w1..wn = log2(count(w1..wn-1) / count(w1..wn)), counts
  over ALL reference sentences of the corpus (the 0-gram count is the total reference length); a sentence's
  hits are clipped against the merged references like BLEU; score = sum_n sum(info * hits) / total_n,
  times ``exp(-beta * ln(c / r)^2)`` for c < r, where r is the sum over sentences of the MEAN reference
  length and beta = -ln(0.5) / ln(1.5)^2.

sacrebleu's corpus_bleu and nltk's corpus_nist give the same numbers only on the cases the tests name
(sacrebleu clips totals at zero and has no empty token; nltk's NIST scores each reference separately and
keeps the best one), so the sums are written out here.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

_TOKENIZER_13A = Tokenizer13a()
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a tokens of ``text``, lower-cased; ``""`` -> ``[""]`` as in pymteval."""
    return [token.lower() for token in _TOKENIZER_13A(text).split(" ")]


def ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    """Counter of the n-grams (tuples) of one sentence."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def clipped_hits(hyp: Sequence[str], refs: Sequence[Sequence[str]], n: int) -> Counter:
    """n-gram -> min(count in hyp, max count in any one reference), for the n-grams that match."""
    merged = Counter()
    for ref in refs:
        merged |= ngram_counts(ref, n)          # | keeps the per-n-gram maximum
    return ngram_counts(hyp, n) & merged        # & keeps the minimum, drops zeros


def _tokenized(hypotheses, references):
    return ([mteval_tokenize(h) for h in hypotheses],
            [[mteval_tokenize(r) for r in refs] for refs in references])


def mteval_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU in [0, 1] of raw (untokenised) sentences; ``references[i]`` holds >= 1 strings."""
    hyps, refss = _tokenized(hypotheses, references)
    hits = [0] * max_n
    totals = [0] * max_n
    ref_len = 0
    for hyp, refs in zip(hyps, refss):
        for n in range(1, max_n + 1):
            hits[n - 1] += sum(clipped_hits(hyp, refs, n).values())
            totals[n - 1] += len(hyp) - n + 1   # may be negative: kept as the official does
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    sys_len = totals[0]
    bp = math.exp(1.0 - ref_len / (sys_len or 1e-5)) if sys_len <= ref_len else 1.0
    log_prec = sum(math.log(max(h, 1e-15) / max(t, 1e-9)) for h, t in zip(hits, totals))
    return bp * math.exp(log_prec / max_n)


def mteval_nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 5) -> float:
    """Corpus NIST (unbounded, ~3-10 on E2E) of raw sentences; ``references[i]`` holds >= 1 strings."""
    hyps, refss = _tokenized(hypotheses, references)
    # counts over every reference sentence; the empty tuple (0-gram) counts reference tokens
    ref_counts = Counter()
    avg_ref_len = 0.0
    for refs in refss:
        for ref in refs:
            ref_counts[()] += len(ref)
            for n in range(1, max_n + 1):
                ref_counts.update(ngram_counts(ref, n))
        avg_ref_len += sum(len(r) for r in refs) / len(refs)

    def info(ngram):
        return math.log2(ref_counts[ngram[:-1]] / ref_counts[ngram])

    score = 0.0
    for n in range(1, max_n + 1):
        gain = sum(info(g) * c for hyp, refs in zip(hyps, refss) for g, c in clipped_hits(hyp, refs, n).items())
        total = sum(len(hyp) - n + 1 for hyp in hyps)
        score += gain / total if total else 0.0   # total == 0 only when nothing was generated
    sys_len = sum(len(h) for h in hyps)
    ratio = sys_len / avg_ref_len
    if ratio >= 1:
        penalty = 1.0
    elif ratio <= 0:
        penalty = 0.0
    else:
        penalty = math.exp(-NIST_BETA * math.log(ratio) ** 2)
    return penalty * score
