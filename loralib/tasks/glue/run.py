"""The GLUE driver behind every `run_glue.py`: the original command-line flags -> model, data, training loop,
evaluation, results files. The subprojects' entry points only choose a flavour:

    examples/NLU/run_glue.py   flavour "nlu"       LoRA paper: --apply_lora --lora_r --lora_alpha --lora_path ...
    lora2/run_glue.py          flavour "lora2"     + AdaLoRA / LoRA²: --apply_adalora --lora_type svd --target_rank ...
    loraplus/run_glue.py       flavour "loraplus"  LoRA+: --loraplus_lr_ratio --target_modules --lora_rank ...

    python examples/NLU/run_glue.py --model_name_or_path roberta-base --task_name mrpc --do_train --do_eval \
        --apply_lora --lora_r 8 --lora_alpha 16 --learning_rate 4e-4 --num_train_epochs 30 --output_dir out/mrpc

What a run writes into --output_dir (nothing at all if the run is refused):
    run_config.json      the flags, the resolved model folder, method, LoRA config, label count
    metrics.jsonl        the loop's training log; checkpoint-<step>/, adapter/, best_adapter/ (loralib.train)
    train_results.json   steps, mean loss, best metric, and the optimizer's parameter groups (name, lr, sizes)
    rank_pattern.json    AdaLoRA / LoRA²: the final rank pattern (adalora_state), also in adapter/
    eval_results.json    {"task", "split", "num_examples", <metric>: value, ...}; MNLI adds the mismatched
                         evaluation under the key "mnli-mm" (same fields), as the original reports both.

Decisions (each one a place where the original scripts were silent, wrong or impossible here):
- --model_name_or_path: a folder; else models/NAME (under the working directory, then the repository);
  else a download through loralib.models.hub, which says plainly when the hub is unreachable.
- --lora_path: microsoft's released NLU file (`roberta_base_lora_mnli.bin`, ...) or one of our adapter
  folders (adapter/, best_adapter/, checkpoint-N/adapter). Without --apply_lora the LoRA config is read
  from the adapter (r from the file, alpha = 2 r for microsoft's files; the recorded LoRAConfig for ours).
  Evaluating an adapter whose head has another label count, or that belongs to another model family or
  size, is an error. Training from one (the paper's "MRPC, RTE, STS-B start from the MNLI LoRA
  checkpoint") keeps its LoRA factors and starts a new head where the label count differs, and says so.
- --cls_dropout is passed into the model config, except for LoRA² under --recipe released (the default):
  the released LoRA² run_glue.py ignored the flag and hard-coded 0.15, so LoRA² gets 0.15 (and a warning
  when the flag says otherwise); --recipe paper honours --cls_dropout (the per-task values of its table).
- --recipe released|paper (every flavour; default released): which of a paper's two accounts the run
  follows where its table and its released code disagree; recorded as "recipe" in run_config.json. The
  scripts in scripts/ choose the flag values per recipe; here it decides only LoRA²'s classifier dropout.
- --lora_a_init kaiming|normal (nlu, lora2): lora_A drawn as loralib's default (kaiming uniform) or from
  N(0, initializer_range) (0.02), as microsoft/LoRA's DeBERTa fork did; B stays zero.
- --fp16 on a machine without a GPU: a warning and fp32 (the released commands all carry --fp16, and a
  precision flag is no reason to refuse a run); --fp16 with --bf16 is an error.
- --output_dir that holds files: training is refused without --overwrite_output_dir (which removes the
  previous run's outputs, only those) or --resume_from_checkpoint (which continues it exactly). An
  evaluation-only run just replaces eval_results.json.
- lora2: --apply_rankselector is accepted as --apply_adalora (the released MRPC scripts used it);
  --apply_adalora or --apply_lora2 imply --apply_lora; --apply_adalora needs --lora_type svd (or
  --apply_lora2) and --target_rank (or --target_total_rank). --lora_type svd builds the layer --svd_layer
  names: "adalora" (AdaLoRA's SVDLinear; the driver's default, and lora2/run_glue_adalora.py's) or "lora2"
  (lora2/run_glue.py's default: in the LoRA² repository the same command built LoRA²'s layer, its loralib
  redefining SVDLinear with inner rank k = 8); --apply_lora2 always builds LoRA² (inner rank --lora2_k);
  the allocator runs only with --apply_adalora.
- loraplus: the LoRA+ repository initialised B with kaiming and A with zeros unless
  --lora_use_original_init was given, and its learning-rate ratios were tuned that way, so the swapped
  init is the default here too; --use_original_init (or its original name) restores LoRA's init. As in
  the LoRA+ GLUE script, the head (classifier / score) is trained and RoBERTa's classifier.dense is frozen.
- Flags of the original commands that change nothing here are accepted (and named in --help):
  --logging_dir, --report_to (tensorboard turns on TensorBoard in output_dir), --local_rank (from
  torch.distributed.launch), --overwrite_cache, --ignore_mismatched_sizes, --keep_checkpoints, --use_lora,
  --use_local, --optim adamw_torch/adamw_hf, --logging_strategy,
  --tb_writter_loginterval (AdaLoRA's scripts).
- nlu and lora2: --apply_lorapro (with --apply_lora, on LoRA's B A layers) trains with LoRA-Pro
  (loralib.optim.LoRAProAdamW, --lorapro_mode full|efficient) instead of AdamW; method "lorapro" in
  run_config.json. Its weight decay pulls s B A toward 0 and leaves W0 as loaded (decay_base_weight=False),
  because the adapter folders hold only the LoRA factors and the head. With --deepspeed it runs through
  loralib.optim.deepspeed_lorapro (full: moments sharded by pair, weight decay refused; efficient:
  adjusted gradients, DeepSpeed's AdamW).
- An evaluation-only run writes run_config.json too when output_dir has none (so `loralib compare` knows
  the model and method); it never replaces a training run's.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ...adalora import RankAllocator, adalora_state, apply_rank_pattern, compute_orth_regu, trim_ranks
from ...adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError
from ...config import LoRAConfig
from ...files import check_output_folder, write_json_atomic
from ...train.run_lock import hold_output_dir
from ...lora2 import LoRA2RankAllocator, compute_lora2_orth_regu
from ...optim import LoRAProAdamW, create_loraplus_optimizer
from ...utils import trainable_summary
from ...models.grad_checkpoint import enable_gradient_checkpointing
from ...train.distributed import zero_stage
from .data import GlueData, get_task, load_glue
from .metrics import compute_metrics, main_metric
from .tokenize import GlueCollator, encode_examples, ensure_pad_token

logger = logging.getLogger("loralib.glue")

FLAVOURS = ("nlu", "lora2", "loraplus")
RECIPES = ("released", "paper")
LORA2_RELEASED_CLS_DROPOUT = 0.15  # the released LoRA² run_glue.py's hard-coded head dropout
REPO_ROOT = Path(__file__).resolve().parents[3]
CLASSIFIER_FAMILIES = ("roberta", "bert", "deberta-v2")  # config.json model types with a dropout in the head
# What a previous training run left in output_dir (removed by --overwrite_output_dir, nothing else is).
RUN_OUTPUTS = ("adapter", "best_adapter", "metrics.jsonl", "tensorboard", "run_config.json", "train_results.json",
               "rank_pattern.json", "eval_results.json")
DESCRIPTIONS = {
    "nlu": "LoRA (Hu et al.) on GLUE with the flags of microsoft/LoRA examples/NLU.",
    "lora2": "LoRA² and AdaLoRA on GLUE with the flags of the released LoRA² / AdaLoRA scripts.",
    "loraplus": "LoRA+ on GLUE with the flags of the LoRA+ repository's glue/src/run_glue.py.",
}


# -- flags ------------------------------------------------------------------------------------------

def _add_common(parser: argparse.ArgumentParser, flavour: str) -> None:
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
    g.add_argument("--lora_path", default=None, help="adapter to start from or evaluate: microsoft's released .bin, "
                   "or one of our adapter folders")

    b = parser.add_argument_group("baselines (any LoRA run)")
    b.add_argument("--use_dora", action="store_true", help="DoRA layers (loralib.dora)")
    b.add_argument("--init_lora_weights", type=_init_flag, default=None,
                   help="True, gaussian, pissa, pissa_niter_N or lora_ga (PEFT's names)")
    b.add_argument("--loraga_batches", type=int, default=8,
                   help="lora_ga: training batches (per-device size) for the gradient estimate")

    t = parser.add_argument_group("training")
    default_do = flavour == "loraplus"  # the LoRA+ script's TrainingArguments default both to True
    t.add_argument("--do_train", action="store_true", default=default_do)
    t.add_argument("--do_eval", action="store_true", default=default_do)
    if default_do:
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
    t.add_argument("--cls_dropout", type=float, default=None, help="dropout of the classification head")
    t.add_argument("--recipe", choices=RECIPES, default="released",
                   help="released: the released code's behaviour where it and the paper disagree (LoRA²: head "
                        "dropout fixed at 0.15); paper: the paper's table (--cls_dropout honoured)")
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


def _init_flag(text: str):
    from ...init_methods import check_init

    try:
        return check_init(True if text.lower() == "true" else text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_lora(parser: argparse.ArgumentParser, flavour: str) -> None:
    g = parser.add_argument_group("LoRA")
    g.add_argument("--apply_lora", action="store_true", help="without it (and without --lora_path): full fine-tuning")
    g.add_argument("--lora_r", type=int, default=None, help="default 8")
    g.add_argument("--lora_alpha", type=float, default=None, help="default 2 r, the released runs' ratio")
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument("--apply_lorapro", action="store_true",
                   help="train the LoRA factors with LoRA-Pro (loralib.optim.LoRAProAdamW); needs --apply_lora")
    g.add_argument("--lorapro_mode", choices=("full", "efficient"), default="full",
                   help="full: Adam moments of the m x n equivalent gradient (the paper's); efficient: Adam on A, B")
    g.add_argument("--lora_a_init", choices=("kaiming", "normal"), default="kaiming",
                   help="kaiming: loralib's lora_A init; normal: N(0, initializer_range), as the DeBERTa fork")
    if flavour == "lora2":
        g.add_argument("--lora_module", default="query,value",
                       help="comma list of query,key,value,intermediate,layer.output,attention.output")


def _add_adalora(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("AdaLoRA / LoRA²")
    g.add_argument("--lora_type", choices=("frd", "svd"), default=None,
                   help="frd: LoRA's B A; svd: AdaLoRA's P diag(E) Q (default frd, svd with --apply_lora2)")
    g.add_argument("--apply_adalora", "--apply_rankselector", dest="apply_adalora", action="store_true",
                   help="allocate ranks during training (--apply_rankselector: the released scripts' spelling)")
    g.add_argument("--apply_lora2", action="store_true", help="LoRA²: P and Q themselves low-rank (inner rank --lora2_k)")
    g.add_argument("--svd_layer", choices=("adalora", "lora2"), default="adalora",
                   help="what --lora_type svd builds: AdaLoRA's SVDLinear, or LoRA²'s layer (the LoRA² repository's "
                        "meaning; lora2/run_glue.py's default)")
    g.add_argument("--lora2_k", type=int, default=8)
    g.add_argument("--target_rank", type=int, default=None, help="average final rank per matrix")
    g.add_argument("--target_total_rank", type=int, default=None, help="final total rank (overrides --target_rank)")
    g.add_argument("--init_warmup", type=int, default=4500)
    g.add_argument("--final_warmup", type=int, default=12000)
    g.add_argument("--mask_interval", type=int, default=10)
    g.add_argument("--beta1", type=float, default=0.85)
    g.add_argument("--beta2", type=float, default=0.85)
    g.add_argument("--reg_orth_coef", type=float, default=0.0)
    g.add_argument("--root_output_dir", default=None, help="the run goes to ROOT/model (as the released scripts did)")


def _add_loraplus(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LoRA+")
    g.add_argument("--loraplus_lr_ratio", type=float, default=None, help="lr_B / lr_A; unset: plain AdamW")
    g.add_argument("--loraplus_lr_embedding", type=float, default=1e-6)
    g.add_argument("--target_modules", default=None, help="comma list, e.g. 'query, value' or 'c_attn, c_proj, c_fc'")
    g.add_argument("--lora_rank", type=int, default=8)
    g.add_argument("--lora_alpha", type=float, default=16)
    g.add_argument("--lora_dropout", type=float, default=0.1)
    g.add_argument("--use_original_init", "--lora_use_original_init", dest="use_original_init", action="store_true",
                   help="LoRA's init (A kaiming, B zeros); default: the LoRA+ experiments' swapped init")
    g.add_argument("--use_lora", action="store_true", help="accepted; LoRA is always on here")


def build_parser(flavour: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour {flavour!r}: expected one of {FLAVOURS}")
    parser = argparse.ArgumentParser(prog=prog or "run_glue.py", description=DESCRIPTIONS[flavour])
    _add_common(parser, flavour)
    if flavour in ("nlu", "lora2"):
        _add_lora(parser, flavour)
    if flavour == "lora2":
        _add_adalora(parser)
    if flavour == "loraplus":
        _add_loraplus(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]], flavour: str, prog: Optional[str] = None) -> argparse.Namespace:
    args = build_parser(flavour, prog).parse_args(argv)
    args.flavour = flavour
    return args


# -- the method the flags ask for -------------------------------------------------------------------

@dataclass
class Method:
    """What is trained: name "full", "lora", "adalora", "lora2" or "lorapro" (LoRA layers, LoRA-Pro
    optimizer); lora None for full fine-tuning."""

    name: str
    lora: Optional[LoRAConfig] = None
    allocate: bool = False           # AdaLoRA's rank allocator runs
    reg_orth_coef: float = 0.0
    loraplus_ratio: Optional[float] = None
    lorapro_mode: Optional[str] = None  # "full" | "efficient": LoRAProAdamW instead of AdamW


def _split_list(text: str, flag: str) -> Tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise ValueError(f"{flag} {text!r} names no module")
    return items


def _check_positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be > 0, got {value}")


def resolve_method(args: argparse.Namespace, adapter_lora: Optional[LoRAConfig]) -> Method:
    """The Method of the flags; adapter_lora is the LoRA config an adapter given by --lora_path implies
    (used when no LoRA flag is given)."""
    flavour = args.flavour
    if flavour == "loraplus":
        _check_positive(args, "lora_rank", "loraplus_lr_ratio")
        if args.target_modules is None:
            if adapter_lora is None:
                raise ValueError("--target_modules is required, e.g. 'query, value' (RoBERTa), "
                                 "'c_attn, c_proj, c_fc' (GPT-2), 'q_proj, k_proj, v_proj, o_proj, up_proj, "
                                 "down_proj, gate_proj' (Llama)")
            return Method("lora", adapter_lora, loraplus_ratio=args.loraplus_lr_ratio)
        lora = LoRAConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=_split_list(args.target_modules, "--target_modules"),
                          init_swapped=not args.use_original_init)
        return Method("lora", lora, loraplus_ratio=args.loraplus_lr_ratio)

    _check_positive(args, "lora_r")
    method = _resolve_lora_method(args, adapter_lora)
    if args.apply_lorapro:
        if not args.apply_lora:
            raise ValueError("--apply_lorapro trains LoRA factors: add --apply_lora")
        if method.name != "lora":
            raise ValueError(f"--apply_lorapro works on LoRA's B A layers, not {method.name}'s SVD-form ones: "
                             "drop --apply_adalora / --apply_lora2 / --lora_type svd")
        if getattr(args, "deepspeed", None) and args.lorapro_mode == "full" and args.weight_decay:
            raise ValueError(f"--weight_decay {args.weight_decay} with --apply_lorapro --lorapro_mode full under "
                             "--deepspeed is not supported (DeepSpeed runs plain SGD on the full variant's "
                             "directions): use 0, --lorapro_mode efficient, or torchrun")
        method.name, method.lorapro_mode = "lorapro", args.lorapro_mode
    return method


def with_baseline_flags(args: argparse.Namespace, method: Method) -> Method:
    """--use_dora / --init_lora_weights on the method's LoRAConfig; one error naming the flags otherwise."""
    if not (args.use_dora or args.init_lora_weights is not None):
        return method
    if method.lora is None:
        raise ValueError("--use_dora / --init_lora_weights configure LoRA, which is off: add --apply_lora")
    if args.use_dora and method.lorapro_mode is not None:
        raise ValueError("DoRA (--use_dora) does not compose with LoRA-Pro (--apply_lorapro): LoRA-Pro's equivalent "
                         "gradient is that of W0 + s B A, which DoRA rescales")
    changes = {"use_dora": True} if args.use_dora else {}
    if args.init_lora_weights is not None:
        changes["init_lora_weights"] = args.init_lora_weights
    try:
        method.lora = method.lora.replace(**changes)
    except ValueError as err:
        raise ValueError(f"--use_dora / --init_lora_weights: {err}") from None
    return method


