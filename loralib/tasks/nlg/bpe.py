"""GPT-2's byte-level BPE, read from any of the three forms its vocabulary ships in, run by tiktoken.

    bpe = GPT2BPE.from_path("vocab")             # encoder.json + vocab.bpe (the LoRA repo's vocab/ folder)
    bpe = GPT2BPE.from_path("gpt2.tiktoken")     # tiktoken's file: one "base64(token) rank" a line
    bpe = GPT2BPE.from_path("models/gpt2")       # a Hugging Face folder with tokenizer.json
    bpe.encode("Hello world") == [15496, 995];  bpe.decode([15496, 995]) == "Hello world"

Every form becomes the same table, token bytes -> id, for ids 0..50255; id 50256 is <|endoftext|>.
Ids are merge ranks in GPT-2 (token 256 + i is the i-th merge), which is what lets tiktoken apply the
merges by rank; a vocabulary where that does not hold is refused rather than silently mis-tokenised.

Text is encoded as ordinary text: a literal "<|endoftext|>" inside a string is split like any other
characters, as the original encoder.py did; the end-of-text id is appended by the callers that need it.
"""
from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Optional

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 50256
GPT2_VOCAB_SIZE = 50257
# GPT-2's pre-tokeniser (tiktoken's r50k_base / the original encoder.py): contractions, letters, digits,
# other symbols, each optionally led by one space; runs of whitespace otherwise.
GPT2_SPLIT_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


class VocabularyError(ValueError):
    """A vocabulary file that cannot be read, or that does not fit the model or the data."""


@lru_cache(maxsize=1)
def _byte_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by encoder.json and vocab.bpe: printable
    Latin-1 bytes map to themselves, the other 68 bytes to chr(256), chr(257), ... in byte order."""
    printable = [b for b in range(256)
                 if ord("!") <= b <= ord("~") or ord("¡") <= b <= ord("¬") or ord("®") <= b <= ord("ÿ")]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_byte() -> Dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


def _unicode_token_to_bytes(token: str, where: str) -> bytes:
    to_byte = _unicode_to_byte()
    try:
        return bytes(to_byte[c] for c in token)
    except KeyError as e:
        raise VocabularyError(f"{where}: token {token!r} has character {e.args[0]!r}, which is not in "
                              f"GPT-2's byte alphabet (not a byte-level BPE vocabulary?)") from None


def _ranks_from_token_ids(token_ids: Dict[str, int], merges: Iterable[tuple], where: str) -> Dict[bytes, int]:
    """encoder.json-style {unicode token: id} + ordered merges -> {token bytes: id}, checking that the ids
    are merge ranks (id of the i-th merge's result == 256 + i) so that tiktoken's rank order is GPT-2's."""
    ranks = {}
    for token, idx in token_ids.items():
        if token == EOS_TOKEN:
            continue
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise VocabularyError(f"{where}: token {token!r} has id {idx!r}, not a non-negative integer")
        ranks[_unicode_token_to_bytes(token, where)] = idx
    for i, (left, right) in enumerate(merges):
        merged = left + right
        if token_ids.get(merged) != 256 + i:
            raise VocabularyError(
                f"{where}: merge {i + 1} ({left!r} {right!r}) makes {merged!r} with id "
                f"{token_ids.get(merged)!r}, expected {256 + i}; the vocabulary and the merges do not match")
    return ranks


def _read_json(path: Path) -> dict:
    from .lines import read_utf8

    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise VocabularyError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _read_merges(path: Path) -> List[tuple]:
    from .lines import read_utf8

    merges = []
    for lineno, line in enumerate(read_utf8(path).splitlines(), 1):
        if lineno == 1 and line.startswith("#version"):
            continue
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise VocabularyError(f"{path}:{lineno}: a merge line holds two tokens, got {line!r}")
        merges.append(tuple(parts))
    return merges


def _ranks_from_encoder_json(folder: Path) -> Dict[bytes, int]:
    encoder, merges = folder / "encoder.json", folder / "vocab.bpe"
    for f in (encoder, merges):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (a GPT-2 vocab folder holds encoder.json and vocab.bpe)")
    token_ids = _read_json(encoder)
    if not isinstance(token_ids, dict):
        raise VocabularyError(f"{encoder}: expected a JSON object token -> id")
    return _ranks_from_token_ids(token_ids, _read_merges(merges), str(encoder))


def _ranks_from_tokenizer_json(path: Path) -> Dict[bytes, int]:
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise VocabularyError(f"{path}: not a BPE tokenizer.json (model.type must be 'BPE' with a vocab)")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return _ranks_from_token_ids(model["vocab"], merges, str(path))


def _ranks_from_tiktoken(path: Path) -> Dict[bytes, int]:
    ranks = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise VocabularyError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}") from None
    return ranks


