"""The T5 text-to-text GLUE run behind lorapro/run_t5_glue.py: the LoRA-GA setting's T5-base table (which
LoRA-Pro's paper shares), one (method, task, seed) row per call.

    spec = T5GlueRun(model_name_or_path="t5-base", task="mnli", data_dir="data", output_dir="out/mnli/lora/seed0")
    execute(prepare(spec))

prepare() checks the spec, reads and tokenises the data, builds the model (nothing written); execute() trains with
loralib.train.train (the one loop) and evaluates on the dev split. Files in output_dir:
    run_config.json     {"method", "model_name_or_path", "model_path", "lora", "task", ...} (what `loralib compare` reads)
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
import functools
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ...files import write_json_atomic, write_jsonl_atomic
from .data import MAX_LENGTH, T5GlueCollator, T5GlueExample, encode, get_task, load_split
from .evaluate import MODES, evaluate, first_tokens

logger = logging.getLogger("loralib.t5glue")

METHODS = ("lora", "rslora", "lora-pro", "rslora-pro", "loraplus", "adalora", "lora2", "dora", "pissa", "lora-ga",
           "full")


@dataclass
class T5GlueRun:
    """One row of the table: the fields are the flags of lorapro/run_t5_glue.py (same names)."""

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
    deepspeed: Optional[str] = None               # not offered: the method helpers read it
    given: Tuple[str, ...] = field(default_factory=tuple)


@dataclass
class Prepared:
    spec: T5GlueRun
    output_dir: Path
    model_path: Path
    model: nn.Module
    tokenizer: Any
    method: Any
    train_examples: List[T5GlueExample]
    dev_examples: List[T5GlueExample]
    grad_accum: int = 1
    total_steps: Optional[int] = None
    allocator: Any = None


def default_targets(hf_config: dict) -> str:
    """LoRA-GA's "all": every nn.Linear but lm_head (find_all_linear_modules), by the model's feed-forward kind."""
    gated = str(hf_config.get("feed_forward_proj", "relu")).startswith("gated-")
    return "q,k,v,o," + ("wi_0,wi_1" if gated else "wi") + ",wo"


def _check(spec: T5GlueRun) -> None:
    from ..instruct.run import _check_output_dir, _positive

    if spec.lora not in METHODS:
        raise ValueError(f"--lora {spec.lora!r} is not one of {', '.join(METHODS)}")
    if spec.eval_mode not in MODES:
        raise ValueError(f"--eval_mode {spec.eval_mode!r} is not one of {', '.join(MODES)}")
    _positive(spec, "lr", "num_train_epochs", "max_steps", "per_device_train_batch_size", "global_batch_size",
              "max_length", "max_train_samples", "max_eval_samples", "eval_batch_size", "logging_steps", "save_steps",
              "save_total_limit")
    if not (spec.do_train or spec.do_eval):
        raise ValueError("nothing to do: --no-do_train without --do_eval")
    if spec.adalora_allocate and spec.lora != "adalora":
        raise ValueError(f"--adalora_allocate applies to --lora adalora, not --lora {spec.lora}")
    if not 0.0 <= spec.lora_dropout < 1.0:
        raise ValueError(f"--lora_dropout must lie in [0, 1), got {spec.lora_dropout}")
    _check_output_dir(Path(spec.output_dir), spec)


def load_model(model_path: Path, lora, bf16: bool) -> nn.Module:
    """Our T5 for the folder in train mode (see instruct.run.load_model: loaded factors must not meet merged
    weights); bf16: frozen weights in bf16, LoRA factors fp32."""
    from ...models.loading import from_pretrained

    model = from_pretrained(model_path, "seq2seq-lm", lora=lora, dtype=torch.bfloat16 if bf16 else torch.float32).train()
    if bf16:
        for name, p in model.named_parameters():
            if "lora_" in name.rsplit(".", 1)[-1]:
                p.data = p.data.float()
    model.loralib_config = lora
    return model


def prepare(spec: T5GlueRun) -> Prepared:
    """Check the spec, read and tokenise the data, build the model. Writes nothing."""
    from ...models.loading import load_tokenizer, read_config
    from ..glue.run import check_targets, resolve_model_path
    from ..instruct.run import (_allocator, _seed, accumulation_steps, loraga_from_examples, mark_trainable,
                                resolve_method, total_steps)

    _check(spec)
    task = get_task(spec.task)
    model_path = resolve_model_path(spec.model_name_or_path)
    hf_config = read_config(model_path)
    if hf_config.get("model_type") != "t5":
        raise ValueError(f"--model_name_or_path {str(model_path)!r}: model_type {hf_config.get('model_type')!r}; "
                         "text-to-text GLUE runs on T5")
    if spec.target_modules is None:
        spec.target_modules = default_targets(hf_config)
    method = resolve_method(spec, "t5")
    if method.lora is not None:
        check_targets(hf_config, method.lora, "--target_modules")
    grad_accum = accumulation_steps(spec)

    tokenizer = load_tokenizer(model_path, hf_config)
    if spec.eval_mode == "score":
        first_tokens(task, tokenizer)  # label words must be told apart by their first token
    train_examples = encode(load_split(task, spec.data_dir, "train", spec.max_train_samples), tokenizer,
                            spec.max_length) if spec.do_train else []
    dev_examples = encode(load_split(task, spec.data_dir, "dev", spec.max_eval_samples), tokenizer,
                          spec.max_length) if spec.do_eval else []

    _seed(spec.seed)  # the LoRA factors are drawn next
    model = load_model(model_path, method.lora, spec.bf16)
    mark_trainable(model, method)
    if method.lora is not None and method.lora.init_lora_weights == "lora_ga" and spec.do_train \
            and not spec.resume_from_checkpoint:  # a resumed run loads A0, B0 (and so the residual) instead
        loraga_from_examples(model, train_examples, T5GlueCollator(model.config.pad_token_id, spec.mask_label_padding),
                             spec.per_device_train_batch_size, spec.loraga_batches, spec.seed, loss_of=seq2seq_loss)
    p = Prepared(spec, Path(spec.output_dir), model_path, model, tokenizer, method, train_examples, dev_examples,
                 grad_accum)
    if spec.do_train:
        p.total_steps = total_steps(len(train_examples), spec, grad_accum)
        if method.name == "lora2" or (method.name == "adalora" and spec.adalora_allocate):
            p.allocator = _allocator(model, method, spec, p.total_steps)
    return p


def seq2seq_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The loss our T5 returns for a collated batch (what the loop trains on)."""
    return model(**batch).loss