def _resolve_lora_method(args: argparse.Namespace, adapter_lora: Optional[LoRAConfig]) -> Method:
    """resolve_method for the nlu and lora2 flavours, LoRA-Pro aside."""
    flavour = args.flavour
    adaptive = flavour == "lora2" and (args.apply_adalora or args.apply_lora2)
    if not (args.apply_lora or adaptive):
        given = [f"--{n}" for n in ("lora_r", "lora_alpha", "lora_type", "target_rank", "target_total_rank")
                 if getattr(args, n, None) is not None]
        given += ["--reg_orth_coef"] if getattr(args, "reg_orth_coef", 0.0) else []
        if given:
            raise ValueError(f"{', '.join(given)} configure LoRA, which is off: add --apply_lora")
        return Method("lora", adapter_lora) if adapter_lora is not None else Method("full")
    r = args.lora_r if args.lora_r is not None else 8
    alpha = args.lora_alpha if args.lora_alpha is not None else 2 * r
    targets: Tuple[str, ...] = ("query", "value")  # the LoRA paper's NLU runs (DeBERTa: query_proj, value_proj)
    if flavour != "lora2":
        return Method("lora", LoRAConfig(r=r, lora_alpha=alpha, lora_dropout=args.lora_dropout, target_modules=targets))

    targets = _split_list(args.lora_module, "--lora_module")
    lora_type = args.lora_type or ("svd" if args.apply_lora2 else "frd")
    lora2 = args.apply_lora2 or (lora_type == "svd" and args.svd_layer == "lora2")
    if args.apply_lora2 and lora_type != "svd":
        raise ValueError("--apply_lora2 builds LoRA² layers, which are SVD-form: drop --lora_type frd")
    if args.apply_adalora and lora_type != "svd":
        raise ValueError("--apply_adalora allocates ranks of SVD-form layers: add --lora_type svd (AdaLoRA) or "
                         "--apply_lora2 (LoRA²)")
    if args.reg_orth_coef < 0:
        raise ValueError(f"--reg_orth_coef must be >= 0, got {args.reg_orth_coef}")
    if args.reg_orth_coef > 0 and lora_type != "svd":
        raise ValueError("--reg_orth_coef regularizes SVD-form factors: add --lora_type svd or --apply_lora2")
    if args.apply_adalora and args.target_rank is None and args.target_total_rank is None:
        raise ValueError("--apply_adalora needs --target_rank (average final rank per matrix) or --target_total_rank")
    _check_positive(args, "lora2_k")
    name = "lora2" if lora2 else ("adalora" if lora_type == "svd" else "lora")
    lora = LoRAConfig(r=r, lora_alpha=alpha, lora_dropout=args.lora_dropout, target_modules=targets,
                      method=name, lora2_k=args.lora2_k)
    return Method(name, lora, allocate=args.apply_adalora, reg_orth_coef=args.reg_orth_coef)


