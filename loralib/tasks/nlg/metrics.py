"""NLG metrics of the LoRA paper's GPT-2 experiments (E2E, WebNLG, DART), computed as the official scripts do.

Inputs everywhere: ``hypotheses: list[str]`` (one detokenised output per example) and
``references: list[list[str]]`` (the references of each example, any count >= 1, counts may differ).

E2E — ``e2e_metrics`` -> {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}, the E2E NLG Challenge's
``measure_scores.py -p`` (github tuetschek/e2e-metrics, which the LoRA repo's eval runs):
  BLEU, NIST: its Python MT-Eval port on the raw text (metrics_mteval.py; BLEU in [0, 1], NIST raw);
  METEOR, ROUGE_L, CIDEr: the COCO caption tools (pycocoevalcap: METEOR 1.5, ROUGE-L with beta 1.2,
  CIDEr-D) on the Stanford PTB tokenizer's output (lower-cased, punctuation dropped).

WebNLG / DART — ``webnlg_metrics`` / ``dart_metrics`` -> {"bleu", "meteor", "ter"} as the LoRA repo's
examples/NLG/eval/eval.py (the WebNLG 2020 challenge's GenerationEval) runs them with ``-nr num_refs``:
  bleu: multi-bleu-detok.perl on the raw text (0-100) = sacrebleu, 13a tokens, case-sensitive, no smoothing;
        the reference files are padded with empty lines up to ``num_refs``, and the perl script counts an
        empty reference as a length-0 candidate for the closest reference length: sacrebleu does the same
        with "" references, so the padding is kept.
  meteor: METEOR 1.5 jar (``-l en -norm``) on nltk.word_tokenize'd text (empty references dropped: they
        score 0 and METEOR keeps each sentence's best reference).
  ter: mean over sentences of the lowest TER against each reference (an empty, padded reference counts
        1.0, as eval.py does), on nltk.word_tokenize'd text, case-sensitive. By default each sentence's
        TER is pyter3's, as eval.py computes it (ter.py; key "ter"); ``ter="sacrebleu"`` uses sacrebleu's
        TER instead (tercom's shift search; key "ter_sacrebleu", so a score says which one it is).
  eval.py itself reads gpt2_decode.py's files with one extra, empty sentence after the final newline; its
  METEOR then fails on the line-count mismatch and prints -1 (its BLEU and TER are unaffected). That bug
  is not reproduced: METEOR is computed on the real sentences.
  With ``categories`` (WebNLG): also bleu_seen / bleu_unseen / bleu_all (BLEU of each subset).

The Java tools start once per call (METEOR ~10 s); pass ``meteor=MeteorScorer`` opened by the caller to
share one METEOR process over several calls.
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from functools import lru_cache
from typing import Callable, Optional, Sequence, Union

from sacrebleu.metrics import BLEU, TER

from .metrics_java import JavaNotFoundError, MeteorScorer, ptb_tokenize, require_java
from .data import SEEN_CATEGORIES  # WebNLG 2017 training categories; the test set's other five are "unseen"
from .lines import parse_e2e_references, read_utf8
from .metrics_mteval import mteval_bleu, mteval_nist
from .ter import eval_py_sentence_ter

TER_DEFINITIONS = {"eval_py": "ter", "sacrebleu": "ter_sacrebleu"}  # definition -> its key in the scores

__all__ = [
    "SEEN_CATEGORIES", "e2e_metrics", "webnlg_metrics", "dart_metrics", "read_e2e_references",
    "multi_bleu_detok", "mean_sentence_ter", "nltk_word_tokenize", "coco_rouge_cider",
    "MeteorScorer", "JavaNotFoundError", "require_java", "ptb_tokenize", "mteval_bleu", "mteval_nist",
]



# ----------------------------------------------------------------------------- inputs

def read_e2e_references(path: Union[str, os.PathLike]) -> list[list[str]]:
    """References of the E2E reference format: one reference a line, inputs separated by one blank line,
    read exactly as measure_scores.py reads them (lines.parse_e2e_references: its line breaks, stripping,
    one-reference files, and its refusal of empty groups, here as file:line)."""
    return parse_e2e_references(read_utf8(path), str(path))


def _check_pairs(hypotheses, references) -> tuple[list[str], list[list[str]]]:
    """Validated copies: equal lengths, strings, and at least one non-empty reference per example."""
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise ValueError("hypotheses must be a list of strings and references a list of lists of strings")
    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        if not isinstance(hyp, str):
            raise ValueError(f"hypothesis {i} is a {type(hyp).__name__}, not a string")
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] must be a list of strings")
        if not any(r.strip() for r in refs):
            raise ValueError(f"example {i} has no non-empty reference")
    return hypotheses, [list(refs) for refs in references]


# ----------------------------------------------------------------------------- E2E

def coco_rouge_cider(hyps_tok: Sequence[str], refs_tok: Sequence[Sequence[str]]) -> tuple[float, float]:
    """(ROUGE_L, CIDEr) of pycocoevalcap on already PTB-tokenised text (pure Python, no Java)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: list(refs) for i, refs in enumerate(refs_tok)}
    res = {i: [hyp] for i, hyp in enumerate(hyps_tok)}
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return float(rouge), float(cider)


