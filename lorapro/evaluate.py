"""Evaluate a base model, or one of its adapters, on GSM8K, HumanEval or MT-Bench (answer generation).

    python lorapro/evaluate.py --eval_task gsm8k --eval_data_path data/instruct/gsm8k_test.jsonl \
        --model_name_or_path meta-llama/Llama-2-7b-hf --lora_path outputs/gsm8k/lora-pro/seed0/adapter \
        --output_dir outputs/gsm8k/lora-pro/seed0/eval
    python lorapro/evaluate.py --eval_task humaneval --lora_path .../peft_adapter --output_dir ...   # PEFT folder
    python lorapro/evaluate.py --eval_task mt-bench --eval_data_path data/mt_bench/question.jsonl ...

--lora_path: our adapter folder (adapter/, checkpoint-N/adapter) or a PEFT LoRA folder; none evaluates the base
model. Writes eval_results.json ({"task", "split": "test", "num_examples", "accuracy" | "pass@1" | "answers_file"}),
predictions.jsonl (or mtbench_answers.jsonl, for FastChat's llm_judge) and run_config.json if absent.
--eval_mode both (default) | ours | released: GSM8K and HumanEval also (or only) scored as LoRA-Pro's released
scripts did (their prompt, decoding, extraction / post-processing): "accuracy_released" / "pass@1_released" and
predictions_released.jsonl (lorapro/README.md, "Released vs corrected").
"""
import sys

from loralib.tasks.instruct import run


def main(argv=None) -> int:
    return run.main_evaluate(argv, prog="lorapro/evaluate.py")


if __name__ == "__main__":
    sys.exit(main())
