"""A code-instruction set in CodeFeedback-Filtered-Instruction's file format, built offline from the Python
standard library's own functions and docstrings (issue 7 §5).

    python data/make_code_instruct.py --output_dir data/stdlib-code

writes data/stdlib-code/codefeedback.jsonl, lines {"query", "answer"} as CodeFeedback's: the query asks for a
function with the given signature that does what its docstring says, the answer gives the standard library's
implementation in a ```python block. Only module-level functions written in Python with a docstring and at
most --max_lines lines of source are kept, from the pure-Python modules listed in MODULES; private names
(leading underscore) and anything that is not plain text are skipped. Nothing here comes from HumanEval: the
set is for checking that a short LoRA / LoRA-Pro fine-tune moves HumanEval pass@1 through the same pipeline
that scores the paper's CodeFeedback runs, not for reproducing the paper's number.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import os
import random
import sys
import textwrap
from pathlib import Path

MODULES = ("base64", "bisect", "calendar", "colorsys", "copy", "csv", "dataclasses", "difflib", "fnmatch",
           "fractions", "ftplib", "functools", "genericpath", "getopt", "glob", "gzip", "heapq", "html",
           "ipaddress", "json.decoder", "json.encoder", "keyword", "linecache", "locale", "mimetypes", "ntpath",
           "numbers", "operator", "optparse", "os", "pathlib", "pickle", "platform", "posixpath", "pprint",
           "quopri", "random", "re", "reprlib", "sched", "secrets", "shlex", "shutil", "statistics", "string",
           "tarfile", "tempfile", "textwrap", "tokenize", "traceback", "types", "typing", "urllib.parse",
           "uuid", "warnings", "wave", "weakref", "zipfile")


def _functions(module_name: str):
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a module missing on this platform or Python version: skip it
        return
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if name.startswith("_") or getattr(fn, "__module__", None) != module.__name__:
            continue
        yield module_name, name, fn


def _example(module_name: str, name: str, fn, max_lines: int):
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        signature = str(inspect.signature(fn))
        definition = ast.parse(source).body[0]
    except (OSError, TypeError, ValueError, SyntaxError):
        return None
    # the docstring written in the source (a __doc__ assigned elsewhere would not be in the answer)
    doc = ast.get_docstring(definition) if isinstance(definition, ast.FunctionDef) else None
    if not doc or len(doc) < 20:
        return None
    if len(source.splitlines()) > max_lines or not source.isascii() or source.lstrip().startswith("@"):
        return None
    query = (f"Write a Python function `{name}{signature}` (as in the `{module_name}` module) that does the "
             f"following:\n\n{doc}")
    answer = f"Here is an implementation of `{name}`:\n\n```python\n{source.rstrip()}\n```"
    return {"query": query, "answer": answer, "source": f"{module_name}.{name}"}


def build(max_lines: int = 40, seed: int = 0) -> list[dict]:
    rows, seen = [], set()
    for module_name in MODULES:
        for mod, name, fn in _functions(module_name):
            row = _example(mod, name, fn, max_lines)
            if row is not None and row["answer"] not in seen:
                seen.add(row["answer"])
                rows.append(row)
    random.Random(seed).shuffle(rows)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="data/stdlib-code")
    parser.add_argument("--max_lines", type=int, default=40, help="longest function source kept, in lines")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_lines < 2:
        parser.error("--max_lines must be at least 2")
    rows = build(args.max_lines, args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "codefeedback.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    print(f"{path}: {len(rows)} functions from {len(MODULES)} standard-library modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
