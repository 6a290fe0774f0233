"""LoRA² (multi-scale LoRA in two orthogonal planes): AdaLoRA whose P and Q are themselves LoRAs.

Per adapted matrix W (out, in), with r the rank that AdaLoRA allocates and k the inner rank:
    Q~ = lora_B (r, k) @ lora_A (k, in)          (the "input" plane, r x in)
    P~ = lora_bb (out, k) @ lora_aa (k, r)       (the "output" plane, out x r)
    delta-W = P~ diag(lora_E) Q~ * lora_alpha / (ranknum + 1e-5),   ranknum = initial r.
Init N(0, 0.02) for every factor except E = 0. Trainable entries per matrix: k (in + out) + 2 r k + r.

Importance (methods.md §3): only the small factors are scored, lora_aa, lora_B and lora_E; the
triplet score of rank i is s(E_i) + mean_k s(aa[:, i]) + mean_k s(B[i, :]), i.e. 2 r k + r scored
entries per matrix instead of AdaLoRA's r (in + out + 1). Schedule, threshold and masking are
AdaLoRA's (`loralib.adalora.RankAllocator`; `LoRA2RankAllocator` is the same restricted to LoRA2 layers).
What the layer shares with AdaLoRA's SVDLinear (base class, scaling, rank buffers) is `loralib.svd_form`.

Orthogonality regularizer (`compute_lora2_orth_regu`), defined here because the released one cannot run:
    within-factor terms, one per factor, on the Gram of its smaller side:
        ||A A^T - I_k||, ||B B^T - I_r|| (or ||B^T B - I_k|| when r > k), ||aa aa^T - I_k|| (or
        ||aa^T aa - I_r|| when k > r), ||bb^T bb - I_k||   (Frobenius norms);
    cross-plane term, for square matrices (in == out) only:
        ||Q~ P~||_F = ||B (A bb) aa||_F   (r x r): the r input directions Q~ reads (rows of Q~)
        are orthogonal to the r output directions P~ writes (columns of P~). For in != out the
        two planes live in different spaces (R^in, R^out) and no cross term exists.
    regularizer = regu_weight * mean over all these terms (squared=True squares each norm), the
    same normalisation as AdaLoRA's. With orthonormal factors and orthogonal planes it is zero.
Deviations from the released code (Godz-z/LoRA-2, loralib/LoRA2.py):
- its compute_orth_regu reads A, B, aa, bb before assigning them (UnboundLocalError), takes
  them from `.data` (no gradient), so it was never in the loss and lora_aa / lora_bb were never
  regularized; its cross-plane product (B A)^T (bb aa)^T = (P~ Q~)^T was computed and then dropped
  (it added ||Gram - I|| again instead). P~ Q~ = 0 is in any case unreachable with orthonormal P~
  (P~^T P~ Q~ = Q~), so we use the product the other way round, Q~ P~, which can vanish;
- its merge multiplied (B A)^T * E * (bb aa)^T elementwise (a shape error for any real layer) and
  printed; ours merges P~ diag(E) Q~, in fp32, through loralib.layers.LoRALayer;
- k was hard-coded to 8 (ours: the `k` argument, LoRAConfig.lora2_k); the allocator's beta checks
  were commented out (ours: ValueError); its schedule printed every step.
Note: here lora_B is (r, k), not AdaLoRA's (out, r): code that treats every "lora_B" as the
output-side factor (LoRA+ learning-rate groups, LoRA-Pro) does not apply to LoRA² layers.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .adalora import RankAllocator, rank_adaptive_layers
from .config import register_method
from .layers import LoRALayer, transpose_if, widened
from .svd_form import SVDFormLinear, check_config_for, effective_alpha, init_rank_state, orth_gap, orth_regularizer


class LoRA2Linear(SVDFormLinear):
    """Linear layer with LoRA²: y = x W^T + b + dropout(x) Q~^T diag(E) P~^T * alpha / (ranknum + 1e-5).

    Shapes: lora_A (k, in), lora_B (r, k), lora_E (r, 1), lora_aa (k, r), lora_bb (out, k).
    The unmerged forward applies the five factors in turn ((..., in) -> k -> r -> k -> out); it
    never forms Q~, P~ or delta-W. `rank_mask` (r,) marks the ranks the allocator keeps.
    """

    rank_dims = {"lora_E": 0, "lora_B": 0, "lora_aa": 1}  # factor -> its rank dimension
    lora_names = ("lora_A", "lora_B", "lora_E", "lora_aa", "lora_bb")

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float, k: int = 8,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True,
                 **kwargs):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (LoRA²'s inner rank) must be an int >= 1, got k={k!r}")
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=effective_alpha(lora_alpha, r), lora_dropout=lora_dropout,
                           merge_weights=merge_weights)
        self.k = k
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((k, in_features)))
            self.lora_E = nn.Parameter(self.weight.new_zeros((r, 1)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((r, k)))
            self.lora_aa = nn.Parameter(self.weight.new_zeros((k, r)))
            self.lora_bb = nn.Parameter(self.weight.new_zeros((out_features, k)))
            self.scaling = self.lora_alpha
            self.weight.requires_grad = False
        init_rank_state(self, r)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)
        self._register_merge_safe_state_hooks()

    def reset_lora_parameters(self) -> None:
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_E)
            for p in (self.lora_A, self.lora_B, self.lora_aa, self.lora_bb):
                nn.init.normal_(p, mean=0.0, std=0.02)

    def planes(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(P~ (out, r), Q~ (r, in)), differentiable."""
        return self.lora_bb @ self.lora_aa, self.lora_B @ self.lora_A

    def delta_weight(self) -> torch.Tensor:
        """P~ diag(E) Q~ * scaling / (ranknum + 1e-5) in fp32, laid out like `weight`."""
        p_plane = widened(self.lora_bb) @ widened(self.lora_aa)
        q_plane = widened(self.lora_B) @ widened(self.lora_A)
        delta = p_plane @ (widened(self.lora_E) * q_plane)
        return transpose_if(delta, self.fan_in_fan_out) * widened(self._rank_scale())

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out) through k, r, k: O(k (in + out) + r k) per token."""
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        h = x @ self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)  # (..., r) = Q~ x
        h = h * self.lora_E.view(-1)
        h = h @ self.lora_aa.transpose(0, 1) @ self.lora_bb.transpose(0, 1)  # (..., out)
        return h * self._rank_scale()

    # -- what the allocator and the regularizer see ----------------------------------------------
    def scored_factors(self) -> List[Tuple[str, nn.Parameter]]:
        """Only the small factors: E (r, 1), aa (k, r), B (r, k); never A (k, in) or bb (out, k)."""
        return [("lora_E", self.lora_E), ("lora_aa", self.lora_aa), ("lora_B", self.lora_B)]

    @staticmethod
    def triplet_score(s_E: torch.Tensor, s_aa: torch.Tensor, s_B: torch.Tensor) -> torch.Tensor:
        """s(E_i) + mean_k s(aa[:, i]) + mean_k s(B[i, :]), (r,)."""
        return s_E.view(-1) + (s_aa.mean(dim=0) + s_B.mean(dim=1))

    def orth_penalties(self, squared: bool = False) -> List[torch.Tensor]:
        """Within-factor gaps of A, B, aa, bb, plus ||Q~ P~||_F when in == out (module docstring)."""
        terms = [torch.norm(orth_gap(p), p="fro") for p in (self.lora_A, self.lora_B, self.lora_aa, self.lora_bb)]
        if self.in_features == self.out_features:
            cross = self.lora_B @ (self.lora_A @ self.lora_bb) @ self.lora_aa  # Q~ P~, (r, r), never (d, d)
            terms.append(torch.norm(cross, p="fro"))
        return [t * t for t in terms] if squared else terms


class LoRA2RankAllocator(RankAllocator):
    """`RankAllocator` on the LoRA² layers of a model: same schedule, threshold and masking; each
    layer scores only lora_E, lora_aa and lora_B (2 r k + r entries)."""

    layer_types = (LoRA2Linear,)


def lora2_layers(model: nn.Module) -> List[Tuple[str, LoRA2Linear]]:
    return [(n, m) for n, m in rank_adaptive_layers(model) if isinstance(m, LoRA2Linear)]


def compute_lora2_orth_regu(model: nn.Module, regu_weight: float = 0.1, squared: bool = False) -> torch.Tensor:
    """regu_weight * mean of every LoRA² orthogonality term (within-factor and cross-plane; module
    docstring). Differentiable in all five factors; add it to the loss before backward()."""
    return orth_regularizer([m for _, m in lora2_layers(model)], regu_weight, squared, "compute_lora2_orth_regu")


def sensitivity_counts(model: nn.Module) -> Dict[str, float]:
    """What the allocator scores on this model's LoRA² layers, against AdaLoRA on the same shapes.

    Per matrix (in, out, r, k): LoRA² scores 2 r k + r entries, AdaLoRA r (in + out + 1).
    Returns matrices, lora2_scored, adalora_scored, scored_ratio (= lora2 / adalora), reduction
    (= 1 - ratio; the paper's "~98.5% fewer"), lora2_params (k (in + out) + 2 r k + r per matrix),
    adalora_params (r (in + out + 1) per matrix: AdaLoRA scores every parameter it trains) and
    trainable (parameters of the model with requires_grad, a classifier head included).
    """
    layers = lora2_layers(model)
    if not layers:
        raise ValueError("sensitivity_counts: the model has no LoRA2Linear layer with r > 0")
    counts = dict(matrices=len(layers), lora2_scored=0, adalora_scored=0, lora2_params=0, adalora_params=0)
    for _, m in layers:
        r, k, d_in, d_out = m.r, m.k, m.in_features, m.out_features
        counts["lora2_scored"] += 2 * r * k + r
        counts["adalora_scored"] += r * (d_in + d_out + 1)
        counts["lora2_params"] += k * (d_in + d_out) + 2 * r * k + r
        counts["adalora_params"] += r * (d_in + d_out + 1)
    counts["scored_ratio"] = counts["lora2_scored"] / counts["adalora_scored"]
    counts["reduction"] = 1.0 - counts["scored_ratio"]
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def _lora2_factory(config, in_features: int, out_features: int, bias: bool = True,
                   fan_in_fan_out: bool = False, chunks: int = 1) -> LoRA2Linear:
    if chunks > 1:
        raise ValueError(f"LoRA² on fused projections (chunks={chunks}, e.g. GPT-2's c_attn) is "
                         f"unsupported: target separate q/k/v projections, or use method='lora'")
    check_config_for("lora2", config)
    return LoRA2Linear(in_features, out_features, r=config.r, lora_alpha=config.lora_alpha, k=config.lora2_k,
                       lora_dropout=config.lora_dropout, fan_in_fan_out=fan_in_fan_out,
                       merge_weights=config.merge_weights, bias=bias)


register_method("lora2", _lora2_factory)
