"""The instruction tasks' evaluation, on rank 0 (generation is not sharded): GSM8K accuracy and HumanEval pass@1
our way and the released scripts' way (evaluation mode "both" | "ours" | "released"), MT-Bench answers for
FastChat's llm_judge; and the evaluation of a saved adapter (lorapro/evaluate.py).

    p = prepare_evaluation(spec)        # spec.method None, spec.lora_path: our adapter folder or PEFT's
    execute(p)                          # loralib.tasks.instruct.run.execute: eval_results.json + predictions
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn as nn

from ...config import LoRAConfig
from ...files import read_json, write_jsonl_atomic
from ...train.run import rank
from .run import InstructRun, Prepared, autocast_for, load_eval_records, load_model

logger = logging.getLogger("loralib.instruct")


def prepare_evaluation(spec: InstructRun) -> Prepared:
    """The base model (+ the adapter folder spec.lora_path: ours or PEFT's) and the test records."""
    from ...adapters import ADAPTER_CONFIG, import_peft, load_adapter, read_adapter_config
    from ...models.loading import load_tokenizer, read_config

    read_config(spec.model_path)  # a folder without a readable config.json fails here, before any weight is read
    lora, peft, record = None, False, {}
    if spec.lora_path:
        folder = Path(spec.lora_path)
        config_file = folder / ADAPTER_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"--lora_path {spec.lora_path!r}: no {ADAPTER_CONFIG} there")
        raw = json.loads(config_file.read_text())
        peft = "peft_type" in raw
        if peft:
            # The run's record; the layers themselves are made by import_peft, each with its own rank and
            # alpha (rank_pattern / alpha_pattern: an exported AdaLoRA or LoRA² adapter has several ranks).
            targets = raw.get("target_modules") or ()
            lora = LoRAConfig(r=int(raw["r"]), lora_alpha=float(raw["lora_alpha"]),
                              target_modules=targets if isinstance(targets, str) else tuple(targets),
                              use_rslora=bool(raw.get("use_rslora", False)), use_dora=bool(raw.get("use_dora")))
        else:
            meta = read_adapter_config(folder)
            lora = LoRAConfig.from_dict(meta["lora"]) if meta.get("lora") else None
        for candidate in (folder / "run_config.json", folder.parent / "run_config.json"):
            if candidate.is_file():
                record = json.loads(candidate.read_text())
                break
    tokenizer = load_tokenizer(spec.model_path)
    e = spec.evaluation
    records = load_eval_records(e.task, e.path, e.max_samples)
    model = load_model(spec.model_path, None if peft else lora, spec.run.precision)
    if spec.lora_path:
        import_peft(model, spec.lora_path) if peft else load_adapter(model, spec.lora_path)
    name = record.get("method") or ("lora" if spec.lora_path else "base")
    return Prepared(spec, model, tokenizer, name, lora, eval_records=records)



def evaluate(p: Prepared) -> dict:
    """The task's evaluation on rank 0 (generation is not sharded): writes the per-example file and returns
    eval_results.json's record (the skeleton writes it). Other ranks return {}."""
    if rank() != 0:
        return {}
    from . import generate_mtbench_answers, write_mtbench_answers

    s, e = p.spec, p.spec.evaluation
    model = p.model.eval()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    gen = dict(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, template=s.data.template)
    p.output_dir.mkdir(parents=True, exist_ok=True)
    rows = rows_released = None
    with autocast_for(device, model):
        if e.task in ("gsm8k", "humaneval"):
            record, rows, rows_released = _evaluate_modes(p, model, device, gen)
        else:
            model_id = f"{Path(s.model_name_or_path).name}-{p.method_name}-seed{s.run.seed}"
            answers = generate_mtbench_answers(model, p.tokenizer, p.eval_records, **gen)
            answers_file = p.output_dir / "mtbench_answers.jsonl"
            write_mtbench_answers(answers_file, answers, model_id)
            record = {"task": "mt-bench", "split": "test", "num_examples": len(p.eval_records),
                      "answers_file": str(answers_file), "model_id": model_id,
                      "judge": "score with FastChat's llm_judge (gen_judgment.py, GPT-4)"}
    if rows is not None:
        write_jsonl_atomic(p.output_dir / "predictions.jsonl", rows)
    if rows_released is not None:
        write_jsonl_atomic(p.output_dir / "predictions_released.jsonl", rows_released)
    logger.info("eval %s: %s", e.task, record)
    return record


def _evaluate_modes(p: Prepared, model: nn.Module, device: torch.device, gen: dict):
    """GSM8K / HumanEval in the evaluation's modes: (eval_results record, our rows, released rows).
    Ours: "accuracy" / "pass@1", greedy; released: "accuracy_released" / "pass@1_released" with the released
    scripts' prompt, extraction / post-processing and decoding (sampling seeded with the run's seed when the
    model folder's generation_config.json sets do_sample, as transformers' generate did there)."""
    from . import evaluate_gsm8k, evaluate_humaneval
    from .prompts import released_decoding

    task, mode = p.spec.evaluation.task, p.spec.evaluation.mode
    metric = "accuracy" if task == "gsm8k" else "pass@1"
    run_one = evaluate_gsm8k if task == "gsm8k" else \
        (lambda *args, **kw: evaluate_humaneval(*args, n_samples=1, k=(1,), **kw))  # noqa: E731
    record: Dict[str, Any] = {"task": task, "split": "test"}
    rows = rows_released = None
    if mode in ("both", "ours"):
        metrics, rows = _split_rows(run_one(model, p.tokenizer, p.eval_records, **gen))
        record.update(num_examples=metrics["num_examples"], **{metric: metrics[metric]})
    if mode in ("both", "released"):
        config_file = Path(p.spec.model_path) / "generation_config.json"
        decoding = released_decoding(read_json(config_file, str(config_file)) if config_file.is_file() else None)
        if decoding["do_sample"]:
            decoding["generator"] = torch.Generator(device=device).manual_seed(p.spec.run.seed)
        logger.info("released %s evaluation, decoding %s", task,
                    {k: v for k, v in decoding.items() if k != "generator"})
        metrics, rows_released = _split_rows(run_one(model, p.tokenizer, p.eval_records, mode="released",
                                                     **gen, **decoding))
        record.update(num_examples=metrics["num_examples"], **{f"{metric}_released": metrics[metric]})
    return record, rows, rows_released


def _split_rows(result):
    """(metrics, per-example rows) from an evaluate_* result: a (metrics, rows) pair, or a dict whose list
    value (the per-example records) is split off."""
    if isinstance(result, tuple):
        return result[0], list(result[1])
    lists = [k for k, v in result.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    metrics = {k: v for k, v in result.items() if k not in lists}
    return metrics, (result[lists[0]] if lists else None)
