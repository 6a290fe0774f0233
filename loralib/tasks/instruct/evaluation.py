"""The instruction tasks' evaluation, on rank 0 (generation is not sharded): GSM8K accuracy and HumanEval pass@1
our way and the released scripts' way (evaluation mode "both" | "ours" | "released"), MT-Bench answers for
FastChat's llm_judge; and the evaluation of a saved adapter (lorapro/evaluate.py).

    p = prepare_evaluation(spec)        # spec.method None, spec.lora_path: any adapter open_adapter reads
    execute(p)                          # loralib.tasks.instruct.run.execute: eval_results.json + predictions
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ...adapter_files import AdapterError, AdapterSource, open_flagged
from ...adapters import load_adapter_source
from ...config import LoRAConfig
from ...files import read_json, write_jsonl_atomic
from ...train.run import rank
from .run import InstructRun, Prepared, autocast_for, load_eval_records, load_model

logger = logging.getLogger("loralib.instruct")
FLAG = "--lora_path"


def prepare_evaluation(spec: InstructRun) -> Prepared:
    """The base model (+ the adapter spec.lora_path names, any format loralib.adapter_files.open_adapter
    recognises) and the test records. An adapter made for another model is refused before the model is built."""
    from ...models.loading import load_tokenizer, read_config

    hf_config = read_config(spec.model_path)  # a folder without a readable config.json fails here, before any weight
    source = open_lora_path(spec.lora_path, hf_config) if spec.lora_path else None
    tokenizer = load_tokenizer(spec.model_path)
    e = spec.evaluation
    records = load_eval_records(e.task, e.path, e.max_samples)
    model = load_model(spec.model_path, source.lora_to_build if source else None, spec.run.precision)
    if source:
        _load_into(model, source)
    made_by = (source.run_config or {}) if source else {}  # the run that made the adapter: its method is recorded
    name = made_by.get("method") or ("lora" if source else "base")
    return Prepared(spec, model, tokenizer, name, _recorded_lora(source), eval_records=records)


def _recorded_lora(source: Optional[AdapterSource]) -> Optional[LoRAConfig]:
    """The LoRAConfig run_config.json records: the adapter's; for a PEFT folder with the folder's own
    target_modules (the names the run adapted, not every module path the opener lists)."""
    targets = source.config.get("target_modules") if source is not None and source.format == "peft" else None
    if not targets:
        return source.lora if source is not None else None
    return source.lora.replace(target_modules=targets if isinstance(targets, str) else tuple(targets))


def open_lora_path(path: str, hf_config: dict) -> AdapterSource:
    """--lora_path opened (our adapter folder, a run's output folder or its checkpoint-<step>/, a PEFT LoRA /
    AdaLoRA folder, a released file) and checked against the model config.json describes, before any weight is
    read: its family (when the adapter records one), then every adapted module's path, on the meta device."""
    from ...models.loading import build_model

    source = open_flagged(path, FLAG)
    source.check_family(hf_config.get("model_type"), FLAG)
    if source.format in ("loralib", "peft"):  # the released files' family is always known
        with torch.device("meta"):
            modules = dict(build_model(hf_config, "causal-lm").named_modules())
        missing = [key for key in source.lora_keys if key.rsplit(".", 1)[0] not in modules]
        if missing:
            raise AdapterError(f"{FLAG} {path!r}: {source.weights}: key {missing[0]!r} names no module of this "
                               f"{hf_config.get('model_type')} model; the adapter was made for another model")
    return source


def _load_into(model: nn.Module, source: AdapterSource) -> None:
    """load_adapter_source (all or nothing), an adapter that does not fit named as --lora_path's (an
    AdapterError's message starts with its file)."""
    try:
        load_adapter_source(model, source)
    except ValueError as err:  # AdapterError included; also e.g. target_modules that name no module
        kind = AdapterError if isinstance(err, AdapterError) else ValueError
        raise kind(f"{FLAG} {str(source.given or source.path)!r}: {err}") from None


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