# -- model ------------------------------------------------------------------------------------------

def resolve_model_path(name_or_path: str) -> Path:
    """A model folder for --model_name_or_path: the folder itself, models/NAME, or a hub download."""
    from ...models.hub import HubUnreachableError, download_model

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    hub_like = (not name_or_path.startswith((".", "/", "~")) and name_or_path.count("/") <= 1
                and not name_or_path.endswith("/"))
    if not hub_like:
        raise FileNotFoundError(f"--model_name_or_path {name_or_path!r}: no such model folder")
    roots = [Path("models"), REPO_ROOT / "models"]
    for root in roots:
        if (root / name_or_path / "config.json").is_file():
            return root / name_or_path
    dest_root = REPO_ROOT / "models" if (REPO_ROOT / "models").is_dir() else Path("models")
    try:
        return download_model(name_or_path, dest_root=str(dest_root))
    except HubUnreachableError as e:
        raise HubUnreachableError(f"--model_name_or_path {name_or_path!r} is not a folder and not in "
                                  f"{' or '.join(str(r / name_or_path) for r in roots)}; {e}") from None


def load_pretrained(folder: Path, num_labels: int, lora: Optional[LoRAConfig],
                    overrides: Dict[str, Any]) -> nn.Module:
    """loralib.models.from_pretrained for sequence classification, with config.json entries overridden
    (cls_dropout) before the model is built."""
    from ...models import loading

    return loading.from_pretrained(folder, "sequence-classification", num_labels, lora, dtype=torch.float32,
                                   config_overrides=overrides)


