"""torch.compile against eager for our LoRA training step (TrainConfig.torch_compile), in one process.

    python benchmarks/bench_compile.py [--models gpt2,smollm2] [--rounds 3] [--backend inductor]

The steps of bench_gpt2_train.py (GPT-2-small shape, random weights, LoRA r 4 on q, v through c_attn, LoRA
dropout 0.1, batch 8 x 256) and bench_llama_train.py (SmolLM2-135M-Instruct's real weights, LoRA r 8 on the
seven projections, batch 4 x 256): forward with labels + backward + AdamW, with the model called eagerly or
through torch.compile (the loop compiles the forward the same way; backward runs AOT autograd's compiled
graph). Two copies of the same model, so both carry their own AdamW state; the first compiled call
(compilation) is timed apart, then eager and compiled steps alternate each round (medians), so that the
shared machine's load changes hit both alike. The two first losses are printed side by side (they agree to
float32 rounding; the compiled dropout mask is drawn by inductor's own generator, so GPT-2's differ slightly).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_gpt2_train as gpt2_bench  # noqa: E402
import bench_llama_train as llama_bench  # noqa: E402
from _common import interleaved, medians, save_random_model  # noqa: E402


def models(name: str, folder: str):
    """Two identical LoRA training models of `name` and the batch ids."""
    if name == "gpt2":
        pair = []
        for _ in range(2):
            torch.manual_seed(0)  # the same LoRA factors in both
            pair.append(gpt2_bench.build("ours", folder, "cpu", torch.float32))
        vocab, batch = gpt2_bench.SHAPE["vocab_size"], 8
    else:
        first, _ = llama_bench.build("ours", folder)
        factors = llama_bench.set_lora_factors(first)
        pair = [first, llama_bench.build("ours", folder, factors)[0]]
        vocab, batch = first.config.vocab_size, 4
    g = torch.Generator().manual_seed(0)
    return pair, torch.randint(0, vocab, (batch, 256), generator=g)


def step_fn(model, ids, backend=None):
    run = torch.compile(model, backend=backend) if backend else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)

    def step():
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt2,smollm2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--folder", default=os.environ.get("LORALIB_SMOLLM2_DIR"), help="SmolLM2 folder")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, CPU {torch.get_num_threads()} threads, backend {args.backend}, fp32; "
          f"medians of {args.rounds} interleaved rounds after 1 warm-up step each\n")
    print("| model | eager s/step | compiled s/step | compiled / eager time | first compiled call s "
          "| first loss eager / compiled |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "gpt2":
                folder = str(save_random_model("gpt2", gpt2_bench.SHAPE, tmp))
            elif name == "smollm2":
                folder = llama_bench.smollm2(args.folder)
            else:
                sys.exit(f"--models: {name!r} is not gpt2 or smollm2")
            (eager, compiled), ids = models(name, folder)
            torch.manual_seed(0)
            steps = {"eager": step_fn(eager, ids), "compiled": step_fn(compiled, ids, args.backend)}
            loss_e = steps["eager"]()
            start = time.perf_counter()
            loss_c = steps["compiled"]()  # compilation: timed apart, not a step
            first_call = time.perf_counter() - start
            t = medians(interleaved(steps, args.rounds))
            print(f"| {name} | {t['eager']:.3f} | {t['compiled']:.3f} | {t['compiled'] / t['eager']:.3f}x "
                  f"| {first_call:.0f} | {loss_e:.6f} / {loss_c:.6f} |", flush=True)
            del eager, compiled, steps
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
