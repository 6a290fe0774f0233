"""Shared by the shell-script tests (test_scripts.py, test_nlg_scripts.py, test_lorapro_scripts.py): running a
script in a clean environment, a stand-in interpreter that records the command lines a script launches, and
reading those command lines back as flags."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Sequence, Tuple


def clean_env(steering_keys: Sequence[str], **extra) -> dict:
    """The caller's environment without the variables that steer the scripts, plus `extra` (as strings)."""
    env = {k: v for k, v in os.environ.items() if k not in steering_keys}
    env.update({"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(script: Path, *args: str, steering_keys: Sequence[str], timeout: float = 300,
               **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env=clean_env(steering_keys, **env), timeout=timeout)


def argv_recorder(folder: Path, answer_to_dash_c: str = "") -> Tuple[Path, Callable[[], List[List[str]]]]:
    """A stand-in interpreter at folder/python that appends its argv (NUL-separated, one run a line) to a log;
    with `answer_to_dash_c` it prints that for `python -c ...` instead of recording it. Returns the stub and
    a function giving the recorded argv lists."""
    log = folder / "argv.log"
    stub = folder / "python"
    dash_c = f'if [[ $1 == -c ]]; then echo {answer_to_dash_c}; exit 0; fi\n' if answer_to_dash_c else ""
    stub.write_text(f'#!/usr/bin/env bash\n{dash_c}printf "%s\\0" "$@" >> {log}\necho >> {log}\n')
    stub.chmod(0o755)

    def calls() -> List[List[str]]:
        if not log.exists():
            return []
        return [line.rstrip("\0").split("\0") for line in log.read_text().splitlines() if line]
    return stub, calls


def parse_flags(argv: Sequence[str]) -> dict:
    """--flag value / --flag (True) -> dict, a later flag overriding an earlier one, as argparse does."""
    flags, i = {}, 0
    while i < len(argv):
        assert argv[i].startswith("--"), f"stray argument {argv[i]!r} in {argv}"
        name = argv[i][2:]
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            flags[name], i = argv[i + 1], i + 2
        else:
            flags[name], i = True, i + 1
    return flags


def same_value(got, want) -> bool:
    """Flag values compared as numbers where both read as numbers ("2e-5" == "0.00002")."""
    if isinstance(want, bool) or isinstance(got, bool):
        return got == want
    try:
        return float(got) == float(want)
    except ValueError:
        return got == want
