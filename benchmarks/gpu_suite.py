"""Every GPU benchmark row in one call (issue 19): one process, timed in interleaved rounds, medians.

    python benchmarks/gpu_suite.py --json $OUT/gpu_suite.json          # CUDA, bf16, 8 minutes at most
    python benchmarks/gpu_suite.py --device cpu --tiny                 # same code, tiny shapes, seconds
    python benchmarks/gpu_suite.py --rows llama7b_step,lorapro         # a subset

Rows (`--rows`, in this order; each reuses the model builders of the single benchmark named):
  llama7b_step      Llama-2-7B shapes (random bf16 weights built on the device), seq 2048, LoRA r 8 alpha 16 on
                    q, k, v, o, gate, up, down; ours vs transformers + PEFT (same weights and factors, SDPA
                    attention on both sides), gradient checkpointing off and on: tokens/s, peak memory, MFU,
                    and the step against its matrix products and SDPA timed alone (kernel_floor).
  gpt2_step         GPT-2-small shapes, LoRA r 4 on q, v (bench_gpt2_train.py), ours / PEFT / frozen
                    fwd+bwd; three repeats, each with freshly built models and its own interleaved rounds.
  smollm2_step      SmolLM2-135M shapes, random weights, LoRA r 8 on all seven projections
                    (bench_llama_train.py); three repeats likewise.
  lorapro           LoRA-Pro efficient and full vs AdamW, optimizer step alone, 224 Llama-7B layers
                    (bench_lorapro.py).
  allocator         AdaLoRA vs LoRA² importance update at 28 and 224 Llama-7B matrices (bench_allocator.py).
  layer             the fused q|k|v MergedLinear (LoRA on q, v) vs microsoft's loralib 0.1.2 vs PEFT, and
                    merged inference vs nn.Linear (bench_layers.py).
  merged_inference  LoRA merged by eval() vs the plain model, forward without grad, GPT-2 and SmolLM2 shapes.
  generation        KV-cache greedy and beam search (10 beams, the LoRA paper's settings) vs transformers'
                    generate, SmolLM2 shapes, random weights (bench_generation.py).

Timing: on CUDA each call starts on an idle device (synchronize) and is timed with CUDA events, so a
launch-bound call is timed with its launches; variants compared in a row are called in turn each round
(after warm-up rounds) and the medians are compared. Peak memory: torch.cuda.max_memory_allocated during
one step above the memory allocated before it, plus what the variant keeps resident (its parameters,
buffers and optimizer state); on CPU the step's growth is sampled process RSS (bench_gpt2_train.PeakMemory).

FLOPs and MFU (llama7b_step). With N the weights of every matrix product of the forward (the seven
projections of every layer and the LM head; not the embedding lookup), N_lora = sum of r (in + out) over
the adapters, L layers, s the sequence length and d_attn = heads x head_dim, one token of a LoRA step costs
    4 N + 6 N_lora + 6 L s d_attn
FLOPs: 2N forward and 2N for the input gradients (no weight gradients for the frozen weights, which full
fine-tuning's 6N would add), each adapter 2 r (in + out) forward and twice that backward, causal attention
2 s d_attn per layer forward (QK^T and AV over the s/2 keys a query sees on average) and twice that
backward. MFU = tokens/s x that / the device's bf16 matrix rate measured here (an 8192^3 product on random
data). Gradient checkpointing recomputes the blocks' forward (2 (N - LM head) + 2 N_lora + 2 L s d_attn
more a token): reported as hardware FLOPs utilisation (HFU) beside the MFU, which leaves it out.

Budgets: each row has a time budget (BUDGETS, seconds on an H200); rounds stop once a row's share of it is
spent (never under 3), a row that runs past 2x its budget is stopped, and rows are skipped once
--time-limit is reached. A row that fails (out of memory, a timeout, anything) prints its error and the
suite continues. The JSON (--json) is rewritten after every row: meta (device, versions, measured matrix
rate and launch latency), then per row its status, wall seconds, results and target checks.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import bench_allocator  # noqa: E402
import bench_generation  # noqa: E402
import bench_gpt2_train  # noqa: E402
import bench_layers  # noqa: E402
import bench_llama_train  # noqa: E402
import bench_lorapro  # noqa: E402
from _common import interleaved, medians, save_random_model, time_call  # noqa: E402

import loralib  # noqa: E402

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")
TARGETS = bench_llama_train.TARGETS  # the seven projections
TINY_LLAMA = dict(vocab_size=256, hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")
TINY_BLOCK = [(32, 32)] * 4 + [(32, 88)] * 2 + [(88, 32)]  # a Llama block's seven (in, out), scaled down


@dataclass
class Shapes:
    """Every size the rows use: FULL on the GPU, TINY for the CPU smoke run (same code paths)."""
    matmul_n: int
    llama: dict
    llama_batch: int
    llama_seq: int
    gpt2: dict
    gpt2_batch: int
    gpt2_seq: int
    smollm2: dict
    smollm2_batch: int
    smollm2_seq: int
    lorapro_blocks: int
    block_shapes: list
    allocator_blocks: Tuple[int, ...]
    layer_d: int
    layer_tokens: Tuple[int, int]
    gen_batch: int
    gen_new_tokens: int
    gen_beams: int
    allocator_repeats: int  # calls timed per allocator measurement (bench_allocator --repeats)
    rounds: int          # interleaved rounds wanted per comparison (fewer if the budget runs out)
    repeats: int = 3     # repeats of the GPT-2 and SmolLM2 step comparisons


FULL = Shapes(matmul_n=8192, llama=LLAMA2_7B, llama_batch=1, llama_seq=2048,
              gpt2=bench_gpt2_train.SHAPE, gpt2_batch=8, gpt2_seq=256,
              smollm2=bench_generation.SMOLLM2_CONFIG, smollm2_batch=8, smollm2_seq=512,
              lorapro_blocks=32, block_shapes=bench_lorapro.BLOCK_SHAPES, allocator_blocks=(4, 32),
              layer_d=4096, layer_tokens=(4, 2048), gen_batch=8, gen_new_tokens=64, gen_beams=10,
              allocator_repeats=20, rounds=30)
TINY = Shapes(matmul_n=128, llama=TINY_LLAMA, llama_batch=1, llama_seq=32,
              gpt2=dict(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2), gpt2_batch=2, gpt2_seq=16,
              smollm2=dict(bench_generation.SMOLLM2_CONFIG, vocab_size=256, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           max_position_embeddings=128),
              smollm2_batch=2, smollm2_seq=16, lorapro_blocks=2, block_shapes=TINY_BLOCK, allocator_blocks=(2,),
              layer_d=32, layer_tokens=(2, 16), gen_batch=2, gen_new_tokens=4, gen_beams=3,
              allocator_repeats=3, rounds=3)

# Seconds each row may take on an H200 (measured rounds stop at their share of it; 2x stops the row).
BUDGETS = {"llama7b_step": 150, "gpt2_step": 60, "smollm2_step": 60, "lorapro": 50, "allocator": 25,
           "layer": 25, "merged_inference": 25, "generation": 60}


class RowTimeout(Exception):
    pass


@dataclass
class Suite:
    device: torch.device
    dtype: torch.dtype
    shapes: Shapes
    tmp: Path
    peak_flops: float = float("nan")
    launch_s: float = float("nan")
    row_end: float = math.inf                     # perf_counter() at which the current row's budget ends
    folders: Dict[str, Path] = field(default_factory=dict)

    def until(self, share: float) -> float:
        """The time at which a stage that may use `share` of the row's remaining budget should stop."""
        now = time.perf_counter()
        return now + share * max(0.0, self.row_end - now) if self.row_end < math.inf else math.inf

    def folder(self, family: str) -> Path:
        """A random Hugging Face model of `family` ("gpt2" or "smollm2") saved once per suite run."""
        if family not in self.folders:
            config = self.shapes.gpt2 if family == "gpt2" else self.shapes.smollm2
            self.folders[family] = save_random_model("gpt2" if family == "gpt2" else "llama", config,
                                                     self.tmp / family)
        return self.folders[family]

    def ids(self, vocab: int, batch: int, seq: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        return torch.randint(0, vocab, (batch, seq), generator=g).to(self.device)


@dataclass
class Row:
    """What a row measured: `results` (numbers for the JSON) and `checks` (the table's lines)."""
    results: dict = field(default_factory=dict)
    checks: List[dict] = field(default_factory=list)

    def check(self, measure: str, ours: str, reference: str, ratio: Optional[float], target: str = "") -> None:
        """One table line; target "<= 1.2" or ">= 1.3" (on the ratio) is marked met / not met."""
        met = None
        if target and ratio is not None:
            op, limit = target.split()
            met = ratio <= float(limit) if op == "<=" else ratio >= float(limit)
        self.checks.append(dict(measure=measure, ours=ours, reference=reference, ratio=ratio, target=target,
                                met=met))


# -- measuring helpers --------------------------------------------------------------------------------

def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def to_device(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model on `device` with its floating parameters in `dtype`, in place (optimizer-free models only);
    buffers keep their dtype (rotary frequencies stay fp32, as in a model loaded with dtype=bf16)."""
    model.to(device)
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


def resident_bytes(model: nn.Module, opt: Optional[torch.optim.Optimizer] = None) -> int:
    """Bytes of the model's parameters and buffers (each storage once) and of the optimizer's state."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(model.parameters()) + list(model.buffers())}
    if opt is not None:
        storages.update({v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
                         for s in opt.state.values() for v in s.values() if torch.is_tensor(v)})
    return sum(storages.values())


def step_peak(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory growth (bytes) of one call above the level before it (bench_gpt2_train.PeakMemory)."""
    with bench_gpt2_train.PeakMemory(device.type) as mem:
        fn()
    return int(mem.peak)


def train_step(model: nn.Module, trainable: List[nn.Parameter], ids: torch.Tensor):
    """(step(), optimizer or None): forward with labels + backward (+ AdamW on `trainable`, if any)."""
    step = bench_llama_train.make_step(model, trainable)
    return (lambda: step(ids)), getattr(step, "optimizer", None)


def compare_steps(s: Suite, models: Dict[str, Tuple[nn.Module, list]], ids: torch.Tensor, share: float,
                  rounds: int, warmup: int = 2) -> dict:
    """Training steps of each model timed in interleaved rounds; per model: median seconds, samples,
    tokens/s, the step's peak memory growth and its resident bytes (model + optimizer state)."""
    steps, opts = {}, {}
    for name, (model, trainable) in models.items():
        steps[name], opts[name] = train_step(model, trainable, ids)
    samples = interleaved(steps, rounds, warmup=warmup, device=s.device, until=s.until(share))
    out = {}
    for name, sec in medians(samples).items():
        growth = step_peak(steps[name], s.device)
        resident = resident_bytes(models[name][0], opts[name])
        out[name] = dict(sec=sec, samples=samples[name], tokens_per_s=ids.numel() / sec, step_growth=growth,
                         resident=resident, memory=resident + growth)
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def loss_and_grads(models: Dict[str, nn.Module], ids: torch.Tensor) -> dict:
    """bench_llama_train.first_step on ours and PEFT: both losses, and the LoRA gradients' relative
    difference (the two models compute the same function: a check that the race is fair)."""
    (loss_o, grad_o, saved_o), (loss_p, grad_p, saved_p) = (bench_llama_train.first_step(models[v], ids)
                                                            for v in ("ours", "peft"))
    rel = ((grad_o.float() - grad_p.float()).norm() / grad_p.float().norm()).item()
    return dict(loss_ours=loss_o, loss_peft=loss_p, loss_rel_diff=abs(loss_o - loss_p) / abs(loss_p),
                lora_grad_rel_diff=rel, saved_for_backward_ours=saved_o, saved_for_backward_peft=saved_p)


# -- device -----------------------------------------------------------------------------------------

def measure_device(s: Suite) -> dict:
    """The matrix rate (FLOP/s) of an n^3 product on random data in the suite's dtype, and the latency of
    one tiny kernel launch (the floor of launch-bound work)."""
    n = s.shapes.matmul_n
    a, b = (torch.randn(n, n, device=s.device, dtype=s.dtype) for _ in range(2))
    c = torch.empty(n, n, device=s.device, dtype=s.dtype)
    samples = interleaved({"mm": lambda: torch.matmul(a, b, out=c)}, rounds=10, warmup=3, device=s.device)
    s.peak_flops = 2 * n ** 3 / medians(samples)["mm"]
    x = torch.zeros(1, device=s.device)
    launches = 200
    s.launch_s = time_call(lambda: [x.add_(1) for _ in range(launches)], s.device) / launches
    return dict(matmul_n=n, matmul_dtype=str(s.dtype), matmul_tflops=s.peak_flops / 1e12,
                launch_us=s.launch_s * 1e6)


# -- rows -------------------------------------------------------------------------------------------

def build_llama_pair(s: Suite):
    """(ours, transformers + PEFT): Llama models of shapes.llama built on the device in the
    suite's dtype, the same random frozen weights in both (ours copied into transformers'), the same
    LoRA factors (B ~ N(0, 0.02), bench_llama_train.set_lora_factors) on the seven projections."""
    import peft
    import transformers
    from loralib.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = s.shapes.llama
    lora = loralib.LoRAConfig(r=bench_llama_train.R, lora_alpha=bench_llama_train.ALPHA, lora_dropout=0.0,
                              target_modules=TARGETS)
    torch.manual_seed(0)
    with s.device, default_dtype(s.dtype):
        ours = LlamaForCausalLM(LlamaConfig.from_hf(cfg), lora).train()
    loralib.mark_only_lora_as_trainable(ours)
    factors = bench_llama_train.set_lora_factors(ours)  # drawn on the CPU, copied to the device
    with s.device, default_dtype(s.dtype):
        hf_config = transformers.LlamaConfig(**cfg, use_cache=False)
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=s.dtype)
        assert hf.config._attn_implementation == "sdpa", hf.config._attn_implementation
        base = {k: v for k, v in ours.state_dict().items() if "lora_" not in k}
        missing, unexpected = hf.load_state_dict(base, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"our Llama's weights do not map onto transformers': missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        del base
        theirs = peft.get_peft_model(hf, peft.LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=0.0,
                                                         target_modules=list(TARGETS)))
        to_device(theirs, s.device, s.dtype).train()  # PEFT keeps its adapters in fp32 by default; ours: bf16
        bench_llama_train.copy_factors_to_peft(theirs, factors)
    return ours, theirs


def lora_step_flops(model: nn.Module, seq: int) -> dict:
    """FLOPs a token of a LoRA training step (see the module docstring): model and with recompute."""
    n_frozen = n_lora = n_head = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            n_frozen += m.in_features * m.out_features
            if name.endswith("lm_head"):
                n_head = m.in_features * m.out_features
            if getattr(m, "has_lora", False):
                n_lora += m.lora_A.numel() + m.lora_B.numel()
    cfg = model.config
    attn = cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq
    model_flops = 4 * n_frozen + 6 * n_lora + 6 * attn
    recompute = 2 * (n_frozen - n_head) + 2 * n_lora + 2 * attn
    return dict(N=n_frozen, N_lora=n_lora, N_lm_head=n_head, flops_per_token=model_flops,
                recompute_flops_per_token=recompute, full_ft_flops_per_token=6 * n_frozen + 6 * attn)


def kernel_floor(s: Suite, cfg: dict, batch: int, seq: int) -> dict:
    """Seconds of the step's unavoidable kernels, each timed alone at the step's shapes: per layer the
    seven projections' forward products x W^T and input-gradient products g W, and causal SDPA forward +
    backward; the LM head's two products once. A step near this floor is bound by how fast these
    kernels run at these shapes; the rest of a step's time is everything else (norms, rotary, SwiGLU,
    the adapters, the loss, the optimizer, launches). `recompute_seconds`: the blocks' forward kernels
    again, which gradient checkpointing adds."""
    d, i, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    H, G, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    tokens = batch * seq
    per_layer = [(d, H * D), (d, G * D), (d, G * D), (H * D, d), (d, i), (d, i), (i, d)]  # (in, out)
    shapes = {}
    for shape in per_layer:
        shapes[shape] = shapes.get(shape, 0) + L
    shapes[(d, v)] = shapes.get((d, v), 0) + 1
    opts = dict(device=s.device, dtype=s.dtype)
    seconds = {}
    for (n_in, n_out), count in shapes.items():
        x, w, g = (torch.randn(tokens, n_in, **opts), torch.randn(n_out, n_in, **opts),
                   torch.randn(tokens, n_out, **opts))
        t = medians(interleaved({"fwd": lambda: x @ w.t(), "bwd": lambda: g @ w}, 10, warmup=2, device=s.device))
        seconds[f"{n_in}x{n_out}"] = dict(count=count, fwd=t["fwd"], bwd=t["bwd"])
    q = torch.randn(batch, H, seq, D, **opts, requires_grad=True)
    k, val = (torch.randn(batch, G, seq, D, **opts, requires_grad=True) for _ in range(2))
    grad = torch.randn(batch, H, seq, D, **opts)

    def attention():
        return torch.nn.functional.scaled_dot_product_attention(q, k, val, is_causal=True, enable_gqa=G != H)

    t = medians(interleaved({"fwd": attention, "fwd_bwd": lambda: attention().backward(grad)}, 10, warmup=2,
                            device=s.device))
    seconds["attention"] = dict(count=L, fwd=t["fwd"], bwd=t["fwd_bwd"] - t["fwd"])
    total = sum(e["count"] * (e["fwd"] + e["bwd"]) for e in seconds.values())
    recompute = sum(e["count"] * e["fwd"] for key, e in seconds.items() if key != f"{d}x{v}")
    return dict(seconds=total, recompute_seconds=recompute, kernels=seconds)


def set_checkpointing(ours: nn.Module, theirs: nn.Module, on: bool) -> None:
    """Gradient checkpointing of every decoder block, non-reentrant on both sides."""
    from loralib.models.grad_checkpoint import disable_gradient_checkpointing, enable_gradient_checkpointing
    hf = theirs.get_base_model()
    if on:
        enable_gradient_checkpointing(ours)
        if hasattr(hf, "activation_checkpointing_enable"):  # newer transformers (the old name warns)
            hf.activation_checkpointing_enable({"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable_gradient_checkpointing(ours)
        (getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable)()


def row_llama7b_step(s: Suite) -> Row:
    row, sh = Row(), s.shapes
    t0 = time.perf_counter()
    ours, theirs = build_llama_pair(s)
    row.results["build_s"] = time.perf_counter() - t0
    ids = s.ids(sh.llama["vocab_size"], sh.llama_batch, sh.llama_seq)
    row.results["check"] = loss_and_grads({"ours": ours, "peft": theirs}, ids)
    flops = lora_step_flops(ours, sh.llama_seq)
    row.results.update(flops=flops, batch=sh.llama_batch, seq=sh.llama_seq, peak_flops=s.peak_flops)
    models = {"ours": (ours, [p for p in ours.parameters() if p.requires_grad]),
              "peft": (theirs, [p for p in theirs.parameters() if p.requires_grad])}
    rounds = max(3, sh.rounds // 2)
    name = "7B" if sh.llama is LLAMA2_7B else "Llama (tiny)"
    floor = kernel_floor(s, sh.llama, sh.llama_batch, sh.llama_seq)
    row.results["kernel_floor"] = floor
    for gc_on, share in ((False, 0.5), (True, 1.0)):
        set_checkpointing(ours, theirs, gc_on)
        res = compare_steps(s, models, ids, share, rounds, warmup=1)
        floor_s = floor["seconds"] + (floor["recompute_seconds"] if gc_on else 0.0)
        for r in res.values():
            r["mfu"] = r["tokens_per_s"] * flops["flops_per_token"] / s.peak_flops
            r["over_kernel_floor"] = r["sec"] / floor_s
            if gc_on:
                r["hfu"] = r["tokens_per_s"] * (flops["flops_per_token"] + flops["recompute_flops_per_token"]) \
                    / s.peak_flops
        key = "gc_on" if gc_on else "gc_off"
        row.results[key] = res
        o, p = res["ours"], res["peft"]
        tag = f"grad ckpt {'on' if gc_on else 'off'}"
        row.check(f"{name} LoRA step tokens/s, {tag}", f"{o['tokens_per_s']:,.0f}", f"{p['tokens_per_s']:,.0f}",
                  p["sec"] / o["sec"], ">= 1.3")
        row.check(f"{name} step peak memory, {tag}", mib(o["memory"]), mib(p["memory"]), o["memory"] / p["memory"],
                  "<= 1.0")
        extra = f", HFU {o['hfu']:.1%} / {p['hfu']:.1%}" if gc_on else ""
        row.check(f"{name} MFU ({flops['flops_per_token'] / 1e9:.1f} GFLOP/token), {tag}{extra}",
                  f"{o['mfu']:.1%}", f"{p['mfu']:.1%}", None)
        row.check(f"{name} step / its kernels alone ({floor_s * 1e3:.3g} ms: products + SDPA), {tag}",
                  f"{o['over_kernel_floor']:.2f}x", f"{p['over_kernel_floor']:.2f}x", None)
    return row


def _repeated_step_row(s: Suite, build: Callable[[], Dict[str, Tuple[nn.Module, list]]], ids: torch.Tensor,
                       label: str, target: str, same_function: bool) -> Row:
    """`repeats` repeats of ours / PEFT / frozen fwd+bwd, each with freshly built models, its own
    interleaved rounds and its own ratio (so a disagreement between runs shows within one run).
    same_function: ours and PEFT carry the same adapters, so their losses and gradients are compared."""
    row, sh = Row(), s.shapes
    reps = []
    for i in range(sh.repeats):
        models = build()
        if i == 0 and same_function:
            row.results["check"] = loss_and_grads({v: models[v][0] for v in ("ours", "peft")}, ids)
        res = compare_steps(s, models, ids, 1.0 / (sh.repeats - i), sh.rounds, warmup=3)
        del models
        free_memory()
        o, p, f = res["ours"], res["peft"], res["frozen"]
        res.update(speedup=p["sec"] / o["sec"], memory_ratio=o["memory"] / p["memory"],
                   lora_over_frozen=o["sec"] / f["sec"], peft_over_frozen=p["sec"] / f["sec"])
        reps.append(res)
        row.check(f"{label} step tokens/s, repeat {i + 1}", f"{o['tokens_per_s']:,.0f}", f"{p['tokens_per_s']:,.0f}",
                  res["speedup"], target)
    row.results["repeats"] = reps
    mid = sorted(reps, key=lambda r: r["speedup"])[len(reps) // 2]
    growth = ""
    if mid["peft"]["step_growth"] > 0:  # the step's own memory, as bench_gpt2_train.py reports it
        growth = f"; the step's growth alone {mid['ours']['step_growth'] / mid['peft']['step_growth']:.2f}x"
    row.check(f"{label} peak memory, resident + step (median repeat{growth})", mib(mid["ours"]["memory"]),
              mib(mid["peft"]["memory"]), mid["memory_ratio"])
    row.check(f"{label} LoRA step / frozen fwd+bwd (time)", f"{mid['lora_over_frozen']:.2f}x",
              f"PEFT {mid['peft_over_frozen']:.2f}x", mid["lora_over_frozen"])
    return row


def row_gpt2_step(s: Suite) -> Row:
    sh, folder = s.shapes, s.folder("gpt2")

    def build():
        models = {}
        for v in ("ours", "peft", "frozen"):
            model = bench_gpt2_train.build(v, str(folder), s.device, s.dtype)
            model.train()  # transformers' from_pretrained leaves PEFT's model in eval mode
            models[v] = (model, [p for p in model.parameters() if p.requires_grad])
        return models

    ids = s.ids(sh.gpt2["vocab_size"], sh.gpt2_batch, sh.gpt2_seq)
    # PEFT cannot adapt chunks of the fused c_attn: its LoRA covers q, k, v (as many parameters as ours on q, v)
    return _repeated_step_row(s, build, ids, "GPT-2", ">= 1.3", same_function=False)


def row_smollm2_step(s: Suite) -> Row:
    sh, folder = s.shapes, s.folder("smollm2")

    def build():
        ours, trainable = bench_llama_train.build("ours", folder)
        factors = bench_llama_train.set_lora_factors(ours)
        models = {"ours": (ours, trainable), "peft": bench_llama_train.build("peft", folder, factors),
                  "frozen": bench_llama_train.build("frozen", folder)}
        for model, _ in models.values():
            to_device(model, s.device, s.dtype)  # in place: the trainable lists stay valid
        return models

    ids = s.ids(sh.smollm2["vocab_size"], sh.smollm2_batch, sh.smollm2_seq)
    return _repeated_step_row(s, build, ids, "SmolLM2", "", same_function=True)


def row_lorapro(s: Suite) -> Row:
    """The optimizer step alone (gradients set once, identical for all), bench_lorapro's layers."""
    from loralib.optim import LoRAProAdamW
    row, sh = Row(), s.shapes
    model = bench_lorapro.build(sh.lorapro_blocks, s.device.type, sh.block_shapes)
    params = [p for p in model.parameters() if p.requires_grad]
    opts = {"adamw": torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0),
            "efficient": LoRAProAdamW(model, lr=1e-5, mode="efficient"),
            "full": LoRAProAdamW(model, lr=1e-5, mode="full")}
    try:  # the full mode keeps two fp32 m x n moments per layer (52 GB at 224 layers): it may not fit
        opts["full"].step()
    except torch.OutOfMemoryError as err:
        row.results["full_error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        del opts["full"]
        free_memory()
    samples = interleaved({k: o.step for k, o in opts.items()}, s.shapes.rounds, warmup=2, device=s.device,
                          until=s.until(1.0))
    sec = medians(samples)
    row.results.update(layers=len(model), samples=samples,
                       **{k: dict(ms=sec[k] * 1e3, x_adamw=sec[k] / sec["adamw"],
                                  state_bytes=bench_lorapro.state_bytes(o)) for k, o in opts.items()})
    n = len(model)
    row.check(f"LoRA-Pro efficient step / AdamW, {n} layers", f"{sec['efficient'] * 1e3:.2f} ms",
              f"{sec['adamw'] * 1e3:.2f} ms", sec["efficient"] / sec["adamw"], "<= 1.2")
    if "full" in sec:
        row.check(f"LoRA-Pro full step / AdamW, {n} layers", f"{sec['full'] * 1e3:.1f} ms",
                  f"{sec['adamw'] * 1e3:.2f} ms", sec["full"] / sec["adamw"])
    else:
        row.check(f"LoRA-Pro full, {n} layers: {row.results['full_error'][:60]}", "-", "-", None)
    return row


def row_allocator(s: Suite) -> Row:
    """bench_allocator.measure for AdaLoRA and LoRA², alternated over three rounds (medians of them)."""
    row, sh = Row(), s.shapes
    for blocks in sh.allocator_blocks:
        args = SimpleNamespace(blocks=blocks, r=8, k=8, device=s.device.type, warmup=3,
                               repeats=sh.allocator_repeats)
        runs = {"adalora": [], "lora2": []}
        for _ in range(3):
            for kind in runs:
                runs[kind].append(bench_allocator.measure(kind, args, sh.block_shapes))
        res = {kind: dict(runs[kind][0], update=sorted(r["update"] for r in rs)[1],
                          mask=sorted(r["mask"] for r in rs)[1], update_runs=[r["update"] for r in rs])
               for kind, rs in runs.items()}
        a, b = res["adalora"], res["lora2"]
        res["update_ratio"] = b["update"] / a["update"]
        res["lora2_update_in_launches"] = b["update"] / 1e3 / s.launch_s
        row.results[f"blocks_{blocks}"] = res
        row.check(f"LoRA² / AdaLoRA allocator update, {a['matrices']} matrices (LoRA² = "
                  f"{res['lora2_update_in_launches']:.0f} launch latencies)", f"{b['update']:.3f} ms",
                  f"{a['update']:.3f} ms", res["update_ratio"], "<= 0.1")
    return row


def row_layer(s: Suite) -> Row:
    """bench_layers' fused q|k|v layer, d = shapes.layer_d, in the suite's dtype."""
    row, sh, d = Row(), s.shapes, s.shapes.layer_d
    B, T = sh.layer_tokens
    layers = {}
    for kind in ("ours", "microsoft", "peft"):
        try:
            layers[kind] = bench_layers.build(kind, d).to(device=s.device, dtype=s.dtype)
            layers[kind].train()  # (microsoft's MergedLinear.train returns None)
        except (FileNotFoundError, ImportError) as err:  # microsoft's wheel is not on the machine
            row.results[f"{kind}_unavailable"] = str(err)
    x = torch.randn(B, T, d, device=s.device, dtype=s.dtype, requires_grad=True)
    grad_out = torch.randn(B, T, 3 * d, device=s.device, dtype=s.dtype)
    steps = {k: (lambda layer=layer: bench_layers.step(layer, x, grad_out)) for k, layer in layers.items()}
    sec = medians(interleaved(steps, sh.rounds, warmup=3, device=s.device, until=s.until(0.6)))
    for kind, layer in layers.items():
        row.results[kind] = dict(ms=sec[kind] * 1e3, step_growth=step_peak(steps[kind], s.device),
                                 saved_for_backward=bench_layers.saved_bytes(layer, x, grad_out))
    shape = f"d {d}, {B}x{T} tokens"
    if "microsoft" in sec:
        row.check(f"layer fwd+bwd / microsoft 0.1.2 ({shape})", f"{sec['ours'] * 1e3:.3f} ms",
                  f"{sec['microsoft'] * 1e3:.3f} ms", sec["ours"] / sec["microsoft"], "<= 0.7")
    row.check(f"layer fwd+bwd / PEFT ({shape})", f"{sec['ours'] * 1e3:.3f} ms", f"{sec['peft'] * 1e3:.3f} ms",
              sec["ours"] / sec["peft"], "<= 1.0")
    del layers, steps, x, grad_out
    merged = bench_layers.build("ours", d).to(device=s.device, dtype=s.dtype).eval()
    plain = bench_layers.build("plain", d).to(device=s.device, dtype=s.dtype).eval()
    xi = torch.randn(B, T, d, device=s.device, dtype=s.dtype)
    with torch.no_grad():
        t = medians(interleaved({"merged": lambda: merged(xi), "plain": lambda: plain(xi)}, 2 * sh.rounds,
                                warmup=3, device=s.device, until=s.until(1.0)))
    row.results["inference"] = dict(merged_ms=t["merged"] * 1e3, plain_ms=t["plain"] * 1e3)
    row.check(f"merged layer / nn.Linear inference ({shape})", f"{t['merged'] * 1e3:.3f} ms",
              f"{t['plain'] * 1e3:.3f} ms", t["merged"] / t["plain"], "<= 1.02")
    return row


def row_merged_inference(s: Suite) -> Row:
    """Our LoRA model after eval() (B A folded into W) against the plain model, forward without grad."""
    row, sh = Row(), s.shapes
    gpt2 = s.folder("gpt2")
    smollm2 = s.folder("smollm2")
    cases = {
        "GPT-2": (lambda: (bench_gpt2_train.build("merged", str(gpt2), s.device, s.dtype),
                           bench_gpt2_train.build("plain", str(gpt2), s.device, s.dtype)),
                  s.ids(sh.gpt2["vocab_size"], sh.gpt2_batch, sh.gpt2_seq)),
        "SmolLM2": (lambda: (to_device(bench_llama_train.build("ours", smollm2)[0], s.device, s.dtype),
                             to_device(bench_llama_train.build("frozen", smollm2)[0], s.device, s.dtype)),
                    s.ids(sh.smollm2["vocab_size"], sh.smollm2_batch, sh.smollm2_seq)),
    }
    for i, (name, (build, ids)) in enumerate(cases.items()):
        merged, plain = (m.eval() for m in build())
        assert all(layer.merged for _, layer in loralib.lora_layers(merged) if layer.has_lora)
        with torch.no_grad():
            t = medians(interleaved({"merged": lambda: merged(input_ids=ids), "plain": lambda: plain(input_ids=ids)},
                                    2 * sh.rounds, warmup=3, device=s.device, until=s.until(1.0 / (2 - i))))
        row.results[name] = dict(merged_ms=t["merged"] * 1e3, plain_ms=t["plain"] * 1e3,
                                 ratio=t["merged"] / t["plain"])
        row.check(f"{name} merged / plain inference ({ids.shape[0]}x{ids.shape[1]})", f"{t['merged'] * 1e3:.2f} ms",
                  f"{t['plain'] * 1e3:.2f} ms", t["merged"] / t["plain"], "<= 1.02")
        del merged, plain
        free_memory()
    return row


def row_generation(s: Suite) -> Row:
    """bench_generation.measure: greedy and beam search (LoRA paper settings), ours vs transformers."""
    row, sh = Row(), s.shapes
    folder = s.folder("smollm2")
    ours, theirs = bench_generation.smollm2_models(folder, s.dtype, s.device)
    ids, mask, pad = bench_generation.prompts(folder, sh.gen_batch, s.device, sh.smollm2["vocab_size"])
    args = SimpleNamespace(family="smollm2", beams=sh.gen_beams, no_eos=False, rows="greedy,beam",
                           new_tokens=sh.gen_new_tokens, batch=sh.gen_batch, repeats=3)
    rows = bench_generation.measure(args, ours, theirs, ids, mask, pad, s.device)
    row.results.update(batch=sh.gen_batch, new_tokens=sh.gen_new_tokens, beams=sh.gen_beams, rows=rows)
    for r in rows:
        kind = "greedy" if r["decoding"] == "greedy" else f"beam ({sh.gen_beams})"
        row.check(f"{kind} {r['unit']} / transformers (same tokens: {'yes' if r['same_tokens'] else 'no'})",
                  f"{r['ours']:.2f}", f"{r['transformers']:.2f}", r["speedup"])
    return row


ROWS: Dict[str, Callable[[Suite], Row]] = {
    "llama7b_step": row_llama7b_step, "gpt2_step": row_gpt2_step, "smollm2_step": row_smollm2_step,
    "lorapro": row_lorapro, "allocator": row_allocator, "layer": row_layer,
    "merged_inference": row_merged_inference, "generation": row_generation}


# -- running ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def hard_limit(seconds: float, name: str):
    """Raise RowTimeout in the main thread once `seconds` have passed (checked between Python bytecodes,
    so a running kernel finishes first)."""
    def fire(signum, frame):
        raise RowTimeout(f"row {name} ran past its hard limit of {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_row(name: str, s: Suite, budget: float, hard: float) -> dict:
    start = time.perf_counter()
    s.row_end = start + budget
    try:
        with hard_limit(hard, name):
            row = ROWS[name](s)
        out = dict(status="ok", results=row.results, checks=row.checks)
    except Exception as err:  # noqa: BLE001 - a failed row is reported and the suite goes on
        tb = traceback.format_exc()
        print(f"[{name}] FAILED: {type(err).__name__}: {err}\n{tb[-2000:]}", file=sys.stderr, flush=True)
        out = dict(status="error", error=f"{type(err).__name__}: {err}"[:2000], traceback=tb[-4000:])
    finally:
        s.row_end = math.inf
        free_memory()
    out["seconds"] = time.perf_counter() - start
    return out


def _version(package: str) -> str:
    """The installed version, or "missing" (the rows that need the package then fail, the others run)."""
    try:
        return __import__(package).__version__
    except ImportError:
        return "missing"


def environment(device: torch.device) -> dict:
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), command=" ".join(sys.argv),
                python=sys.version.split()[0], torch=torch.__version__, transformers=_version("transformers"),
                peft=_version("peft"), loralib=loralib.__version__)
    if device.type == "cuda":
        meta.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30)
    else:
        meta["device"] = f"CPU, {torch.get_num_threads()} threads"
    try:
        meta["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return meta


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str, allow_nan=True))
    tmp.replace(path)


def print_table(report: dict) -> None:
    m = report["meta"]
    print(f"\nGPU suite{' (TINY SMOKE RUN: not a figure)' if report['tiny'] else ''}: {m['device']} | "
          f"torch {m['torch']} | transformers {m['transformers']} | peft {m['peft']} | {report['dtype']} | "
          f"{m['date']} | {m.get('commit', '')}")
    d = report.get("device_rates", {})
    if d:
        print(f"measured: {d['matmul_tflops']:.1f} TFLOP/s ({d['matmul_dtype']} {d['matmul_n']}^3 matmul), "
              f"kernel launch {d['launch_us']:.1f} us")
    print("\n| row | measure | ours | reference | ratio | target | met |")
    print("|---|---|---|---|---|---|---|")
    for name, r in report["rows"].items():
        if r["status"] != "ok":
            print(f"| {name} | {r['status'].upper()}: {r.get('error', '')[:150]} | | | | | |")
            continue
        for c in r["checks"]:
            ratio = "" if c["ratio"] is None else f"{c['ratio']:.3f}x"
            met = "" if c["met"] is None else ("met" if c["met"] else "NOT met")
            print(f"| {name} | {c['measure']} | {c['ours']} | {c['reference']} | {ratio} | {c['target']} | {met} |")
    print(f"\n(wall {report['wall_s']:.0f} s; rows: " +
          ", ".join(f"{n} {r['seconds']:.0f} s" for n, r in report["rows"].items()) + ")")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: the same code paths in seconds (smoke run)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    ap.add_argument("--json", default=str(HERE / "results" / "gpu_suite.json"), help="where the full numbers go")
    ap.add_argument("--time-limit", type=float, default=480.0,
                    help="seconds for the whole suite: rows that would start later are skipped")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        ap.error(f"--rows: unknown row(s) {unknown or '(none given)'}; known: {', '.join(ROWS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible (use --device cpu --tiny for the smoke run)")
    if device.type == "cpu" and not args.tiny:
        ap.error("--device cpu needs --tiny: the full shapes are GPU sizes (a 7B model twice, 52 GB of LoRA-Pro "
                 "state); the CPU figures come from the single benchmarks (benchmarks/run_all.py)")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    shapes = TINY if args.tiny else FULL

    start = time.perf_counter()
    deadline = start + args.time_limit
    json_path = Path(args.json)
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        s = Suite(device=device, dtype=dtype, shapes=shapes, tmp=Path(tmp))
        report = dict(meta=environment(device), tiny=args.tiny, dtype=str(dtype).removeprefix("torch."),
                      budgets=BUDGETS, rows={}, wall_s=0.0)
        report["device_rates"] = measure_device(s)
        gc.freeze()  # what is alive now (modules, imports) stays: free_memory()'s collections skip it
        print(f"[suite] {report['meta']['device']}, torch {torch.__version__}; "
              f"{report['device_rates']['matmul_tflops']:.1f} TFLOP/s measured; rows: {', '.join(rows)}", flush=True)
        for name in rows:
            left = deadline - time.perf_counter()
            if left < 5:
                report["rows"][name] = dict(status="skipped", error="the suite's --time-limit was reached",
                                            seconds=0.0)
            else:
                budget = BUDGETS[name] if not args.tiny else 60.0
                report["rows"][name] = run_row(name, s, min(budget, left), min(2 * budget, left + 30))
            r = report["rows"][name]
            summary = "; ".join(f"{c['measure']}: {c['ratio']:.3f}x" for c in r.get("checks", [])
                                if c["ratio"] is not None)
            print(f"[{name}] {r['status']} in {r['seconds']:.0f} s. {summary}", flush=True)
            report["wall_s"] = time.perf_counter() - start
            write_json(json_path, report)
    print_table(report)
    print(f"full numbers: {json_path}")
    return 0 if all(r["status"] == "ok" for r in report["rows"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
