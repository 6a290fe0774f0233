"""Whole-or-nothing text files: every run output (run_config.json, eval_results.json, predictions, answer
files) is written to a temporary file beside its final name and renamed over it, so a crash or a full disk
leaves the previous file, or none, never half of one. And the one JSON reader whose errors name the file."""
from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Union

PathLike = Union[str, os.PathLike]


class DiskFullError(ValueError):
    """No space left (or quota exceeded) while writing: one line naming the path. A ValueError, so that every
    entry point prints it as one line; what was written atomically before is intact."""


_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def full_disk_named(path: PathLike):
    """Turn a full disk inside the block into DiskFullError naming the file (or `path` when the error names
    none). torch.save reports it as a RuntimeError without errno ("... file write failed"): named too."""
    try:
        yield
    except OSError as e:
        if e.errno not in _FULL or isinstance(e, DiskFullError):
            raise
        raise DiskFullError(f"{e.filename or path}: no space left on device (errno {errno.errorcode[e.errno]}) "
                            "while writing; free some space and resume from the last checkpoint") from None
    except RuntimeError as e:
        if "write failed" not in str(e) and "file write" not in str(e):
            raise
        raise DiskFullError(f"{path}: writing failed ({str(e).splitlines()[0][:120]}); is the disk full? Free "
                            "some space and resume from the last checkpoint") from None


def check_output_folder(path: PathLike, flag: str) -> None:
    """Refuse, before anything is written, an output folder that cannot be made or written: a file in its
    place or on its way, or a read-only folder (the nearest existing one when it is still to be made)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file, not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {str(existing)!r} on its way is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r}: {str(existing)!r} is not writable"
                         + (" (read-only)" if existing == path else f" (so {path.name!r} cannot be made in it)"))


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
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        with full_disk_named(path), os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def apply_umask(path: PathLike) -> None:
    """Give a file written through a private temporary (mkstemp, safetensors: 0600) the mode an ordinary new
    file gets (0666 less the umask), so results and adapters are shared like any other file."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask (read by setting it: there is no getter; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: PathLike, obj: Any, sort_keys: bool = False) -> Path:
    """One JSON document, indented; values JSON cannot hold (paths, dtypes) are written as str()."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def write_jsonl_atomic(path: PathLike, rows: Iterable[Any]) -> Path:
    """JSON Lines: one object a line, non-ASCII text kept as is."""
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
