"""A tiny LoRA model and data set for the hardening and fault-injection tests, importable and runnable.

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
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import loralib  # noqa: E402
from loralib.train import TrainConfig, train  # noqa: E402

IN, CLASSES = 6, 3
FAST = dict(per_device_batch_size=4, progress_bar=False, log_every=1, device="cpu")


class TinyNet(nn.Module):
    """Two LoRA layers and a trainable head; forward(x, labels) -> {"loss", "logits"}."""

    def __init__(self):
        super().__init__()
        self.l1 = loralib.Linear(IN, 16, r=4, lora_alpha=8)
        self.l2 = loralib.Linear(16, 8, r=2, lora_alpha=4)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x, labels=None):
        logits = self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))
        return {"loss": None if labels is None else F.cross_entropy(logits, labels), "logits": logits}


def tiny_model() -> TinyNet:
    torch.manual_seed(1)
    model = TinyNet()
    loralib.mark_only_lora_as_trainable(model)
    for p in model.head.parameters():
        p.requires_grad = True
    with torch.no_grad():  # B = 0 at init would make the first steps trivial
        for layer in (model.l1, model.l2):
            layer.lora_B.normal_(std=0.2)
    return model


def tiny_data(n: int = 32):
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(n, IN, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def collate(items):
    return {"x": torch.stack([d["x"] for d in items]), "labels": torch.stack([d["labels"] for d in items])}


def accuracy(model) -> dict:
    data = collate(tiny_data())
    with torch.no_grad():
        return {"accuracy": float((model(data["x"])["logits"].argmax(-1) == data["labels"]).float().mean())}


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
