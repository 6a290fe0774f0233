"""A small real learning check of the LoRA family against full fine-tuning (issue 4 §6).

    python benchmarks/learning_check.py            # everything: ~2.5 min on one CPU thread
    python benchmarks/learning_check.py --smoke    # a handful of steps, for tests/test_learning_check.py

The problem (teacher-student, fixed by --problem-seed): a 4-layer MLP
    x (32) -> fc1 -> gelu -> fc2 -> gelu -> fc3 -> gelu -> head -> y (16),   hidden width 64,
with random "pretrained" weights W0. The fine-tuning target is the same network with every weight moved by
    dW_l = c_l U_l diag(sigma) V_l^T,   sigma_i = i^(-p_l),   ||dW_l||_F = 0.6 ||W0_l||_F,
U_l, V_l random orthonormal; p_l = (0.5, 2.0, 1.0, 1.0) for (fc1, fc2, fc3, head): fc1's change is
full-rank-ish, fc2's nearly rank 2. A rank-4 update can hold 51% / 100% / 87% / 90% of these changes'
energy (printed as `energy@4`), so LoRA's rank limit matters and the layers need different ranks.
Inputs x ~ N(0, I), 2048 training points, targets y = teacher(x); every method starts from W0 and trains
on the same minibatches (batch 64, order fixed by --seed) with the loss
    L = mean ||f(x) - y||^2 / mean ||f_W0(x) - y||^2        (so L = 1 at step 0),
evaluated on the whole training set after every step: the "training loss curve". Biases are frozen for
every method (the target changes only the weights), weight decay is 0, no schedule, no clipping.

Methods (adapters on fc1, fc2, fc3 and head; s = alpha / r = 2 everywhere):
    full        AdamW on the four weight matrices, lr = LR
    lora        LoRA r = 4 (A kaiming, B = 0), AdamW on A and B, lr = LR
    lorapro     LoRAProAdamW(mode="full"), lr = LR      (the SAME lr as LoRA: the paper's comparison)
    lorapro_eff LoRAProAdamW(mode="efficient"), lr = LR
    loraplus    LoRA with lr_B = ratio * lr_A, lr_A = LR, ratio = 16 (create_loraplus_optimizer)
    adalora     SVDLinear r = 8 -> average 4 (RankAllocator), orth. regularizer 0.1, lr = LR_RANK
    lora2       LoRA2Linear r = 8 -> average 4, k = 8 (LoRA2RankAllocator), regularizer 0.1, lr = LR_RANK
    dora        DoRA r = 4 (loralib.dora: LoRA + a trained magnitude per row), AdamW, lr = LR
    pissa       LoRA r = 4 from W0's top-4 singular triplets (residual frozen), AdamW, lr = LR
    lora_ga     LoRA r = 4 from the SVD of W0's gradient over the first 8 minibatches (PEFT's defaults:
                ArB2r, stable, gamma 16; residual frozen), AdamW, lr = LR
AdaLoRA and LoRA² start from r = 8 per layer and end with the same total budget as LoRA's r = 4
(16 ranks over 4 layers); their final rank pattern (ranks kept per layer) is reported.
Learning rates: LR = 1e-3 (AdamW's usual lr for full fine-tuning) for full, LoRA, LoRA-Pro and LoRA+'s A: the
LoRA-Pro paper compares all of them at one lr, since LoRA-Pro's full mode emulates AdamW on W at that lr.
LR_RANK = 1e-2 for AdaLoRA and LoRA², whose adapters start at N(0, 0.02) with E = 0 and learn slowly at 1e-3
(the sweep reruns them at 1e-3, 3e-3, 1e-2 and 3e-2).

The two claims, with their measures:
(1) LoRA-Pro's loss curve is closer to full fine-tuning's than LoRA's.
    Distance of a curve L_m to the reference L_full: D(m) = mean over steps t = 1..T of
    |ln L_m(t) - ln L_full(t)|  (the mean vertical gap between the curves on a log axis; 0.1 means
    "about 10% off on average"). PASS when D(lorapro) < D(lora). Efficient mode is reported beside it,
    and so is the linear-axis gap A(m) = mean_t |L_m(t) - L_full(t)| (the area between the curves / T),
    which weighs the early, large losses more.
(2) LoRA+ (ratio > 1) reaches a set loss in fewer steps than LoRA at the same lr_A.
    The set loss L* = sqrt(L_lora(0) * L_lora(T)): halfway, on a log axis, from the start to LoRA's final
    loss (so LoRA is sure to reach it). Steps to L*: the first step t with L(t) <= L*. PASS when
    LoRA+ needs fewer steps than LoRA.
Both are then repeated over 3 learning rates x 3 seeds (and two LoRA+ ratios; full FT always at the same
lr as LoRA and LoRA-Pro) so a reader can see how robust the verdicts are; AdaLoRA and LoRA² are rerun at
4 learning rates to show how stable their rank patterns are. Nothing was tuned to make a claim pass.

Outputs (benchmarks/results/, git-ignored): learning_check_curves.png (all methods),
learning_check_sensitivity.png (claim 1 and 2 over lr and seed), learning_check.json (all curves and numbers).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import loralib  # noqa: E402
from loralib.adalora import RankAllocator, compute_orth_regu  # noqa: E402
from loralib.lora2 import LoRA2RankAllocator  # noqa: E402
from loralib.optim import LoRAProAdamW, create_loraplus_optimizer  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LAYERS = ("fc1", "fc2", "fc3", "head")


# -- the problem ----------------------------------------------------------------------------------

@dataclass
class ProblemConfig:
    d_in: int = 32
    hidden: int = 64
    d_out: int = 16
    n_train: int = 2048
    decay: Tuple[float, ...] = (0.5, 2.0, 1.0, 1.0)  # p_l of sigma_i = i^-p per layer (fc1, fc2, fc3, head)
    relative_change: float = 0.6                      # ||dW||_F / ||W0||_F


class MLP(nn.Module):
    """x (N, d_in) -> (N, d_out) through three GELU hidden layers of width `hidden`."""

    def __init__(self, cfg: ProblemConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_in, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.hidden)
        self.fc3 = nn.Linear(cfg.hidden, cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x))
        x = F.gelu(self.fc2(x))
        x = F.gelu(self.fc3(x))
        return self.head(x)


@dataclass
class Problem:
    cfg: ProblemConfig
    pretrained: Dict[str, torch.Tensor]   # state dict of W0 (and biases)
    deltas: Dict[str, torch.Tensor]       # dW per layer, (out, in)
    x: torch.Tensor                       # (n_train, d_in)
    y: torch.Tensor                       # (n_train, d_out)
    base_mse: float                       # mean ||f_W0(x) - y||^2: the loss normaliser


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen))
    return q


def make_problem(cfg: ProblemConfig, seed: int = 0) -> Problem:
    """The pretrained network W0, the fine-tuning target W0 + dW, and the training set (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = MLP(cfg)
    pretrained = {k: v.detach().clone() for k, v in net.state_dict().items()}
    deltas = {}
    for name, p in zip(LAYERS, cfg.decay):
        w0 = pretrained[f"{name}.weight"]
        out_f, in_f = w0.shape
        k = min(out_f, in_f)
        sigma = torch.arange(1, k + 1, dtype=torch.float32) ** (-p)
        delta = _orthonormal(out_f, k, gen) @ torch.diag(sigma) @ _orthonormal(in_f, k, gen).T
        deltas[name] = delta * (cfg.relative_change * w0.norm() / delta.norm())
    teacher = MLP(cfg)
    teacher.load_state_dict({k: v + deltas[k.split(".")[0]] if k.endswith("weight") else v
                             for k, v in pretrained.items()})
    x = torch.randn(cfg.n_train, cfg.d_in, generator=gen)
    with torch.no_grad():
        y = teacher(x)
        base_mse = (net(x) - y).pow(2).mean().item()
    return Problem(cfg, pretrained, deltas, x, y, base_mse)


def energy_at_rank(delta: torch.Tensor, r: int) -> float:
    """Share of ||dW||_F^2 in its r largest singular values (the most a rank-r update can capture)."""
    s = torch.linalg.svdvals(delta)
    return float((s[:r] ** 2).sum() / (s ** 2).sum())


# -- the methods ----------------------------------------------------------------------------------

@dataclass
class RunConfig:
    steps: int = 400
    batch: int = 64
    lr: float = 1e-3            # full, lora, lorapro(_eff), and lr_A of loraplus
    lr_rank: float = 1e-2       # adalora, lora2 (their own lr: E starts at 0, A and B at N(0, 0.02))
    r: int = 4
    alpha: float = 8.0          # s = alpha / r = 2
    ratio: float = 16.0         # LoRA+ lr_B / lr_A
    r_init: int = 8             # AdaLoRA / LoRA²: initial rank per layer, ending at r on average
    lora2_k: int = 8             # the released default
    regu_weight: float = 0.1
    seed: int = 0               # adapter init and minibatch order


@dataclass
class Setup:
    """What one method trains: the model, its optimizer, and the optional AdaLoRA-style plug-ins."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    regularizer: Optional[Callable[[nn.Module], torch.Tensor]] = None
    allocator: Optional[RankAllocator] = None


def _pretrained_model(problem: Problem) -> nn.Module:
    model = MLP(problem.cfg)
    model.load_state_dict(problem.pretrained)
    return model


def _adapted(problem: Problem, run: RunConfig, method: str = "lora", r: Optional[int] = None,
             alpha: Optional[float] = None) -> nn.Module:
    torch.manual_seed(run.seed)  # the adapter init
    r = run.r if r is None else r
    config = loralib.LoRAConfig(r=r, lora_alpha=run.alpha if alpha is None else alpha, target_modules=LAYERS,
                                method=method, lora2_k=run.lora2_k)
    return loralib.inject(_pretrained_model(problem), LAYERS, config=config)


def _rank_allocated(problem: Problem, run: RunConfig, method: str) -> Setup:
    # alpha = 2 r_init gives AdaLoRA's scale alpha / (ranknum + 1e-5) ~= 2, as LoRA's s.
    model = _adapted(problem, run, method, r=run.r_init, alpha=2.0 * run.r_init)
    allocator_cls = RankAllocator if method == "adalora" else LoRA2RankAllocator
    # Schedule as AdaLoRA's GLUE recipes, in proportion: 10% warmup at full rank, cubic decrease, the last
    # 30% at the target with importance frozen.
    allocator = allocator_cls(model, lora_r=run.r_init, target_rank=run.r, init_warmup=run.steps // 10,
                              final_warmup=(3 * run.steps) // 10, mask_interval=max(1, run.steps // 40),
                              beta1=0.85, beta2=0.85, total_step=run.steps)
    regularizer = (lambda m: compute_orth_regu(m, run.regu_weight)) if run.regu_weight > 0 else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.lr_rank,
                                  weight_decay=0.0)
    return Setup(model, optimizer, regularizer, allocator)


def build(method: str, problem: Problem, run: RunConfig) -> Setup:
    """The model (from W0) and optimizer of `method` (module docstring)."""
    if method == "full":
        model = _pretrained_model(problem)
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        for n, p in model.named_parameters():
            p.requires_grad = n.endswith("weight")
        return Setup(model, torch.optim.AdamW(weights, lr=run.lr, weight_decay=0.0))
    if method == "lora":
        model = _adapted(problem, run)
        params = [p for p in model.parameters() if p.requires_grad]
        return Setup(model, torch.optim.AdamW(params, lr=run.lr, weight_decay=0.0))
    if method in ("lorapro", "lorapro_eff"):
        model = _adapted(problem, run)
        mode = "full" if method == "lorapro" else "efficient"
        return Setup(model, LoRAProAdamW(model, lr=run.lr, weight_decay=0.0, mode=mode))
    if method == "loraplus":
        model = _adapted(problem, run)
        return Setup(model, create_loraplus_optimizer(model, torch.optim.AdamW, lr=run.lr,
                                                      loraplus_lr_ratio=run.ratio, weight_decay=0.0))
    if method in ("dora", "pissa", "lora_ga"):
        model = _adapted(problem, run, method.replace("_", "-"))
        if method == "lora_ga":  # the gradient of the loss over the first 8 minibatches of the training set
            def train_step():
                for i in range(8):
                    rows = slice(i * run.batch, (i + 1) * run.batch)
                    _loss(model, problem, problem.x[rows], problem.y[rows]).backward()
            loralib.loraga_init(model, train_step)
        params = [p for p in model.parameters() if p.requires_grad]
        return Setup(model, torch.optim.AdamW(params, lr=run.lr, weight_decay=0.0))
    if method in ("adalora", "lora2"):
        return _rank_allocated(problem, run, method)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


METHODS = ("full", "lora", "lorapro", "lorapro_eff", "loraplus", "adalora", "lora2", "dora", "pissa", "lora_ga")


# -- training -------------------------------------------------------------------------------------

def _loss(model: nn.Module, problem: Problem, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).mean() / problem.base_mse


def train(method: str, problem: Problem, run: RunConfig) -> dict:
    """Train one method; returns its curve (normalised loss on the training set, steps 0..T), the rank
    pattern for AdaLoRA / LoRA², trainable-parameter count and wall time."""
    setup = build(method, problem, run)
    model, opt = setup.model, setup.optimizer
    gen = torch.Generator().manual_seed(1000 + run.seed)  # the same minibatches for every method
    n = problem.x.shape[0]
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(run.steps * run.batch / n))])

    def full_loss() -> float:
        with torch.no_grad():
            return _loss(model, problem, problem.x, problem.y).item()

    curve = [full_loss()]
    start = time.perf_counter()
    for step in range(run.steps):
        idx = order[step * run.batch:(step + 1) * run.batch]
        loss = _loss(model, problem, problem.x[idx], problem.y[idx])
        if setup.regularizer is not None:
            loss = loss + setup.regularizer(model)
        loss.backward()
        opt.step()
        if setup.allocator is not None:  # after step, before zero_grad: it reads the gradients
            setup.allocator.update_and_mask(model, step)
        opt.zero_grad(set_to_none=True)
        curve.append(full_loss())
    seconds = time.perf_counter() - start
    result = dict(method=method, curve=curve, seconds=seconds,
                  trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    if setup.allocator is not None:
        result["rank_pattern"] = {name: int(sum(mask)) for name, mask in setup.allocator.get_rank_pattern().items()}
    return result


# -- measures -------------------------------------------------------------------------------------

def curve_distance(curve: Sequence[float], reference: Sequence[float]) -> float:
    """D = mean over t = 1..T of |ln curve(t) - ln reference(t)| (module docstring, claim 1)."""
    a = torch.tensor(curve[1:], dtype=torch.float64).clamp_min(1e-12).log()
    b = torch.tensor(reference[1:], dtype=torch.float64).clamp_min(1e-12).log()
    return float((a - b).abs().mean())


def steps_to(curve: Sequence[float], target: float) -> Optional[int]:
    """The first step t with curve(t) <= target, or None if it never gets there."""
    return next((t for t, v in enumerate(curve) if v <= target), None)


def set_loss(lora_curve: Sequence[float]) -> float:
    """L* = sqrt(L_lora(0) L_lora(T)) (module docstring, claim 2)."""
    return math.sqrt(lora_curve[0] * lora_curve[-1])


def area_between(curve: Sequence[float], reference: Sequence[float]) -> float:
    """A = mean over t = 1..T of |curve(t) - reference(t)| (linear axis; module docstring, claim 1)."""
    return float((torch.tensor(curve[1:], dtype=torch.float64) -
                  torch.tensor(reference[1:], dtype=torch.float64)).abs().mean())


def claim1(runs: Dict[str, dict]) -> dict:
    ref = runs["full"]["curve"]
    out = {}
    for m in ("lora", "lorapro", "lorapro_eff"):
        out[f"D_{m}"] = curve_distance(runs[m]["curve"], ref)
        out[f"A_{m}"] = area_between(runs[m]["curve"], ref)
    out["passed"] = out["D_lorapro"] < out["D_lora"]
    return out


def claim2(lora_curve: Sequence[float], plus_curve: Sequence[float]) -> dict:
    target = set_loss(lora_curve)
    s_lora, s_plus = steps_to(lora_curve, target), steps_to(plus_curve, target)
    passed = s_plus is not None and (s_lora is None or s_plus < s_lora)
    return dict(target=target, steps_lora=s_lora, steps_loraplus=s_plus, passed=passed)


# -- reporting ------------------------------------------------------------------------------------

def _fmt_steps(s: Optional[int], total: int) -> str:
    return f">{total}" if s is None else str(s)


def markdown_table(runs: Dict[str, dict], run: RunConfig) -> str:
    ref = runs["full"]["curve"]
    total = run.steps
    marks = [t for t in (total // 4, total // 2, total) if t > 0]
    head = ("| method | lr | trainable | " + " | ".join(f"L@{t}" for t in marks) +
            " | D to full | steps to 0.5 | steps to 0.2 | s/run |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m, res in runs.items():
        c = res["curve"]
        if m == "loraplus":
            lr = f"{run.lr:g} (B: {run.lr * run.ratio:g})"
        else:
            lr = f"{run.lr_rank if m in ('adalora', 'lora2') else run.lr:g}"
        lines.append(f"| {m} | {lr} | {res['trainable']} | " + " | ".join(f"{c[t]:.4f}" for t in marks) +
                     f" | {curve_distance(c, ref):.3f} | {_fmt_steps(steps_to(c, 0.5), total)} | "
                     f"{_fmt_steps(steps_to(c, 0.2), total)} | {res['seconds']:.1f} |")
    return "\n".join(lines)


def plot_curves(runs: Dict[str, dict], run: RunConfig, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"full": ("black", "-"), "lora": ("tab:blue", "-"), "lorapro": ("tab:red", "-"),
              "lorapro_eff": ("tab:red", "--"), "loraplus": ("tab:green", "-"), "adalora": ("tab:purple", "-"),
              "lora2": ("tab:orange", "-")}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for m, res in runs.items():
        color, ls = styles.get(m, (None, "-"))
        ax.plot(res["curve"], label=m, color=color, linestyle=ls, linewidth=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (normalised, 1 = pretrained)")
    ax.set_title(f"Teacher-student MLP: lr={run.lr:g} (full, LoRA, LoRA-Pro, LoRA+ lr_A), "
                 f"lr={run.lr_rank:g} (AdaLoRA, LoRA²)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sensitivity(sens: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    lrs = sorted({row["lr"] for row in sens["claim1"]})
    for key, color, label in (("D_lora", "tab:blue", "LoRA"), ("D_lorapro", "tab:red", "LoRA-Pro full"),
                              ("D_lorapro_eff", "tab:pink", "LoRA-Pro efficient")):
        for row in sens["claim1"]:
            ax1.scatter(row["lr"], row[key], color=color, s=14, label=label if row is sens["claim1"][0] else None)
        ax1.plot(lrs, [sum(r[key] for r in sens["claim1"] if r["lr"] == lr) /
                       sum(1 for r in sens["claim1"] if r["lr"] == lr) for lr in lrs], color=color)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xticks(lrs)
        ax.set_xticklabels([f"{lr:g}" for lr in lrs])
        ax.minorticks_off()
    ax1.set_xlabel("lr (full, LoRA, LoRA-Pro)")
    ax1.set_ylabel("D to full FT: mean |ln L - ln L_full|")
    ax1.set_title("claim 1 (lower = closer to full FT)", fontsize=9)
    ax1.legend(fontsize=8)
    ax1.grid(True, alpha=0.3)
    for ratio, marker in zip(sorted({row["ratio"] for row in sens["claim2"]}), "os^"):
        rows = [r for r in sens["claim2"] if r["ratio"] == ratio]
        ax2.scatter([r["lr"] * (1.04 if marker != "o" else 0.96) for r in rows],
                    [(r["steps_loraplus"] or sens["steps"]) / max(1, r["steps_lora"] or sens["steps"]) for r in rows],
                    marker=marker, label=f"ratio {ratio:g}")
    ax2.axhline(1.0, color="gray", linestyle="--")
    ax2.set_xlabel("lr_A (LoRA and LoRA+)")
    ax2.set_ylabel("steps to L*: LoRA+ / LoRA")
    ax2.set_title("claim 2 (below 1 = LoRA+ faster)", fontsize=9)
    ax2.legend(fontsize=8)
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------

def sensitivity(problem: Problem, base: RunConfig, lrs: Sequence[float], seeds: Sequence[int],
                ratios: Sequence[float], rank_lrs: Sequence[float] = ()) -> dict:
    """Both claims for every (lr, seed), claim 2 for every LoRA+ ratio; AdaLoRA and LoRA² (seed of `base`)
    for every lr in `rank_lrs`: final loss and rank pattern."""
    out = {"steps": base.steps, "claim1": [], "claim2": [], "rank": []}
    for lr in rank_lrs:
        for m in ("adalora", "lora2"):
            res = train(m, problem, RunConfig(**{**asdict(base), "lr_rank": lr}))
            out["rank"].append(dict(method=m, lr=lr, final=res["curve"][-1], rank_pattern=res["rank_pattern"]))
    for lr in lrs:
        for seed in seeds:
            run = RunConfig(**{**asdict(base), "lr": lr, "seed": seed})
            runs = {m: train(m, problem, run) for m in ("full", "lora", "lorapro", "lorapro_eff")}
            out["claim1"].append(dict(lr=lr, seed=seed, **claim1(runs)))
            for ratio in ratios:
                plus = train("loraplus", problem, RunConfig(**{**asdict(run), "ratio": ratio}))
                out["claim2"].append(dict(lr=lr, seed=seed, ratio=ratio,
                                          **claim2(runs["lora"]["curve"], plus["curve"])))
    return out


def sensitivity_tables(sens: dict) -> str:
    lines = ["| lr | seed | D(LoRA) | D(LoRA-Pro full) | D(LoRA-Pro eff) | A(LoRA) | A(LoRA-Pro full) | claim 1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sens["claim1"]:
        lines.append(f"| {r['lr']:g} | {r['seed']} | {r['D_lora']:.3f} | {r['D_lorapro']:.3f} | "
                     f"{r['D_lorapro_eff']:.3f} | {r['A_lora']:.4f} | {r['A_lorapro']:.4f} | "
                     f"{'PASS' if r['passed'] else 'FAIL'} |")
    n1 = sum(r["passed"] for r in sens["claim1"])
    lines += [f"\nclaim 1 holds in {n1}/{len(sens['claim1'])} (lr, seed) settings\n",
              "| lr_A | seed | ratio | L* | steps LoRA | steps LoRA+ | claim 2 |", "|---|---|---|---|---|---|---|"]
    for r in sens["claim2"]:
        lines.append(f"| {r['lr']:g} | {r['seed']} | {r['ratio']:g} | {r['target']:.4f} | "
                     f"{_fmt_steps(r['steps_lora'], sens['steps'])} | {_fmt_steps(r['steps_loraplus'], sens['steps'])} | "
                     f"{'PASS' if r['passed'] else 'FAIL'} |")
    n2 = sum(r["passed"] for r in sens["claim2"])
    lines.append(f"\nclaim 2 holds in {n2}/{len(sens['claim2'])} (lr_A, seed, ratio) settings")
    if sens["rank"]:
        lines += ["\n| method | lr | final loss | ranks kept (" + ", ".join(LAYERS) + ") |", "|---|---|---|---|"]
        for r in sens["rank"]:
            lines.append(f"| {r['method']} | {r['lr']:g} | {r['final']:.4f} | "
                         f"{', '.join(str(k) for k in r['rank_pattern'].values())} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a handful of steps, no sensitivity sweep")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 400; smoke 6)")
    parser.add_argument("--lr", type=float, default=RunConfig.lr)
    parser.add_argument("--lr-rank", type=float, default=RunConfig.lr_rank)
    parser.add_argument("--ratio", type=float, default=RunConfig.ratio)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--problem-seed", type=int, default=0)
    parser.add_argument("--sens-lrs", type=float, nargs="*", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--sens-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--sens-ratios", type=float, nargs="*", default=[4.0, 16.0])
    parser.add_argument("--sens-rank-lrs", type=float, nargs="*", default=[1e-3, 3e-3, 1e-2, 3e-2],
                        help="lrs for AdaLoRA and LoRA² in the sweep")
    parser.add_argument("--no-sensitivity", action="store_true")
    parser.add_argument("--out", default=RESULTS, help="folder for the PNGs and the JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny matrices: 1 is fastest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    steps = args.steps if args.steps is not None else (6 if args.smoke else RunConfig.steps)
    problem_cfg = ProblemConfig(n_train=256) if args.smoke else ProblemConfig()
    problem = make_problem(problem_cfg, args.problem_seed)
    run = RunConfig(steps=steps, lr=args.lr, lr_rank=args.lr_rank, ratio=args.ratio, seed=args.seed)
    if steps <= 1:
        parser.error("--steps must be at least 2 (the AdaLoRA schedule needs a budgeting phase)")

    print(f"## Learning check: teacher-student MLP, {steps} steps, batch {run.batch}, seed {run.seed}\n")
    print("dW energy a rank-4 update can capture (energy@4): " +
          ", ".join(f"{n} {energy_at_rank(problem.deltas[n], run.r):.2f}" for n in LAYERS) + "\n")
    runs = {m: train(m, problem, run) for m in METHODS}
    print(markdown_table(runs, run))
    print()
    for m in ("adalora", "lora2"):
        print(f"{m} final rank pattern (of r={run.r_init}; budget {run.r * len(LAYERS)}): " +
              ", ".join(f"{n}={k}" for n, k in runs[m]["rank_pattern"].items()))
    print()

    c1 = claim1(runs)
    c2 = claim2(runs["lora"]["curve"], runs["loraplus"]["curve"])
    print(f"CLAIM 1 {'PASS' if c1['passed'] else 'FAIL'}: LoRA-Pro (full) closer to full FT than LoRA at lr={run.lr:g}: "
          f"D(LoRA-Pro)={c1['D_lorapro']:.3f} vs D(LoRA)={c1['D_lora']:.3f}; "
          f"linear gap A(LoRA-Pro)={c1['A_lorapro']:.4f} vs A(LoRA)={c1['A_lora']:.4f}")
    print(f"   (not part of the claim) LoRA-Pro efficient mode: D={c1['D_lorapro_eff']:.3f}, "
          f"A={c1['A_lorapro_eff']:.4f}: {'closer' if c1['D_lorapro_eff'] < c1['D_lora'] else 'NOT closer'} "
          f"to full FT than LoRA")
    print(f"CLAIM 2 {'PASS' if c2['passed'] else 'FAIL'}: LoRA+ (ratio {run.ratio:g}) reaches L*={c2['target']:.4f} in "
          f"{_fmt_steps(c2['steps_loraplus'], steps)} steps vs LoRA {_fmt_steps(c2['steps_lora'], steps)} "
          f"(lr_A={run.lr:g})")

    report = dict(problem=asdict(problem_cfg), run=asdict(run),
                  energy_at_r={n: energy_at_rank(problem.deltas[n], run.r) for n in LAYERS},
                  runs=runs, claim1=c1, claim2=c2)
    if not args.smoke and not args.no_sensitivity:
        print(f"\n## Sensitivity: lr in {args.sens_lrs} (full FT at the same lr), seeds {args.sens_seeds}, "
              f"LoRA+ ratios {args.sens_ratios}; AdaLoRA / LoRA² at lr in {args.sens_rank_lrs}\n")
        sens = sensitivity(problem, run, args.sens_lrs, args.sens_seeds, args.sens_ratios, args.sens_rank_lrs)
        print(sensitivity_tables(sens))
        report["sensitivity"] = sens

    os.makedirs(args.out, exist_ok=True)
    paths = {"curves": os.path.join(args.out, "learning_check_curves.png"),
             "json": os.path.join(args.out, "learning_check.json")}
    plot_curves(runs, run, paths["curves"])
    if "sensitivity" in report:
        paths["sensitivity"] = os.path.join(args.out, "learning_check_sensitivity.png")
        plot_sensitivity(report["sensitivity"], paths["sensitivity"])
    report["seconds"] = time.perf_counter() - t0
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {', '.join(paths.values())}\ntotal time {report['seconds']:.1f} s")
    report["paths"] = paths
    return report


if __name__ == "__main__":
    main()
