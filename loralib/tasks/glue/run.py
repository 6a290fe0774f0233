"""The GLUE run behind every `run_glue.py`: a typed GlueRun -> model, data, training loop, evaluation, results
files. The entry points parse their paper's original flags (the shared ones: loralib.train.hf_flags) and build
the GlueRun, choosing the method with loralib.methods.make_method:

    examples/NLU/run_glue.py   LoRA paper: --apply_lora --lora_r --lora_alpha --lora_path ...
    lora2/run_glue.py          + AdaLoRA / LoRA²: --apply_adalora --lora_type svd --target_rank ...
    loraplus/run_glue.py       LoRA+: --loraplus_lr_ratio --target_modules --lora_rank ...

    spec = GlueRun(run=RunSpec(output_dir=Path("out/mrpc")), train=TrainConfig(...),
                   optimizer=OptimizerSettings(lr=4e-4),
                   model_name_or_path="roberta-base", task_name="mrpc", method=make_method("lora", lora_config))
    result = execute(prepare(spec))       # prepare checks and builds (writes nothing); execute runs the phases

What a run writes into its output_dir (nothing at all if the run is refused):
    run_config.json      the method, LoRA config, resolved model folder, label count (+ the entry point's record:
                         its flags under "args", "flavour", "recipe")
    metrics.jsonl        the loop's training log; checkpoint-<step>/, adapter/, best_adapter/ (loralib.train)
    train_results.json   steps, mean loss, best metric, and the optimizer's parameter groups (name, lr, sizes)
    rank_pattern.json    AdaLoRA / LoRA²: the final rank pattern (adalora_state), also in adapter/
    eval_results.json    {"task", "split", "num_examples", <metric>: value, ...}; MNLI adds the mismatched
                         evaluation under the key "mnli-mm" (same fields), as the original reports both.

Decisions (each one a place where the original scripts were silent, wrong or impossible here):
- model_name_or_path: a folder; else models/NAME (under the working directory, then the repository);
  else a download through loralib.models.hub (loralib.train.run.resolve_model_path).
- lora_path: any adapter loralib.adapter_files.open_adapter recognises (loralib.tasks.glue.adapter). Without a
  method the LoRA config is read from the adapter (r from the file, alpha = 2 r for microsoft's files; the
  recorded LoRAConfig for ours; PEFT's r and lora_alpha): `adapter_method`. A PEFT adapter's layers are its
  own (its rank_pattern / alpha_pattern), injected when it is loaded: the model is built without LoRA.
- cls_dropout is passed into the model config; fixed_cls_dropout (LoRA² under --recipe released: the released
  LoRA² run_glue.py hard-coded 0.15) wins over it, with a warning when they differ.
- lora_a_init "normal": lora_A drawn from N(0, initializer_range) (0.02), as microsoft/LoRA's DeBERTa fork
  did; B stays zero.
- An output_dir that holds files: training is refused without overwrite (which removes the previous run's
  outputs, only those) or resume_from (which continues it exactly); an evaluation-only run just replaces
  eval_results.json, and writes run_config.json too when the folder has none (so `loralib compare` knows the
  model and method); it never replaces a training run's.
- LoRA-Pro (method "lorapro", on LoRA's B A layers): its weight decay pulls s B A toward 0 and leaves W0 as
  loaded, because the adapter folders hold only the LoRA factors and the head; under DeepSpeed it runs as
  loralib.optim.deepspeed_lorapro says (full: weight decay refused). Every optimizer comes from
  loralib.methods.training_hooks.
- LoRA+ is recorded as method "lora" with its loraplus_lr_ratio, as run_config.json always had it (loralib
  compare counts that as loraplus).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ...adalora import adalora_state
from ...adapter_files import AdapterSource
from ...config import LoRAConfig
from ...files import write_json_atomic
from ...methods import AllocatorSchedule, Method, OptimizerSettings, make_method, rank_allocator
from ...models.grad_checkpoint import enable_gradient_checkpointing
from ...models.loading import check_targets
from ...train import run as skeleton
from ...train.distributed import zero_stage
from ...train.run import LOOP_OUTPUTS, RunSpec, Training, resolve_model_path
from ...utils import trainable_summary
from .adapter import check_fits, load_lora_path, open_lora_path
from .data import GlueData, get_task, load_glue
from .evaluate import eval_sets, evaluate_dev_sets, score
from .metrics import main_metric
from .model import (check_positions, grow_embeddings, head_overrides, load_pretrained, loraga_from_features,
                    mark_trainable, normal_lora_a, position_limit)
from .tokenize import GlueCollator, encode_examples, ensure_pad_token

logger = logging.getLogger("loralib.glue")

# what a GLUE training run leaves in output_dir (removed by overwrite, nothing else is)
GLUE_OUTPUTS = LOOP_OUTPUTS + ("run_config.json", "train_results.json", "rank_pattern.json", "eval_results.json")


def adapter_method(lora: LoRAConfig) -> Method:
    """The method an adapter's LoRAConfig implies when the flags chose none: its layer's (LoRA, AdaLoRA's SVD form,
    LoRA²), trained at fixed rank."""
    return make_method(lora.method if lora.method in ("adalora", "lora2") else "lora", lora, allocate=False)


@dataclass
class Allocation:
    """AdaLoRA's budget schedule in steps (loralib.methods.AllocatorSchedule less the run's total steps)."""

    init_warmup: int = 4500
    final_warmup: int = 12000
    mask_interval: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    target_total_rank: Optional[int] = None


@dataclass
class GlueRun:
    """One GLUE run. run: the skeleton's RunSpec; train: the loop's TrainConfig (metric_for_best None: the task's
    main metric); optimizer: the method's optimizer settings; method: None for full fine-tuning, or, with
    lora_path, the method adapter_method gives the adapter's LoRAConfig. record: what the entry point adds to
    run_config.json (its flags under "args", "flavour", "recipe")."""

    run: RunSpec
    train: Any
    optimizer: OptimizerSettings
    model_name_or_path: str
    task_name: str
    method: Optional[Method] = None
    adapter_method: Callable[[LoRAConfig], Method] = adapter_method
    data_dir: str = "data/"
    tokenizer_name: Optional[str] = None
    max_seq_length: int = 128
    pad_to_max_length: bool = False
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    eval_batch_size: int = 8
    lora_path: Optional[str] = None
    cls_dropout: Optional[float] = None
    fixed_cls_dropout: Optional[float] = None
    lora_a_init: str = "kaiming"               # "kaiming" (loralib's) | "normal" (N(0, initializer_range))
    loraga_batches: int = 8
    gradient_checkpointing: bool = False
    deterministic: bool = False                # torch.use_deterministic_algorithms
    frozen_head: Tuple[str, ...] = ()          # head parameters kept frozen (LoRA+'s script: classifier.dense.)
    allocation: Allocation = field(default_factory=Allocation)
    target_flag: str = "LoRA target"           # the flag named when a LoRA target matches no projection
    record: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.run.outputs = GLUE_OUTPUTS


@dataclass
class RunResult:
    output_dir: Path
    model: nn.Module
    eval_results: Optional[dict] = None
    train_results: Optional[dict] = None


@dataclass
class GlueTask:
    """A prepared run (everything built and checked, nothing written): the skeleton's RunTask for GLUE."""

    spec: GlueRun
    model_path: Path
    model: nn.Module
    tokenizer: Any
    method: Method
    num_labels: int
    train_features: Optional[List[dict]]
    dev: List[Tuple[GlueData, List[dict]]]
    adapter: Optional[AdapterSource] = None
    allocator: Any = None

    def __post_init__(self):
        self.collate = GlueCollator(self.tokenizer)

    def run_config(self) -> dict:
        s, m = self.spec, self.method
        t = s.train
        return {**s.record, "task": get_task(s.task_name).name, "method": m.name,
                "global_batch_size": t.per_device_batch_size * t.grad_accum_steps * skeleton.world_size(),
                "model_name_or_path": s.model_name_or_path, "model_path": str(self.model_path),
                "model_type": self.model.hf_config.get("model_type"), "num_labels": self.num_labels,
                "lora": m.lora.to_dict() if m.lora is not None else None, "loraplus_lr_ratio": m.loraplus_ratio,
                "precision": s.run.precision, "lora_path": s.lora_path,
                # the head dropout the model was built with (LoRA² as released fixes 0.15 whatever the flag says)
                "cls_dropout": self.model.hf_config.get("cls_dropout")}

    def training(self) -> Training:
        config = self.spec.train
        if config.eval_strategy != "no" and config.metric_for_best is None:
            config = dataclasses.replace(config, metric_for_best=main_metric(self.spec.task_name))
        eval_fn = None
        if config.eval_strategy != "no":
            data, features = self.dev[0]
            eval_fn = lambda m: score(m, data, features, self.collate, self.spec.eval_batch_size)  # noqa: E731
        return Training(self.model, self.train_features, self.collate, config, self.method, self.spec.optimizer,
                        eval_fn=eval_fn, allocator=self.allocator)

    def after_training(self, outcome, train_results: dict) -> None:
        if self.allocator is None:
            return
        state = adalora_state(self.model)
        write_json_atomic(self.spec.run.output_dir / "rank_pattern.json", state)
        write_json_atomic(Path(outcome.adapter_dir) / "rank_pattern.json", state)
        kept = sum(sum(v) for v in state["rank_pattern"].values())
        logger.info("final rank budget %d of %d", kept, sum(len(v) for v in state["rank_pattern"].values()))

    def evaluate(self) -> dict:
        return evaluate_dev_sets(self.model, self.dev, self.collate, self.spec.eval_batch_size)


