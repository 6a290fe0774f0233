"""GPT-2 LoRA training step: ours against transformers + PEFT, on the same GPT-2-small-shaped random model.

    python benchmarks/bench_gpt2_train.py                        # CPU, fp32 (about 3 min on 2 idle cores)
    python benchmarks/bench_gpt2_train.py --device cuda --dtype bf16 --steps 20

One step = forward with labels + backward + AdamW on the LoRA parameters: LoRA on q and v through c_attn,
r = 4, alpha = 32, LoRA dropout 0.1, batch 8, seq 256, GPT-2's own dropouts (0.1). PEFT cannot adapt
chunks of a fused projection, so PEFT's LoRA covers all of c_attn (q, k, v) at r = 4, which has as many
trainable parameters (147,456) as ours on q and v at r = 4 each. Weights are fp32, or bf16 with
--dtype bf16 (parameters cast, no autocast).

Also measured with our model: the frozen model's forward + backward (the gradient flowing from the loss
to the embeddings through every frozen layer: the least work any adapter needs), and inference with
the LoRA merged into the weights (eval()) against the plain model, timed alternately in one process.

Each training variant runs in its own subprocess, loading the same saved random weights (a Hugging Face
folder) with loralib.models.from_pretrained or transformers' from_pretrained. Time: median over
--steps steps after --warmup steps. Peak memory on CPU: the process's peak RSS during the timed steps
above its RSS just before them (psutil, sampled every 2 ms by a thread); on CUDA:
torch.cuda.max_memory_allocated during the steps above the memory allocated before them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import save_random_model  # noqa: E402

SHAPE = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
LORA = dict(r=4, lora_alpha=32, lora_dropout=0.1)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TRAINING = ("ours", "peft", "frozen")


class PeakMemory:
    """Peak memory above the level at __enter__: CUDA allocator statistics, or sampled process RSS."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil
            _trim_heap()
            self.proc, self.stop = psutil.Process(), threading.Event()
            self.base = self.high = self.proc.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.high = max(self.high, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.high, self.proc.memory_info().rss) - self.base


def _trim_heap():
    """Give freed heap pages back to the OS so that RSS starts from the live set (glibc only)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def build(variant: str, folder: str, device: str, dtype: torch.dtype):
    """The model of one variant ("ours", "peft", "frozen", "plain", "merged") from the saved folder."""
    if variant == "peft":
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2LMHeadModel as HFModel

        model = get_peft_model(HFModel.from_pretrained(folder),
                               LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, **LORA))
        return model.to(device=device, dtype=dtype)

    import loralib
    from loralib.models import from_pretrained

    lora = None
    if variant in ("ours", "merged"):
        lora = loralib.LoRAConfig(target_modules=("c_attn",), enable_lora=(True, False, True), **LORA)
    model = from_pretrained(folder, task="causal-lm", lora=lora).train()  # train(): unmerged
    if lora is None:
        model.requires_grad_(False)
        if variant == "frozen":  # gradients flow from the loss down to the embeddings' output
            model.transformer.drop.register_forward_hook(lambda module, inputs, out: out.requires_grad_())
    else:
        loralib.mark_only_lora_as_trainable(model)
        for _, layer in loralib.lora_layers(model):
            if layer.has_lora:  # B != 0, so that merging does change the weights
                torch.nn.init.normal_(layer.lora_B, std=0.02)
    return model.to(device=device, dtype=dtype)


def timed(step, device, warmup, steps, memory=True):
    """(median seconds per step, peak memory in bytes above the start)."""
    for _ in range(warmup):  # allocator, kernels, optimizer state
        step()
    _sync(device)
    times = []
    with PeakMemory(device if memory else "none") as mem:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), mem.peak


def run_training(variant, folder, device, dtype, ids, warmup, steps) -> dict:
    model = build(variant, folder, device, dtype).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if variant == "frozen":
        def step():
            model(input_ids=ids, labels=ids).loss.backward()
    else:
        opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.01)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    sec, peak = timed(step, device, warmup, steps)
    return dict(sec=sec, peak=peak, trainable=sum(p.numel() for p in trainable))


def run_inference(folder, device, dtype, ids, warmup, steps) -> dict:
    """Merged LoRA and plain model, timed in alternation so that drifts hit both alike."""
    models = {name: build(name, folder, device, dtype).eval() for name in ("merged", "plain")}
    assert all(layer.merged for _, layer in __import__("loralib").lora_layers(models["merged"]) if layer.has_lora)
    times = {name: [] for name in models}
    with torch.no_grad():
        for round in range(steps):
            for name, model in models.items():
                sec, _ = timed(lambda: model(input_ids=ids), device, warmup if round == 0 else 0, 1, memory=False)
                times[name].append(sec)
    return {name: dict(sec=statistics.median(t)) for name, t in times.items()}


def child(args, dtype):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.seq), generator=g).to(args.device)
    if args._child == "inference":
        res = run_inference(args._model, args.device, DTYPES[dtype], ids, args.warmup, max(3, args.steps))
    else:
        res = run_training(args._child, args._model, args.device, DTYPES[dtype], ids, args.warmup, args.steps)
    print("RESULT " + json.dumps(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 2 on CPU, 20 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on CPU, 5 on CUDA)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--variants", default="ours,peft,frozen,inference")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.steps = args.steps or (20 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if args._child:  # one variant, in a fresh process
        return child(args, args.dtype)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_random_model("gpt2", SHAPE, tmp)  # random weights, in the Hugging Face layout
        for variant in args.variants.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--_child", variant, "--_model", tmp]
            for flag in ("device", "dtype", "steps", "warmup", "batch", "seq"):
                cmd += [f"--{flag}", str(getattr(args, flag))]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                sys.exit(f"variant {variant} failed:\n{out.stderr[-3000:]}")
            result = json.loads(line[0][len("RESULT "):])
            results.update(result if variant == "inference" else {variant: result})

    tokens = args.batch * args.seq
    dev = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    memory = "torch.cuda.max_memory_allocated" if cuda else "peak RSS (psutil)"
    print(f"GPT-2 small shape, LoRA r=4 on q,v (c_attn), batch {args.batch} x seq {args.seq}, {args.dtype}, "
          f"{dev}, torch {torch.__version__}; median of {args.steps} steps after {args.warmup} warm-up\n")
    print(f"| training step | tokens/s | s/step | peak memory above start, MiB ({memory}) | trainable params |")
    print("|---|---|---|---|---|")
    names = {"ours": "loralib (ours)", "peft": "transformers + PEFT", "frozen": "frozen model fwd+bwd (ours)"}
    for key in TRAINING:
        if key in results:
            r = results[key]
            print(f"| {names[key]} | {tokens / r['sec']:.0f} | {r['sec']:.3f} | {r['peak'] / 2**20:.0f} "
                  f"| {r['trainable']:,} |")
    print()
    if "ours" in results and "peft" in results:
        o, p = results["ours"], results["peft"]
        print(f"- throughput ours / PEFT: {p['sec'] / o['sec']:.2f}x; peak memory ours / PEFT: "
              f"{o['peak'] / p['peak']:.2f}x")
    if "ours" in results and "frozen" in results:
        print(f"- LoRA step / frozen forward+backward (time): {results['ours']['sec'] / results['frozen']['sec']:.3f}x")
    if "merged" in results:
        m, p = results["merged"]["sec"], results["plain"]["sec"]
        print(f"- merged LoRA inference / plain model (forward, no grad, alternated): {m / p:.3f}x "
              f"({m:.4f} s vs {p:.4f} s)")


if __name__ == "__main__":
    main()
