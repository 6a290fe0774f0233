"""LoRA-Pro's released evaluation beside ours (issue 14, item 6): the released GSM8K rule on hand-made outputs,
the released HumanEval prompt byte for byte and its post-processing, both modes scored on the same generated
outputs, and lorapro/evaluate.py writing both scores (github.com/mrflogs/LoRA-Pro, evaluation/
eval_llama-2_math_multi_gpus.py at 26d4093, eval_llama-2_code_multi_gpus.py at 0ae2f42)."""
from __future__ import annotations

import json

import pytest

from loralib.tasks.instruct import evaluate_gsm8k, evaluate_humaneval, extract_gsm8k_answer
from loralib.tasks.instruct import gsm8k as gsm8k_module
from loralib.tasks.instruct import humaneval as humaneval_module
from loralib.tasks.instruct.gsm8k import extract_gsm8k_answer_released, gsm8k_accuracy_released
from loralib.tasks.instruct.humaneval import humaneval_prompt_released, postprocess_humaneval_released
from loralib.tasks.instruct.prompts import ALPACA_PROMPT, RELEASED_GSM8K_PROMPT, released_decoding


# -- GSM8K -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, released, ours", [
    ("3 + 4 = 7\n#### 7", 7, "7"),
    ("#### 1,234", 1, "1234"),              # commas: the released rule stops at the comma
    ("#### 3.50", 3, "3.5"),                # decimals: the integer part
    ("#### -12", 0, "-12"),                 # negatives: no digit right after "#### " -> no match -> 0
    ("She lost 5 dollars. The answer is: 5", 0, "5"),  # no "####": 0; ours reads "The answer is"
    ("first 12 then 30.", 0, "30"),         # no "####": 0; ours takes the last number
    ("####\n  42 and then #### 9", 42, "9"),  # the FIRST "####", white space (newlines too) skipped
    ("#### 0", 0, "0"),
    ("####", 0, None),
])
def test_released_gsm8k_rule_on_hand_made_outputs(text, released, ours):
    assert extract_gsm8k_answer_released(text) == released
    assert extract_gsm8k_answer(text) == ours


def test_both_gsm8k_modes_scored_on_the_same_outputs():
    references = ["... #### 1234", "... #### 18", "... #### -3", "... #### 7", "... #### 0", "... #### 2"]
    outputs = ["#### 1,234", "so it is 18.\nThe answer is: 18", "#### -3", "#### 7", "no idea", "#### 2.5"]
    # released: "1,234" -> 1 vs 1234 wrong; no "####" -> 0 wrong; -3 -> 0 == reference -3 -> 0 right (!);
    # 7 right; "no idea" -> 0 == reference 0 right (!); 2.5 -> 2 right
    assert gsm8k_accuracy_released(outputs, references) == pytest.approx(4 / 6)
    ours = [extract_gsm8k_answer(o) == extract_gsm8k_answer(r) for o, r in zip(outputs, references)]
    assert ours == [True, True, True, True, False, False]


def test_evaluate_gsm8k_released_mode(monkeypatch):
    records = [{"query": "q1", "answer": "2 + 5 = 7\n#### 7", "target": "7"},
               {"query": "q2", "answer": "#### 10", "target": "10"}]
    seen = {}

    def fake_generate_texts(model, tokenizer, prompts, **kwargs):
        seen["prompts"], seen["kwargs"] = prompts, kwargs
        return ["so 7\nThe answer is: 7", "#### 10.0"]

    monkeypatch.setattr(gsm8k_module, "generate_texts", fake_generate_texts)
    out = evaluate_gsm8k(None, None, records, max_new_tokens=512, batch_size=4, template="chat", mode="released",
                         do_sample=True, temperature=0.8, top_p=0.95)
    assert seen["prompts"] == [ALPACA_PROMPT.format(query=q) + " " for q in ("q1", "q2")]  # the trailing space
    assert seen["prompts"][0].endswith("### Response:\n ") and RELEASED_GSM8K_PROMPT.endswith("\n ")
    assert seen["kwargs"]["add_special_tokens"] and seen["kwargs"]["do_sample"]  # template ignored: Alpaca + <s>
    assert out["accuracy"] == 0.5 and [r["correct"] for r in out["records"]] == [False, True]
    assert [r["prediction"] for r in out["records"]] == [0, 10]
    ours = evaluate_gsm8k(None, None, records, template="alpaca")  # same generations, our rule
    assert ours["accuracy"] == 1.0
    with pytest.raises(ValueError, match="evaluation mode"):
        evaluate_gsm8k(None, None, records, mode="paper")


def test_released_decoding_follows_the_model_folders_generation_config():
    assert released_decoding(None) == {"do_sample": False}
    assert released_decoding({"do_sample": False, "temperature": 0.6}) == {"do_sample": False}
    assert released_decoding({"do_sample": True}) == {"do_sample": True, "top_k": 50, "temperature": 0.8,
                                                      "top_p": 0.95}
    assert released_decoding({"do_sample": True, "top_k": 0})["top_k"] == 0


# -- HumanEval ---------------------------------------------------------------------------------------

PROBLEM = {"task_id": "Test/0", "entry_point": "add",
           "prompt": 'def add(a, b):\n    """Add two numbers."""\n',
           "canonical_solution": "    return a + b\n",
           "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"}

