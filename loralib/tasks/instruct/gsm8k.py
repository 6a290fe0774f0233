r"""GSM8K: the number a generated solution ends on, exact-match accuracy, and the evaluation loop.

    extract_gsm8k_answer("... #### 1,234.50")      # -> "1234.5"
    gsm8k_accuracy(["18", "3"], ["18", "4"])       # -> 0.5
    evaluate_gsm8k(model, tokenizer, load_records("gsm8k", path))  # {"accuracy", "num_examples", "records"}

Which number is the answer, first rule that applies:
  1. the first number after the last "####" (GSM8K's own format; LoRA-Pro's rule);
  2. the first number after the last "The answer is" (MetaMathQA responses end "The answer is: 18", and a
     model trained on them answers so; LoRA-Pro trains on the full response);
  3. the last number anywhere in the text (a fallback; a text without any number -> None).
Numbers are normalised before comparing: "$", thousands separators and a trailing period go, a minus sign
stays, trailing decimal zeros go ("3.50" == "3.5", "18.0" == "18"). Fractions "1/2" are not evaluated.

`mode="released"`: LoRA-Pro's released script (evaluation/eval_llama-2_math_multi_gpus.py, commit 26d4093 of
github.com/mrflogs/LoRA-Pro) instead: its prompt (ours + a trailing space), its decoding
(prompts.released_decoding) and its extraction `extract_gsm8k_answer_released`: the digits right after the
FIRST "####" (`####\s*(\d+)`) of the decoded prompt + generation, as an int; no match -> 0. So "#### -5" and a
text without "####" both score 0 (and match a reference of 0), "#### 1,234" is 1 and "#### 3.5" is 3; the
reference goes through the same rule. Ours scores at least as high on the same outputs but where the released
0 matches.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Sequence

from .generate import generate_texts
from .prompts import RELEASED_GSM8K_PROMPT, check_eval_mode, format_prompt

# A minus sign (not one between two terms: "20-3" is not -3), an optional "$", then digits with optional
# thousands groups ("1,234") and decimals ("3.50"), or a bare decimal (".5").
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\$?-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)
_RELEASED_ANSWER = re.compile(r"####\s*(\d+)")


def normalize_number(text: str) -> str | None:
    """"$1,234.50" -> "1234.5", "-7." -> "-7", "18.00" -> "18"; None when it is not a number."""
    s = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return normalize_number(match.group()) if match else None


def extract_gsm8k_answer(text: str) -> str | None:
    """The answer number of a generated or reference solution, normalised (see the module docstring)."""
    if "####" in text:
        found = _first_number(text.rsplit("####", 1)[1])
        if found is not None:
            return found
    answer_is = list(_ANSWER_IS.finditer(text))
    if answer_is:
        found = _first_number(text[answer_is[-1].end():])
        if found is not None:
            return found
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def extract_gsm8k_answer_released(text: str) -> int:
    """The released rule: int of the digits after the first "####" (and optional white space); 0 without one."""
    match = _RELEASED_ANSWER.search(text)
    return int(match.group(1)) if match else 0


def gsm8k_accuracy_released(texts: Sequence[str], references: Sequence[str]) -> float:
    """The released score: the fraction of texts whose released answer equals that of the reference solution."""
    if len(texts) != len(references):
        raise ValueError(f"{len(texts)} outputs for {len(references)} references")
    if not references:
        raise ValueError("no references to score")
    return sum(extract_gsm8k_answer_released(t) == extract_gsm8k_answer_released(r)
               for t, r in zip(texts, references)) / len(references)


def gsm8k_accuracy(predictions: Sequence[str | None], targets: Sequence[str]) -> float:
    """Fraction of predictions equal to their target number after normalisation (None never matches)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        raise ValueError("no targets to score")
    correct = 0
    for pred, target in zip(predictions, targets):
        want = normalize_number(str(target))
        got = None if pred is None else normalize_number(str(pred))
        correct += int(got is not None and got == want)
    return correct / len(targets)


def evaluate_gsm8k(model, tokenizer, records: Sequence[dict], max_new_tokens: int = 512, batch_size: int = 16,
                   template: str = "alpaca", limit: int | None = None, mode: str = "ours",
                   **generate_kwargs) -> dict:
    """Answers to GSM8K test questions (records from load_records("gsm8k", ...)), greedy unless
    generate_kwargs say otherwise.

    Returns {"accuracy": fraction, "num_examples": n, "records": [{"query", "target", "generation",
    "prediction", "correct"}]}. mode "ours": the training template (alpaca as in LoRA-Pro, or chat) and
    extract_gsm8k_answer; "released": the released prompt (template ignored) and extraction, applied to
    prompt + generation as the released script decoded the whole sequence (pass its decoding,
    prompts.released_decoding, in generate_kwargs).
    """
    check_eval_mode(mode)
    records = list(records[:limit] if limit else records)
    if not records:
        raise ValueError("no GSM8K records to evaluate")
    released = mode == "released"
    prompts = [RELEASED_GSM8K_PROMPT.format(query=r["query"]) if released
               else format_prompt(r["query"], tokenizer, template) for r in records]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           add_special_tokens=released or template == "alpaca", **generate_kwargs)
    if released:
        predictions = [extract_gsm8k_answer_released(prompt + text) for prompt, text in zip(prompts, texts)]
        targets = [extract_gsm8k_answer_released(r["answer"]) for r in records]
        per_example = [{"query": r["query"], "target": target, "generation": t, "prediction": p, "correct": p == target}
                       for r, t, p, target in zip(records, texts, predictions, targets)]
        return {"accuracy": sum(row["correct"] for row in per_example) / len(records), "num_examples": len(records),
                "records": per_example}
    predictions = [extract_gsm8k_answer(t) for t in texts]
    targets = [r["target"] for r in records]
    per_example = [{"query": r["query"], "target": r["target"], "generation": t, "prediction": p,
                    "correct": p is not None and p == normalize_number(r["target"])}
                   for r, t, p in zip(records, texts, predictions)]
    return {"accuracy": gsm8k_accuracy(predictions, targets), "num_examples": len(records),
            "records": per_example}