# -- prepare: checks, data, model, adapter (nothing written) -------------------------------------------

def prepare(spec: GlueRun) -> GlueTask:
    """Check the spec, read the data, build the model (LoRA inline) and load lora_path. Writes nothing."""
    skeleton.check_output_dir(spec.run)
    task = get_task(spec.task_name)
    # Data first: a missing or malformed file fails in seconds, before any model is read.
    train_data = load_glue(task.name, spec.data_dir, "train") if spec.run.do_train else None
    dev_data = eval_sets(task.name, spec.data_dir) if spec.run.do_eval else []
    num_labels = (train_data or dev_data[0]).num_labels

    adapter = open_lora_path(spec.lora_path) if spec.lora_path else None
    method = _method(spec, adapter)
    model, tokenizer, model_path = _build_model(spec, method, adapter, num_labels)
    train_features, dev = _encode(spec, task, model, tokenizer, train_data, dev_data)
    if spec.train.deepspeed_config:  # a typo found now, not after run_config.json is written
        zero_stage(spec.train.deepspeed_config)
    prepared = GlueTask(spec, model_path, model, tokenizer, method, num_labels, train_features, dev, adapter)
    if train_features is not None:
        if not train_features:
            raise ValueError(f"{train_data.source}: no training examples")
        prepared.allocator = _allocator(spec, model, method, len(train_features))
    return prepared


