"""`make demo-digits`: the core layers end to end on real data, offline, in a minute.

A small conv net is pretrained on scikit-learn's handwritten digits 0-4, then adapted to digits 5-9 three
ways: a new head on the frozen net, LoRA (loralib.Conv2d / loralib.Linear, r = 4) plus the head, and full
fine-tuning. It prints test accuracy and trainable-parameter counts, then checks that the merged LoRA model
(model.eval()) gives the same predictions and that the adapter saved with loralib.save_adapter reloads.

Run: python demo/digits.py [--epochs N] [--rank R] [--seed S]   (make demo-digits)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python demo/digits.py` from a checkout

import loralib as lora  # noqa: E402


class DigitsNet(nn.Module):
    """(B, 1, 8, 8) images -> (B, n_classes) logits; LoRA of rank r on both convolutions and the hidden layer."""

    def __init__(self, r: int = 0, n_classes: int = 5):
        super().__init__()
        self.conv1 = lora.Conv2d(1, 16, 3, r=r, lora_alpha=2 * r or 1, padding=1)
        self.conv2 = lora.Conv2d(16, 32, 3, r=r, lora_alpha=2 * r or 1, padding=1)
        self.hidden = lora.Linear(32 * 2 * 2, 64, r=r, lora_alpha=2 * r or 1)
        self.head = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 16, 4, 4)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 2, 2)
        return self.head(F.relu(self.hidden(x.flatten(1))))


def load_digits_split(seed: int):
    """Digits as (x, y) tensors: pretraining task (0-4) and adaptation task (5-9, labels 0-4), train/test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    tasks = {}
    for name, keep in (("pretrain", y < 5), ("adapt", y >= 5)):
        xs, ys = x[keep], y[keep] % 5
        x_tr, x_te, y_tr, y_te = train_test_split(xs, ys, test_size=0.3, random_state=seed, stratify=ys)
        tasks[name] = (x_tr, y_tr, x_te, y_te)
    return tasks


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rank < 1 or args.epochs < 1:
        parser.error(f"--rank and --epochs must be positive, got --rank {args.rank} --epochs {args.epochs}")
    torch.manual_seed(args.seed)
    start = time.time()
    tasks = load_digits_split(args.seed)

    pre = DigitsNet(r=0)
    train(pre, *tasks["pretrain"][:2], epochs=args.epochs, lr=3e-3, seed=args.seed)
    print(f"pretrained on digits 0-4: test accuracy {accuracy(pre, *tasks['pretrain'][2:]):.3f}")
    pretrained_state = {k: v for k, v in pre.state_dict().items() if not k.startswith("head.")}

    x_tr, y_tr, x_te, y_te = tasks["adapt"]
    results = {}

    def adapted(r: int) -> DigitsNet:
        torch.manual_seed(args.seed + 1)  # the same new head in every variant
        model = DigitsNet(r=r)
        model.load_state_dict(pretrained_state, strict=False)  # pretrained first, as loralib's README says
        return model

    frozen = adapted(0)
    for name, p in frozen.named_parameters():
        p.requires_grad = name.startswith("head.")
    low_rank = adapted(args.rank)
    lora.mark_only_lora_as_trainable(low_rank)
    for p in low_rank.head.parameters():
        p.requires_grad = True
    full = adapted(0)

    print(f"\nadapting to digits 5-9 ({len(x_tr)} train / {len(x_te)} test images):")
    print(f"| {'method':<24} | {'trainable / all params':>22} | {'test accuracy':>13} |")
    print(f"|{'-' * 26}|{'-' * 24}|{'-' * 15}|")
    for name, model, lr in (("frozen net + new head", frozen, 3e-3), (f"LoRA r={args.rank} + new head", low_rank, 3e-3),
                            ("full fine-tuning", full, 1e-3)):
        train(model, x_tr, y_tr, epochs=args.epochs, lr=lr, seed=args.seed)
        trainable, total = lora.count_parameters(model)
        results[name] = accuracy(model, x_te, y_te)
        print(f"| {name:<24} | {f'{trainable:,} / {total:,}':>22} | {results[name]:>13.3f} |")

    # merged inference (eval() folds B A into the weights) predicts exactly what the unmerged model does
    low_rank.train()
    with torch.no_grad():
        unmerged = low_rank(x_te)
    merged_acc = accuracy(low_rank, x_te, y_te)
    with torch.no_grad():
        max_diff = (low_rank(x_te) - unmerged).abs().max().item()
    print(f"\nLoRA merged for inference: accuracy {merged_acc:.3f}, max |logit difference| {max_diff:.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        lora.save_adapter(low_rank, tmp, include=["head"])
        reloaded = adapted(args.rank)
        lora.load_adapter(reloaded, tmp)
        print(f"adapter saved and reloaded into the pretrained net: accuracy {accuracy(reloaded, x_te, y_te):.3f}")
    print(f"\ndone in {time.time() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
