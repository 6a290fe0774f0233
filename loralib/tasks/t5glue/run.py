"""The T5 text-to-text GLUE run behind lorapro/run_t5_glue.py: the LoRA-GA setting's T5-base table (which
LoRA-Pro's paper shares), one (method, task, seed) row per call.

    spec = T5GlueRun(model_name_or_path="t5-base", task="mnli", data_dir="data", output_dir="out/mnli/lora/seed0")
    execute(prepare(spec))

prepare() checks the spec, resolves the method (loralib.methods.make_method), reads and tokenises the data, builds
the model (nothing written) and returns a RunTask; execute() runs it through loralib.train.run.execute (the one run
skeleton: start, train with the method's optimizer / regularizer / allocator, the PEFT export, evaluate on the dev
split). Files in output_dir:
    run_config.json     {"method", "model_name_or_path", "model_path", "lora", "task", "paper_setting": "lora-ga", ...}
                        (what `loralib compare` reads; "paper_setting", not "setting": compare sets apart the runs
                        whose "setting" is outside the papers, and this one is LoRA-Pro's T5 table's)
    metrics.jsonl, checkpoint-<step>/, adapter/       the loop's log, checkpoints and final adapter
    peft_adapter/       the adapter as a PEFT LoRA (task_type SEQ_2_SEQ_LM; AdaLoRA / LoRA²: the plain-LoRA form)
    train_results.json  steps, mean loss, the optimizer's parameter groups
    eval_results.json   {"task", "split", "num_examples", "accuracy"[, "matthews_correlation" for CoLA]}
    predictions.jsonl   per dev example: gold and predicted label word

The setting (LoRA-GA, reproduce/run_exp.py + reproduce/utils.py at commit 7cbdd68 and conf/model/t5base.yaml,
conf/peft/*.yaml at c185846; see loralib.tasks.t5glue.data for the data rules): t5-base in fp32; LoRA r 8,
alpha 16, dropout 0 on every linear layer but the head (q, k, v, o of all attentions, wi / wi_0, wi_1, wo);
AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0, cosine schedule with warmup ratio 0.03, batch 32, 1 epoch,
max length 128, gradient clipping 1.0 (the Trainer's default); the model's own dropout (0.1) on. LoRA+: ratio 16.
AdaLoRA: PEFT's AdaLoraConfig(target_r=8, lora_alpha=16) defaults, init_r 12, orthogonal regulariser 0.5.

Decisions (where ours differs from the released code, the switch that restores it):
- Evaluation once, after the last step. The released Trainer evaluated every floor(n/32) steps with
  load_best_model_at_end on eval_loss: with one epoch that is one evaluation, at step floor(n/32), one step
  before the end when n is not a multiple of 32.
- AdaLoRA's rank allocation: the released Trainer never calls PEFT's update_and_allocate (the files read hold no
  such call), so its AdaLoRA trains fixed rank-12 SVD-form factors with the orthogonal regulariser. That is the
  default here too (adalora_allocate=False); adalora_allocate=True runs the allocator of AdaLoRA's paper with
  PEFT's schedule defaults (tinit 0, tfinal 0, deltaT 1, beta 0.85 / 0.85) from 12 down to 8. LoRA² always allocates.
- Padded label positions are trained as pad tokens (released); mask_label_padding=True ignores them.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ...config import LoRAConfig
from ...files import write_json_atomic, write_jsonl_atomic
from ...methods import AllocatorSchedule, Method, OptimizerSettings, make_method, method_entry, rank_allocator
from ...train import run as skeleton
from ...train.run import LOOP_OUTPUTS, RunSpec, Training
from .data import MAX_LENGTH, T5GlueCollator, T5GlueExample, encode, get_task, load_split
from .evaluate import MODES, evaluate, first_tokens

logger = logging.getLogger("loralib.t5glue")

# what a run writes into output_dir (what --overwrite_output_dir clears), and an evaluation-only run
OUTPUTS = LOOP_OUTPUTS + ("peft_adapter", "run_config.json", "train_results.json", "eval_results.json",
                          "predictions.jsonl", "rank_pattern.json")
EVAL_OUTPUTS = ("eval_results.json", "predictions.jsonl")


@dataclass
class T5GlueRun:
    """One row of the table: the fields are the flags of lorapro/run_t5_glue.py (same names). `lora` is a
    method name or alias of loralib.methods ("lora-pro" = "lorapro")."""

    model_name_or_path: str
    task: str
    data_dir: str
    output_dir: str
    lora: str = "lora"
    lorapro_mode: Optional[str] = None
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: Optional[str] = None          # default: every linear layer of the model but the head
    loraplus_lr_ratio: Optional[float] = None     # default 16 (the setting's conf/peft)
    use_rslora: bool = False                      # rsLoRA scaling with lora / dora / pissa / lora-ga / loraplus
    use_dora: bool = False                        # DoRA layers with the LoRA methods (not LoRA-Pro)
    init_lora_weights: Optional[str] = None       # True, gaussian, pissa, pissa_niter_N, lora_ga (default: method's)
    loraga_batches: int = 8                       # LoRA-GA: batches of the gradient estimate (conf/init/gradient.yaml: 8 iters)
    target_rank: Optional[int] = None
    init_rank: Optional[int] = None
    init_warmup_ratio: float = 0.0
    final_warmup_ratio: float = 0.0
    mask_interval: int = 1
    reg_orth_coef: float = 0.5
    lora2_k: int = 8
    adalora_allocate: bool = False
    lr: float = 1e-4
    num_train_epochs: float = 1.0
    max_steps: Optional[int] = None
    per_device_train_batch_size: int = 32
    global_batch_size: int = 32
    gradient_accumulation_steps: Optional[int] = None
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    max_length: int = MAX_LENGTH
    mask_label_padding: bool = False
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    eval_mode: str = "score"
    eval_batch_size: int = 32
    seed: int = 0
    bf16: bool = False
    logging_steps: int = 10
    save_steps: Optional[int] = None
    save_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    overwrite_output_dir: bool = False
    do_train: bool = True
    do_eval: bool = True
    disable_tqdm: bool = False
    torch_compile: bool = False                   # torch.compile the training forward (TrainConfig.torch_compile)
    given: Tuple[str, ...] = field(default_factory=tuple)  # the flags given on the command line


def run_spec(spec: T5GlueRun) -> RunSpec:
    """The skeleton's half of the spec: the output folder, phases, seed, precision, resume and overwrite."""
    return RunSpec(output_dir=Path(spec.output_dir), do_train=spec.do_train, do_eval=spec.do_eval, seed=spec.seed,
                   precision=skeleton.precision_of(bf16=spec.bf16), resume_from=spec.resume_from_checkpoint,
                   overwrite=spec.overwrite_output_dir, outputs=OUTPUTS, eval_outputs=EVAL_OUTPUTS)