def run_config(p: Prepared) -> dict:
    from ..instruct.run import _world_size

    s = p.spec
    return {"method": p.method.run_config_name, "model_name_or_path": s.model_name_or_path,
            "model_path": str(p.model_path), "model_type": "t5",
            "lora": p.method.lora.to_dict() if p.method.lora is not None else None,
            "lorapro_mode": p.method.lorapro_mode, "loraplus_lr_ratio": p.method.loraplus_ratio,
            "task": get_task(s.task).name, "setting": "lora-ga", "precision": "bf16" if s.bf16 else "fp32",
            "world_size": _world_size(), "gradient_accumulation_steps": p.grad_accum, "args": asdict(s)}


def train_config(p: Prepared):
    from ...train import TrainConfig

    s = p.spec
    return TrainConfig(
        output_dir=str(p.output_dir), max_steps=s.max_steps, num_epochs=s.num_train_epochs,
        per_device_batch_size=s.per_device_train_batch_size, grad_accum_steps=p.grad_accum, lr=s.lr,
        weight_decay=s.weight_decay, betas=(s.adam_beta1, s.adam_beta2), eps=s.adam_epsilon,
        schedule=s.lr_scheduler_type, warmup_ratio=s.warmup_ratio, max_grad_norm=s.max_grad_norm,
        precision="bf16" if s.bf16 else "fp32", eval_strategy="no", eval_at_end=False,
        save_strategy="steps" if s.save_steps else "epoch", save_every=s.save_steps,
        save_total_limit=s.save_total_limit, seed=s.seed, log_every=s.logging_steps,
        progress_bar=not s.disable_tqdm, resume_from=s.resume_from_checkpoint, torch_compile=s.torch_compile)


