"""LoRA-Pro's memory: optimizer state for Llama-2-7B computed from the shapes, and a measured training step.

Part 1 (no hardware needed): bytes of optimizer state for Llama-2-7B (32 blocks, hidden 4096, intermediate
11008, LoRA r 8 on the seven projections q, k, v, o, gate, up, down):
  - LoRA + AdamW: two fp32 moments of A (r x n) and B (m x r) per adapted matrix;
  - LoRA-Pro efficient: the same (adjusted gradients, ordinary Adam on A and B);
  - LoRA-Pro full: two fp32 moments of the m x n equivalent gradient per adapted matrix (ours), against the
    released code's bf16 moments (~26 GB, whose second moment cannot decay in bf16);
  - per GPU under ZeRO on N GPUs, where optimizer state is partitioned N ways (LoRA, efficient LoRA-Pro,
    and the released full mode, which kept its m x n moments inside DeepSpeed's partitions); our full mode
    under DeepSpeed (loralib.optim.deepspeed_lorapro.ZeROLoRAProFull) deals whole pairs to ranks, so the
    figure is the largest rank's share under its dealing rule; under DDP every rank holds the whole state.
Part 2 (measured): one training step (forward + backward under bf16 autocast with gradient checkpointing,
optimizer step, zero_grad) of a stack of Llama-2-7B-shaped decoder blocks with random bf16 weights and fp32
LoRA factors: step time, peak GPU memory and measured optimizer-state bytes for LoRA, LoRA-Pro full and
LoRA-Pro efficient. Without a GPU, a scaled-down stack (hidden / 8) in fp32 gives step time and state bytes.

    python benchmarks/bench_lorapro_memory.py                         # analytic table + CPU measurement
    python benchmarks/bench_lorapro_memory.py --device cuda --layers 32 --seq 512
    python benchmarks/bench_lorapro_memory.py --analytic-only --json out.json
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from loralib import LoRAConfig, mark_only_lora_as_trainable
from loralib.models.grad_checkpoint import enable_gradient_checkpointing
from loralib.models.loading import build_model
from loralib.optim import LoRAProAdamW
from loralib.optim.deepspeed_lorapro import deal_by_size

HIDDEN, INTERMEDIATE, LAYERS_7B, R = 4096, 11008, 32, 8
# (m, n) = (out, in) of the seven adapted projections of one block
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
          "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTERMEDIATE, HIDDEN), "up_proj": (INTERMEDIATE, HIDDEN),
          "down_proj": (HIDDEN, INTERMEDIATE)}
TARGETS = tuple(SHAPES)
FP32, BF16 = 4, 2
GB = 1e9


def analytic(layers: int = LAYERS_7B, r: int = R, gpus=(1, 2, 4, 8)) -> dict:
    """Optimizer-state bytes from the shapes (see the module docstring)."""
    full_elems = layers * sum(m * n for m, n in SHAPES.values())            # sum of m n
    lora_elems = layers * sum(r * (m + n) for m, n in SHAPES.values())      # sum of r (m + n)
    rows = {
        "lora_adamw": 2 * lora_elems * FP32,
        "lorapro_efficient": 2 * lora_elems * FP32,
        "lorapro_full_fp32": 2 * full_elems * FP32,
        "lorapro_full_bf16_released": 2 * full_elems * BF16,
    }
    pair_sizes = [m * n for _ in range(layers) for m, n in SHAPES.values()]

    def largest_share(n: int) -> int:  # fp32 moments (2 per element) of the rank holding the most pairs
        owners = deal_by_size(pair_sizes, n)
        return max(sum(s for s, o in zip(pair_sizes, owners) if o == rank) for rank in range(n)) * 2 * FP32

    per_gpu = {f"zero2_{n}gpu": {"lora_adamw": rows["lora_adamw"] / n,
                                 "lorapro_efficient": rows["lorapro_efficient"] / n,
                                 "lorapro_full_bf16_released": rows["lorapro_full_bf16_released"] / n,
                                 "lorapro_full_fp32_zero_sharded": largest_share(n),
                                 "lorapro_full_fp32_ddp": rows["lorapro_full_fp32"]} for n in gpus}
    return {"layers": layers, "r": r, "adapted_matrices": layers * len(SHAPES), "lora_params": lora_elems,
            "sum_mn": full_elems, "state_bytes": rows, "per_gpu_bytes": per_gpu}


def print_analytic(table: dict) -> None:
    print(f"Llama-2-7B shapes: {table['layers']} blocks x 7 projections = {table['adapted_matrices']} matrices, "
          f"r {table['r']}: {table['lora_params'] / 1e6:.1f} M LoRA parameters, sum m n = {table['sum_mn'] / 1e9:.3f} G")
    print(f"{'optimizer state':<34}{'bytes':>16}{'GB':>10}")
    for name, value in table["state_bytes"].items():
        print(f"{name:<34}{value:>16,.0f}{value / GB:>10.2f}")
    print("per GPU under ZeRO (state partitioned N ways; our full mode: pairs dealt to ranks under DeepSpeed, "
          "the whole state on every rank under DDP)")
    names = list(next(iter(table["per_gpu_bytes"].values())))
    print(f"{'GPUs':<8}" + "".join(f"{n:>33}" for n in names))
    for key, row in table["per_gpu_bytes"].items():
        print(f"{key.split('_')[1]:<8}" + "".join(f"{row[n] / GB:>30.3f} GB" for n in names))


# -- measured -----------------------------------------------------------------------------------------

def build_stack(layers: int, hidden: int, intermediate: int, heads: int, vocab: int, device: str,
                dtype: torch.dtype) -> torch.nn.Module:
    """A Llama causal LM of `layers` blocks with random weights (base in `dtype`, LoRA factors fp32)."""
    config = dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    lora = LoRAConfig(r=R, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build_model(config, "causal-lm", lora=lora)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                if name.endswith("lora_B"):
                    p.normal_(std=1e-3)  # as after some training: B = 0 would make LoRA-Pro's B^T B singular
    for module in model.modules():
        if hasattr(module, "rebuild_buffers"):
            module.rebuild_buffers()
    mark_only_lora_as_trainable(model)
    return model.train()


def _optimizer(name: str, model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "lora":
        return torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0)
    return LoRAProAdamW(model, lr=2e-5, mode=name.split("-")[-1])


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                total += v.untyped_storage().nbytes()
    return total


def measure(method: str, args) -> dict:
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_stack(args.layers, args.hidden, args.intermediate, args.heads, args.vocab, args.device, dtype)
    enable_gradient_checkpointing(model)
    opt = _optimizer(method, model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)

    def step():
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    row = {"method": method, "step_s": seconds, "optimizer_state_bytes": state_bytes(opt),
           "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    if cuda:
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    del model, opt
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=None, help="decoder blocks (default: 32 on GPU, 2 on CPU)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512 GPU, 64 CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default="lora,lorapro-full,lorapro-efficient")
    parser.add_argument("--analytic-only", action="store_true")
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    scale = 1 if cuda else 8  # CPU: hidden and intermediate / 8, so a step takes seconds
    args.hidden, args.intermediate = HIDDEN // scale, INTERMEDIATE // scale
    args.heads, args.vocab = 32 // scale, 32000 // scale
    args.layers = args.layers or (LAYERS_7B if cuda else 2)
    args.seq = args.seq or (512 if cuda else 64)

    table = analytic()
    print_analytic(table)
    results = {"analytic": table}
    if not args.analytic_only:
        setting = (f"{args.layers} blocks, hidden {args.hidden}, intermediate {args.intermediate}, batch {args.batch} "
                   f"x seq {args.seq}, {'bf16' if cuda else 'fp32'} base weights, fp32 LoRA, r {R}, gradient "
                   f"checkpointing, {args.device}" + ("" if cuda else " (scaled down: hidden / 8)"))
        print(f"\nmeasured: {setting}")
        print(f"{'method':<20}{'step s':>10}{'opt state GB':>14}{'weights GB':>12}{'peak GB':>10}")
        rows = []
        for method in args.methods.split(","):
            try:
                row = measure(method.strip(), args)
            except torch.OutOfMemoryError:
                row = {"method": method, "error": "out of memory"}
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(row)
            if "error" in row:
                print(f"{method:<20}{'out of memory':>46}")
                continue
            peak = row.get("peak_allocated_bytes")
            peak_text = f"{peak / GB:.2f}" if peak else "-"
            print(f"{row['method']:<20}{row['step_s']:>10.3f}{row['optimizer_state_bytes'] / GB:>14.3f}"
                  f"{row['weights_bytes'] / GB:>12.3f}{peak_text:>10}")
        results["measured"] = {"setting": setting, "rows": rows,
                               "device_name": torch.cuda.get_device_name() if cuda else "cpu"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
