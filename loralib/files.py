"""Whole-or-nothing text files: every run output (run_config.json, eval_results.json, predictions, answer
files) is written to a temporary file beside its final name and renamed over it, so a crash or a full disk
leaves the previous file, or none, never half of one. And the one JSON reader whose errors name the file."""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Union

PathLike = Union[str, os.PathLike]


def read_json(path: PathLike, missing: str, error: type = ValueError) -> Any:
    """The JSON document of `path`: FileNotFoundError(missing) when there is no such file, `error` naming the
    file and the position when it is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise error(not_utf8(path)) from None


def not_utf8(path: PathLike) -> str:
    """"FILE:LINE: not UTF-8 text ..." for the first line of `path` (.gz read through gzip) that does not
    decode. Text readers decode in chunks, so their UnicodeDecodeError names no line: it is found again here."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"{path}:{line_no}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at column "
                        f"{e.start + 1}); re-encode the file as UTF-8")
    return f"{path}: not UTF-8 text; re-encode the file as UTF-8"


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path`, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: PathLike, obj: Any, sort_keys: bool = False) -> Path:
    """One JSON document, indented; values JSON cannot hold (paths, dtypes) are written as str()."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def write_jsonl_atomic(path: PathLike, rows: Iterable[Any]) -> Path:
    """JSON Lines: one object a line, non-ASCII text kept as is."""
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