class GPT2BPE:
    """GPT-2 byte-level BPE. `vocab_size` counts the ordinary tokens plus <|endoftext|> (50257 for GPT-2)."""

    def __init__(self, ranks: Dict[bytes, int], source: str = "<memory>"):
        try:
            import tiktoken
        except ImportError as e:  # an extra of the nlg install, imported only here
            raise ImportError("GPT2BPE needs tiktoken (pip install tiktoken==0.14.0, or loralib[nlg])") from e
        ids = sorted(ranks.values())
        if ids != list(range(len(ids))):
            raise VocabularyError(f"{source}: token ids are not 0..{len(ids) - 1} without gaps")
        self.source = source
        self.eos_id = len(ids)
        if self.eos_id != EOS_ID:
            # Our models and data use id 50256 for <|endoftext|>: another vocabulary would shift it.
            raise VocabularyError(f"{source}: {len(ids)} ordinary tokens, so <|endoftext|> would get id "
                                  f"{len(ids)}; GPT-2's vocabulary has {EOS_ID} (id {EOS_ID} = <|endoftext|>)")
        self.vocab_size = self.eos_id + 1
        self._enc = tiktoken.Encoding(name=f"gpt2-bpe:{source}", pat_str=GPT2_SPLIT_PATTERN,
                                      mergeable_ranks=ranks, special_tokens={EOS_TOKEN: self.eos_id})

    @classmethod
    def from_path(cls, path) -> "GPT2BPE":
        """A folder with encoder.json + vocab.bpe, or with tokenizer.json; a *.tiktoken file; a tokenizer.json."""
        path = Path(path)
        if path.is_dir():
            if (path / "encoder.json").exists() or (path / "vocab.bpe").exists():
                return cls(_ranks_from_encoder_json(path), str(path))
            if (path / "tokenizer.json").is_file():
                return cls(_ranks_from_tokenizer_json(path / "tokenizer.json"), str(path))
            raise FileNotFoundError(f"{path}: no encoder.json + vocab.bpe and no tokenizer.json in this folder")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GPT-2 vocabulary (a vocab/ folder, a *.tiktoken file "
                                    f"or a tokenizer.json)")
        if path.name.endswith(".json"):
            return cls(_ranks_from_tokenizer_json(path), str(path))
        return cls(_ranks_from_tiktoken(path), str(path))

    def encode(self, text: str) -> List[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; bytes that do not form UTF-8 become U+FFFD, as the original decoder did."""
        ids = list(ids)
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < self.vocab_size]
        if bad:
            raise VocabularyError(f"id {bad[0]!r} is outside this vocabulary (0..{self.vocab_size - 1})")
        return self._enc.decode(ids, errors="replace")

    def check_model(self, model_vocab_size: int, where: str = "the model") -> None:
        """Refuse a model whose embedding table does not have this vocabulary's size."""
        if model_vocab_size != self.vocab_size:
            raise VocabularyError(f"{self.source}: {self.vocab_size} tokens, but {where} has vocab_size "
                                  f"{model_vocab_size}; use the vocabulary the model was trained with")

    def __repr__(self) -> str:
        return f"GPT2BPE({self.source!r}, vocab_size={self.vocab_size})"


def check_ids(ids: Iterable[int], vocab_size: int, where: str) -> None:
    """Refuse token ids that do not index a vocabulary of `vocab_size` (`where` names the file:line)."""
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise VocabularyError(f"{where}: token id {i!r} is outside the vocabulary (0..{vocab_size - 1}); "
                                  f"was this file encoded with another vocabulary?")


def load_bpe(path: Optional[str]) -> GPT2BPE:
    """`path` or, when None, the offline copy .cache/gpt2-bpe/gpt2.tiktoken of this checkout (else of the
    working directory), where the Makefile puts it."""
    if path is None:
        rel = Path(".cache") / "gpt2-bpe" / "gpt2.tiktoken"
        candidates = [Path(__file__).resolve().parents[3] / rel, Path.cwd() / rel]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"no --vocab given and {candidates[0]} is missing (`make` fetches it; or pass "
                                    f"the LoRA repository's vocab/ folder or a tokenizer.json folder)")
        path = found[0]
    return GPT2BPE.from_path(path)