def default_targets(hf_config: dict) -> str:
    """LoRA-GA's "all": every nn.Linear but lm_head (find_all_linear_modules), by the model's feed-forward kind."""
    gated = str(hf_config.get("feed_forward_proj", "relu")).startswith("gated-")
    return "q,k,v,o," + ("wi_0,wi_1" if gated else "wi") + ",wo"


def _positive(spec: T5GlueRun, *names: str) -> None:
    for name in names:
        value = getattr(spec, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be > 0, got {value}")


def _check(spec: T5GlueRun) -> RunSpec:
    """The flags alone (no file read but the output folder's listing); returns the RunSpec."""
    try:
        entry = method_entry(spec.lora)
    except ValueError as err:
        raise ValueError(f"--lora: {err}") from None
    if spec.eval_mode not in MODES:
        raise ValueError(f"--eval_mode {spec.eval_mode!r} is not one of {', '.join(MODES)}")
    _positive(spec, "lr", "num_train_epochs", "max_steps", "per_device_train_batch_size", "global_batch_size",
              "max_length", "max_train_samples", "max_eval_samples", "eval_batch_size", "logging_steps", "save_steps",
              "save_total_limit")
    if not (spec.do_train or spec.do_eval):
        raise ValueError("nothing to do: --no-do_train without --do_eval")
    if spec.adalora_allocate and entry.name != "adalora":
        raise ValueError(f"--adalora_allocate applies to --lora adalora, not --lora {spec.lora}")
    if not 0.0 <= spec.lora_dropout < 1.0:
        raise ValueError(f"--lora_dropout must lie in [0, 1), got {spec.lora_dropout}")
    for flag in ("lora_r", "mask_interval", "lora2_k"):
        if getattr(spec, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(spec, flag)}")
    run = run_spec(spec)
    skeleton.check_output_dir(run)
    return run


def method_of(spec: T5GlueRun) -> Method:
    """The method of the flags, from the registry (spec.target_modules filled in); ValueError naming the flag
    for a combination that makes no sense."""
    entry = method_entry(spec.lora)
    adaptive = entry.layer in ("adalora", "lora2")
    if spec.init_rank is not None and not adaptive:
        raise ValueError(f"--target_rank / --init_rank apply to --lora adalora / lora2, not --lora {spec.lora}")
    if not entry.trains_adapter or adaptive:
        for flag in ("use_rslora", "use_dora"):
            if getattr(spec, flag):
                raise ValueError(f"--{flag} does not compose with --lora {spec.lora}")
        if spec.init_lora_weights not in (None, True):
            raise ValueError(f"--init_lora_weights {spec.init_lora_weights} does not compose with --lora {spec.lora}")
    settings = dict(lorapro_mode=spec.lorapro_mode, loraplus_ratio=spec.loraplus_lr_ratio)
    if not entry.trains_adapter:
        return make_method(entry.name, None, **settings)
    targets = tuple(t.strip() for t in spec.target_modules.split(",") if t.strip())
    if not targets:
        raise ValueError(f"--target_modules {spec.target_modules!r} names no module")
    common = dict(lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, target_modules=targets)
    if adaptive:
        target = spec.target_rank if spec.target_rank is not None else spec.lora_r
        init = spec.init_rank if spec.init_rank is not None else max(target, round(1.5 * target))
        if target < 1 or init < target:
            raise ValueError(f"--target_rank {target} / --init_rank {init}: need 1 <= target_rank <= init_rank")
        return make_method(entry.name, LoRAConfig(r=init, lora2_k=spec.lora2_k, **common), target_rank=target,
                           reg_orth_coef=spec.reg_orth_coef,
                           allocate=spec.adalora_allocate if entry.name == "adalora" else None, **settings)
    init = True if spec.init_lora_weights is None else spec.init_lora_weights
    try:
        lora = LoRAConfig(r=spec.lora_r, use_rslora=spec.use_rslora, use_dora=spec.use_dora, init_lora_weights=init,
                          **common)
    except ValueError as err:
        raise ValueError(f"--lora {spec.lora} with --use_dora / --init_lora_weights: {err}") from None
    return make_method(entry.name, lora, init_lora_weights=spec.init_lora_weights, **settings)


def load_model(model_path: Path, lora: Optional[LoRAConfig], bf16: bool) -> nn.Module:
    """Our T5 for the folder in train mode; bf16: frozen weights in bf16, LoRA factors fp32."""
    return skeleton.load_for_training(model_path, "seq2seq-lm", lora, "bf16" if bf16 else "fp32")


mark_trainable = skeleton.mark_trainable


def seq2seq_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The loss our T5 returns for a collated batch (what the loop trains on)."""
    return model(**batch).loss


@dataclass
class Prepared:
    """A checked, built row (nothing written yet): the RunTask loralib.train.run.execute runs."""

    spec: T5GlueRun
    run: RunSpec
    model_path: Path
    model: nn.Module
    tokenizer: Any
    method: Method
    train_examples: List[T5GlueExample]
    dev_examples: List[T5GlueExample]
    grad_accum: int = 1
    total_steps: Optional[int] = None
    allocator: Any = None

    @property
    def output_dir(self) -> Path:
        return self.run.output_dir

    def collator(self) -> T5GlueCollator:
        return T5GlueCollator(self.model.config.pad_token_id, self.spec.mask_label_padding)

    def run_config(self) -> dict:
        s, m = self.spec, self.method
        return {"method": m.name, "model_name_or_path": s.model_name_or_path, "model_path": str(self.model_path),
                "model_type": "t5", "lora": m.lora.to_dict() if m.lora is not None else None,
                "lorapro_mode": m.lorapro_mode, "loraplus_lr_ratio": m.loraplus_ratio, "task": get_task(s.task).name,
                "paper_setting": "lora-ga", "precision": self.run.precision, "world_size": skeleton.world_size(),
                "gradient_accumulation_steps": self.grad_accum, "args": asdict(s)}

    def training(self) -> Training:
        from ...train import TrainConfig

        s = self.spec
        config = TrainConfig(
            output_dir=str(self.output_dir), max_steps=s.max_steps, num_epochs=s.num_train_epochs,
            per_device_batch_size=s.per_device_train_batch_size, grad_accum_steps=self.grad_accum, lr=s.lr,
            weight_decay=s.weight_decay, betas=(s.adam_beta1, s.adam_beta2), eps=s.adam_epsilon,
            schedule=s.lr_scheduler_type, warmup_ratio=s.warmup_ratio, max_grad_norm=s.max_grad_norm,
            precision=self.run.precision, eval_strategy="no", eval_at_end=False,
            save_strategy="steps" if s.save_steps else "epoch", save_every=s.save_steps,
            save_total_limit=s.save_total_limit, seed=s.seed, log_every=s.logging_steps,
            progress_bar=not s.disable_tqdm, resume_from=s.resume_from_checkpoint, torch_compile=s.torch_compile)
        optimizer = OptimizerSettings(lr=s.lr, weight_decay=s.weight_decay, betas=(s.adam_beta1, s.adam_beta2),
                                      eps=s.adam_epsilon, max_grad_norm=s.max_grad_norm)
        return Training(self.model, self.train_examples, self.collator(), config, self.method, optimizer,
                        allocator=self.allocator)

    def after_training(self, outcome, train_results: dict) -> None:
        """The adapter as a PEFT LoRA, and the ranks AdaLoRA / LoRA² kept."""
        from ...adapters import export_peft

        if self.method.lora is not None:
            export_peft(self.model, self.output_dir / "peft_adapter",
                        base_model_name_or_path=self.spec.model_name_or_path, task_type="SEQ_2_SEQ_LM")
        if self.method.entry.layer in ("adalora", "lora2"):
            from ...adalora import adalora_state

            write_json_atomic(self.output_dir / "rank_pattern.json", adalora_state(self.model))

    def evaluate(self) -> Optional[dict]:
        """Accuracy on the dev split (main process only); writes predictions.jsonl, returns eval_results.json."""
        if skeleton.rank() != 0:
            return None
        task = get_task(self.spec.task)
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        model = self.model.to(device)
        with _autocast(model, device):
            scores, rows = evaluate(model, task, self.tokenizer, self.dev_examples, self.spec.eval_mode,
                                    self.spec.eval_batch_size)
        # numbers only besides task / split (loralib compare reads every other field as a metric); the eval mode
        # is in run_config.json's args
        record = {"task": task.name, "split": task.dev_split, "num_examples": len(self.dev_examples), **scores}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(self.output_dir / "predictions.jsonl", rows)
        logger.info("eval %s: %s", task.name, record)
        return record


def _autocast(model: nn.Module, device: torch.device):
    if any(q.dtype == torch.bfloat16 for q in model.parameters()):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _allocator(model: nn.Module, method: Method, spec: T5GlueRun, steps: int):
    """AdaLoRA's / LoRA²'s rank allocator over the run's steps (None when the method does not allocate)."""
    if not method.allocate:
        return None
    init_warmup, final_warmup = int(spec.init_warmup_ratio * steps), int(spec.final_warmup_ratio * steps)
    if init_warmup + final_warmup >= steps:
        raise ValueError(f"--init_warmup_ratio {spec.init_warmup_ratio} + --final_warmup_ratio "
                         f"{spec.final_warmup_ratio} leave no budgeting phase in {steps} steps")
    return rank_allocator(model, method, AllocatorSchedule(steps, init_warmup, final_warmup, spec.mask_interval))


def prepare(spec: T5GlueRun) -> Prepared:
    """Check the spec, resolve the method, read and tokenise the data, build the model. Writes nothing."""
    from ...models.loading import load_tokenizer, read_config
    from ...models.loading import check_targets
    from ..instruct.run import loraga_from_examples

    run = _check(spec)
    task = get_task(spec.task)
    model_path = skeleton.resolve_model_path(spec.model_name_or_path)
    hf_config = read_config(model_path)
    if hf_config.get("model_type") != "t5":
        raise ValueError(f"--model_name_or_path {str(model_path)!r}: model_type {hf_config.get('model_type')!r}; "
                         "text-to-text GLUE runs on T5")
    if spec.target_modules is None:
        spec.target_modules = default_targets(hf_config)
    method = method_of(spec)
    if method.lora is not None:
        check_targets(hf_config, method.lora, "--target_modules")
    grad_accum = skeleton.accumulation_steps(spec.global_batch_size, spec.per_device_train_batch_size,
                                             spec.gradient_accumulation_steps, "--global_batch_size" in spec.given)

    tokenizer = load_tokenizer(model_path, hf_config)
    if spec.eval_mode == "score":
        first_tokens(task, tokenizer)  # label words must be told apart by their first token
    train_examples = encode(load_split(task, spec.data_dir, "train", spec.max_train_samples), tokenizer,
                            spec.max_length) if spec.do_train else []
    dev_examples = encode(load_split(task, spec.data_dir, "dev", spec.max_eval_samples), tokenizer,
                          spec.max_length) if spec.do_eval else []

    skeleton.seed_everything(spec.seed)  # the LoRA factors are drawn next
    model = load_model(model_path, method.lora, spec.bf16)
    mark_trainable(model, method)
    p = Prepared(spec, run, model_path, model, tokenizer, method, train_examples, dev_examples, grad_accum)
    if method.lora is not None and method.lora.init_lora_weights == "lora_ga" and spec.do_train \
            and not spec.resume_from_checkpoint:  # a resumed run loads A0, B0 (and so the residual) instead
        loraga_from_examples(model, train_examples, p.collator(), spec.per_device_train_batch_size,
                             spec.loraga_batches, spec.seed, loss_of=seq2seq_loss)
    if spec.do_train:
        p.total_steps = skeleton.total_steps(len(train_examples), spec.per_device_train_batch_size, grad_accum,
                                             spec.num_train_epochs, spec.max_steps, spec.seed)
        p.allocator = _allocator(model, method, spec, p.total_steps)
    return p


def execute(p: Prepared) -> Dict[str, Any]:
    """Train (if asked), save the adapters, evaluate (if asked): the phases of loralib.train.run.execute.
    Returns {"train": ..., "eval": ...}."""
    return skeleton.execute(p.run, p)