def check_targets(hf_config: dict, lora: LoRAConfig, flag: str) -> None:
    """Every LoRA target must name at least one projection of the model (checked on the meta device)."""
    from ...models import loading

    if isinstance(lora.target_modules, str):
        return
    module = loading.family_module(hf_config.get("model_type"))
    for target in lora.target_modules:
        probe = LoRAConfig(r=1, lora_alpha=1, target_modules=(target,))
        with torch.device("meta"):
            model = module.build(hf_config, "base", None, probe)
        if not any(getattr(m, "has_lora", False) for m in model.modules()):
            raise ValueError(f"{flag}: {target!r} matches no projection of this {hf_config.get('model_type')} model")


def grow_embeddings(model: nn.Module, new_size: int) -> int:
    """Give the input embedding new_size rows; the new rows are the mean of the old ones (LoRA+'s recipe
    for Llama's added pad token). Returns the number of rows added."""
    old = model.hf_config["vocab_size"]
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == old), None)
    if embedding is None:
        raise ValueError(f"cannot find the input embedding ({old} rows) to add the pad token to")
    n_new = new_size - old
    with torch.no_grad():
        weight = embedding.weight
        rows = weight.mean(dim=0, keepdim=True).expand(n_new, -1)
        embedding.weight = nn.Parameter(torch.cat([weight, rows]), requires_grad=weight.requires_grad)
    embedding.num_embeddings = new_size
    model.hf_config["vocab_size"] = new_size
    if hasattr(getattr(model, "config", None), "vocab_size"):
        model.config.vocab_size = new_size
    return n_new


def normal_lora_a(model: nn.Module, std: float) -> int:
    """Redraw every lora_A (r, in) from N(0, std), as microsoft/LoRA's DeBERTa fork initialised it (its
    _init_weights); lora_B stays zero, so the model's output is unchanged. Returns the count redrawn."""
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "lora_A":
                param.normal_(0.0, std)
                count += 1
    if not count:
        raise ValueError("--lora_a_init normal: the model has no lora_A (add --apply_lora)")
    return count


def mark_trainable(model: nn.Module, method: Method, flavour: str) -> None:
    """Full fine-tuning trains everything. Otherwise the adapter factors and the head (everything outside
    the base model: classifier, pooler, score) are trained, as the released NLU scripts did."""
    if method.name == "full":
        for p in model.parameters():
            p.requires_grad = True
        return
    prefix = getattr(model, "base_model_prefix", "")
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name.rsplit(".", 1)[-1] or not name.startswith(prefix + ".")
    if flavour == "loraplus" and model.hf_config.get("model_type") == "roberta":
        for name, p in model.named_parameters():
            if name.startswith("classifier.dense."):  # the LoRA+ GLUE script froze it for RoBERTa
                p.requires_grad = False


# -- adapters given by --lora_path ------------------------------------------------------------------

@dataclass
class Adapter:
    """An adapter to load: microsoft's released file ("released") or one of our folders ("ours")."""

    kind: str
    path: Path
    tensors: Dict[str, torch.Tensor]
    lora: Optional[LoRAConfig]          # the config it implies
    rank_state: Optional[dict] = None   # AdaLoRA / LoRA² rank pattern saved with it
    run_config: Optional[dict] = None   # run_config.json of the run that made it, if found


def _find_upwards(folder: Path, name: str, levels: int = 3) -> Optional[Path]:
    for candidate in [folder, *list(folder.parents)[:levels - 1]]:
        if (candidate / name).is_file():
            return candidate / name
    return None


