"""Fused q|k|v projection with LoRA on q and v: ours vs microsoft's loralib 0.1.2 vs PEFT, in one run.

Shapes (issue 2): d = 1024, r = 4, batch 8 x 512 tokens, fp32. Measures forward + backward time (the input
requires grad, as inside a network) and memory, then merged inference against a plain nn.Linear.
- ours: loralib.MergedLinear(1024, 3072, enable_lora=[True, False, True]), the low-rank path per chunk.
- microsoft: the same layer from loralib 0.1.2 (builds a dense delta-W every forward).
- PEFT: q, k, v as three nn.Linear(1024, 1024), LoRA on q and v, outputs concatenated (PEFT cannot put LoRA
  on chunks of one fused Linear).
Memory: bytes saved for backward (exact, via saved-tensor hooks, each storage counted once) and the peak
RSS growth of one step in a fresh process (the kernel's high-water mark VmHWM, reset just before the step
through /proc/self/clear_refs; glibc is told to mmap every block over 64 KiB so freed tensors leave RSS),
so temporaries such as a dense delta-W count too.

Run: make bench, or LORALIB_REFERENCE_WHEEL=.cache/wheels/loralib-0.1.2-py3-none-any.whl \
     .venv/bin/python benchmarks/bench_layers.py [--repeats 10]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, medians  # noqa: E402
from _reference import load_ms_loralib  # noqa: E402

D, R, BATCH, SEQ = 1024, 4, 8, 512


class PeftQKV(nn.Module):
    def __init__(self, d: int = D):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def build(kind: str, d: int = D) -> nn.Module:
    """One fused q|k|v projection d -> 3d of `kind` ("ours", "microsoft", "peft", "plain"), fp32, CPU."""
    torch.manual_seed(0)
    if kind == "ours":
        import loralib
        layer = loralib.MergedLinear(d, 3 * d, r=R, lora_alpha=2 * R, enable_lora=[True, False, True])
    elif kind == "microsoft":
        layer = load_ms_loralib().MergedLinear(d, 3 * d, r=R, lora_alpha=2 * R, enable_lora=[True, False, True])
    elif kind == "peft":
        import peft
        layer = peft.get_peft_model(PeftQKV(d), peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=["q", "v"]))
    elif kind == "plain":
        layer = nn.Linear(d, 3 * d)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return layer


def step(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """One training step's layer work: forward, then backward of a given upstream gradient (a real
    network's, not the stride-0 gradient of .sum(), which some backward kernels would materialise)."""
    layer(x).backward(grad_out)


def saved_bytes(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.backward(grad_out)
    return sum(storages.values())


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_peak_rss(kind: str) -> None:
    """Run in a fresh process: print the peak RSS growth (bytes) of one training step after set-up."""
    layer = build(kind)
    x = torch.randn(BATCH, SEQ, D, requires_grad=True)
    grad_out = torch.randn(BATCH, SEQ, 3 * D)
    step(layer, x, grad_out)  # warm-up: lazy initialisations are not the step's memory
    layer.zero_grad(set_to_none=True)
    x.grad = None
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = _status_kib("VmRSS")
    step(layer, x, grad_out)
    print(json.dumps({"peak_rss_growth": (_status_kib("VmHWM") - before) * 1024}))


def peak_rss(kind: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--child", kind], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_growth"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child_peak_rss(args.child)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d={D}, r={R}, batch {BATCH} x {SEQ}, fp32\n")
    x = torch.randn(BATCH, SEQ, D, requires_grad=True)
    grad_out = torch.randn(BATCH, SEQ, 3 * D)
    layers = {kind: build(kind) for kind in ("ours", "microsoft", "peft")}
    for layer in layers.values():
        layer.train()
    steps = {kind: (lambda layer=layer: step(layer, x, grad_out)) for kind, layer in layers.items()}
    times = medians(interleaved(steps, args.repeats, warmup=2))
    rows = {kind: dict(time=times[kind], saved=saved_bytes(layer, x, grad_out), rss=peak_rss(kind))
            for kind, layer in layers.items()}
    print("| layer (train step) | fwd+bwd ms | vs microsoft | vs PEFT | saved for backward MiB | peak RSS growth MiB |")
    print("|---|---|---|---|---|---|")
    for kind, row in rows.items():
        print(f"| {kind} | {row['time'] * 1e3:.1f} | {row['time'] / rows['microsoft']['time']:.2f}x | "
              f"{row['time'] / rows['peft']['time']:.2f}x | {row['saved'] / 2**20:.1f} | {row['rss'] / 2**20:.1f} |")

    # merged inference: our layer after eval() against a plain nn.Linear of the same shape
    ours, plain = build("ours").eval(), build("plain").eval()
    xi = torch.randn(BATCH, SEQ, D)
    with torch.no_grad():
        t = medians(interleaved({"ours": lambda: ours(xi), "plain": lambda: plain(xi)}, args.repeats, warmup=2))
    t_ours, t_plain = t["ours"], t["plain"]
    print(f"\n| inference | ms | ratio |\n|---|---|---|\n| nn.Linear | {t_plain * 1e3:.1f} | 1.00x |\n"
          f"| ours, merged | {t_ours * 1e3:.1f} | {t_ours / t_plain:.3f}x |")


if __name__ == "__main__":
    main()
