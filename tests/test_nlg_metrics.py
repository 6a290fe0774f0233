"""NLG metrics (loralib/tasks/nlg/metrics.py) against the official numbers, the reference libraries and hand math.

- E2E: the five numbers the official measure_scores.py -p prints on the e2e-metrics example inputs.
- On ~300 (hypothesis, references) pairs made from the example sentences (words dropped, swapped, replaced;
  1 to 5 references each): BLEU vs sacrebleu.corpus_bleu, NIST vs nltk.corpus_nist (single reference, where
  the two agree by construction), ROUGE_L vs rouge-score's LCS combined the COCO way, CIDEr vs pycocoevalcap
  called directly, WebNLG BLEU vs sacrebleu, TER vs sacrebleu's TER; the official quirks by hand math.
- Errors, Java missing, and the Java processes being ended.
Java starts twice in all (one PTB tokenizer run, one METEOR server shared by the tests that need it).
"""
from __future__ import annotations

import math
import os
import random
import re
import shutil
from pathlib import Path

import pytest
import sacrebleu

from loralib.tasks.nlg import metrics as M
from loralib.tasks.nlg.metrics_mteval import mteval_bleu, mteval_nist, mteval_tokenize

EXAMPLE = Path("/work/shared/data/e2e-example")
if not EXAMPLE.is_dir():  # shared/ sits beside the checkout in CI
    EXAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e-example"
needs_example = pytest.mark.skipif(not (EXAMPLE / "devel-conc.txt").is_file(), reason="no e2e-example data")
needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="no java: apt-get install default-jre-headless")


# ----------------------------------------------------------------------------- data

def _example_sentences() -> list[str]:
    if (EXAMPLE / "devel-conc.txt").is_file():
        refs = M.read_e2e_references(EXAMPLE / "devel-conc.txt")
        hyps = (EXAMPLE / "baseline-output.txt").read_text(encoding="utf-8").splitlines()
        return sorted({s for group in refs for s in group} | {h.strip() for h in hyps if h.strip()})
    return ["The Vaults is a pub near Café Adriatic in the city centre.",   # a fallback corpus
            "Near the riverside, The Eagle serves French food for £20-25.",
            "Aromi is a kid friendly coffee shop with a 3 out of 5 rating.",
            "There is a cheap family-friendly restaurant, Zizzi, by the river. It serves pasta."]


def _variant(words: list[str], rng: random.Random, vocab: list[str]) -> str:
    out = [w for w in words if rng.random() > 0.15] or words[:1]
    if len(out) > 2 and rng.random() < 0.5:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    if rng.random() < 0.3:
        out[rng.randrange(len(out))] = rng.choice(vocab)
    if rng.random() < 0.2:
        out = [w.upper() if rng.random() < 0.2 else w for w in out]
    return " ".join(out)


def _pairs(n: int = 300, seed: int = 0, max_refs: int = 5) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    sents = _example_sentences()
    vocab = sorted({w for s in sents for w in s.split()})
    hyps, refss = [], []
    for _ in range(n):
        base = rng.choice(sents)
        refs = [base] + [rng.choice(sents) for _ in range(rng.randint(0, max_refs - 1))]
        rng.shuffle(refs)
        hyps.append(_variant(base.split(), rng, vocab))
        refss.append(refs)
    return hyps, refss


def _none_padded_streams(refss):
    width = max(len(r) for r in refss)
    return [[refs[k] if k < len(refs) else None for refs in refss] for k in range(width)]


def _simple_tokens(text: str) -> str:
    """Stand-in for the PTB tokenizer (no Java): lower-cased words, punctuation dropped."""
    return " ".join(re.findall(r"[a-z0-9£]+(?:[-'][a-z0-9]+)*", text.lower()))


@pytest.fixture(scope="module", autouse=True)
def meteor():
    """One METEOR server for the module, started before the first test so that its ~10 s start (loading the
    paraphrase table) overlaps the pure-Python tests; the tests that score with it come last."""
    if shutil.which("java") is None:
        yield None
        return
    with M.MeteorScorer() as scorer:
        yield scorer