def read_lora_path(path: str) -> Adapter:
    from ...adapters import read_adapter_config
    from ...models.released_nlu import nlu_lora_config, read_nlu_adapter

    p = Path(path)
    if p.is_dir():
        config_file = p / ADAPTER_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"--lora_path {path!r}: folder without {ADAPTER_CONFIG}")
        if "peft_type" in json.loads(config_file.read_text()):
            raise AdapterError(f"--lora_path {path!r} is a PEFT adapter folder; load it with loralib.import_peft "
                               "on the model, or convert it with loralib.save_adapter")
        meta = read_adapter_config(p)
        weights = p / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"--lora_path {path!r}: {weights} is missing")
        tensors = load_file(str(weights))
        lora = LoRAConfig.from_dict(meta["lora"]) if meta.get("lora") else None
        rank_file = _find_upwards(p, "rank_pattern.json", 1)
        run_file = _find_upwards(p, "run_config.json")
        return Adapter("ours", p, tensors, lora,
                       json.loads(rank_file.read_text()) if rank_file else None,
                       json.loads(run_file.read_text()) if run_file else None)
    if not p.is_file():
        raise FileNotFoundError(f"--lora_path {path!r} does not exist")
    tensors = read_nlu_adapter(p)
    return Adapter("released", p, tensors, nlu_lora_config(tensors))


_FAMILY_PREFIX = {"roberta": "roberta", "bert": "bert", "deberta-v2": "deberta", "gpt2": "transformer", "llama": "model"}


def check_adapter_family(adapter: Adapter, model_type: str) -> None:
    """An adapter of another model family is refused before any model is built."""
    if adapter.kind == "released":
        prefixes = {k.split(".", 1)[0] for k in adapter.tensors if ".lora_" in k}
        want = _FAMILY_PREFIX.get(model_type)
        if prefixes and want not in prefixes:
            raise ValueError(f"--lora_path {str(adapter.path)!r} holds adapters of a {'/'.join(sorted(prefixes))} "
                             f"model; --model_name_or_path is a {model_type} model")
    elif adapter.run_config is not None:
        made_for = adapter.run_config.get("model_type")
        if made_for is not None and made_for != model_type:
            raise ValueError(f"--lora_path {str(adapter.path)!r} was trained on a {made_for} model "
                             f"({adapter.run_config.get('model_name_or_path')}); --model_name_or_path is a "
                             f"{model_type} model")


def _label_mismatch(key: str, got: tuple, want: tuple, num_labels: int) -> bool:
    """A head output tensor (its first dimension is the model's label count) sized for another label count."""
    return ("lora_" not in key and len(got) == len(want) and want[0] == num_labels and got[0] != want[0]
            and got[1:] == want[1:])


def load_lora_path(model: nn.Module, adapter: Adapter, num_labels: int, training: bool) -> List[str]:
    """Load the adapter into the model; returns the keys loaded. When training, head tensors whose label
    count differs are left out (a new head is trained); otherwise that is an error."""
    from ...models.released_nlu import load_nlu_adapter

    state = model.state_dict()
    tensors = dict(adapter.tensors)
    prefix = getattr(model, "base_model_prefix", "")
    mismatched = [k for k, v in tensors.items() if k in state and not k.startswith(prefix + ".")
                  and _label_mismatch(k, tuple(v.shape), tuple(state[k].shape), num_labels)]
    if mismatched:
        got, want = tuple(tensors[mismatched[0]].shape), tuple(state[mismatched[0]].shape)
        if not training:
            raise AdapterError(f"--lora_path {str(adapter.path)!r}: the adapter's head was trained for {got[0]} labels "
                               f"(key {mismatched[0]!r}), this task has {want[0]}")
        logger.warning("%s: head trained for %d labels, this task has %d: loading its LoRA factors and "
                       "training a new head (%s)", adapter.path, got[0], want[0], ", ".join(mismatched))
        for k in mismatched:
            del tensors[k]
    if adapter.kind == "released":
        return load_nlu_adapter(model, tensors)
    if adapter.rank_state and adapter.rank_state.get("trimmed"):
        trim_ranks(model, adapter.rank_state["rank_pattern"])
        state = model.state_dict()
    source = adapter.path / ADAPTER_WEIGHTS
    for key, value in tensors.items():
        if key not in state:
            raise AdapterError(f"{source}: key {key!r} is not in the model ({type(model).__name__}); the adapter "
                               "was made for another model or other LoRA targets")
        if tuple(value.shape) != tuple(state[key].shape):
            raise AdapterError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the model expects "
                               f"{tuple(state[key].shape)} (another model size, or another LoRA rank)")
    missing = [k for k in state if "lora_" in k.rsplit(".", 1)[-1] and k not in tensors]
    if missing:
        raise AdapterError(f"{source}: the model carries LoRA factors the adapter lacks, e.g. {missing[:3]} "
                           f"({len(missing)} in all): build it with the adapter's targets")
    model.load_state_dict(tensors, strict=False)
    if adapter.rank_state and not adapter.rank_state.get("trimmed"):
        apply_rank_pattern(model, adapter.rank_state["rank_pattern"])
    return sorted(tensors)


# -- data -------------------------------------------------------------------------------------------

def eval_sets(task_name: str, data_dir: str) -> List[GlueData]:
    """The dev sets to report: MNLI's matched and mismatched, one set for the other tasks."""
    task = get_task(task_name)
    names = [task.name] + (["mnli-mm"] if task.name == "mnli" else [])
    return [load_glue(name, data_dir, "dev") for name in names]


def split_name(data: GlueData) -> str:
    if data.task.folder == "MNLI":
        return f"{data.split}_{'mismatched' if data.task.name == 'mnli-mm' else 'matched'}"
    return data.split


