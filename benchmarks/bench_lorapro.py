"""LoRA-Pro's optimizer overhead on Llama-7B-shaped layers: step time and state memory against AdamW.

One Llama-7B block has seven adapted projections: q, k, v, o (4096 -> 4096), gate and up (4096 -> 11008)
and down (11008 -> 4096); r = 8, alpha = 16. `--blocks N` times that many layers are built. Each row
times `optimizer.step()` alone (gradients are set by hand, identical for every row) and counts the bytes
of the optimizer's state tensors.

    python benchmarks/bench_lorapro.py                      # CPU, one block (7 layers)
    python benchmarks/bench_lorapro.py --device cuda --blocks 4

Targets (issue 4 §7): efficient LoRA-Pro at most 1.2x the AdamW step. The full mode's extra state for all
of Llama-2-7B (32 blocks x 7 projections, two fp32 m x n moments each) is computed from the shapes.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

import loralib
from loralib.optim import LoRAProAdamW

HIDDEN, INTERMEDIATE, N_BLOCKS_7B, R = 4096, 11008, 32, 8
BLOCK_SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, INTERMEDIATE)] * 2 + [(INTERMEDIATE, HIDDEN)]  # (in, out)


def build(blocks: int, device: str, shapes=BLOCK_SHAPES) -> nn.Module:
    """blocks x len(shapes) LoRA layers (shapes: (in, out) per layer of a block) with fp32 factors and
    gradients on `device`."""
    torch.manual_seed(0)
    layers = nn.ModuleList()
    for _ in range(blocks):
        for fan_in, fan_out in shapes:
            # The frozen weight is never read by the optimizer (weight decay 0): a zero-stride stand-in
            # with the right shape and no memory, so 32 blocks fit beside the full mode's state.
            layer = loralib.Linear(fan_in, fan_out, r=R, lora_alpha=16, device="meta")
            stand_in = torch.zeros((), dtype=torch.bfloat16, device=device).expand(fan_out, fan_in)
            layer.weight = nn.Parameter(stand_in, requires_grad=False)
            layer.bias = None
            layer.lora_A = nn.Parameter(torch.randn(R, fan_in, device=device) / fan_in ** 0.5)
            layer.lora_B = nn.Parameter(torch.randn(fan_out, R, device=device) * 1e-3)  # trained a while
            layers.append(layer)
    for p in layers.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    return layers


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def time_steps(opt, device: str, steps: int, warmup: int) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        opt.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--blocks", type=int, default=1, help="Llama blocks of 7 layers each")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the fastest counts")
    parser.add_argument("--skip-full", action="store_true", help="skip the full mode (2 fp32 m x n per layer)")
    args = parser.parse_args()

    model = build(args.blocks, args.device)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    makers = [("AdamW (LoRA)", lambda: torch.optim.AdamW(lora_params, lr=1e-5, weight_decay=0.0)),
              ("LoRA-Pro efficient", lambda: LoRAProAdamW(model, lr=1e-5, mode="efficient"))]
    if not args.skip_full:
        makers.append(("LoRA-Pro full", lambda: LoRAProAdamW(model, lr=1e-5, mode="full")))
    # Rounds interleave the optimizers and each keeps its fastest round: robust to a shared machine.
    opts = [(name, make()) for name, make in makers]
    best = {name: float("inf") for name, _ in opts}
    for _ in range(args.rounds):
        for name, opt in opts:
            best[name] = min(best[name], time_steps(opt, args.device, args.steps, args.warmup))
    rows = [(name, best[name], state_bytes(opt)) for name, opt in opts]

    n_layers = 7 * args.blocks
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"CPU ({torch.get_num_threads()} threads)")
    print(f"{n_layers} Llama-7B-shaped layers ({args.blocks} block(s): 4x 4096x4096, 2x 4096->11008, "
          f"1x 11008->4096), r={R}, fp32 LoRA factors, {device_name}, "
          f"best of {args.rounds} rounds of {args.steps} steps\n")
    print("| optimizer | step time (ms) | x AdamW | state (MiB) |")
    print("|---|---:|---:|---:|")
    base = rows[0][1]
    for name, seconds, nbytes in rows:
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / base:.2f} | {nbytes / 2**20:.1f} |")

    per_block = sum(fan_in * fan_out for fan_in, fan_out in BLOCK_SHAPES)
    extra = 2 * 4 * per_block * N_BLOCKS_7B
    print(f"\nFull mode's extra state for Llama-2-7B ({N_BLOCKS_7B} blocks x 7 projections, "
          f"{per_block * N_BLOCKS_7B:,} adapted weights): 2 fp32 m x n moments = {extra:,} bytes "
          f"({extra / 2**30:.1f} GiB; the released code's bf16 moments: {extra // 2:,} bytes, "
          f"{extra / 2 / 2**30:.1f} GiB).")
    adam_lora = 2 * 4 * R * sum(fan_in + fan_out for fan_in, fan_out in BLOCK_SHAPES) * N_BLOCKS_7B
    print(f"For comparison, AdamW's (and efficient LoRA-Pro's) state for the same LoRA factors: "
          f"{adam_lora:,} bytes ({adam_lora / 2**20:.0f} MiB).")


if __name__ == "__main__":
    main()