# ----------------------------------------------------------------------------- E2E, official numbers

@needs_example
def test_read_e2e_references_formats(tmp_path):
    refs = M.read_e2e_references(EXAMPLE / "devel-conc.txt")
    assert [len(r) for r in refs] == [6, 6, 6, 6, 9, 11, 37, 39, 10, 7]
    assert refs[0][0].startswith("There is a place in the city centre, Alimentum")
    p = tmp_path / "refs.txt"
    p.write_text("a1\na2\n\nb1\n\n", encoding="utf-8")         # one blank line after each group
    assert M.read_e2e_references(p) == [["a1", "a2"], ["b1"]]
    p.write_text("a1\na2\n\n\n\nb1\n\n", encoding="utf-8")     # a run of blank lines: refused, as officially
    with pytest.raises(ValueError, match="refs.txt:4: two blank lines in a row"):
        M.read_e2e_references(p)
    p.write_text("x\ny  \nz\n", encoding="utf-8")                # no blank line: one reference per example
    assert M.read_e2e_references(p) == [["x"], ["y"], ["z"]]
    p.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="refs.txt:1: a blank first line"):
        M.read_e2e_references(p)
    p.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="refs.txt: no references"):
        M.read_e2e_references(p)
    with pytest.raises(FileNotFoundError):
        M.read_e2e_references(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- BLEU / NIST (pymteval)

def test_mteval_tokenize_is_v13a_lowercased():
    assert mteval_tokenize("Costs £20-25, rated 3.5 out of 5.") == \
        ["costs", "£20", "-", "25", ",", "rated", "3.5", "out", "of", "5", "."]
    assert mteval_tokenize("Price: 1,000&amp;more") == ["price", ":", "1,000", "&", "more"]
    assert mteval_tokenize("") == [""]            # pymteval splits "" into one empty token


def test_mteval_bleu_matches_sacrebleu_on_generated_pairs():
    hyps, refss = _pairs()
    keep = [i for i, h in enumerate(hyps) if len(mteval_tokenize(h)) >= 4]  # totals agree from 4 tokens on
    hyps, refss = [hyps[i] for i in keep], [refss[i] for i in keep]
    assert len(hyps) > 250 and len({len(r) for r in refss}) == 5
    ours = mteval_bleu(hyps, refss)
    ref = sacrebleu.corpus_bleu(hyps, _none_padded_streams(refss), lowercase=True, tokenize="13a",
                                smooth_method="none")
    assert 0.2 < ours < 0.95
    assert ours == pytest.approx(ref.score / 100, abs=1e-12)
    # and on a corpus where the system is shorter than the references (brevity penalty active)
    short = [" ".join(h.split()[:max(4, len(h.split()) // 2)]) for h in hyps]
    ref = sacrebleu.corpus_bleu(short, _none_padded_streams(refss), lowercase=True, tokenize="13a",
                                smooth_method="none")
    assert ref.bp < 0.9
    assert mteval_bleu(short, refss) == pytest.approx(ref.score / 100, abs=1e-12)


def test_mteval_bleu_official_quirks_by_hand():
    # "a b" vs "a b": n-gram totals 2, 1, 0, -1 (not clipped at 0); hits 2, 1, 0, 0; floors 1e-15 / 1e-9
    p = [2 / 2, 1 / 1, 1e-15 / 1e-9, 1e-15 / 1e-9]
    assert mteval_bleu(["a b"], [["A B"]]) == pytest.approx(math.exp(sum(map(math.log, p)) / 4), rel=1e-12)
    # closest reference length, the shorter one on a tie: |3-2| == |3-4| -> r = 2 < c = 3, no penalty
    one = mteval_bleu(["x y z"], [["x y z w", "x y"]])
    assert one == pytest.approx(math.exp((math.log(3 / 3) + math.log(2 / 2) + math.log(1) +
                                          math.log(1e-15 / 1e-9)) / 4), rel=1e-12)
    # an empty output is one (unmatched) token
    assert mteval_bleu([""], [["a b c"]]) == pytest.approx(
        math.exp(1 - 3 / 1) * math.exp((math.log(1e-15 / 1) + 3 * math.log(1e-15 / 1e-9)) / 4), rel=1e-9)


def test_mteval_nist_matches_nltk_with_one_reference():
    from nltk.translate.nist_score import corpus_nist

    hyps, refss = _pairs(n=220, seed=1, max_refs=1)
    keep = [i for i, h in enumerate(hyps) if len(mteval_tokenize(h)) >= 5]  # totals agree from 5 tokens on
    hyps, refss = [hyps[i] for i in keep], [refss[i] for i in keep]
    assert len(hyps) > 180 and all(len(r) == 1 for r in refss)
    ours = mteval_nist(hyps, refss)
    ref = corpus_nist([[mteval_tokenize(r) for r in refs] for refs in refss], [mteval_tokenize(h) for h in hyps])
    assert 3 < ours < 15
    assert ours == pytest.approx(ref, rel=1e-12)
    short = [" ".join(h.split()[:max(5, len(h.split()) // 2)]) for h in hyps]   # length penalty active
    ref = corpus_nist([[mteval_tokenize(r) for r in refs] for refs in refss], [mteval_tokenize(h) for h in short])
    assert mteval_nist(short, refss) == pytest.approx(ref, rel=1e-12)


def test_mteval_nist_multi_reference_by_hand():
    # refs "a b", "a c": counts () 4, a 2, b 1, c 1, ab 1, ac 1 -> info a 1, b 2, ab log2(2/1) = 1.
    # Hits are clipped against the MERGED references (nltk would keep the best single reference instead):
    # n=1: (1 + 2) / 2 tokens; n=2: 1 / 1; n=3: total 0 -> 0; n=4, 5: no hits. Lengths 2 vs mean 2 -> no penalty.
    assert mteval_nist(["a b"], [["a b", "a c"]]) == pytest.approx(1.5 + 1.0, rel=1e-12)
    # penalty: output 2 tokens vs mean reference length (2 + 4) / 2 = 3
    beta = -math.log(0.5) / math.log(1.5) ** 2
    info_a, info_b, info_ab = math.log2(6 / 2), math.log2(6 / 1), math.log2(2 / 1)   # () count 2 + 4
    expected = ((info_a + info_b) / 2 + info_ab / 1) * math.exp(-beta * math.log(2 / 3) ** 2)
    assert mteval_nist(["a b"], [["a b", "a c d e"]]) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- ROUGE_L / CIDEr (COCO)

def _coco_tokens(seed):
    hyps, refss = _pairs(seed=seed)
    return [_simple_tokens(h) for h in hyps], [[_simple_tokens(r) for r in refs] for refs in refss]


def test_rouge_l_matches_rouge_score_lcs_with_coco_beta():
    from rouge_score import rouge_scorer

    class Whitespace:
        def tokenize(self, text):
            return text.split()

    hyps, refss = _coco_tokens(seed=2)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Whitespace())
    beta2 = 1.2 ** 2
    per_sentence = []
    for hyp, refs in zip(hyps, refss):
        scored = [scorer.score(ref, hyp)["rougeL"] for ref in refs]
        p, r = max(s.precision for s in scored), max(s.recall for s in scored)
        per_sentence.append((1 + beta2) * p * r / (r + beta2 * p) if p and r else 0.0)
    rouge, _ = M.coco_rouge_cider(hyps, refss)
    assert 0.3 < rouge < 0.99
    assert rouge == pytest.approx(sum(per_sentence) / len(per_sentence), rel=1e-12)


def test_cider_matches_pycocoevalcap_called_directly():
    from pycocoevalcap.cider.cider import Cider

    hyps, refss = _coco_tokens(seed=3)
    order = list(range(len(hyps)))
    random.Random(0).shuffle(order)   # COCO ids in another order: the corpus statistics must not care
    gts = {f"img-{i}": refss[i] for i in order}
    res = {f"img-{i}": [hyps[i]] for i in order}
    expected, _ = Cider().compute_score(gts, res)
    _, cider = M.coco_rouge_cider(hyps, refss)
    assert 0.5 < cider < 10
    assert cider == pytest.approx(expected, rel=1e-9)
    # a hypothesis paired with the wrong references scores lower: the pairing is what is measured
    assert M.coco_rouge_cider(hyps[1:] + hyps[:1], refss)[1] < cider / 2


# ----------------------------------------------------------------------------- WebNLG / DART pieces

def test_multi_bleu_detok_matches_sacrebleu_and_keeps_empty_padding():
    hyps, refss = _pairs(seed=4)
    padded = M._padded(refss, None)
    assert {len(r) for r in padded} == {5} and any("" in r for r in padded)
    # where an empty reference is never the closest in length, sacrebleu without padding is the perl script
    n_tok = lambda text: len(text.split()) and len(sacrebleu.tokenizers.tokenizer_13a.Tokenizer13a()(text).split())
    keep = [i for i, (h, refs) in enumerate(zip(hyps, refss))
            if n_tok(h) > min(abs(n_tok(h) - n_tok(r)) for r in refs)]
    assert 200 < len(keep) < len(hyps)
    sub_hyps, sub_refs = [hyps[i] for i in keep], [refss[i] for i in keep]
    ref = sacrebleu.corpus_bleu(sub_hyps, _none_padded_streams(sub_refs), tokenize="13a", smooth_method="none")
    assert M.multi_bleu_detok(sub_hyps, M._padded(sub_refs, 5)) == pytest.approx(ref.score, abs=1e-9)
    assert 20 < ref.score < 95
    # elsewhere the padding lowers the reference length, so it matters (the perl script's behaviour)
    ref = sacrebleu.corpus_bleu(hyps, _none_padded_streams(refss), tokenize="13a", smooth_method="none")
    assert M.multi_bleu_detok(hyps, padded) > ref.score
    # case-sensitive, unlike the E2E BLEU
    assert M.multi_bleu_detok(["The Cat sat on a mat"], [["the cat sat on a mat"]]) < 100
    # multi-bleu-detok.perl: an empty reference line is a length-0 candidate for the closest length:
    # 5 output tokens vs references of 14 and 0 tokens -> r = 0, no brevity penalty
    hyp, long_ref = ["a b c d e"], "a b c d e f g h i j k l m n"
    assert M.multi_bleu_detok(hyp, [[long_ref, ""]]) == pytest.approx(100.0)
    assert M.multi_bleu_detok(hyp, [[long_ref]]) == pytest.approx(100 * math.exp(1 - 14 / 5))
    assert M._padded([["x", ""], ["y", "z", "w"]], 2) == [["x", ""], ["y", "z"]]


def test_nltk_word_tokenize_splits_sentences_then_treebank_words():
    import nltk

    text = 'Alimentum is "family friendly". It costs £20-25, ain\'t it? Rated 3.5 out of 5.'
    expected = ["Alimentum", "is", "``", "family", "friendly", "''", ".", "It", "costs", "£20-25", ",", "ai",
                "n't", "it", "?", "Rated", "3.5", "out", "of", "5", "."]
    assert M.nltk_word_tokenize(text) == expected
    try:   # with nltk's English Punkt data installed, it is exactly nltk.word_tokenize
        assert M.nltk_word_tokenize(text) == nltk.word_tokenize(text)
    except LookupError:
        pass


def test_mean_sentence_ter_against_sacrebleu_and_by_hand():
    hyps, refss = _pairs(n=200, seed=5, max_refs=3)
    hyps_tok = [" ".join(M.nltk_word_tokenize(h)) for h in hyps]
    refs_tok = [[" ".join(M.nltk_word_tokenize(r)) for r in refs] for refs in refss]
    expected = [min(sacrebleu.sentence_ter(h, [r], case_sensitive=True).score for r in refs) / 100
                for h, refs in zip(hyps_tok, refs_tok)]
    ours = M.mean_sentence_ter(hyps_tok, refs_tok, "sacrebleu")
    assert 0.05 < ours < 1
    assert ours == pytest.approx(sum(expected) / len(expected), rel=1e-12)
    for definition in ("eval_py", "sacrebleu"):   # eval.py's (pyter's) TER is the default
        ter = lambda h, r: M.mean_sentence_ter(h, r, definition)  # noqa: E731
        assert ter(["a b c d"], [["a c d"]]) == pytest.approx(1 / 3)   # one deletion
        assert ter(["c d a b"], [["a b c d"]]) == pytest.approx(1 / 4)   # one block shift
        assert ter(["A b"], [["a b"]]) == pytest.approx(1 / 2)           # case-sensitive
        # a padded (empty) reference counts 1.0, which caps a sentence worse than 1 (4 edits / 1 word)
        assert ter(["x y z w"], [["a"]]) == pytest.approx(4.0)
        assert ter(["x y z w"], [["a", ""]]) == pytest.approx(1.0)
    assert M.mean_sentence_ter(hyps_tok, refs_tok) != ours   # the definitions part on these pairs


# ----------------------------------------------------------------------------- errors and processes

def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="3 hypotheses but 2 reference lists"):
        M.e2e_metrics(["a", "b", "c"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="example 1 has no non-empty reference"):
        M.webnlg_metrics(["a", "b"], [["a"], ["", " "]])
    with pytest.raises(ValueError, match=r"references\[0\] must be a list of strings"):
        M.dart_metrics(["a"], ["a reference given as a bare string"])
    with pytest.raises(ValueError, match="hypothesis 0 is a list"):
        M.dart_metrics([["a"]], [["a"]])
    with pytest.raises(ValueError, match="1 categories for 2 hypotheses"):
        M.webnlg_metrics(["a", "b"], [["a"], ["b"]], categories=["City"])
    with pytest.raises(ValueError, match=r"references\[1\] holds an empty reference"):
        M.e2e_metrics(["a", "b"], [["a"], ["b", ""]])
    with pytest.raises(ValueError, match="no hypotheses"):
        M.e2e_metrics([], [])


def test_missing_java_says_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    hyps, refs = ["a b c"], [["a b c"]]
    for call in (lambda: M.e2e_metrics(hyps, refs), lambda: M.webnlg_metrics(hyps, refs),
                 lambda: M.dart_metrics(hyps, refs), lambda: M.MeteorScorer().__enter__(),
                 lambda: M.ptb_tokenize(["a"])):
        with pytest.raises(M.JavaNotFoundError, match="apt-get install default-jre-headless"):
            call()
    assert issubclass(M.JavaNotFoundError, FileNotFoundError)


def _java_children() -> set[int]:
    """pids of the java processes whose parent is this process."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"java" in cmd:
            found.add(int(entry))
    return found


@needs_java
def test_meteor_process_is_ended_even_after_an_error():
    before = _java_children()
    with M.MeteorScorer() as scorer:
        proc = scorer._meteor.meteor_p
        assert proc.pid in _java_children()
        scorer._meteor.lock.acquire()   # as if a score had failed half-way (pycocoevalcap holds its lock)
    assert proc.poll() is not None and _java_children() == before
    with pytest.raises(RuntimeError, match="not running"):
        scorer.score(["a"], [["a"]])
    scorer.close()   # idempotent


@needs_java
def test_e2e_metrics_closes_the_meteor_it_opens(monkeypatch):
    events = []

    class FakeMeteor:   # stands in for the 10-second METEOR start; the PTB tokenizer still runs for real
        def __enter__(self):
            events.append("open")
            return self

        def __exit__(self, *exc):
            events.append("close")

        def score(self, hyps, refs, keep_empty=False):
            raise RuntimeError("scoring failed")

    monkeypatch.setattr(M, "MeteorScorer", FakeMeteor)
    before = _java_children()
    with pytest.raises(RuntimeError, match="scoring failed"):
        M.e2e_metrics(["The Vaults is a pub."], [["The Vaults is a pub.", "A pub: The Vaults."]])
    assert events == ["open", "close"] and _java_children() == before


# ---------------------------------------------------------------- E2E, official numbers (last: waits for METEOR)

@needs_java
@needs_example
def test_e2e_example_matches_official_measure_scores(meteor):
    hyps = (EXAMPLE / "baseline-output.txt").read_text(encoding="utf-8").splitlines()
    refs = M.read_e2e_references(EXAMPLE / "devel-conc.txt")
    scores = M.e2e_metrics(hyps, refs, meteor=meteor)
    assert list(scores) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    assert {k: round(v, 4) for k, v in scores.items()} == {
        "BLEU": 0.7203, "NIST": 7.7889, "METEOR": 0.4801, "ROUGE_L": 0.7910, "CIDEr": 2.3039}


@needs_java
def test_webnlg_and_dart_metrics(meteor):
    hyps, refss = _pairs(n=60, seed=6, max_refs=4)
    cats = [("Airport", "Artist", "City", "Politician")[i % 4] for i in range(len(hyps))]
    scores = M.webnlg_metrics(hyps, refss, categories=cats, num_refs=6, meteor=meteor)
    assert set(scores) == {"bleu", "meteor", "ter", "bleu_seen", "bleu_unseen", "bleu_all"}
    padded = M._padded(refss, 6)
    seen = [i for i, c in enumerate(cats) if c in M.SEEN_CATEGORIES]
    unseen = [i for i in range(len(hyps)) if i not in seen]
    assert scores["bleu_all"] == scores["bleu"] == pytest.approx(M.multi_bleu_detok(hyps, padded))
    assert scores["bleu_seen"] == pytest.approx(
        M.multi_bleu_detok([hyps[i] for i in seen], [padded[i] for i in seen]))
    assert scores["bleu_unseen"] == pytest.approx(
        M.multi_bleu_detok([hyps[i] for i in unseen], [padded[i] for i in unseen]))
    assert scores["bleu_seen"] != scores["bleu_unseen"]
    hyps_tok = [" ".join(M.nltk_word_tokenize(h)) for h in hyps]
    refs_tok = [[" ".join(M.nltk_word_tokenize(r)) for r in refs] for refs in refss]
    assert scores["meteor"] == pytest.approx(meteor.score(hyps_tok, refs_tok), abs=1e-12)
    assert 0.2 < scores["meteor"] < 0.95
    assert scores["ter"] == pytest.approx(M.mean_sentence_ter(hyps_tok, M._padded(refs_tok, 6), "eval_py"))
    # sacrebleu's TER on request, under its own key: a score says which definition it is
    other = M.dart_metrics(hyps, refss, num_refs=6, meteor=meteor, ter="sacrebleu")
    assert set(other) == {"bleu", "meteor", "ter_sacrebleu"} and other["meteor"] == scores["meteor"]
    assert other["ter_sacrebleu"] == pytest.approx(M.mean_sentence_ter(hyps_tok, M._padded(refs_tok, 6), "sacrebleu"))
    # boolean "seen" flags (LoRA's converted files) select the same subsets
    as_bool = M.webnlg_metrics(hyps, refss, categories=[c in M.SEEN_CATEGORIES for c in cats], num_refs=6,
                               meteor=meteor)
    assert as_bool == scores
    dart = M.dart_metrics(hyps, refss, num_refs=6, meteor=meteor)
    assert dart == {k: scores[k] for k in ("bleu", "meteor", "ter")}
    # METEOR of the references themselves is near 1, of an unrelated output near 0
    assert meteor.score(["the cat sat on the mat"], [["the cat sat on the mat"]]) > 0.9
    assert meteor.score(["zebra quantum"], [["the cat sat on the mat"]]) < 0.05
