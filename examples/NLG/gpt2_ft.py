"""gpt2_ft.py: fine-tune GPT-2 on an NLG task (E2E, DART, WebNLG) with LoRA, with the flags of microsoft/LoRA
examples/NLG/src/gpt2_ft.py. This file parses them and translates them into loralib.tasks.nlg.train's
NLGTrainSpec; the run (data, loss, the original's checkpoint files) is described in that module's docstring.

    torchrun --nproc_per_node=1 examples/NLG/gpt2_ft.py --train_data data/e2e/train.jsonl \
        --valid_data data/e2e/valid.jsonl --train_batch_size 8 --grad_acc 1 --valid_batch_size 4 --seq_len 512 \
        --model_card gpt2.md --init_checkpoint models/gpt2-medium --platform local --clip 0.0 --lr 0.0002 \
        --weight_decay 0.01 --correct_bias --adam_beta2 0.999 --scheduler linear --warmup_step 500 --max_epoch 5 \
        --save_interval 1000 --lora_dim 4 --lora_alpha 32 --lora_dropout 0.1 --label_smooth 0.1 \
        --work_dir trained_models/GPT2_M/e2e --random_seed 110

Writes WORK_DIR/model.<step>.pt as the original (the LoRA factors at each --save_interval, the whole model at the
end, so the original gpt2_beam.py command reads it unchanged), model.<last step>.lora.pt (the last factors),
adapter/, checkpoint-<step>/, run_config.json and train_results.json.

Optimizer, as the original's optimizer.py: loralib.optim.GPT2FTAdamW (Adam with the bias correction only under
--correct_bias; decoupled weight decay applied after the Adam step) over every trainable tensor (biases and
LayerNorm weights excepted under --no_decay_bias); the linear / cosine / constant schedules after
--warmup_step linear warmup steps; --clip > 0 clips the global gradient norm.

Decisions where the original was silent, wrong or impossible here:
- --init_checkpoint: a GPT-2 folder (config.json + weights), a model.safetensors / pytorch_model.bin file
  (the original's gpt2-medium-pytorch_model.bin), or unset: models/gpt2-medium (by --model_card). Its size
  must be --model_card's (a folder with a non-standard size, e.g. a tiny test model, is used as it is).
  The original silently trained a random GPT-2 when the flag was left out.
- --max_step and --max_epoch: training stops at whichever comes first; one of them is required.
- Steps are optimizer steps: with --grad_acc > 1 the schedule advances once per accumulation group (the
  original stepped it every micro-batch, so its warmup and decay ran --grad_acc times faster).
- The original also wrote the whole model at the end of every epoch (as model.<step>.pt, 1.4 GB each for
  GPT-2 M); here only the end of training gets the whole model (the other epoch ends nothing, unless they
  fall on a --save_interval step, which gets the LoRA factors).
- --fp16 uses torch autocast with loss scaling on a GPU (the original needed apex); on a CPU: a warning, fp32.
  --fp16 with --bf16 is an error.
- The original's cosine schedule measured its decay from step 0, not from the warmup's end; ours from the
  warmup's end (loralib.train.schedules).
- Flags of the original that change nothing here are accepted: --platform, --local_rank, --rank, --device,
  --world_size (torchrun's environment is read; run_config.json records WORLD_SIZE as args.world_size),
  --roll_interval, --roll_lr, --roll_step, --eval_epoch, --i_steps, --i_lrs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from loralib.methods import OptimizerSettings, make_method
from loralib.models.gpt2_checkpoint import MODEL_CARDS
from loralib.tasks.nlg.completion import nlg_lora
from loralib.tasks.nlg.train import NLGTrainSpec, run
from loralib.train.run import RunSpec, precision_of, world_size


def add_gpu_flags(parser: argparse.ArgumentParser) -> None:
    """The original gpu.py's flags (gpt2_ft.py and gpt2_beam.py); torchrun's environment decides ranks and
    devices here."""
    g = parser.add_argument_group("distributed (the original's flags; torchrun's environment is what counts)")
    g.add_argument("--platform", default="k8s", help="accepted; launch several processes with torchrun")
    g.add_argument("--local_rank", "--local-rank", type=int, default=0, help="accepted; LOCAL_RANK is read")
    g.add_argument("--rank", type=int, default=0, help="accepted; RANK is read")
    g.add_argument("--device", type=int, default=0, help="accepted; the local rank's GPU is used")
    g.add_argument("--world_size", type=int, default=0, help="accepted; WORLD_SIZE is read (and recorded)")
    g.add_argument("--random_seed", type=int, default=10, help="random seed")


def recorded_flags(args: argparse.Namespace) -> dict:
    """The flags as run_config.json keeps them ("args"): as given, except --world_size, an accepted flag whose
    default (0) said nothing of the run: the number of processes torchrun started (WORLD_SIZE) is recorded."""
    return {**vars(args), "world_size": world_size()}


def add_optimizer_flags(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("optimizer (the original optimizer.py)")
    o.add_argument("--lr", type=float, default=0.00001)
    o.add_argument("--weight_decay", type=float, default=0.01)
    o.add_argument("--correct_bias", action="store_true", help="Adam's bias correction (the paper's runs set it)")
    o.add_argument("--adam_epislon", "--adam_epsilon", dest="adam_epislon", type=float, default=1e-6)
    o.add_argument("--no_decay_bias", action="store_true", help="no weight decay on biases and LayerNorm weights")
    o.add_argument("--adam_beta1", type=float, default=0.9)
    o.add_argument("--adam_beta2", type=float, default=0.98)
    o.add_argument("--scheduler", default="linear",
                   choices=("cosine", "inv_sqrt", "dev_perf", "constant", "linear", "cycle"),
                   help="linear, cosine or constant (each after --warmup_step); the others are not supported")
    o.add_argument("--max_step", type=int, default=None, help="optimizer steps (stops at this or --max_epoch)")
    o.add_argument("--max_epoch", type=int, default=None)
    o.add_argument("--warmup_step", type=int, default=0)
    o.add_argument("--i_steps", default="0", help="accepted (the unsupported cycle scheduler)")
    o.add_argument("--i_lrs", default="0.00025", help="accepted (the unsupported cycle scheduler)")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data and model")
    d.add_argument("--train_data", required=True, help="encoded JSONL: {'context': [ids], 'completion': [ids]}")
    d.add_argument("--valid_data", required=True, help="encoded JSONL for the validation loss")
    d.add_argument("--train_batch_size", type=int, default=8)
    d.add_argument("--valid_batch_size", type=int, default=4)
    d.add_argument("--grad_acc", type=int, default=1)
    d.add_argument("--clip", type=float, default=0.0, help="max gradient norm; 0: no clipping")
    d.add_argument("--seq_len", type=int, default=512, help="examples are cut to this many tokens")
    d.add_argument("--model_card", default="gpt2.md", choices=tuple(MODEL_CARDS))
    d.add_argument("--init_checkpoint", default=None, help="pretrained GPT-2: a folder, a model.safetensors or "
                   "pytorch_model.bin file (default: models/<gpt2 | gpt2-medium | gpt2-large> by --model_card)")
    d.add_argument("--fp16", action="store_true", help="fp16 autocast + loss scaling on a GPU (CPU: fp32)")
    d.add_argument("--bf16", action="store_true", help="bf16 autocast (not an original flag)")
    d.add_argument("--log_interval", type=int, default=100)
    d.add_argument("--eval_interval", type=int, default=2000)
    d.add_argument("--save_interval", type=int, default=500)
    d.add_argument("--work_dir", default=os.getenv("PT_OUTPUT_DIR", "gpt2_model"))
    d.add_argument("--lora_dim", type=int, default=0, help="LoRA rank r on q and v of c_attn; 0: full fine-tuning")
    d.add_argument("--lora_alpha", type=int, default=128)
    d.add_argument("--obj", default="clm", choices=("jlm", "clm"),
                   help="clm: loss on the completion; jlm: on every token")
    d.add_argument("--lora_dropout", type=float, default=0.0)
    d.add_argument("--label_smooth", type=float, default=0.0)
    d.add_argument("--recipe", choices=("released", "paper"), default="released",
                   help="recorded in run_config.json: which account of the paper the run follows (scripts/README.md)")
    d.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' or a checkpoint-<step> folder of --work_dir (not an original flag)")
    d.add_argument("--overwrite_work_dir", action="store_true",
                   help="train into a --work_dir that holds a previous run (not an original flag)")
    d.add_argument("--disable_tqdm", action="store_true", help="no progress bar (not an original flag)")
    d.add_argument("--torch_compile", action="store_true", help="torch.compile the training forward (inductor; off "
                   "by default: see benchmarks/README.md) (not an original flag)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt2_ft.py", description="Fine-tune GPT-2 with LoRA on E2E / DART / WebNLG "
                                "(the flags of microsoft/LoRA examples/NLG/src/gpt2_ft.py).")
    add_gpu_flags(p)
    add_optimizer_flags(p)
    add_run_flags(p)
    c = p.add_argument_group("accepted for the original commands; they change nothing here")
    c.add_argument("--roll_interval", type=int, default=-1)
    c.add_argument("--roll_lr", type=float, default=0.00001)
    c.add_argument("--roll_step", type=int, default=100)
    c.add_argument("--eval_epoch", type=int, default=1)
    return p


def check_flags(args: argparse.Namespace) -> None:
    """One clear error for a flag value the run cannot honour."""
    positive = ("train_batch_size", "valid_batch_size", "grad_acc", "seq_len", "log_interval", "eval_interval",
                "save_interval")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_step", "max_epoch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_step is None and args.max_epoch is None:
        raise ValueError("set --max_epoch or --max_step (the original ran forever without either)")
    if args.scheduler not in ("linear", "cosine", "constant"):
        raise ValueError(f"--scheduler {args.scheduler} is not supported; use linear, cosine or constant")
    if args.lora_dim < 0:
        raise ValueError(f"--lora_dim must be >= 0, got {args.lora_dim}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"--lora_dropout must lie in [0, 1), got {args.lora_dropout}")
    if not 0.0 <= args.label_smooth < 1.0:
        raise ValueError(f"--label_smooth must lie in [0, 1), got {args.label_smooth}")
    if args.lr < 0 or args.weight_decay < 0 or args.adam_epislon < 0 or args.warmup_step < 0 or args.clip < 0:
        raise ValueError("--lr, --weight_decay, --adam_epislon, --warmup_step and --clip must be >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ValueError(f"--{name} must lie in [0, 1), got {getattr(args, name)}")


def spec_from_args(args: argparse.Namespace) -> NLGTrainSpec:
    """The flags as an NLGTrainSpec: LoRA (r = --lora_dim on q and v) or full fine-tuning (--lora_dim 0),
    trained with the original optimizer.py's AdamW."""
    check_flags(args)
    lora = nlg_lora(args.lora_dim, args.lora_alpha, args.lora_dropout)
    method = make_method("lora", lora) if lora is not None else make_method("full", None)
    optimizer = OptimizerSettings(lr=args.lr, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epislon, max_grad_norm=args.clip, adamw="lora-repo",
                                  correct_bias=args.correct_bias, no_decay_bias=args.no_decay_bias)
    run_spec = RunSpec(output_dir=Path(args.work_dir), seed=args.random_seed,
                       precision=precision_of(args.fp16, args.bf16), resume_from=args.resume_from_checkpoint,
                       overwrite=args.overwrite_work_dir, output_flag="--work_dir")
    return NLGTrainSpec(
        run=run_spec, train_data=args.train_data, valid_data=args.valid_data, method=method, optimizer=optimizer,
        model_card=args.model_card, init_checkpoint=args.init_checkpoint, seq_len=args.seq_len,
        joint_lm=args.obj == "jlm", label_smooth=args.label_smooth, train_batch_size=args.train_batch_size,
        valid_batch_size=args.valid_batch_size, grad_acc=args.grad_acc, max_step=args.max_step,
        max_epoch=args.max_epoch, scheduler=args.scheduler, warmup_step=args.warmup_step,
        log_interval=args.log_interval, eval_interval=args.eval_interval, save_interval=args.save_interval,
        progress_bar=not args.disable_tqdm and sys.stderr.isatty(), torch_compile=args.torch_compile,
        recipe=args.recipe, record=recorded_flags(args))


def train_nlg(argv: Optional[Sequence[str]] = None):
    """Parse, check, train; returns loralib.train's TrainResult. Errors propagate (see `main`)."""
    return run(spec_from_args(build_parser().parse_args(argv)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: 0 on success; a bad flag, file or checkpoint prints one `error:` line, returns 2."""
    from loralib.cli import run_entry_point

    return run_entry_point(lambda: train_nlg(argv), "gpt2_ft.py")


if __name__ == "__main__":
    sys.exit(main())
