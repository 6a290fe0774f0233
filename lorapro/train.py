"""LoRA-Pro (Wang et al., ICLR 2025) and its baselines on instruction data, with the released scripts' flags
(`--lora lora-pro-full --seed 0 --lr 0.00002`) and the run command's hyper-parameters as flags.

    python lorapro/train.py --lora lora-pro --dataset metamath --data_path data/instruct/metamath.jsonl \
        --eval_data_path data/instruct/gsm8k_test.jsonl --seed 0 --output_dir outputs/gsm8k/lora-pro/seed0 --do_eval
    torchrun --nproc_per_node 8 lorapro/train.py --lora rslora-pro ...        # DDP, global batch still 32
    torchrun --nproc_per_node 8 lorapro/train.py --lora lora-pro --deepspeed lorapro/ds_zero2.json ...  # or ds_zero3

--lora: lora, rslora, lora-pro (= lora-pro-full), rslora-pro, loraplus, adalora, lora2, dora, pissa, lora-ga, full
(--use_rslora, --use_dora, --init_lora_weights compose with the LoRA ones). The released code's rules, off by
default (lorapro/README.md, "Released vs corrected"): --lorapro_released_clipping, --lorapro_released_scaling
(full mode), --lorapro_released_weight_decay (efficient mode). The flags and their defaults are lorapro/flags.py;
the run, and what lands in --output_dir, is loralib.tasks.instruct.run.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root, for lorapro.flags
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from lorapro import flags  # noqa: E402
from loralib.tasks.instruct import run as instruct  # noqa: E402

PROG = "lorapro/train.py"


def run(argv=None) -> dict:
    """Parse, prepare and execute (errors propagate): {"train": ..., "eval": ...}."""
    return instruct.execute(instruct.prepare(flags.train_spec(argv, PROG)))


def main(argv=None) -> int:
    return flags.exit_code(lambda: run(argv), PROG)


if __name__ == "__main__":
    sys.exit(main())
