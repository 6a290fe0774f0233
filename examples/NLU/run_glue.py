"""LoRA on GLUE with the flags of microsoft/LoRA examples/NLU (RoBERTa, BERT, DeBERTa v2/v3).

    python examples/NLU/run_glue.py --model_name_or_path roberta-base --task_name mnli --do_train --do_eval \
        --max_seq_length 512 --per_device_train_batch_size 16 --learning_rate 5e-4 --num_train_epochs 30 \
        --warmup_ratio 0.06 --weight_decay 0.1 --evaluation_strategy epoch --save_strategy epoch \
        --apply_lora --lora_r 8 --lora_alpha 16 --seed 0 --output_dir out/mnli

    # evaluate microsoft's released adapter
    python examples/NLU/run_glue.py --model_name_or_path roberta-base --task_name mnli --do_eval \
        --lora_path roberta_base_lora_mnli.bin --apply_lora --lora_r 8 --lora_alpha 16 --output_dir out/eval

LoRA goes on the self-attention query and value projections (r 8, alpha 2 r unless given); without --apply_lora
(and without --lora_path): full fine-tuning. Any row re-runs with a baseline: --use_dora (DoRA),
--init_lora_weights pissa | pissa_niter_N | lora_ga (with --loraga_batches N). --apply_lorapro trains the factors
with LoRA-Pro (--lorapro_mode full|efficient). --lora_a_init normal draws lora_A from N(0, 0.02) as microsoft's
DeBERTa fork did (default: loralib's kaiming init); --recipe released|paper is recorded in run_config.json
(scripts/README.md lists where the paper's tables and its scripts disagree; the scripts choose the flag values).
The flags shared with the other GLUE entry points (transformers' TrainingArguments, data) are
loralib.train.hf_flags; the run itself (data, model, training, results files, the decisions where the original
was silent) is loralib.tasks.glue.run; see their docstrings.
"""
import argparse
import sys
from typing import Optional

from loralib.config import LoRAConfig
from loralib.methods import Method, make_method
from loralib.tasks.glue import run as glue
from loralib.train import hf_flags

PROG = "examples/NLU/run_glue.py"
TARGETS = ("query", "value")  # the LoRA paper's NLU runs (DeBERTa: query_proj, value_proj)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="LoRA (Hu et al.) on GLUE with the flags of "
                                                            "microsoft/LoRA examples/NLU.")
    hf_flags.add_glue_flags(parser)
    hf_flags.add_lora_flags(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def method_of(args: argparse.Namespace) -> Optional[Method]:
    """The method of the flags; None without --apply_lora (full fine-tuning, or the adapter --lora_path names)."""
    hf_flags.check_positive(args, "lora_r")
    if not args.apply_lora:
        hf_flags.check_lora_off(args, [f"--{n}" for n in ("lora_r", "lora_alpha") if getattr(args, n) is not None])
        return None
    r = args.lora_r if args.lora_r is not None else 8
    alpha = args.lora_alpha if args.lora_alpha is not None else 2 * r
    lora = LoRAConfig(r=r, lora_alpha=alpha, lora_dropout=args.lora_dropout, target_modules=TARGETS)
    lora = hf_flags.with_baselines(args, lora, lorapro=args.apply_lorapro)
    if args.apply_lorapro:
        return make_method("lorapro", lora, lorapro_mode=args.lorapro_mode)
    return make_method("lora", lora)


def glue_run(args: argparse.Namespace) -> glue.GlueRun:
    """The GlueRun of the flags."""
    method = method_of(args)
    return glue.GlueRun(**hf_flags.glue_fields(args, record={"flavour": "nlu"}), method=method,
                        adapter_method=lambda lora: glue.adapter_method(hf_flags.with_baselines(args, lora)),
                        lora_a_init=args.lora_a_init)


def run_glue(argv=None) -> glue.RunResult:
    """Parse, translate, prepare and execute; errors propagate."""
    return glue.run_glue(glue_run(parse_args(argv)))


def main(argv=None) -> int:
    """0 on success; a bad flag, file or adapter: one `error:` line and 2."""
    args = parse_args(argv)
    return glue.main(lambda: glue_run(args), PROG)


if __name__ == "__main__":
    sys.exit(main())