@torch.no_grad()
def predict(model: nn.Module, features: List[dict], collate: Callable, batch_size: int) -> torch.Tensor:
    """Logits (n, num_labels) of the model on the features, in batches (the caller sets eval mode)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(features), batch_size):
        batch = collate(features[start:start + batch_size])
        batch.pop("labels", None)
        out.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
    return torch.cat(out)


def score(model: nn.Module, data: GlueData, features: List[dict], collate: Callable, batch_size: int) -> dict:
    logits = predict(model, features, collate, batch_size)
    labels = [f["labels"] for f in features]
    return compute_metrics(data.task.name, logits.numpy(), labels)


# -- the run ----------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """Everything a run needs, built and checked; nothing written yet."""

    args: argparse.Namespace
    output_dir: Path
    model_path: Path
    model: nn.Module
    tokenizer: Any
    method: Method
    task_name: str
    num_labels: int
    train_features: Optional[List[dict]]
    dev: List[Tuple[GlueData, List[dict]]]
    precision: str
    adapter: Optional[Adapter] = None
    total_steps: Optional[int] = None
    allocator: Any = None


@dataclass
class RunResult:
    output_dir: Path
    model: nn.Module
    eval_results: Optional[dict] = None
    train_results: Optional[dict] = None
    param_groups: List[dict] = field(default_factory=list)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _precision(args) -> str:
    if args.fp16 and args.bf16:
        raise ValueError("--fp16 and --bf16 exclude each other")
    if args.fp16:
        if torch.cuda.is_available():
            return "fp16"
        warnings.warn("--fp16 needs a GPU and none is available: training in fp32", stacklevel=2)
        return "fp32"
    return "bf16" if args.bf16 else "fp32"


def _output_dir(args) -> Path:
    root = getattr(args, "root_output_dir", None)
    if root is not None:
        if args.output_dir is not None and Path(args.output_dir) != Path(root) / "model":
            raise ValueError("--root_output_dir puts the run in ROOT/model; give it or --output_dir, not both")
        return Path(root) / "model"
    if args.output_dir is None:
        raise ValueError("--output_dir is required")
    return Path(args.output_dir)


def _check_output_dir(out: Path, args) -> None:
    check_output_folder(out, "--output_dir")  # a file, or read-only: refused before the model is built
    if not args.do_train or not out.is_dir() or not any(out.iterdir()):
        return
    if args.resume_from_checkpoint:
        return
    if args.overwrite_output_dir:
        if args.lora_path and out.resolve() in Path(args.lora_path).resolve().parents:
            raise ValueError(f"--lora_path {args.lora_path!r} lies inside --output_dir {str(out)!r}, which "
                             "--overwrite_output_dir would clear: train into another folder")
        return
    raise ValueError(f"--output_dir {str(out)!r} already holds files: add --overwrite_output_dir to replace the "
                     "previous run, or --resume_from_checkpoint latest to continue it")


def _position_limit(hf_config: dict) -> Optional[int]:
    """Input positions the model has a learned embedding for (None: relative or rotary positions only)."""
    kind, table = hf_config.get("model_type"), hf_config.get("max_position_embeddings")
    if kind == "gpt2":
        return hf_config.get("n_positions") or hf_config.get("n_ctx")
    if kind in ("roberta", "xlm-roberta", "camembert") and table:  # positions count from pad_token_id + 1
        return table - (hf_config.get("pad_token_id", 1) + 1)
    if kind in ("deberta-v2", "deberta") and not hf_config.get("position_biased_input", True):
        return None
    return table if kind in ("bert", "deberta-v2", "deberta") else None


def _check_positions(features: List[dict], limit: Optional[int], args, source) -> None:
    longest = max((len(f["input_ids"]) for f in features), default=0)
    if limit is not None and longest > limit:
        raise ValueError(f"--max_seq_length {args.max_seq_length}: {source} has examples of {longest} tokens but "
                         f"the model has {limit} positions; pass --max_seq_length {limit} or less")


def _steps(n_samples: int, args) -> int:
    """Optimizer steps of the run, computed as loralib.train does (so the allocator can be checked first)."""
    from ...train import ShardedBatches

    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = len(ShardedBatches(n_samples, args.per_device_train_batch_size, world, 0, seed=args.seed))
    per_epoch = math.ceil(micro / args.gradient_accumulation_steps)
    return args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def loraga_from_features(model: nn.Module, features: List[dict], collate: Callable, batch_size: int,
                         n_batches: int) -> None:
    """LoRA-GA's init from the mean gradient of the training loss over the first n_batches batches."""
    from ...init_methods import loraga_init

    if n_batches < 1:
        raise ValueError(f"--loraga_batches must be >= 1, got {n_batches}")

    def train_step():
        for start in range(0, min(len(features), n_batches * batch_size), batch_size):
            model(**collate(features[start:start + batch_size])).loss.backward()

    loraga_init(model, train_step)


