"""The flags the three GLUE entry points share (examples/NLU, lora2, loraplus run_glue.py), all forks of
transformers' examples/text-classification/run_glue.py: its model and data arguments, transformers'
TrainingArguments, and what this repository added to all three (--cls_dropout, --recipe, PEFT's baseline
names) -- and their translation into the run skeleton's RunSpec, the loop's TrainConfig and the method's
OptimizerSettings. Each paper's own flags (--apply_lora, --apply_adalora, --loraplus_lr_ratio, ...) live next to
its entry point.

    parser = argparse.ArgumentParser(prog="run_glue.py")
    add_glue_flags(parser)                  # + the paper's own flags
    args = parser.parse_args(argv)
    spec = run_spec(args, output_dir(args)); config = train_config(args, spec, precision_of(args.fp16, args.bf16))

Flags of the original commands that change nothing here are accepted (and named in --help): --logging_dir,
--report_to (tensorboard turns on TensorBoard in output_dir), --local_rank (from torch.distributed.launch),
--overwrite_cache, --ignore_mismatched_sizes, --keep_checkpoints, --use_local, --run_name, --optim
adamw_torch/adamw_hf, --logging_strategy, --tb_writter_loginterval (AdaLoRA's scripts).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence, Tuple

from ..config import LoRAConfig
from ..methods import OptimizerSettings
from .run import RunSpec, precision_of

RECIPES = ("released", "paper")


def add_glue_flags(parser: argparse.ArgumentParser, do_by_default: bool = False) -> None:
    """The flags every GLUE entry point takes. do_by_default: --do_train / --do_eval default to on (the LoRA+
    script's TrainingArguments did), with --no_do_train / --no_do_eval to turn them off."""
    _add_model_data(parser)
    _add_training(parser, do_by_default)
    _add_accepted(parser)


def _add_model_data(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and data")
    g.add_argument("--model_name_or_path", required=True,
                   help="a Hugging Face model folder, or a hub name looked up in models/NAME (downloaded when online)")
    g.add_argument("--task_name", required=True, help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli (or wn-lex, wn-pair)")
    g.add_argument("--tokenizer_name", default=None, help="tokenizer folder (default: the model folder)")
    g.add_argument("--data_dir", default="data/", help="GLUE folder: official TSV layout or datasets save_to_disk (default data/)")
    g.add_argument("--max_seq_length", type=int, default=128)
    g.add_argument("--pad_to_max_length", action="store_true", help="pad every example to max_seq_length "
                   "(the original runs did; the default pads each batch to its longest row)")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--max_eval_samples", type=int, default=None)
    g.add_argument("--cls_dropout", type=float, default=None, help="dropout of the classification head")
    g.add_argument("--recipe", choices=RECIPES, default="released",
                   help="released: the released code's behaviour where it and the paper disagree (LoRA²: head "
                        "dropout fixed at 0.15); paper: the paper's table (--cls_dropout honoured)")
    b = parser.add_argument_group("baselines (any LoRA run; PEFT's LoraConfig names)")
    b.add_argument("--use_dora", action="store_true", help="DoRA layers (loralib.dora)")
    b.add_argument("--init_lora_weights", type=_init_flag, default=None,
                   help="True, gaussian, pissa, pissa_niter_N or lora_ga (PEFT's names)")
    b.add_argument("--loraga_batches", type=int, default=8,
                   help="lora_ga: training batches (per-device size) for the gradient estimate")


def _add_training(parser: argparse.ArgumentParser, do_by_default: bool) -> None:
    t = parser.add_argument_group("training (transformers' TrainingArguments)")
    t.add_argument("--do_train", action="store_true", default=do_by_default)
    t.add_argument("--do_eval", action="store_true", default=do_by_default)
    if do_by_default:
        t.add_argument("--no_do_train", dest="do_train", action="store_false")
        t.add_argument("--no_do_eval", dest="do_eval", action="store_false")
    t.add_argument("--output_dir", default=None)
    t.add_argument("--overwrite_output_dir", action="store_true")
    t.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-<step> folder")
    t.add_argument("--per_device_train_batch_size", type=int, default=8)
    t.add_argument("--per_device_eval_batch_size", type=int, default=8)
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--learning_rate", type=float, default=5e-5)
    t.add_argument("--weight_decay", type=float, default=0.0)
    t.add_argument("--adam_beta1", type=float, default=0.9)
    t.add_argument("--adam_beta2", type=float, default=0.999)
    t.add_argument("--adam_epsilon", type=float, default=1e-8)
    t.add_argument("--max_grad_norm", type=float, default=1.0)
    t.add_argument("--num_train_epochs", type=float, default=3.0)
    t.add_argument("--max_steps", type=int, default=-1, help="> 0 overrides --num_train_epochs")
    t.add_argument("--lr_scheduler_type", default="linear",
                   choices=("linear", "cosine", "constant", "constant_with_warmup"))
    t.add_argument("--warmup_ratio", type=float, default=0.0)
    t.add_argument("--warmup_steps", type=int, default=0, help="> 0 overrides --warmup_ratio")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--evaluation_strategy", "--eval_strategy", dest="evaluation_strategy", default="no",
                   choices=("no", "steps", "epoch"))
    t.add_argument("--eval_steps", type=int, default=None, help="default: --logging_steps")
    t.add_argument("--save_strategy", default="steps", choices=("no", "steps", "epoch"))
    t.add_argument("--save_steps", type=int, default=500)
    t.add_argument("--save_total_limit", type=int, default=None)
    t.add_argument("--logging_steps", type=int, default=500)
    t.add_argument("--load_best_model_at_end", action="store_true")
    t.add_argument("--metric_for_best_model", default=None, help="default: the task's main metric")
    t.add_argument("--fp16", action="store_true", help="fp16 autocast on GPU (on CPU: a warning and fp32)")
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--deepspeed", default=None, help="a DeepSpeed config JSON")
    t.add_argument("--dataloader_num_workers", type=int, default=0)
    t.add_argument("--use_deterministic_algorithms", action="store_true")
    t.add_argument("--disable_tqdm", action="store_true")
    t.add_argument("--torch_compile", action="store_true", help="torch.compile the training forward (inductor; off by default: see benchmarks/README.md)")
    t.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute each encoder/decoder block in the backward pass (less activation memory)")


def _add_accepted(parser: argparse.ArgumentParser) -> None:
    c = parser.add_argument_group("accepted for the original commands; they change nothing here")
    c.add_argument("--logging_dir", default=None, help="logs go to output_dir/metrics.jsonl (and tensorboard/)")
    c.add_argument("--report_to", nargs="+", default=(), help="'tensorboard' writes output_dir/tensorboard")
    c.add_argument("--local_rank", type=int, default=-1, help="set by torch.distributed.launch; torchrun's env is read")
    c.add_argument("--overwrite_cache", action="store_true")
    c.add_argument("--ignore_mismatched_sizes", action="store_true", help="a new head is always made when needed")
    c.add_argument("--keep_checkpoints", default=None)
    c.add_argument("--optim", default="adamw_torch", choices=("adamw_torch", "adamw_hf", "adamw_torch_fused"))
    c.add_argument("--use_local", action="store_true")
    c.add_argument("--run_name", default=None)
    c.add_argument("--logging_strategy", default="steps", choices=("no", "steps", "epoch"),
                   help="the loop logs every --logging_steps steps to metrics.jsonl")
    c.add_argument("--tb_writter_loginterval", type=int, default=None,
                   help="AdaLoRA's scripts: the interval of its rank TensorBoard logs (ranks go to metrics.jsonl)")


def add_lora_flags(parser: argparse.ArgumentParser, lora_module: Optional[str] = None) -> None:
    """The LoRA flags of microsoft/LoRA's examples/NLU run_glue.py (and LoRA-Pro's and the DeBERTa fork's, added
    here), which the AdaLoRA and LoRA² scripts, forks of it, take too; lora_module: the default of their
    --lora_module (None: the flag is not offered, as in the LoRA repository)."""
    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora_path", default=None, help="adapter to start from or evaluate: microsoft's released .bin, "
                   "one of our adapter folders, a run folder or checkpoint, or a PEFT folder")
    g.add_argument("--apply_lora", action="store_true", help="without it (and without --lora_path): full fine-tuning")
    g.add_argument("--lora_r", type=int, default=None, help="default 8")
    g.add_argument("--lora_alpha", type=float, default=None, help="default 2 r, the released runs' ratio")
    g.add_argument("--lora_dropout", type=float, default=0.0)
    if lora_module is not None:
        g.add_argument("--lora_module", default=lora_module,
                       help="comma list of query,key,value,intermediate,layer.output,attention.output")
    g.add_argument("--apply_lorapro", action="store_true",
                   help="train the LoRA factors with LoRA-Pro (loralib.optim.LoRAProAdamW); needs --apply_lora")
    g.add_argument("--lorapro_mode", choices=("full", "efficient"), default="full",
                   help="full: Adam moments of the m x n equivalent gradient (the paper's); efficient: Adam on A, B")
    g.add_argument("--lora_a_init", choices=("kaiming", "normal"), default="kaiming",
                   help="kaiming: loralib's lora_A init; normal: N(0, initializer_range), as the DeBERTa fork")


def _init_flag(text: str):
    from ..init_methods import check_init

    try:
        return check_init(True if text.lower() == "true" else text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# -- translation --------------------------------------------------------------------------------------

def check_positive(args: argparse.Namespace, *names: str) -> None:
    """--NAME > 0 for each flag given (None: not given)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be > 0, got {value}")


def split_list(text: str, flag: str) -> Tuple[str, ...]:
    """A comma list flag ('query, value') as a tuple of names; one error when it names nothing."""
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise ValueError(f"{flag} {text!r} names no module")
    return items


def run_spec(args: argparse.Namespace, output_dir: Optional[str] = None, **fields) -> RunSpec:
    """The RunSpec of the flags (output_dir: where the run goes when the entry point decides it, e.g.
    --root_output_dir; default --output_dir). Checks the flags every run has; fields: RunSpec's others."""
    output_dir = output_dir if output_dir is not None else args.output_dir
    if output_dir is None:
        raise ValueError("--output_dir is required")
    if args.evaluation_strategy != "no":
        args.do_eval = True  # as transformers' TrainingArguments do
    if not (args.do_train or args.do_eval):
        raise ValueError("nothing to do: pass --do_train and/or --do_eval")
    if args.resume_from_checkpoint and not args.do_train:
        raise ValueError("--resume_from_checkpoint continues training: add --do_train")
    check_positive(args, "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                   "max_seq_length", "logging_steps", "save_steps", "eval_steps", "max_train_samples",
                   "max_eval_samples", "num_train_epochs")
    if args.cls_dropout is not None and not 0.0 <= args.cls_dropout < 1.0:
        raise ValueError(f"--cls_dropout must lie in [0, 1), got {args.cls_dropout}")
    return RunSpec(output_dir=Path(output_dir), do_train=args.do_train, do_eval=args.do_eval, seed=args.seed,
                   precision=precision_of(args.fp16, args.bf16), resume_from=args.resume_from_checkpoint,
                   overwrite=args.overwrite_output_dir, protected=getattr(args, "lora_path", None), **fields)


def train_config(args: argparse.Namespace, spec: RunSpec):
    """The loop's TrainConfig of TrainingArguments' flags. metric_for_best stays None when
    --metric_for_best_model is not given (the task fills in its main metric)."""
    from .loop import TrainConfig

    schedule = "constant" if args.lr_scheduler_type.startswith("constant") else args.lr_scheduler_type
    # transformers' "constant" has no warmup; its "constant_with_warmup" is our constant schedule
    no_warmup = args.lr_scheduler_type == "constant"
    evaluate = args.do_eval and args.evaluation_strategy != "no"
    eval_every = (args.eval_steps or args.logging_steps) if args.evaluation_strategy == "steps" else None
    return TrainConfig(
        output_dir=str(spec.output_dir), max_steps=args.max_steps if args.max_steps > 0 else None,
        num_epochs=args.num_train_epochs, per_device_batch_size=args.per_device_train_batch_size,
        grad_accum_steps=args.gradient_accumulation_steps, lr=args.learning_rate, weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, schedule=schedule,
        warmup_steps=0 if no_warmup else args.warmup_steps, warmup_ratio=0.0 if no_warmup else args.warmup_ratio,
        max_grad_norm=args.max_grad_norm, precision=spec.precision,
        eval_strategy=args.evaluation_strategy if evaluate else "no", eval_every=eval_every,
        save_strategy=args.save_strategy, save_every=args.save_steps if args.save_strategy == "steps" else None,
        save_total_limit=args.save_total_limit, metric_for_best=args.metric_for_best_model if evaluate else None,
        load_best_at_end=args.load_best_model_at_end and evaluate, seed=args.seed,
        num_workers=args.dataloader_num_workers, log_every=args.logging_steps,
        tensorboard="tensorboard" in args.report_to,
        progress_bar=not args.disable_tqdm, resume_from=args.resume_from_checkpoint, deepspeed_config=args.deepspeed,
        torch_compile=args.torch_compile)


def optimizer_settings(args: argparse.Namespace, **fields) -> OptimizerSettings:
    """AdamW's hyper-parameters of the flags (fields: OptimizerSettings' others, e.g. loraplus_lr_embedding)."""
    return OptimizerSettings(lr=args.learning_rate, weight_decay=args.weight_decay,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                             max_grad_norm=args.max_grad_norm, **fields)


def check_lora_off(args: argparse.Namespace, given: Sequence[str]) -> None:
    """No flag chose a LoRA method (full fine-tuning, or the adapter --lora_path names): refuse the flags that
    configure LoRA (given: those on the command line), --apply_lorapro, and without an adapter the baselines."""
    if given:
        raise ValueError(f"{', '.join(given)} configure LoRA, which is off: add --apply_lora")
    if getattr(args, "apply_lorapro", False):
        raise ValueError("--apply_lorapro trains LoRA factors: add --apply_lora")
    if not getattr(args, "lora_path", None):
        with_baselines(args, None)  # refuses --use_dora / --init_lora_weights without LoRA


def with_baselines(args: argparse.Namespace, lora: Optional[LoRAConfig], lorapro: bool = False) -> Optional[LoRAConfig]:
    """--use_dora / --init_lora_weights on a run's LoRAConfig; one error naming the flags otherwise."""
    if not (args.use_dora or args.init_lora_weights is not None):
        return lora
    if lora is None:
        raise ValueError("--use_dora / --init_lora_weights configure LoRA, which is off: add --apply_lora")
    if args.use_dora and lorapro:
        raise ValueError("DoRA (--use_dora) does not compose with LoRA-Pro (--apply_lorapro): LoRA-Pro's equivalent "
                         "gradient is that of W0 + s B A, which DoRA rescales")
    changes = {"use_dora": True} if args.use_dora else {}
    if args.init_lora_weights is not None:
        changes["init_lora_weights"] = args.init_lora_weights
    try:
        return lora.replace(**changes)
    except ValueError as err:
        raise ValueError(f"--use_dora / --init_lora_weights: {err}") from None


def glue_fields(args: argparse.Namespace, output_dir: Optional[str] = None, record: Optional[dict] = None,
                **optimizer_fields) -> dict:
    """The keyword arguments of loralib.tasks.glue.run.GlueRun that the shared flags give: its RunSpec, the
    loop's TrainConfig, the optimizer settings (optimizer_fields: OptimizerSettings' others), the data and
    model flags, and run_config.json's record (record's entries + "recipe" + the flags under "args")."""
    spec = run_spec(args, output_dir)
    return dict(run=spec, train=train_config(args, spec), optimizer=optimizer_settings(args, **optimizer_fields),
                model_name_or_path=args.model_name_or_path, task_name=args.task_name, data_dir=args.data_dir,
                tokenizer_name=args.tokenizer_name, max_seq_length=args.max_seq_length,
                pad_to_max_length=args.pad_to_max_length, max_train_samples=args.max_train_samples,
                max_eval_samples=args.max_eval_samples, eval_batch_size=args.per_device_eval_batch_size,
                lora_path=getattr(args, "lora_path", None), cls_dropout=args.cls_dropout,
                loraga_batches=args.loraga_batches, gradient_checkpointing=args.gradient_checkpointing,
                deterministic=args.use_deterministic_algorithms,
                record={**(record or {}), "recipe": args.recipe, "args": dict(vars(args))})
