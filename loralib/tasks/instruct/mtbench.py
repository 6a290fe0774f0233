"""MT-Bench: questions in, answers out, in the files of FastChat's llm_judge; the judging is FastChat's.

    questions = load_mtbench_questions("fastchat/llm_judge/data/mt_bench/question.jsonl")
    answers = generate_mtbench_answers(model, tokenizer, questions)       # [{"question_id", "turns": [a1, a2]}]
    write_mtbench_answers("fastchat/llm_judge/data/mt_bench/model_answer/<model_id>.jsonl", answers, model_id)

question.jsonl, one JSON object a line: {"question_id": 81, "category": "writing", "turns": [q1, q2],
"reference": [...] (math/reasoning/coding only)}.
model_answer/<model_id>.jsonl, one a line, sorted by question_id (as FastChat's gen_model_answer writes it):
{"question_id": 81, "answer_id": "<random id>", "model_id": "<model_id>",
 "choices": [{"index": 0, "turns": [a1, a2]}], "tstamp": <unix time>}.

Judging (GPT-4 as judge, needs OPENAI_API_KEY and `pip install "fschat[model_worker,llm_judge]"`), from
FastChat's fastchat/llm_judge folder with the answer file under data/mt_bench/model_answer/:
    python gen_judgment.py --model-list <model_id> --parallel 2      # single-answer grading, judge gpt-4
    python show_result.py --model-list <model_id>                    # the MT-Bench score (1-10)

Decoding here is greedy unless generate kwargs say otherwise (FastChat samples with a per-category
temperature); the second turn sees the first question and the model's first answer.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Mapping, Sequence

from ...files import write_jsonl_atomic
from .data import DataError
from .generate import generate_texts
from .prompts import ALPACA_PROMPT, TEMPLATES, render_chat, require_chat_template

# A later turn under the alpaca template: the earlier exchange, then the same Instruction/Response layout.
ALPACA_NEXT_TURN = "\n\n### Instruction:\n{query}\n\n### Response:\n"


def load_mtbench_questions(path: str | os.PathLike) -> list[dict]:
    """The questions of a FastChat question.jsonl: [{"question_id", "category", "turns": [str, ...], ...}]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    questions, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(q, dict) or "question_id" not in q or "turns" not in q:
                raise DataError(f"{path}:{line_no}: a question needs 'question_id' and 'turns'")
            turns = q["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise DataError(f"{path}:{line_no}: 'turns' must be a non-empty list of strings")
            if q["question_id"] in seen:
                raise DataError(f"{path}:{line_no}: question_id {q['question_id']!r} appears twice")
            seen.add(q["question_id"])
            questions.append(q)
    if not questions:
        raise DataError(f"{path}:1: no questions")
    return questions


def _as_answer_list(answers) -> list[tuple[object, list[str]]]:
    if isinstance(answers, Mapping):  # question_id -> turns
        items = list(answers.items())
    else:
        items = [(a["question_id"], a["turns"]) for a in answers]
    for qid, turns in items:
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"answer to question {qid!r}: turns must be a list of strings")
    return items


def write_mtbench_answers(path: str | os.PathLike, answers, model_id: str) -> Path:
    """Write answers ([{"question_id", "turns"}] or {question_id: turns}) as a FastChat model_answer file,
    atomically (a temp file, then os.replace)."""
    if not model_id or not isinstance(model_id, str):
        raise ValueError("model_id must be a non-empty string")
    items = sorted(_as_answer_list(answers), key=lambda item: item[0])
    rows = ({"question_id": qid, "answer_id": secrets.token_urlsafe(16), "model_id": model_id,
             "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()} for qid, turns in items)
    return write_jsonl_atomic(path, rows)


def generate_mtbench_answers(model, tokenizer, questions: Sequence[dict], template: str = "alpaca",
                             max_new_tokens: int = 1024, batch_size: int = 8, **generate_kwargs) -> list[dict]:
    """Answer every turn of every question, turn by turn (all questions' turn t in one batched pass).
    Returns [{"question_id", "turns": [answer per turn]}] in the order of `questions`."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q["turns"]) for q in questions)):
        active = [i for i, q in enumerate(questions) if turn < len(q["turns"])]
        prompts = [_conversation_prompt(questions[i]["turns"][:turn + 1], answers[i], tokenizer, template)
                   for i in active]
        texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               add_special_tokens=template == "alpaca", **generate_kwargs)
        for i, text in zip(active, texts):
            answers[i].append(text.strip())
    return [{"question_id": q["question_id"], "turns": a} for q, a in zip(questions, answers)]


def _conversation_prompt(queries: list[str], replies: list[str], tokenizer, template: str) -> str:
    """The prompt for the last of `queries`, given the replies to the earlier ones."""
    if template == "chat":
        require_chat_template(tokenizer)
        messages = []
        for q, a in zip(queries, replies):
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": queries[-1]})
        return render_chat(tokenizer, messages, generation_prompt=True)
    text = ALPACA_PROMPT.format(query=queries[0])
    for q, a in zip(queries[1:], replies):
        text += " " + a + ALPACA_NEXT_TURN.format(query=q)
    return text
