"""The Java half of the NLG metrics: the Stanford PTB tokenizer and METEOR 1.5, both as pycocoevalcap ships them.

- ``ptb_tokenize(texts)``: pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, ``-preserveLines
  -lowerCase``, punctuation tokens dropped), which COCOEvalCap runs before METEOR / ROUGE_L / CIDEr.
  One Java start for the whole list.
- ``MeteorScorer``: pycocoevalcap's METEOR 1.5 server (``-l en -norm``, stdin/stdout protocol), as a context
  manager so the Java process is always ended; one instance can score many corpora (METEOR's start,
  loading its paraphrase table, takes ~10 s).
"""

from __future__ import annotations

import re
import shutil
from typing import Sequence

JAVA_HINT = "install a Java runtime, e.g. `apt-get install default-jre-headless`"

# characters Java / Python read as line ends: one inside a sentence would shift every later line
_LINE_BREAKS = re.compile(r"[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")


class JavaNotFoundError(FileNotFoundError):
    """No ``java`` on PATH, which METEOR 1.5 and the PTB tokenizer need."""


def require_java() -> str:
    """Path of the ``java`` executable; raises JavaNotFoundError saying what to install."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(f"`java` was not found on PATH; METEOR 1.5 and the PTB tokenizer "
                                f"(pycocoevalcap) need it: {JAVA_HINT}")
    return java


def one_line(text: str) -> str:
    """``text`` with line breaks turned into spaces (the tools read one sentence per line)."""
    return _LINE_BREAKS.sub(" ", text)


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """PTB-tokenised, lower-cased, punctuation-free form of each string (space-joined tokens)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    require_java()
    captions = {i: [{"caption": one_line(t)}] for i, t in enumerate(texts)}
    tokenized = PTBTokenizer().tokenize(captions)
    if len(tokenized) != len(texts):  # a lost line would silently misalign every score after it
        raise RuntimeError(f"PTB tokenizer returned {len(tokenized)} lines for {len(texts)} sentences")
    return [tokenized[i][0] for i in range(len(texts))]


class MeteorScorer:
    """METEOR 1.5 (``-l en -norm``) over a running Java process.

    with MeteorScorer() as meteor:
        meteor.score(["a hypothesis"], [["a reference", "another reference"]])  -> float in [0, 1]

    The corpus score is METEOR's own aggregate over the per-sentence statistics (the best-scoring reference
    of each sentence), the number COCOEvalCap and the METEOR jar's file mode both report.
    """

    def __init__(self):
        self._meteor = None

    def __enter__(self) -> "MeteorScorer":
        from pycocoevalcap.meteor.meteor import Meteor

        require_java()
        self._meteor = Meteor()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the Java process (idempotent)."""
        if self._meteor is None:
            return
        proc = self._meteor.meteor_p
        if self._meteor.lock.locked():  # an error mid-score left it held; pycocoevalcap's __del__ takes it
            self._meteor.lock.release()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
        proc.kill()
        proc.wait()
        self._meteor = None

    def score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]],
              keep_empty: bool = False) -> float:
        """Corpus METEOR of ``hypotheses[i]`` against ``references[i]`` (its empty strings dropped unless
        ``keep_empty``: they score 0 and METEOR keeps each sentence's best reference)."""
        if self._meteor is None:
            raise RuntimeError("MeteorScorer is not running: use it inside `with MeteorScorer() as m:`")
        if len(hypotheses) != len(references):
            raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} reference lists")
        # '|||' separates fields in METEOR's protocol; pycocoevalcap strips it from hypotheses only
        refs = {i: [one_line(r).replace("|||", " ") for r in rs if keep_empty or r.strip()]
                for i, rs in enumerate(references)}
        hyps = {i: [one_line(h)] for i, h in enumerate(hypotheses)}
        if self._meteor.meteor_p.poll() is not None:
            raise RuntimeError(f"the METEOR Java process exited (code {self._meteor.meteor_p.returncode})")
        score, _ = self._meteor.compute_score(refs, hyps)
        return float(score)