def e2e_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                meteor: Optional[MeteorScorer] = None) -> dict[str, float]:
    """{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"} as measure_scores.py -p prints them (see module doc)."""
    hyps, refss = _check_pairs(hypotheses, references)
    for i, refs in enumerate(refss):
        if not all(r.strip() for r in refs):  # the official reader can not produce one
            raise ValueError(f"references[{i}] holds an empty reference")
    require_java()
    scores = {"BLEU": mteval_bleu(hyps, refss), "NIST": mteval_nist(hyps, refss)}

    # COCOEvalCap tokenises references and outputs (two Java runs there, one here: same tokens)
    flat = hyps + [r for refs in refss for r in refs]
    tokens = ptb_tokenize(flat)
    hyps_tok, pos, refs_tok = tokens[:len(hyps)], len(hyps), []
    for refs in refss:
        refs_tok.append(tokens[pos:pos + len(refs)])
        pos += len(refs)

    with (nullcontext(meteor) if meteor is not None else MeteorScorer()) as scorer:
        # a reference of only punctuation is empty after PTB: COCOEvalCap still sends it to METEOR
        scores["METEOR"] = scorer.score(hyps_tok, refs_tok, keep_empty=True)
    scores["ROUGE_L"], scores["CIDEr"] = coco_rouge_cider(hyps_tok, refs_tok)
    return {k: scores[k] for k in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")}


# ----------------------------------------------------------------------------- WebNLG / DART

@lru_cache(maxsize=1)
def _sentence_splitter() -> Callable[[str], list[str]]:
    """English Punkt from nltk's data when installed, else untrained Punkt (with a warning)."""
    from nltk.tokenize import PunktSentenceTokenizer, sent_tokenize

    try:
        sent_tokenize("Probe.")
        return sent_tokenize
    except LookupError:
        warnings.warn("nltk data 'punkt_tab' not found: sentences for METEOR/TER are split by untrained Punkt "
                      "(`make test` installs it offline through data/fetch_punkt_tab.py; "
                      "`python -m nltk.downloader punkt_tab` where nltk's server is reachable)")
        return PunktSentenceTokenizer().tokenize


def nltk_word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize`` (Punkt sentences, then Treebank words), as GenerationEval tokenises.

    Without nltk's ``punkt_tab`` data (the Makefile installs it offline: data/fetch_punkt_tab.py), Punkt
    runs untrained: the same algorithm without the English abbreviation list, so "St. Louis" may split
    differently.
    """
    from nltk.tokenize import NLTKWordTokenizer

    return [w for sent in _sentence_splitter()(text) for w in NLTKWordTokenizer().tokenize(sent)]


def _padded(references: Sequence[Sequence[str]], num_refs: Optional[int]) -> list[list[str]]:
    """Non-empty references of each example, cut or padded with "" to ``num_refs`` (default: the most any
    example has), like the reference files ``gpt2_decode.py --ref_num`` writes."""
    real = [[r for r in refs if r.strip()] for refs in references]
    width = num_refs if num_refs is not None else max(len(r) for r in real)
    if width < 1:
        raise ValueError(f"num_refs must be >= 1, got {num_refs}")
    return [refs[:width] + [""] * (width - len(refs[:width])) for refs in real]


def multi_bleu_detok(hypotheses: Sequence[str], padded_refs: Sequence[Sequence[str]]) -> float:
    """BLEU (0-100) of multi-bleu-detok.perl; ``padded_refs`` all of one length, "" for a missing reference."""
    streams = [list(stream) for stream in zip(*padded_refs)]
    bleu = BLEU(tokenize="13a", lowercase=False, smooth_method="none", force=True)
    return float(bleu.corpus_score(list(hypotheses), streams).score)


def mean_sentence_ter(hyps_tok: Sequence[str], padded_refs_tok: Sequence[Sequence[str]],
                      definition: str = "eval_py") -> float:
    """Mean over sentences of min over references of TER (edits / reference length); "" counts 1.0.
    definition "eval_py": pyter3's TER as the LoRA repo's eval.py; "sacrebleu": sacrebleu's (tercom's)."""
    if definition == "eval_py":
        per_sentence = [eval_py_sentence_ter(hyp, refs) for hyp, refs in zip(hyps_tok, padded_refs_tok)]
        return sum(per_sentence) / len(per_sentence)
    if definition != "sacrebleu":
        raise ValueError(f"TER definition {definition!r}: expected one of {', '.join(TER_DEFINITIONS)}")
    ter = TER(case_sensitive=True)
    per_sentence = []
    for hyp, refs in zip(hyps_tok, padded_refs_tok):
        per_sentence.append(min(ter.sentence_score(hyp, [ref]).score / 100.0 if ref else 1.0 for ref in refs))
    return sum(per_sentence) / len(per_sentence)


def _is_seen(category) -> bool:
    # LoRA's converted WebNLG files store a boolean "cate" (seen or not); the raw data a category name
    return category if isinstance(category, bool) else str(category) in SEEN_CATEGORIES


def webnlg_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                   categories: Optional[Sequence[Union[str, bool]]] = None, num_refs: Optional[int] = None,
                   meteor: Optional[MeteorScorer] = None, ter: str = "eval_py") -> dict[str, Optional[float]]:
    """{"bleu" (0-100), "meteor" (0-1), "ter" (0-1)} (see module doc); with ``categories`` (a name, or
    True for seen, per hypothesis) also "bleu_seen", "bleu_unseen", "bleu_all" (None for an empty subset).
    ``num_refs``: the ``-nr`` / ``--ref_num`` of the LoRA eval (6 there); None = the most any example has.
    ``ter``: "eval_py" (key "ter") or "sacrebleu" (key "ter_sacrebleu").
    """
    if ter not in TER_DEFINITIONS:
        raise ValueError(f"ter={ter!r}: expected one of {', '.join(TER_DEFINITIONS)}")
    hyps, refss = _check_pairs(hypotheses, references)
    if categories is not None and len(categories) != len(hyps):
        raise ValueError(f"got {len(categories)} categories for {len(hyps)} hypotheses")
    require_java()
    padded = _padded(refss, num_refs)
    scores: dict[str, Optional[float]] = {"bleu": multi_bleu_detok(hyps, padded)}

    hyps_tok = [" ".join(nltk_word_tokenize(h)) for h in hyps]
    padded_tok = [[" ".join(nltk_word_tokenize(r)) if r else "" for r in refs] for refs in padded]
    with (nullcontext(meteor) if meteor is not None else MeteorScorer()) as scorer:
        scores["meteor"] = scorer.score(hyps_tok, padded_tok)
    scores[TER_DEFINITIONS[ter]] = mean_sentence_ter(hyps_tok, padded_tok, ter)

    if categories is not None:
        seen = [_is_seen(c) for c in categories]
        for name, keep in (("bleu_seen", True), ("bleu_unseen", False)):
            idx = [i for i, s in enumerate(seen) if s == keep]
            scores[name] = multi_bleu_detok([hyps[i] for i in idx], [padded[i] for i in idx]) if idx else None
        scores["bleu_all"] = scores["bleu"]
    return scores


def dart_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]], num_refs: Optional[int] = None,
                 meteor: Optional[MeteorScorer] = None, ter: str = "eval_py") -> dict[str, float]:
    """{"bleu" (0-100), "meteor" (0-1), "ter" (0-1)}, computed as for WebNLG (the LoRA eval runs the same
    script on DART)."""
    return webnlg_metrics(hypotheses, references, num_refs=num_refs, meteor=meteor, ter=ter)
