"""DoRA's training step against ours LoRA and PEFT's DoRA; PiSSA / LoRA-GA initialisation time (issue 15 §7).

    python benchmarks/bench_dora.py                    # both shapes, CPU, fp32; init times for 4096 x 4096
    python benchmarks/bench_dora.py --shapes gpt2 --repeats 5 --init-size 1024 --full-svd

The model is the stack of a decoder block's projections, `--blocks` times, with the shapes of GPT-2 small
(d 768: c_attn 768->2304, attn.c_proj, c_fc 768->3072, mlp.c_proj) or SmolLM2-135M (d 576: q, k/v 576->192,
o, gate/up 576->1536, down), as nn.Linear layers with GELU / SiLU and residuals between them; every projection
adapted (r 8, alpha 16). The same module gets our layers (loralib.inject) or PEFT's (get_peft_model), so
the comparison is of the adapter layers alone. One step = forward on batch x seq tokens, backward of a fixed
upstream gradient, AdamW step. Times: medians of interleaved rounds. Memory: bytes autograd saves for backward
(exact) and the peak RSS growth of one step in a fresh process.
Initialisation: PiSSA (full SVD, optional: slow on CPU; "pissa_niter_4") and LoRA-GA's factors from a given
gradient (torch.svd_lowrank, q = 4 r, niter 4), one --init-size square matrix, r 8.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import loralib as lora  # noqa: E402
from _common import interleaved, medians  # noqa: E402
from bench_layers import _status_kib, saved_bytes  # noqa: E402

SHAPES = {  # (d, [(name, in, out), ...] in the order the block applies them, activation)
    "gpt2": (768, [("c_attn", 768, 2304), ("attn_proj", 768, 768), ("c_fc", 768, 3072), ("mlp_proj", 3072, 768)],
             nn.GELU),
    "smollm2": (576, [("q_proj", 576, 576), ("k_proj", 576, 192), ("v_proj", 576, 192), ("o_proj", 576, 576),
                      ("gate_proj", 576, 1536), ("up_proj", 576, 1536), ("down_proj", 1536, 576)], nn.SiLU),
}
KINDS = ("ours_lora", "ours_dora", "peft_dora")


class Block(nn.Module):
    """The block's projections in sequence: attention-like (the first output's first d columns feed the
    output projection), then the MLP; residual connections as in a decoder block."""

    def __init__(self, shape: str):
        super().__init__()
        d, projections, act = SHAPES[shape]
        self.shape, self.d = shape, d
        for name, n_in, n_out in projections:
            setattr(self, name, nn.Linear(n_in, n_out))
        self.act = act()

    def forward(self, x):
        if self.shape == "gpt2":
            h = x + self.attn_proj(self.c_attn(x)[..., :self.d])
            return h + self.mlp_proj(self.act(self.c_fc(h)))
        attn = self.q_proj(x) + torch.cat([self.k_proj(x), self.v_proj(x), self.k_proj(x)], -1)[..., :self.d]
        h = x + self.o_proj(attn)
        return h + self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))


def build(shape: str, kind: str, blocks: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(shape) for _ in range(blocks)])
    targets = [name for name, _, _ in SHAPES[shape][1]]
    if kind == "peft_dora":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=True))
    return lora.inject(model, targets, r=8, lora_alpha=16, use_dora=kind == "ours_dora", merge_weights=False)


def make_step(model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(x).backward(grad_out)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def child_peak_rss(shape: str, kind: str, blocks: int, batch: int, seq: int) -> None:
    """In a fresh process: the peak RSS growth (bytes) of one training step after a warm-up step."""
    model = build(shape, kind, blocks)
    d = SHAPES[shape][0]
    x, grad_out = torch.randn(batch, seq, d), torch.randn(batch, seq, d)
    step = make_step(model, x, grad_out)
    step()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    step()
    print(json.dumps({"peak_rss_growth": (_status_kib("VmHWM") - before) * 1024}))


def peak_rss(shape: str, kind: str, args) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--child", shape, kind, "--blocks", str(args.blocks),
                          "--batch", str(args.batch), "--seq", str(args.seq)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_growth"]


def bench_shape(shape: str, args) -> dict:
    d = SHAPES[shape][0]
    g = torch.Generator().manual_seed(1)
    x, grad_out = torch.randn(args.batch, args.seq, d, generator=g), torch.randn(args.batch, args.seq, d, generator=g)
    models = {kind: build(shape, kind, args.blocks) for kind in KINDS}
    with torch.no_grad():  # the same output for the same input (B = 0 at the start: the base model's)
        ref = models["peft_dora"](x)
        assert all(torch.allclose(m(x), ref, atol=1e-4) for m in models.values())
    times = medians(interleaved({kind: make_step(m, x, grad_out) for kind, m in models.items()}, args.repeats, warmup=2))
    saved = {kind: saved_bytes(m, x, grad_out) for kind, m in models.items()}
    rss = {kind: peak_rss(shape, kind, args) for kind in KINDS}
    tokens = args.batch * args.seq
    return {"shape": shape, "tokens": tokens, "step_ms": {k: 1e3 * t for k, t in times.items()},
            "tok_per_s": {k: tokens / t for k, t in times.items()},
            "saved_MiB": {k: v / 2**20 for k, v in saved.items()}, "peak_rss_MiB": {k: v / 2**20 for k, v in rss.items()},
            "dora_vs_lora_time": times["ours_dora"] / times["ours_lora"],
            "dora_vs_peft_throughput": times["peft_dora"] / times["ours_dora"],
            "dora_vs_peft_peak_rss": rss["ours_dora"] / rss["peft_dora"]}


def bench_init(size: int, r: int, full_svd: bool) -> dict:
    """Seconds to initialise one size x size layer: PiSSA (SVD of W) and LoRA-GA (SVD of a given gradient)."""
    torch.manual_seed(0)
    base = nn.Linear(size, size, bias=False)
    grad = torch.randn(size, size) @ torch.randn(size, 64) @ torch.randn(64, size) / size  # a low-rank-ish G
    out = {}
    for init in (["pissa"] if full_svd else []) + ["pissa_niter_4", "pissa_niter_16"]:
        model = nn.Sequential(copy.deepcopy(base))
        t0 = time.perf_counter()
        lora.inject(model, ["0"], r=r, lora_alpha=2 * r, init_lora_weights=init)
        out[init] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lora.init_methods.loraga_factors(grad, base.weight.data, r, 2.0)
    out["lora_ga (factors from G)"] = time.perf_counter() - t0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--init-size", type=int, default=4096)
    parser.add_argument("--full-svd", action="store_true", help="also time PiSSA's full SVD (minutes on CPU)")
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "KIND"))
    args = parser.parse_args()
    if args.child:
        child_peak_rss(*args.child, args.blocks, args.batch, args.seq)
        return
    results = {"threads": torch.get_num_threads(), "shapes": [bench_shape(s, args) for s in args.shapes],
               "init_seconds": bench_init(args.init_size, 8, args.full_svd), "init_size": args.init_size}
    for res in results["shapes"]:
        print(f"\n{res['shape']} ({args.blocks} blocks, {res['tokens']} tokens, fp32, {results['threads']} threads)")
        print("| step | ms | tok/s | saved for backward MiB | peak RSS growth MiB |\n|---|---|---|---|---|")
        for kind in KINDS:
            print(f"| {kind} | {res['step_ms'][kind]:.1f} | {res['tok_per_s'][kind]:.0f} | {res['saved_MiB'][kind]:.1f} "
                  f"| {res['peak_rss_MiB'][kind]:.1f} |")
        print(f"our DoRA / our LoRA step time: {res['dora_vs_lora_time']:.2f}x (target <= 1.3x); "
              f"our DoRA / PEFT DoRA throughput: {res['dora_vs_peft_throughput']:.2f}x (target >= 1.3x); "
              f"peak RSS ours / PEFT: {res['dora_vs_peft_peak_rss']:.2f}x (target <= 1x)")
    print(f"\ninit of one {args.init_size} x {args.init_size} matrix, r 8 (s):")
    for name, seconds in results["init_seconds"].items():
        print(f"  {name}: {seconds:.2f}")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "bench_dora.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
