"""LoRA-Pro's T5-base GLUE table (the LoRA-GA setting): one (method, task, seed) row, text-to-text.

    python lorapro/run_t5_glue.py --model_name_or_path t5-base --task mnli --data_dir data --lora lora-pro \
        --seed 0 --output_dir outputs/lorapro_t5_glue/mnli/lora-pro/seed0

--task: mnli, sst2, cola, qnli, mrpc. --lora: lora, rslora, lora-pro (= lora-pro-full), rslora-pro, loraplus,
adalora, lora2, dora, pissa, lora-ga, full (--use_rslora / --use_dora / --init_lora_weights compose as in
lorapro/train.py). Every flag is a field of loralib.tasks.t5glue.run.T5GlueRun (same name, same default: the
setting's hyper-parameters); what is written to --output_dir, and the decisions, are in that module's docstring.
"""
import argparse
import dataclasses
import sys
import typing

from loralib.cli import run_entry_point
from loralib.init_methods import check_init
from loralib.methods import method_entry
from loralib.tasks.t5glue import run as t5glue

# the table's rows, as this script spells them; any name or alias of loralib.methods is read as one of them
METHODS = ("lora", "rslora", "lora-pro", "rslora-pro", "loraplus", "adalora", "lora2", "dora", "pissa", "lora-ga",
           "full")
HIDDEN = ("given",)  # filled in here
CHOICES = {"lora": METHODS, "task": ("mnli", "sst2", "cola", "qnli", "mrpc"),
           "lorapro_mode": ("full", "efficient"), "eval_mode": ("score", "generate"),
           "lr_scheduler_type": ("cosine", "linear", "constant")}
HELP = {"model_name_or_path": "a T5 model folder, or a hub name looked up in models/NAME",
        "data_dir": "GLUE folder: official TSVs (data/MNLI/train.tsv) or data/download_glue.py's save_to_disk folders",
        "lora": "the method", "lorapro_mode": "LoRA-Pro variant (default full)",
        "target_modules": "comma list (default: every linear layer but the head: q,k,v,o,wi[,wi_0,wi_1],wo)",
        "loraplus_lr_ratio": "loraplus: lr_B / lr_A (default 16)",
        "adalora_allocate": "adalora: run the rank allocator (the released Trainer never did)",
        "mask_label_padding": "ignore padded label positions in the loss (released: trained as pad tokens)",
        "eval_mode": "score the label words' first tokens (the setting) or generate them",
        "max_train_samples": "first N training examples (default all)", "max_eval_samples": "first N dev examples",
        "bf16": "bf16 frozen weights + autocast (the setting: fp32)",
        "use_rslora": "rsLoRA scaling alpha / sqrt(r)", "use_dora": "DoRA layers (not with LoRA-Pro)",
        "loraga_batches": "LoRA-GA: training batches of the gradient estimate"}


def _method_flag(text: str) -> str:
    """--lora: the row's spelling of the registry's method ("lorapro", "lora-pro-full" -> "lora-pro")."""
    try:
        name = method_entry(text).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return next((m for m in METHODS if method_entry(m).name == name), name)


def _init_flag(text: str):
    try:
        return check_init(True if text.lower() == "true" else text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorapro/run_t5_glue.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(t5glue.T5GlueRun)
    for f in dataclasses.fields(t5glue.T5GlueRun):
        if f.name in HIDDEN:
            continue
        kind = hints[f.name]
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional[X] -> X
        required = f.default is dataclasses.MISSING
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                                help=HELP.get(f.name))
        elif f.name == "init_lora_weights":
            parser.add_argument("--init_lora_weights", type=_init_flag, default=None,
                                help="True, gaussian, pissa, pissa_niter_N or lora_ga (default: the method's)")
        elif f.name == "lora":
            parser.add_argument("--lora", type=_method_flag, default=f.default,
                                choices=CHOICES["lora"], help=HELP["lora"])
        else:
            parser.add_argument(f"--{f.name}", type=kind, required=required, choices=CHOICES.get(f.name),
                                default=None if required else f.default, help=HELP.get(f.name))
    return parser


def spec_from_argv(argv=None) -> "t5glue.T5GlueRun":
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(build_parser().parse_args(argv))
    return t5glue.T5GlueRun(**args, given=tuple(a.split("=")[0] for a in argv if a.startswith("--")))


def main(argv=None) -> int:
    return run_entry_point(lambda: t5glue.execute(t5glue.prepare(spec_from_argv(argv))), "lorapro/run_t5_glue.py")


if __name__ == "__main__":
    sys.exit(main())
