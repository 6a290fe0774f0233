"""Reading NLG text files: UTF-8 errors that name file:line, and the line splitting of each official script.

Three ways of cutting a text into lines are in use, and each file must be cut as the script that reads it
cuts it, or the metrics see other sentences:
    e2e_lines       the E2E measure_scores.py (codecs.open + `for line in fh`, i.e. str.splitlines()): breaks
                    at \\n, \\r, \\r\\n and also at U+000B, U+000C, U+001C, U+001D, U+001E, U+0085, U+2028,
                    U+2029; every line is strip()ped.
    eval_py_lines   the LoRA repo's eval.py for WebNLG/DART (codecs.open(...).read().split('\\n'), like the
                    perl BLEU script's lines): breaks at \\n only, lines kept as they are. eval.py also keeps
                    the empty string after a file's final newline as one more sentence (its METEOR then fails
                    on the line-count mismatch and silently reports -1); that empty sentence is dropped here.
    universal_lines open()'s text mode (JSONL files, the original gpt2_decode.py's reads): \\n, \\r, \\r\\n.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

# Characters str.splitlines() breaks at besides \n and \r: the E2E script splits lines there too.
EXTRA_LINE_BREAKS = ("\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


class DataFormatError(ValueError):
    """Raw or converted data that does not have the expected shape; the message starts with file:line."""


def read_utf8(path, flag: str = "") -> str:
    """The text of `path`; bytes that are not UTF-8 are a DataFormatError naming file:line and the byte.
    `flag` names the command-line flag the file came from, for a missing file's message."""
    path = Path(path)
    if path.is_dir():
        raise DataFormatError(f"{path}: a folder, expected a file" + (f" ({flag})" if flag else ""))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" + (f" ({flag})" if flag else ""))
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise DataFormatError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); "
                              f"re-save the file as UTF-8") from None


def e2e_lines(text: str) -> List[str]:
    """The lines measure_scores.py reads from a file with this text: splitlines(), each stripped."""
    return [line.strip() for line in text.splitlines()]


def eval_py_lines(text: str) -> List[str]:
    """The lines eval.py reads (split at \\n only), without the empty one after a final newline."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def universal_lines(text: str) -> List[str]:
    """The lines open() in text mode yields (\\n, \\r and \\r\\n end a line), without their ends."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def parse_e2e_references(text: str, source: str = "<references>") -> List[List[str]]:
    """E2E references as measure_scores.py groups them: one reference a line, inputs separated by a blank
    line; a file without blank lines holds one reference per input. An empty group (a blank first line, or
    two blank lines in a row before more text or at the end) is refused as the official script refuses the
    file; the message names the line (counted as the official reader counts lines)."""
    groups: List[List[str]] = [[]]
    for lineno, line in enumerate(e2e_lines(text), 1):
        if line:
            groups[-1].append(line)
        else:
            if not groups[-1]:
                where = "a blank first line" if lineno == 1 else "two blank lines in a row"
                raise DataFormatError(f"{source}:{lineno}: {where} make an empty reference group (the E2E "
                                      f"measure_scores.py refuses the file too); separate inputs by one blank line")
            groups.append([])
    if not groups[-1]:
        groups.pop()
    if not groups:
        raise DataFormatError(f"{source}: no references found")
    if len(groups) == 1:
        return [[line] for line in groups[0]]
    return groups


def first_extra_break(text: str, source: str) -> str:
    """'file:line: U+XXXX' for the first \\n-counted line that holds a character the E2E script also
    breaks lines at (so it reads that line as two), or "": a hint when line counts disagree."""
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line[:-1] if line.endswith("\r") else line  # \r\n is one line end everywhere
        breaks = [c for c in line if c in EXTRA_LINE_BREAKS or c == "\r"]
        if breaks:
            return f"{source}:{lineno}: U+{ord(breaks[0]):04X}"
    return ""
