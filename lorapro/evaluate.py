"""Evaluate a base model, or one of its adapters, on GSM8K, HumanEval or MT-Bench (answer generation).

    python lorapro/evaluate.py --eval_task gsm8k --eval_data_path data/instruct/gsm8k_test.jsonl \
        --model_name_or_path meta-llama/Llama-2-7b-hf --lora_path outputs/gsm8k/lora-pro/seed0/adapter \
        --output_dir outputs/gsm8k/lora-pro/seed0/eval
    python lorapro/evaluate.py --eval_task humaneval --lora_path .../peft_adapter --output_dir ...   # PEFT folder
    python lorapro/evaluate.py --eval_task mt-bench --eval_data_path data/mt_bench/question.jsonl ...

--lora_path: anything loralib.adapter_files.open_adapter reads - our adapter folder (adapter/), a lorapro/train.py
output folder (its adapter/, or an interrupted run's newest checkpoint), a loop checkpoint (checkpoint-<step>/), a
PEFT LoRA or AdaLoRA folder (peft_adapter/); none evaluates the base model. An adapter made for another model (a
RoBERTa one, say) is one error naming --lora_path, before the model is loaded; run_config.json records the "method"
of the run that made the adapter.
Writes eval_results.json ({"task", "split": "test", "num_examples", "accuracy" | "pass@1" | "answers_file"}),
predictions.jsonl (or mtbench_answers.jsonl, for FastChat's llm_judge) and run_config.json if absent.
--eval_mode both (default) | ours | released: GSM8K and HumanEval also (or only) scored as LoRA-Pro's released
scripts did (their prompt, decoding, extraction / post-processing): "accuracy_released" / "pass@1_released" and
predictions_released.jsonl (lorapro/README.md, "Released vs corrected"). Flags: lorapro/flags.py.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root, for lorapro.flags
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from lorapro import flags  # noqa: E402
from loralib.tasks.instruct import evaluation, run as instruct  # noqa: E402

PROG = "lorapro/evaluate.py"


def run(argv=None) -> dict:
    """Parse, load the model (+ adapter) and evaluate (errors propagate): {"eval": ...}."""
    return instruct.execute(evaluation.prepare_evaluation(flags.evaluation_spec(argv, PROG)))


def main(argv=None) -> int:
    return flags.exit_code(lambda: run(argv), PROG)


if __name__ == "__main__":
    sys.exit(main())
