"""TER as the LoRA repository's eval.py computes it: pyter3's `ter(hyp_words, ref_words)`, written here.

    ter = (number of shifts + Levenshtein distance of the shifted hypothesis to the reference) / len(ref)

pyter's shift search (greedy, one shift per round, until no shift lowers the distance):
  - candidates: every pair of positions (i, j), i != j, with hyp[i] == ref[j], each with the LONGEST run
    L such that hyp[i:i+L] == ref[j:j+L] (shorter runs from the same pair are not tried);
  - the shift moves hyp[i:i+L] out and inserts it at index j of what is left;
  - the round takes the candidate with the largest (distance before - distance after, shifted words),
    compared as a tuple, i.e. ties go to the lexicographically largest word list (pyter sorts the tuples
    and takes the last); it stops when that gain is <= 0. Each shift costs 1.
Words are compared exactly (case-sensitive). Unlike tercom and sacrebleu's TER, shifts are not limited in
size or distance and need not start at a mismatch, and a word can be shifted again in a later round; on
WebNLG-style outputs the two definitions differ by a few thousandths (examples/NLG/README.md).

The distances are computed with Hyyrö's bit-parallel Levenshtein algorithm (one machine-word-like
operation per hypothesis word, the reference's positions as bits), continued from the state of the
unchanged prefix of each shifted hypothesis, so a WebNLG test set scores in seconds.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

State = Tuple[int, int, int]  # (VP, VN, distance): the vertical +1 / -1 bits of a DP column and its last cell


class ReferenceDistance:
    """Levenshtein distance (unit costs) of word lists to one fixed reference of m >= 1 words."""

    def __init__(self, ref: Sequence[str]):
        if not ref:
            raise ValueError("the reference is empty")
        self.m = len(ref)
        self.mask, self.top = (1 << self.m) - 1, 1 << (self.m - 1)
        self.bits: Dict[str, int] = {}
        for i, word in enumerate(ref):  # bit i: ref[i] is this word
            self.bits[word] = self.bits.get(word, 0) | (1 << i)
        self.start: State = (self.mask, 0, self.m)  # column 0: D[i][0] = i, all steps +1

    def step(self, state: State, word: str) -> State:
        """The column after one more hypothesis word (Hyyrö 2003, global distance: row 0 steps +1)."""
        vp, vn, dist = state
        x = self.bits.get(word, 0) | vn
        d0 = ((((x & vp) + vp) & self.mask) ^ vp) | x
        hp = vn | (~(d0 | vp) & self.mask)
        hn = d0 & vp
        dist += 1 if hp & self.top else -1 if hn & self.top else 0
        hp = ((hp << 1) | 1) & self.mask
        hn = (hn << 1) & self.mask
        return hn | (~(d0 | hp) & self.mask), hp & d0, dist

    def prefix_states(self, words: Sequence[str]) -> List[State]:
        """states[k]: the state after words[:k] (k = 0 .. len(words))."""
        states = [self.start]
        for w in words:
            states.append(self.step(states[-1], w))
        return states

    def distance(self, words: Sequence[str], states: Sequence[State] = (), shared: int = 0) -> int:
        """Distance of `words`; with `states` of a list that agrees with `words` on its first `shared`
        words, the computation resumes from there."""
        state = states[shared] if states else self.start
        for w in words[shared if states else 0:]:
            state = self.step(state, w)
        return state[2]


def shift_candidates(hyp: Sequence[str], ref: Sequence[str]):
    """(i, j, L) for pyter's shifts: hyp[i] == ref[j], i != j, L the longest common run from there."""
    for i in range(len(hyp)):
        for j in range(len(ref)):
            if i == j or hyp[i] != ref[j]:
                continue
            length = 1
            while i + length < len(hyp) and j + length < len(ref) and hyp[i + length] == ref[j + length]:
                length += 1
            yield i, j, length


def pyter_ter(hyp: Sequence[str], ref: Sequence[str]) -> float:
    """pyter3's ter(hyp, ref) on word lists; raises ZeroDivisionError for an empty reference, as pyter does
    (eval.py scores that sentence 1)."""
    hyp, ref = list(hyp), list(ref)
    if not ref:
        raise ZeroDivisionError("TER of an empty reference")
    dist = ReferenceDistance(ref)
    shifts = 0
    while True:
        states = dist.prefix_states(hyp)
        before = states[-1][2]
        best = None
        for i, j, length in shift_candidates(hyp, ref):
            shifted = hyp[:i] + hyp[i + length:]
            shifted[j:j] = hyp[i:i + length]
            candidate = (before - dist.distance(shifted, states, min(i, j)), shifted)
            if best is None or candidate > best:
                best = candidate
        if best is None or best[0] <= 0:
            return (shifts + before) / len(ref)
        shifts += 1
        hyp = best[1]


def eval_py_sentence_ter(hyp_tok: str, refs_tok: Sequence[str]) -> float:
    """eval.py's TER of one sentence: the lowest over its references of pyter's TER on the space-split
    tokenised texts; an empty reference (a padded slot) counts 1."""
    scores = []
    for ref in refs_tok:
        words = ref.split()
        scores.append(pyter_ter(hyp_tok.split(), words) if words else 1.0)
    return min(scores)