def prepare(args: argparse.Namespace) -> Prepared:
    """Check the flags, read the data, build the model (LoRA inline) and load --lora_path. Writes nothing."""
    from ...models.loading import check_tokenizer_fits, family_module, load_tokenizer, read_config

    flavour = args.flavour
    out = _output_dir(args)
    if args.evaluation_strategy != "no":
        args.do_eval = True  # as transformers' TrainingArguments do
    if not (args.do_train or args.do_eval):
        raise ValueError("nothing to do: pass --do_train and/or --do_eval")
    if args.resume_from_checkpoint and not args.do_train:
        raise ValueError("--resume_from_checkpoint continues training: add --do_train")
    _check_positive(args, "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "max_seq_length", "logging_steps", "save_steps", "eval_steps", "max_train_samples",
                    "max_eval_samples", "num_train_epochs")
    if args.cls_dropout is not None and not 0.0 <= args.cls_dropout < 1.0:
        raise ValueError(f"--cls_dropout must lie in [0, 1), got {args.cls_dropout}")
    _check_output_dir(out, args)
    precision = _precision(args)
    task = get_task(args.task_name)

    # Data first: a missing or malformed file fails in seconds, before any model is read.
    train_data = load_glue(task.name, args.data_dir, "train") if args.do_train else None
    dev_data = eval_sets(task.name, args.data_dir) if args.do_eval else []
    num_labels = (train_data or dev_data[0]).num_labels

    adapter = read_lora_path(args.lora_path) if args.lora_path else None
    method = with_baseline_flags(args, resolve_method(args, adapter.lora if adapter else None))
    model_path = resolve_model_path(args.model_name_or_path)
    hf_config = read_config(model_path)
    model_type = hf_config.get("model_type")
    family_module(model_type, str(model_path / "config.json"))
    if adapter is not None:
        check_adapter_family(adapter, model_type)
    overrides = {}
    if args.cls_dropout is not None:
        if model_type not in CLASSIFIER_FAMILIES:
            raise ValueError(f"--cls_dropout: a {model_type} classifier has no dropout (only {', '.join(CLASSIFIER_FAMILIES)})")
        overrides["cls_dropout"] = args.cls_dropout
    if method.name == "lora2" and args.recipe == "released" and model_type in CLASSIFIER_FAMILIES:
        if args.cls_dropout not in (None, LORA2_RELEASED_CLS_DROPOUT):
            warnings.warn(f"--cls_dropout {args.cls_dropout} is ignored for LoRA² under --recipe released (the "
                          f"released code hard-coded {LORA2_RELEASED_CLS_DROPOUT}); --recipe paper honours it")
        overrides["cls_dropout"] = LORA2_RELEASED_CLS_DROPOUT
    if method.lora is not None:
        check_targets(hf_config, method.lora,
                      {"nlu": "LoRA target", "lora2": "--lora_module", "loraplus": "--target_modules"}[flavour])

    _seed(args.seed)  # the head and LoRA factors are drawn next, as in the original scripts (set_seed first)
    model = load_pretrained(model_path, num_labels, method.lora, overrides).train()
    model.loralib_config = method.lora
    if getattr(args, "lora_a_init", "kaiming") == "normal":
        normal_lora_a(model, model.hf_config.get("initializer_range", 0.02))

    tokenizer = load_tokenizer(Path(args.tokenizer_name) if args.tokenizer_name else model_path)
    added = ensure_pad_token(tokenizer, model_type)
    if added:
        n_tokens = len(tokenizer)
        if n_tokens > model.hf_config["vocab_size"]:
            grow_embeddings(model, n_tokens)
    check_tokenizer_fits(tokenizer, model.hf_config, str(model_path))

    if adapter is not None:
        loaded = load_lora_path(model, adapter, num_labels, training=args.do_train)
        logger.info("loaded %d tensors from %s", len(loaded), adapter.path)
    mark_trainable(model, method, flavour)
    if args.gradient_checkpointing:  # recompute each block in the backward pass (the LoRA+ Llama-7B recipe)
        enable_gradient_checkpointing(model)

    encode = lambda data, limit: encode_examples(  # noqa: E731
        data.examples[:limit] if limit else data.examples, tokenizer, args.max_seq_length,
        args.pad_to_max_length, is_regression=task.is_regression)
    train_features = encode(train_data, args.max_train_samples) if train_data is not None else None
    dev = [(d, encode(d, args.max_eval_samples)) for d in dev_data]
    if train_features and method.lora is not None and method.lora.init_lora_weights == "lora_ga" \
            and not args.resume_from_checkpoint:  # a resumed run loads A0, B0 (and so the residual) instead
        loraga_from_features(model, train_features, GlueCollator(tokenizer), args.per_device_train_batch_size,
                             args.loraga_batches)
    for data, features in dev:
        if any("labels" not in f for f in features):
            raise ValueError(f"{data.source}: the dev set has examples without a label; it cannot be scored")
    for data, features in ([(train_data, train_features)] if train_features else []) + dev:
        _check_positions(features, _position_limit(model.hf_config), args, data.source)
    if args.deepspeed:  # a typo found now, not after run_config.json is written
        zero_stage(args.deepspeed)

    prepared = Prepared(args, out, model_path, model, tokenizer, method, task.name, num_labels, train_features,
                        dev, precision, adapter)
    if train_features is not None:
        if not train_features:
            raise ValueError(f"{train_data.source}: no training examples")
        prepared.total_steps = _steps(len(train_features), args)
        if method.allocate:
            cls = LoRA2RankAllocator if method.name == "lora2" else RankAllocator
            prepared.allocator = cls(model, lora_r=method.lora.r, target_rank=args.target_rank or 0,
                                     init_warmup=args.init_warmup, final_warmup=args.final_warmup,
                                     mask_interval=args.mask_interval, beta1=args.beta1, beta2=args.beta2,
                                     total_step=prepared.total_steps, target_total_rank=args.target_total_rank)
        if args.deepspeed and prepared.allocator is not None and zero_stage(args.deepspeed) == 3:
            raise ValueError("--apply_adalora with a ZeRO-3 --deepspeed config is not supported (the factors rank "
                             "allocation scores and masks are partitioned there); use ZeRO-1/2 or torchrun")
    return prepared


def _clear_previous_run(out: Path, training: bool) -> None:
    """--overwrite_output_dir: remove what an earlier run of this driver wrote (eval results only, when
    this run only evaluates), and nothing else."""
    if not out.is_dir():
        return
    names = RUN_OUTPUTS if training else ("eval_results.json",)
    doomed = [out / n for n in names] + (
        [p for p in out.iterdir() if p.name.startswith(("checkpoint-", ".tmp-", ".old-"))] if training else [])
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _train_config(p: Prepared):
    from ...train import TrainConfig

    a = p.args
    schedule = "constant" if a.lr_scheduler_type.startswith("constant") else a.lr_scheduler_type
    # transformers' "constant" has no warmup; its "constant_with_warmup" is our constant schedule
    no_warmup = a.lr_scheduler_type == "constant"
    evaluate = a.do_eval and a.evaluation_strategy != "no"
    eval_every = (a.eval_steps or a.logging_steps) if a.evaluation_strategy == "steps" else None
    return TrainConfig(
        output_dir=str(p.output_dir), max_steps=a.max_steps if a.max_steps > 0 else None,
        num_epochs=a.num_train_epochs, per_device_batch_size=a.per_device_train_batch_size,
        grad_accum_steps=a.gradient_accumulation_steps, lr=a.learning_rate, weight_decay=a.weight_decay,
        betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon, schedule=schedule,
        warmup_steps=0 if no_warmup else a.warmup_steps, warmup_ratio=0.0 if no_warmup else a.warmup_ratio,
        max_grad_norm=a.max_grad_norm, precision=p.precision,
        eval_strategy=a.evaluation_strategy if evaluate else "no", eval_every=eval_every,
        save_strategy=a.save_strategy, save_every=a.save_steps if a.save_strategy == "steps" else None,
        save_total_limit=a.save_total_limit,
        metric_for_best=(a.metric_for_best_model or main_metric(p.task_name)) if evaluate else None,
        load_best_at_end=a.load_best_model_at_end and evaluate, seed=a.seed, num_workers=a.dataloader_num_workers,
        log_every=a.logging_steps, tensorboard="tensorboard" in a.report_to, progress_bar=not a.disable_tqdm,
        resume_from=a.resume_from_checkpoint, deepspeed_config=a.deepspeed, torch_compile=a.torch_compile)


def _group_summary(optimizer: torch.optim.Optimizer) -> List[dict]:
    return [{"name": g.get("name", f"group{i}"), "lr": g["lr"], "weight_decay": g.get("weight_decay", 0.0),
             "num_tensors": len(g["params"]), "numel": sum(p.numel() for p in g["params"])}
            for i, g in enumerate(optimizer.param_groups)]