def _method(spec: GlueRun, adapter: Optional[AdapterSource]) -> Method:
    if spec.method is not None:
        method = spec.method
    elif adapter is not None and adapter.lora is not None:
        method = spec.adapter_method(adapter.lora)
    else:
        method = make_method("full", None)
    if adapter is not None:
        check_fits(adapter, method.lora)
    t = spec.train
    if t.deepspeed_config and method.lorapro_mode == "full" and t.weight_decay:
        raise ValueError(f"--weight_decay {t.weight_decay} with --apply_lorapro --lorapro_mode full under "
                         "--deepspeed is not supported (DeepSpeed runs plain SGD on the full variant's "
                         "directions): use 0, --lorapro_mode efficient, or torchrun")
    return method


def _build_model(spec: GlueRun, method: Method, adapter: Optional[AdapterSource], num_labels: int):
    """(model, tokenizer, model folder): the classifier with the method's layers (a PEFT adapter's own, injected
    module by module when it is loaded), the adapter loaded, the trainable parameters marked."""
    from ...models.loading import check_tokenizer_fits, family_module, load_tokenizer, read_config

    model_path = resolve_model_path(spec.model_name_or_path)
    hf_config = read_config(model_path)
    model_type = hf_config.get("model_type")
    family_module(model_type, str(model_path / "config.json"))
    if adapter is not None:
        adapter.check_family(model_type)
    overrides = head_overrides(model_type, spec.cls_dropout, spec.fixed_cls_dropout)
    # a PEFT adapter brings its own layers (lora_to_build None): loading it injects them module by module
    builds_own = adapter is not None and adapter.lora is not None and adapter.lora_to_build is None
    lora = None if builds_own else method.lora
    if lora is not None:
        check_targets(hf_config, lora, spec.target_flag)

    skeleton.seed_everything(spec.run.seed)  # the head and LoRA factors are drawn next (set_seed first, as originals)
    model = load_pretrained(model_path, num_labels, lora, overrides).train()
    model.loralib_config = lora
    if spec.lora_a_init == "normal":
        normal_lora_a(model, model.hf_config.get("initializer_range", 0.02))

    tokenizer = load_tokenizer(Path(spec.tokenizer_name) if spec.tokenizer_name else model_path)
    if ensure_pad_token(tokenizer, model_type) and len(tokenizer) > model.hf_config["vocab_size"]:
        grow_embeddings(model, len(tokenizer))
    check_tokenizer_fits(tokenizer, model.hf_config, str(model_path))

    if adapter is not None:
        loaded = load_lora_path(model, adapter, num_labels, training=spec.run.do_train)
        logger.info("loaded %d tensors from %s (%s)", len(loaded), adapter.path, adapter.format)
    mark_trainable(model, full=method.lora is None, frozen_head=spec.frozen_head)
    if spec.gradient_checkpointing:  # recompute each block in the backward pass (the LoRA+ Llama-7B recipe)
        enable_gradient_checkpointing(model)
    return model, tokenizer, model_path


