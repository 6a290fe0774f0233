"""Rank-allocator update time: AdaLoRA (scores every entry of A, E, B) against LoRA² (scores only E, aa, B).

    python benchmarks/bench_allocator.py                      # 4 Llama-7B blocks (28 matrices), CUDA if present
    python benchmarks/bench_allocator.py --device cpu --blocks 32

Layers shaped like Llama-7B's: per block q, k, v, o (4096 x 4096), gate and up (4096 -> 11008) and down
(11008 -> 4096), r = 8 (LoRA²: k = 8). Only the adapter factors and their gradients are allocated (the
frozen weights stay on the meta device: the allocator never reads them). Both allocators are the same
`loralib.adalora.RankAllocator` code; they differ only in what each layer type scores.

Measured, median over --repeats calls after --warmup calls, in the budgeting phase of the schedule:
  update          update_and_mask on a step that only updates the importance EMAs;
  update + mask   update_and_mask on a step that also computes triplet scores, the kthvalue threshold
                  and masks E (mask_interval = 1).
Target: LoRA²'s update at most 0.1x AdaLoRA's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loralib.adalora import RankAllocator, SVDLinear  # noqa: E402
from loralib.lora2 import LoRA2Linear, LoRA2RankAllocator  # noqa: E402

LLAMA_7B_BLOCK = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]


def build(kind: str, blocks: int, r: int, k: int, device: str, shapes=LLAMA_7B_BLOCK) -> nn.ModuleList:
    """Adapted layers ((in, out) per layer of a block in `shapes`) with real factors and gradients on
    `device`, frozen weights on meta."""
    layers = []
    for d_in, d_out in shapes * blocks:
        with torch.device("meta"):
            layer = (SVDLinear(d_in, d_out, r=r, lora_alpha=2 * r) if kind == "adalora"
                     else LoRA2Linear(d_in, d_out, r=r, lora_alpha=2 * r, k=k))
        for name in layer.lora_names:
            shape = getattr(layer, name).shape
            p = nn.Parameter(torch.randn(shape, device=device) * 0.02)
            p.grad = torch.randn(shape, device=device) * 1e-3
            setattr(layer, name, p)
        layer.rank_mask = torch.ones(r, dtype=torch.bool, device=device)
        layers.append(layer)
    return nn.ModuleList(layers)


def timed(fn, warmup: int, repeats: int, device: str) -> float:
    times = []
    for i in range(warmup + repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(i)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(kind: str, args, shapes=LLAMA_7B_BLOCK) -> dict:
    """Median milliseconds of `kind`'s allocator ("adalora" or "lora2"): update, and update + mask."""
    model = build(kind, args.blocks, args.r, args.k, args.device, shapes)
    cls = RankAllocator if kind == "adalora" else LoRA2RankAllocator
    total = 10 ** 6  # a long budgeting phase: every measured step is in it

    def allocator(mask_interval):
        return cls(model, lora_r=args.r, target_rank=args.r // 2, init_warmup=0, final_warmup=0,
                   mask_interval=mask_interval, beta1=0.85, beta2=0.85, total_step=total)

    update_only = allocator(mask_interval=total)  # steps 1.. never hit a multiple of it
    with_mask = allocator(mask_interval=1)
    n = args.warmup + args.repeats
    return dict(
        matrices=len(model), scored=update_only.num_scored,
        update=timed(lambda i: update_only.update_and_mask(model, i + 1), args.warmup, args.repeats, args.device),
        mask=timed(lambda i: with_mask.update_and_mask(model, i + 1), args.warmup, args.repeats, args.device),
        steps=n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--blocks", type=int, default=4, help="Llama-7B blocks (7 matrices each)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    results = {kind: measure(kind, args) for kind in ("adalora", "lora2")}
    base = results["adalora"]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"Allocator update on {args.blocks} Llama-7B block(s) = {base['matrices']} matrices "
          f"(4 x 4096x4096, 2 x 4096->11008, 1 x 11008->4096 per block), r = {args.r}, LoRA² k = {args.k}; "
          f"{where}; torch {torch.__version__}; median of {args.repeats} after {args.warmup} warm-up calls.\n")
    print("| allocator | scored entries | update (ms) | update + mask (ms) | update vs AdaLoRA | update + mask vs AdaLoRA |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, name in (("adalora", "AdaLoRA"), ("lora2", "LoRA²")):
        res = results[kind]
        print(f"| {name} | {res['scored']:,} | {res['update']:.3f} | {res['mask']:.3f} | "
              f"{res['update'] / base['update']:.3f}x | {res['mask'] / base['mask']:.3f}x |")
    ratio = results["lora2"]["update"] / base["update"]
    print(f"\nTarget LoRA² update <= 0.1x AdaLoRA's: {'met' if ratio <= 0.1 else 'NOT met'} ({ratio:.3f}x).")


if __name__ == "__main__":
    main()
