"""The tiny LoRA model and data of test_train_loop for the hardening and fault-injection tests, importable and
runnable.

    model, data = tiny_model(), tiny_data()
    train(model, data, collate, TrainConfig(output_dir=..., **FAST))

As a script it trains into OUTPUT_DIR (the fault tests kill it, race two of them, resume it):

    python tests/_hardening_fixtures.py OUTPUT_DIR [--resume] [--lr LR] [--steps N] [--sleep SECONDS]

--sleep pauses after every optimizer step (a callback), so a test can kill the run between checkpoints.
It prints "ready" once it holds the output folder and "done" at the end.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loralib.train import TrainConfig, train  # noqa: E402
# test_train_loop's model (two LoRA layers and a head), 48 samples and collate
from test_train_loop import build as tiny_model, collate, data as tiny_data  # noqa: E402

FAST = dict(per_device_batch_size=4, progress_bar=False, log_every=1, device="cpu")


def accuracy(model) -> dict:
    batch = collate(tiny_data())
    with torch.no_grad():
        return {"accuracy": float((model(batch["x"])["logits"].argmax(-1) == batch["labels"]).float().mean())}


def adapter_tensors(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or k.startswith("head")}


def write_tiny_roberta(folder: Path, max_positions: int = 40) -> Path:
    """A random 1-layer RoBERTa (transformers' save_pretrained) and the offline tokenizer, in `folder`."""
    import transformers
    from _glue_fixtures import make_tokenizer

    torch.manual_seed(0)
    model = transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=64, max_position_embeddings=max_positions, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32), add_pooling_layer=False)
    model.save_pretrained(folder)
    make_tokenizer("roberta").save_pretrained(folder)
    return folder


class _Pause:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_begin(self, state):
        print("ready", flush=True)

    def on_step_end(self, state, logs):
        print(f"step {state.global_step}", flush=True)
        time.sleep(self.seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args(argv)
    config = TrainConfig(output_dir=args.output_dir, max_steps=args.steps, lr=args.lr, save_strategy="steps",
                         save_every=2, resume_from="latest" if args.resume else None, **FAST)
    try:
        train(tiny_model(), tiny_data(), collate, config, callbacks=[_Pause(args.sleep)])
    except ValueError as e:  # what an entry point does: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