def _encode(spec: GlueRun, task, model: nn.Module, tokenizer, train_data: Optional[GlueData],
            dev_data: List[GlueData]):
    """(train features or None, [(dev set, its features)]), checked against the model's positions; LoRA-GA's
    init from the first training batches."""
    def encode(data: GlueData, limit: Optional[int]) -> List[dict]:
        return encode_examples(data.examples[:limit] if limit else data.examples, tokenizer, spec.max_seq_length,
                               spec.pad_to_max_length, is_regression=task.is_regression)

    train_features = encode(train_data, spec.max_train_samples) if train_data is not None else None
    dev = [(d, encode(d, spec.max_eval_samples)) for d in dev_data]
    lora = getattr(model, "loralib_config", None)
    if train_features and lora is not None and lora.init_lora_weights == "lora_ga" and not spec.run.resume_from:
        # a resumed run loads A0, B0 (and so the residual) instead
        loraga_from_features(model, train_features, GlueCollator(tokenizer), spec.train.per_device_batch_size,
                             spec.loraga_batches)
    for data, features in dev:
        if any("labels" not in f for f in features):
            raise ValueError(f"{data.source}: the dev set has examples without a label; it cannot be scored")
    for data, features in ([(train_data, train_features)] if train_features else []) + dev:
        check_positions(features, position_limit(model.hf_config), spec.max_seq_length, data.source)
    return train_features, dev


def _allocator(spec: GlueRun, model: nn.Module, method: Method, n_examples: int):
    """The method's rank allocator over the run's steps (None when the method does not allocate)."""
    t = spec.train
    steps = skeleton.total_steps(n_examples, t.per_device_batch_size, t.grad_accum_steps, t.num_epochs, t.max_steps,
                                 t.seed)
    allocator = rank_allocator(model, method, AllocatorSchedule(steps, **dataclasses.asdict(spec.allocation)))
    if allocator is not None and t.deepspeed_config and zero_stage(t.deepspeed_config) == 3:
        raise ValueError("--apply_adalora with a ZeRO-3 --deepspeed config is not supported (the factors rank "
                         "allocation scores and masks are partitioned there); use ZeRO-1/2 or torchrun")
    return allocator


# -- execute ------------------------------------------------------------------------------------------

def execute(task: GlueTask) -> RunResult:
    """Train (if asked), evaluate (if asked), and write the results files (loralib.train.run.execute)."""
    if task.spec.deterministic:
        torch.use_deterministic_algorithms(True)
    logger.info("%s", trainable_summary(task.model))
    results = skeleton.execute(task.spec.run, task)
    return RunResult(task.spec.run.output_dir, task.model, results.get("eval"), results.get("train"))


def run_glue(spec: GlueRun) -> RunResult:
    """Prepare and execute; errors propagate (see `main` for the command-line behaviour)."""
    return execute(prepare(spec))


def main(make_spec: Callable[[], GlueRun], prog: str) -> int:
    """An entry point's command line: make_spec() translates its flags; 0 on success; a bad flag, file or
    adapter prints one `PROG: error:` line and returns 2."""
    from ...cli import INPUT_ERRORS, run_entry_point
    from ...models.hub import HubUnreachableError

    return run_entry_point(lambda: run_glue(make_spec()), prog, INPUT_ERRORS + (HubUnreachableError,))