def _run_config(p: Prepared) -> dict:
    return {"flavour": p.args.flavour, "task": p.task_name, "method": p.method.name, "recipe": p.args.recipe,
            "global_batch_size": p.args.per_device_train_batch_size * p.args.gradient_accumulation_steps
            * int(os.environ.get("WORLD_SIZE", "1")),
            "model_name_or_path": p.args.model_name_or_path, "model_path": str(p.model_path),
            "model_type": p.model.hf_config.get("model_type"), "num_labels": p.num_labels,
            "lora": p.method.lora.to_dict() if p.method.lora is not None else None,
            "loraplus_lr_ratio": p.method.loraplus_ratio, "precision": p.precision,
            "lora_path": p.args.lora_path, "args": {k: v for k, v in vars(p.args).items()}}


def execute(p: Prepared) -> RunResult:
    """Train (if asked), evaluate (if asked), and write the results files."""
    from ...train import default_optimizer, train

    a = p.args
    main_process = _rank() == 0
    result = RunResult(p.output_dir, p.model)
    if a.use_deterministic_algorithms:
        torch.use_deterministic_algorithms(True)
    if main_process and a.do_train:
        hold_output_dir(p.output_dir)  # one run per folder, locked before the first write (to process exit)
    if main_process and a.overwrite_output_dir and not a.resume_from_checkpoint:
        _clear_previous_run(p.output_dir, training=a.do_train)
    collate = GlueCollator(p.tokenizer)
    logger.info("%s", trainable_summary(p.model))

    if a.do_train:
        config = _train_config(p)
        if main_process and not (a.resume_from_checkpoint and (p.output_dir / "run_config.json").exists()):
            # a resume keeps the run's record: the loop refuses one whose result-changing settings differ
            p.output_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(p.output_dir / "run_config.json", _run_config(p))
        data, features = p.dev[0] if p.dev else (None, None)
        eval_fn = None
        if config.eval_strategy != "no":
            eval_fn = lambda m: score(m, data, features, collate, a.per_device_eval_batch_size)  # noqa: E731

        def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
            if p.method.lorapro_mode is not None:
                optimizer = LoRAProAdamW(model, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                                         eps=a.adam_epsilon, weight_decay=a.weight_decay, mode=p.method.lorapro_mode,
                                         decay_base_weight=False)
            elif p.method.loraplus_ratio is not None:
                optimizer = create_loraplus_optimizer(
                    model, torch.optim.AdamW, lr=a.learning_rate, loraplus_lr_ratio=p.method.loraplus_ratio,
                    loraplus_lr_embedding=a.loraplus_lr_embedding, weight_decay=a.weight_decay,
                    betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon)
            else:
                optimizer = default_optimizer(model, config)
            result.param_groups = _group_summary(optimizer)
            return optimizer

        regularizer = None
        if p.method.reg_orth_coef > 0:
            orth = compute_lora2_orth_regu if p.method.name == "lora2" else compute_orth_regu
            regularizer = lambda m: orth(m, regu_weight=p.method.reg_orth_coef)  # noqa: E731
        factory = make_optimizer if (a.deepspeed is None or p.method.loraplus_ratio is not None) else None
        callbacks = None
        if a.deepspeed is not None and p.method.lorapro_mode is not None:
            from ...optim.deepspeed_lorapro import lorapro_under_deepspeed

            config, factory, callbacks = lorapro_under_deepspeed(config, p.method.lorapro_mode,
                                                                 (a.adam_beta1, a.adam_beta2), a.adam_epsilon)
        outcome = train(p.model, p.train_features, collate, config, eval_fn=eval_fn, optimizer_factory=factory,
                        regularizer=regularizer, allocator=p.allocator, callbacks=callbacks)
        result.train_results = {"global_step": outcome.global_step, "epoch": outcome.epoch,
                                "train_loss": outcome.train_loss, "best_metric": outcome.best_metric,
                                "best_step": outcome.best_step, "adapter_dir": outcome.adapter_dir,
                                "best_adapter_dir": outcome.best_adapter_dir,
                                "last_checkpoint": outcome.last_checkpoint, "param_groups": result.param_groups}
        if main_process:
            write_json_atomic(p.output_dir / "train_results.json", result.train_results)
            if p.allocator is not None:
                state = adalora_state(p.model)
                write_json_atomic(p.output_dir / "rank_pattern.json", state)
                write_json_atomic(Path(outcome.adapter_dir) / "rank_pattern.json", state)
                kept = sum(sum(v) for v in state["rank_pattern"].values())
                logger.info("final rank budget %d of %d", kept, sum(len(v) for v in state["rank_pattern"].values()))

    if a.do_eval:
        p.model.eval()
        results: Dict[str, Any] = {}
        for i, (data, features) in enumerate(p.dev):
            metrics = score(p.model, data, features, collate, a.per_device_eval_batch_size)
            record = {"task": data.task.name, "split": split_name(data), "num_examples": len(features), **metrics}
            if i == 0:
                results.update(record)
            else:
                results[data.task.name] = record
            logger.info("eval %s: %s", data.task.name, metrics)
        result.eval_results = results
        if main_process:
            p.output_dir.mkdir(parents=True, exist_ok=True)
            if not (p.output_dir / "run_config.json").exists():  # evaluation only: say what was evaluated
                write_json_atomic(p.output_dir / "run_config.json", _run_config(p))
            write_json_atomic(p.output_dir / "eval_results.json", results)
    return result


def run_glue(argv: Optional[Sequence[str]], flavour: str, prog: Optional[str] = None) -> RunResult:
    """Parse, prepare and execute; errors propagate (see `main` for the command-line behaviour)."""
    return execute(prepare(parse_args(argv, flavour, prog)))


def main(argv: Optional[Sequence[str]] = None, flavour: str = "nlu", prog: Optional[str] = None) -> int:
    """The command line: 0 on success; a bad flag, file or adapter prints one `error:` line and returns 2."""
    from ...cli import INPUT_ERRORS, run_entry_point
    from ...models.hub import HubUnreachableError

    return run_entry_point(lambda: run_glue(argv, flavour, prog), prog or "run_glue.py",
                           INPUT_ERRORS + (HubUnreachableError,))
