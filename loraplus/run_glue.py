"""LoRA+ on GLUE with the flags of the LoRA+ repository's glue/src/run_glue.py (GPT-2, RoBERTa, Llama).

    python loraplus/run_glue.py --model_name_or_path gpt2 --task_name mnli --target_modules "c_attn, c_proj, c_fc" \
        --loraplus_lr_ratio 10 --lora_rank 8 --lora_alpha 8 --max_seq_length 128 \
        --per_device_train_batch_size 32 --num_train_epochs 3 --learning_rate 2e-4 \
        --lr_scheduler_type linear --adam_beta1 0.9 --adam_beta2 0.99 --adam_epsilon 1e-8 \
        --evaluation_strategy steps --eval_steps 500 --save_steps 500 --output_dir out/gpt2_mnli

B is trained with lr * --loraplus_lr_ratio (loralib.optim.create_loraplus_optimizer); --do_train and --do_eval
default to on, as in the LoRA+ script (--no_do_train / --no_do_eval turn them off). The LoRA+ experiments'
swapped init (B kaiming, A zeros) is the default; --use_original_init (or --lora_use_original_init) gives
LoRA's. GPT-2 pads with its eos token, Llama gets a new [PAD] token (embedding grown, new row = mean).
--use_dora and --init_lora_weights (pissa / lora_ga need --use_original_init: both set the factors) re-run a
row with DoRA, PiSSA or LoRA-GA. --recipe released|paper is recorded in run_config.json (no disagreement between
the LoRA+ paper and its scripts is known). As in the LoRA+ GLUE script, the head (classifier / score) is trained
and RoBERTa's classifier.dense is frozen. The flags shared with the other GLUE entry points (transformers'
TrainingArguments, data) are loralib.train.hf_flags; the run itself is loralib.tasks.glue.run; see their
docstrings. run_config.json records a LoRA+ run as method "lora" with its loraplus_lr_ratio (as it always did;
loralib compare counts that as loraplus).
"""
import argparse
import sys
from typing import Optional

from loralib.config import LoRAConfig
from loralib.methods import Method, make_method
from loralib.tasks.glue import run as glue
from loralib.train import hf_flags

PROG = "loraplus/run_glue.py"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="LoRA+ on GLUE with the flags of the LoRA+ repository's "
                                                            "glue/src/run_glue.py.")
    hf_flags.add_glue_flags(parser, do_by_default=True)  # the LoRA+ script's TrainingArguments default both to on
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
    g.add_argument("--lora_path", default=None, help="adapter to start from or evaluate (one of our adapter folders)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _method(args: argparse.Namespace, lora: LoRAConfig) -> Method:
    """LoRA+ with --loraplus_lr_ratio, plain LoRA (AdamW) without it."""
    lora = hf_flags.with_baselines(args, lora)
    if args.loraplus_lr_ratio is None:
        return make_method("lora", lora)
    return make_method("loraplus", lora, loraplus_ratio=args.loraplus_lr_ratio)


def method_of(args: argparse.Namespace) -> Optional[Method]:
    """The method of the flags; None without --target_modules (the adapter --lora_path names)."""
    hf_flags.check_positive(args, "lora_rank", "loraplus_lr_ratio")
    if args.target_modules is None:
        if not args.lora_path:
            raise ValueError("--target_modules is required, e.g. 'query, value' (RoBERTa), "
                             "'c_attn, c_proj, c_fc' (GPT-2), 'q_proj, k_proj, v_proj, o_proj, up_proj, "
                             "down_proj, gate_proj' (Llama)")
        return None
    lora = LoRAConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=hf_flags.split_list(args.target_modules, "--target_modules"),
                      init_swapped=not args.use_original_init)
    return _method(args, lora)


def glue_run(args: argparse.Namespace) -> glue.GlueRun:
    """The GlueRun of the flags."""
    method = method_of(args)
    fields = hf_flags.glue_fields(args, record={"flavour": "loraplus"},
                                  loraplus_lr_embedding=args.loraplus_lr_embedding)
    return glue.GlueRun(**fields, method=method, adapter_method=lambda lora: _method(args, lora),
                        frozen_head=("classifier.dense.",), target_flag="--target_modules")


def run_glue(argv=None) -> glue.RunResult:
    """Parse, translate, prepare and execute; errors propagate."""
    return glue.run_glue(glue_run(parse_args(argv)))


def main(argv=None) -> int:
    """0 on success; a bad flag, file or adapter: one `error:` line and 2."""
    args = parse_args(argv)
    return glue.main(lambda: glue_run(args), PROG)


if __name__ == "__main__":
    sys.exit(main())