RELEASED_PROMPT_OF_PROBLEM = (
    "Below is an instruction that describes a task.\n"
    " Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Complete the following Python code: \n"
    "Notes: respond with the entire complete function definition\n"
    "do not add any comments, be as concise in your code as possible\n"
    "use only built-in libraries, assume no additional imports other than those provided (if any)\n"
    "use `    ` (4 spaces) for each level of indentation\n"
    "\n"
    "code:\n"
    "```python\n"
    "def add(a, b):\n"
    '    """Add two numbers."""\n'
    "\n"
    "```\n"
    "\n"
    "### Response:\n"
    "```python\n"
    " ")


def test_released_humaneval_prompt_byte_for_byte():
    assert humaneval_prompt_released(PROBLEM).encode() == RELEASED_PROMPT_OF_PROBLEM.encode()


@pytest.mark.parametrize("generation, completion", [
    # the whole function, fenced, tab-indented, with a docstring and a blank line
    ('def add(a, b):\n\t"""Sum."""\n\n\treturn a + b\n```\n', "def add(a, b):\n    return a + b"),
    # odd indentation re-levelled from the def line
    ("def add(a, b):\n  if a:\n     return a + b\n  return b\n",
     "def add(a, b):\n    if a:\n        return a + b\n    return b"),
    # a body at column 0 stays there (no def line): the released completion then fails to run
    ("return a + b\n", "return a + b"),
    # "def" as a substring ("default") is the released def line
    ("    default = 0\n        return a + b", "default = 0\n    return a + b"),
    ("", ""),
])
def test_released_humaneval_postprocessing(generation, completion):
    assert postprocess_humaneval_released(humaneval_prompt_released(PROBLEM) + generation) == completion


def test_both_humaneval_modes_scored_on_the_same_generated_outputs(monkeypatch):
    """One generated text per problem, scored by both post-processings: a bare body at column 0 passes ours
    (indented into the stub) and fails the released one; a whole function passes both."""
    generated = iter([])
    seen = []

    def fake_generate_texts(model, tokenizer, prompts, **kwargs):
        seen.append((prompts, kwargs))
        return [next(generated) for _ in prompts]

    monkeypatch.setattr(humaneval_module, "generate_texts", fake_generate_texts)
    problems = [dict(PROBLEM, task_id="Test/0"), dict(PROBLEM, task_id="Test/1")]
    texts = ["return a + b\n", "def add(a, b):\n    return a + b\n```"]
    results = {}
    for mode in ("ours", "released"):
        generated = iter(texts)
        results[mode] = evaluate_humaneval(None, None, problems, mode=mode, n_workers=2, timeout=10.0)
    assert [r["passed"] for r in results["ours"]["records"]] == [True, True]
    assert [r["passed"] for r in results["released"]["records"]] == [False, True]
    assert results["ours"]["pass@1"] == 1.0 and results["released"]["pass@1"] == 0.5
    assert seen[1][0] == [humaneval_prompt_released(p) for p in problems]
    assert seen[1][1]["add_special_tokens"] is True


# -- lorapro/evaluate.py -----------------------------------------------------------------------------

def test_evaluate_py_writes_both_scores(tmp_path, monkeypatch):
    """The driver on the smoke assets (tiny random Llama): eval_results.json holds "accuracy" and
    "accuracy_released", each from its own generation, and the released rows go to predictions_released.jsonl."""
    from lorapro import evaluate as lorapro_evaluate
    from lorapro.smoke import build_smoke_assets

    assets = build_smoke_assets(tmp_path / "smoke")
    calls = []

    def fake_generate_texts(model, tokenizer, prompts, **kwargs):
        calls.append((list(prompts), kwargs))
        return ["The answer is: 5\n#### 5", "#### 8", "#### 2.0", "nothing"][:len(prompts)]

    monkeypatch.setattr(gsm8k_module, "generate_texts", fake_generate_texts)
    out = tmp_path / "eval"
    assert lorapro_evaluate.main(["--model_name_or_path", assets["model"], "--eval_task", "gsm8k", "--eval_data_path",
                              assets["gsm8k_test.jsonl"], "--output_dir", str(out), "--no-bf16",
                              "--max_new_tokens", "4"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    # targets 5, 8, 2, 7: ours 3 of 4 ("#### 2.0" is 2); released 3 of 4 ("2.0" -> 2; "nothing" -> 0 != 7)
    assert results == {"task": "gsm8k", "split": "test", "num_examples": 4, "accuracy": 0.75,
                       "accuracy_released": 0.75}
    assert [p.endswith("### Response:\n") for p in calls[0][0]] == [True] * 4
    assert [p.endswith("### Response:\n ") for p in calls[1][0]] == [True] * 4
    assert calls[1][1]["do_sample"] is False  # the tiny model's generation_config.json does not sample
    released_rows = [json.loads(line) for line in (out / "predictions_released.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in released_rows] == [5, 8, 2, 0]

    out2 = tmp_path / "eval2"
    assert lorapro_evaluate.main(["--model_name_or_path", assets["model"], "--eval_task", "gsm8k", "--eval_data_path",
                              assets["gsm8k_test.jsonl"], "--output_dir", str(out2), "--no-bf16",
                              "--max_new_tokens", "4", "--eval_mode", "released"]) == 0
    assert json.loads((out2 / "eval_results.json").read_text()) == {
        "task": "gsm8k", "split": "test", "num_examples": 4, "accuracy_released": 0.75}
    assert not (out2 / "predictions.jsonl").exists()