def execute(p: Prepared) -> Dict[str, Any]:
    """Train (if asked), save the adapters, evaluate (if asked); returns {"train": ..., "eval": ...}."""
    from ...adapters import export_peft
    from ...train import train
    from ...train.run_lock import hold_output_dir
    from ..instruct.run import _clear_previous_run, _rank, make_optimizer

    s = p.spec
    main_process = _rank() == 0
    results: Dict[str, Any] = {}
    if s.do_train:
        if main_process:
            hold_output_dir(p.output_dir)  # one run per folder, locked before the first write (to process exit)
            if s.overwrite_output_dir and not s.resume_from_checkpoint:
                _clear_previous_run(p.output_dir)
            p.output_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(p.output_dir / "run_config.json", run_config(p))
        groups: List[dict] = []

        def optimizer_factory(model: nn.Module) -> torch.optim.Optimizer:
            optimizer = make_optimizer(model, p.method, s)
            groups.extend(_group_summary(optimizer))
            return optimizer

        collate = T5GlueCollator(p.model.config.pad_token_id, s.mask_label_padding)
        outcome = train(p.model, p.train_examples, collate, train_config(p), optimizer_factory=optimizer_factory,
                        regularizer=orthogonal_regularizer(p.method), allocator=p.allocator)
        results["train"] = {"global_step": outcome.global_step, "epoch": outcome.epoch,
                            "train_loss": outcome.train_loss, "adapter_dir": outcome.adapter_dir,
                            "last_checkpoint": outcome.last_checkpoint, "param_groups": groups}
        if main_process:
            if p.method.lora is not None:
                export_peft(p.model, p.output_dir / "peft_adapter", base_model_name_or_path=s.model_name_or_path,
                            task_type="SEQ_2_SEQ_LM")
            if p.method.name in ("adalora", "lora2"):
                from ...adalora import adalora_state

                write_json_atomic(p.output_dir / "rank_pattern.json", adalora_state(p.model))
            write_json_atomic(p.output_dir / "train_results.json", results["train"])
    if s.do_eval and main_process:
        results["eval"] = evaluate_dev(p)
    return results


def _group_summary(optimizer: torch.optim.Optimizer) -> List[dict]:
    """What train_results.json records of the optimizer: each group's name, lr and size."""
    return [dict(name=group.get("name", f"group{i}"), lr=group["lr"], num_tensors=len(group["params"]),
                 numel=sum(t.numel() for t in group["params"])) for i, group in enumerate(optimizer.param_groups)]


def orthogonal_regularizer(method):
    """AdaLoRA's (or LoRA²'s) orthogonal regulariser of the method, None for the others."""
    if method.reg_orth_coef <= 0:
        return None
    from ...adalora import compute_orth_regu
    from ...lora2 import compute_lora2_orth_regu

    return functools.partial(compute_lora2_orth_regu if method.name == "lora2" else compute_orth_regu,
                             regu_weight=method.reg_orth_coef)


def _autocast(model: nn.Module, device: torch.device):
    if any(q.dtype == torch.bfloat16 for q in model.parameters()):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate_dev(p: Prepared) -> dict:
    """Accuracy on the dev split; writes eval_results.json and predictions.jsonl."""
    task = get_task(p.spec.task)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = p.model.to(device)
    with _autocast(model, device):
        scores, rows = evaluate(model, task, p.tokenizer, p.dev_examples, p.spec.eval_mode, p.spec.eval_batch_size)
    # numbers only besides task / split (loralib compare reads every other field as a metric); the eval mode
    # is in run_config.json's args
    record = {"task": task.name, "split": task.dev_split, "num_examples": len(p.dev_examples), **scores}
    p.output_dir.mkdir(parents=True, exist_ok=True)
    if not (p.output_dir / "run_config.json").exists():
        write_json_atomic(p.output_dir / "run_config.json", run_config(p))
    write_jsonl_atomic(p.output_dir / "predictions.jsonl", rows)
    write_json_atomic(p.output_dir / "eval_results.json", record)
    logger.info("eval %s: %s", task.name, record)
    return record


# -- smoke assets (scripts/lorapro_t5_glue.sh --smoke) ------------------------------------------------

def build_smoke_model(dest) -> str:
    """A tiny random T5 in t5-base's layout (relu, tied head, dropout 0.1) with a character-level T5 tokenizer,
    saved under dest (once) with transformers' save_pretrained. Returns the folder."""
    import os
    import string

    import transformers

    dest = Path(dest)
    if (dest / "config.json").is_file():
        return str(dest)
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in chars] + \
            [("\u2581" + c, -1.0) for c in chars] + [("\u2581", -2.0)]
    tokenizer = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                   num_heads=2, feed_forward_proj="relu", dropout_rate=0.1, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return str(dest)
