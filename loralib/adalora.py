"""AdaLoRA (Zhang et al., ICLR 2023): LoRA in SVD form whose rank budget moves to where it matters.

Each adapted matrix gets delta-W = P diag(E) Q * scaling / (ranknum + 1e-5), with
Q = lora_A (r, in), E = lora_E (r, 1), P = lora_B (out, r); ranknum = the initial r, kept constant.
During training a `RankAllocator` scores every singular triplet (E_i, Q_i., P_.i) and zeroes the
E_i of the least important ones, following a cubic budget schedule from sum(r) down to the target.

API of AdaLoRA's released loralib: `SVDLinear`, `RankAllocator(model, lora_r, target_rank,
init_warmup, final_warmup, mask_interval, beta1, beta2, total_step, target_total_rank)` with
`update_and_mask(model, global_step)` and `schedule_threshold(step) -> (budget, mask_now)`, and
`compute_orth_regu(model, regu_weight)`. Plus: the rank pattern (`rank_pattern`, `adalora_state`,
`apply_rank_pattern`, `trim_ranks`) and an allocator state dict for exact resumption.
The layer rules SVDLinear shares with LoRA²'s LoRA2Linear (scaling, rank buffers, orthogonality
gap, regularizer) live in `loralib.svd_form`.

Differences from the released code, each a fix:
- Impossible settings are a ValueError at construction (total_step <= init_warmup + final_warmup,
  a target above the initial budget, betas outside (0, 1), no rank-adaptive layer, lora_r not the
  layers' rank) instead of an assert (gone under `python -O`) or a crash deep inside.
- A budget equal to the initial budget masks nothing; the released code asked kthvalue for k = 0.
- `model.eval()` on a parent module merges (the released `eval()` override only ran when called on
  the layer itself), and the state dict always holds the unmerged weight (loralib.layers).
- E starts at zero whatever the entry point (constructor, config factory, reset_parameters).
- The allocator raises if a scored factor has no gradient (update_and_mask was called after
  zero_grad, or before backward) and if it masks before it ever scored; `check_called(step)` lets a
  training loop verify at save time that the allocator kept pace with training.
- The rank pattern is kept on the layers (`rank_mask`), saved by `adalora_state` and re-applied by
  `apply_rank_pattern`; `trim_ranks` drops pruned triplets for a smaller adapter file.
- Masking a merged layer unmerges and re-merges it, so the merged weight never goes stale.
- Importance state is one flat fp32 tensor per statistic: one kernel per step for all layers.

Ties: like the released code and PEFT, a triplet is masked when its score is <= the k-th smallest,
so equal scores can mask more than k triplets.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .config import register_method
from .layers import LoRALayer, transpose_if, widened
from .svd_form import SVDFormLinear, check_config_for, effective_alpha, init_rank_state, orth_gap, orth_regularizer


class SVDLinear(SVDFormLinear):
    """Linear layer with AdaLoRA: y = x W^T + b + dropout(x) (A * E)^T B^T * scaling / (ranknum + 1e-5).

    Shapes: lora_A (r, in), lora_E (r, 1), lora_B (out, r); weight (out, in), or (in, out) with
    fan_in_fan_out. Init: E = 0, A and B ~ N(0, 0.02). scaling = lora_alpha (r if lora_alpha <= 0);
    ranknum = r stays fixed (also after `trim_ranks`), so alpha / r is the effective scale.
    `rank_mask` (r,) marks the triplets the allocator keeps.
    """

    rank_dims = {"lora_A": 0, "lora_E": 0, "lora_B": 1}  # factor -> its rank dimension
    lora_names = ("lora_A", "lora_E", "lora_B")

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True,
                 **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=effective_alpha(lora_alpha, r), lora_dropout=lora_dropout,
                           merge_weights=merge_weights)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
            self.lora_E = nn.Parameter(self.weight.new_zeros((r, 1)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
            self.scaling = self.lora_alpha
            self.weight.requires_grad = False
        init_rank_state(self, r)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)
        self._register_merge_safe_state_hooks()

    def reset_lora_parameters(self) -> None:
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_E)  # delta-W starts at zero through E, never through A or B
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def delta_weight(self) -> torch.Tensor:
        """B (E * A) * scaling / (ranknum + 1e-5) in fp32, laid out like `weight`."""
        pea = widened(self.lora_B) @ (widened(self.lora_A) * widened(self.lora_E))
        return transpose_if(pea, self.fan_in_fan_out) * widened(self._rank_scale())

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out) without forming delta-W."""
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        return (x @ (self.lora_A * self.lora_E).transpose(0, 1) @ self.lora_B.transpose(0, 1)) * self._rank_scale()

    # -- what the allocator and the regularizer see ----------------------------------------------
    def scored_factors(self) -> List[Tuple[str, nn.Parameter]]:
        """The factors whose every entry gets an importance score."""
        return [("lora_E", self.lora_E), ("lora_A", self.lora_A), ("lora_B", self.lora_B)]

    @staticmethod
    def triplet_score(s_E: torch.Tensor, s_A: torch.Tensor, s_B: torch.Tensor) -> torch.Tensor:
        """s(E_i) + mean_j s(A_ij) + mean_j s(B_ji), (r,). (Summed in PEFT's order: E + (A + B).)"""
        return s_E.view(-1) + (s_A.mean(dim=1) + s_B.mean(dim=0))

    def orth_penalties(self, squared: bool = False) -> List[torch.Tensor]:
        """||A A^T - I||_F and ||B^T B - I||_F (squared if asked)."""
        out = [torch.norm(orth_gap(self.lora_A), p="fro"), torch.norm(orth_gap(self.lora_B), p="fro")]
        return [t * t for t in out] if squared else out


# ---- layers, masks, rank patterns -------------------------------------------------------------

def rank_adaptive_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, layer) for every layer with a rank to allocate (SVDLinear, LoRA2Linear; initial r > 0)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer) and hasattr(module, "rank_dims") and module.rank_mask.numel() > 0:
            yield name, module


def _set_mask(layer: nn.Module, keep: torch.Tensor, zero_masked: bool = True) -> None:
    """Record which triplets are kept; zero the E of the others (around an unmerge if merged)."""
    keep = keep.to(device=layer.rank_mask.device, dtype=torch.bool).view(-1)
    if zero_masked and not layer.trimmed:
        was_merged = layer.merged
        layer.unmerge()
        with torch.no_grad():
            layer.lora_E.masked_fill_(~keep.to(layer.lora_E.device).view(-1, 1), 0.0)
        if was_merged:
            layer.merge()
    layer.rank_mask.copy_(keep)


def rank_pattern(model: nn.Module) -> Dict[str, List[bool]]:
    """{layer name: [kept?] * initial r}: the triplets each layer keeps (all True before any masking)."""
    return {name: layer.rank_mask.tolist() for name, layer in rank_adaptive_layers(model)}


def _check_pattern(model: nn.Module, pattern: Dict[str, Sequence[bool]]) -> Dict[str, nn.Module]:
    layers = dict(rank_adaptive_layers(model))
    unknown = sorted(set(pattern) - set(layers))
    missing = sorted(set(layers) - set(pattern))
    if unknown or missing:
        raise KeyError(f"rank pattern does not fit the model: layers not in the model {unknown}, "
                       f"layers missing from the pattern {missing}")
    for name, keep in pattern.items():
        if len(keep) != layers[name].rank_mask.numel():
            raise ValueError(f"rank pattern for {name!r} has {len(keep)} entries; "
                             f"the layer's initial rank is {layers[name].rank_mask.numel()}")
    return layers


def apply_rank_pattern(model: nn.Module, pattern: Dict[str, Sequence[bool]]) -> nn.Module:
    """Re-apply a saved rank pattern: zero the pruned E entries and record the masks.

    On a rank-trimmed layer (see `trim_ranks`) the pattern must be the one it was trimmed with.
    """
    layers = _check_pattern(model, pattern)
    for name, keep in pattern.items():
        layer = layers[name]
        keep_t = torch.tensor([bool(k) for k in keep], dtype=torch.bool)
        if layer.trimmed:
            if not torch.equal(keep_t, layer.rank_mask.cpu()):
                raise ValueError(f"layer {name!r} is trimmed to another rank pattern")
            continue
        _set_mask(layer, keep_t)
    return model


def adalora_state(model: nn.Module) -> dict:
    """What to save next to the adapter weights so a load rebuilds the same ranks (JSON-serialisable).

    {"rank_pattern": {layer: [kept?] * initial r}, "trimmed": whether the factors hold only kept ranks}.
    To load: build the model with the initial r; if "trimmed", `trim_ranks(model, pattern)` before
    loading the weights, else load the weights and `apply_rank_pattern(model, pattern)`.
    """
    layers = list(rank_adaptive_layers(model))
    trimmed = {layer.trimmed for _, layer in layers}
    if len(trimmed) > 1:
        raise ValueError("some rank-adaptive layers are trimmed and some are not; trim all of them "
                         "(trim_ranks) or none before saving")
    return {"rank_pattern": rank_pattern(model), "trimmed": bool(trimmed and trimmed.pop())}


def _trim_layer(layer: nn.Module, keep: torch.Tensor) -> None:
    was_merged = layer.merged
    layer.unmerge()
    keep = keep.to(torch.bool).view(-1)
    idx = keep.nonzero().view(-1)
    if idx.numel() == 0:
        for name in layer.lora_names:  # nothing kept: a plain linear layer
            delattr(layer, name)
    else:
        for name, dim in layer.rank_dims.items():
            p = getattr(layer, name)
            kept = p.detach().index_select(dim, idx.to(p.device)).clone()
            setattr(layer, name, nn.Parameter(kept, requires_grad=p.requires_grad))
    layer.r = int(idx.numel())
    layer.rank_mask.copy_(keep.to(layer.rank_mask.device))
    layer.trimmed = True
    if was_merged:
        layer.merge()


def trim_ranks(model: nn.Module, pattern: Optional[Dict[str, Sequence[bool]]] = None) -> nn.Module:
    """Rebuild every rank-adaptive layer with only its kept triplets (smaller factors, same output).

    pattern: a saved rank pattern; None uses each layer's current mask. ranknum keeps the initial
    r, so the scale and the output are unchanged (pruned triplets have E = 0 after a mask step).
    Trimmed layers cannot be re-allocated; trim for saving or inference. Trimming is idempotent.
    """
    layers = dict(rank_adaptive_layers(model))
    if pattern is not None:
        _check_pattern(model, pattern)
    for name, layer in layers.items():
        keep = (torch.tensor([bool(k) for k in pattern[name]], dtype=torch.bool) if pattern is not None
                else layer.rank_mask.cpu())
        if layer.trimmed:
            if not torch.equal(keep, layer.rank_mask.cpu()):
                raise ValueError(f"layer {name!r} is already trimmed to another rank pattern")
            continue
        _trim_layer(layer, keep)
    return model


# ---- the orthogonal regularizer --------------------------------------------------------------

def compute_orth_regu(model: nn.Module, regu_weight: float = 0.1, squared: bool = False) -> torch.Tensor:
    """regu_weight * the mean, over every factor, of its orthogonality gap (AdaLoRA's regularizer).

    SVDLinear contributes ||A A^T - I||_F and ||B^T B - I||_F; LoRA2Linear its terms (see
    loralib.lora2). Unsquared norms, averaged over factors, as in the released code and PEFT;
    squared=True gives the paper's squared norms. Add the result to the loss before backward().
    """
    return orth_regularizer([layer for _, layer in rank_adaptive_layers(model)], regu_weight, squared,
                            "compute_orth_regu")


# ---- the rank allocator -----------------------------------------------------------------------

def _flatten(tensors: List[torch.Tensor]) -> torch.Tensor:
    """All tensors as one 1-D buffer, in order (one C++ call when they share a dtype)."""
    if len({t.dtype for t in tensors}) == 1:
        return _flatten_dense_tensors(tensors)
    return torch.cat([t.reshape(-1).float() for t in tensors])


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}")


class RankAllocator:
    """AdaLoRA's budget schedule and importance-based masking (methods.md §2).

    Call `update_and_mask(model, global_step)` once per training step, after optimizer.step() and
    before zero_grad() (it reads the gradients). With b0 = sum of initial ranks, bT = target_rank *
    n_matrices (or target_total_rank), t_i = init_warmup, t_f = final_warmup, T = total_step:
      step <= t_i:          budget b0, no masking;
      t_i < step <= T - t_f: budget int(bT + (b0 - bT) (1 - (step - t_i) / (T - t_f - t_i))^3),
                            masking when step % mask_interval == 0;
      step > T - t_f:       budget bT, masking every step with the importance frozen.
    Importance per scored entry: I = |w * grad|, I_bar <- b1 I_bar + (1 - b1) I,
    U_bar <- b2 U_bar + (1 - b2) |I - I_bar|, score = I_bar * U_bar (updated while step < T - t_f).
    Each layer combines its entry scores into one score per triplet (`triplet_score`); the E of
    every triplet scoring <= the (b0 - budget)-th smallest is zeroed.

    Works on every rank-adaptive layer of the model (SVDLinear; LoRA2Linear scores its small
    factors only). `state_dict()` / `load_state_dict()` carry the importance state, last step and
    masks, so a resumed run allocates exactly as an uninterrupted one.
    """

    layer_types: Tuple[type, ...] = ()  # () accepts any rank-adaptive layer

    def __init__(self, model: nn.Module, lora_r: int, target_rank: int, init_warmup: int, final_warmup: int,
                 mask_interval: int, beta1: float, beta2: float, total_step: Optional[int] = None,
                 target_total_rank: Optional[int] = None):
        cls = type(self).__name__
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
                raise ValueError(f"{cls}: {name} must lie in (0, 1), got {name}={value!r}")
        _check_int("lora_r", lora_r, 1)
        _check_int("target_rank", target_rank, 0)
        _check_int("init_warmup", init_warmup, 0)
        _check_int("final_warmup", final_warmup, 0)
        _check_int("mask_interval", mask_interval, 1)
        self.model = model
        self.lora_init_rank = lora_r
        self.ave_target_rank = target_rank
        self.initial_warmup = init_warmup
        self.final_warmup = final_warmup
        self.mask_interval = mask_interval
        self.beta1 = beta1
        self.beta2 = beta2

        self.layers = [(n, m) for n, m in rank_adaptive_layers(model)
                       if not self.layer_types or isinstance(m, self.layer_types)]
        if not self.layers:
            kinds = "/".join(t.__name__ for t in self.layer_types) or "SVDLinear or LoRA2Linear"
            raise ValueError(f"{cls}: the model has no {kinds} layer with r > 0; build the model with "
                             f"LoRAConfig(method='adalora' or 'lora2') before the allocator")
        for name, layer in self.layers:
            if layer.trimmed:
                raise ValueError(f"{cls}: layer {name!r} is rank-trimmed; allocate on untrimmed layers")
            if layer.r != lora_r:
                raise ValueError(f"{cls}: lora_r={lora_r} but layer {name!r} has r={layer.r}")
        self.total_rank = sum(layer.r for _, layer in self.layers)  # b0
        if target_total_rank is not None:
            _check_int("target_total_rank", target_total_rank, 0)
            self.target_rank = target_total_rank
        else:
            self.target_rank = target_rank * len(self.layers)  # bT
        if self.target_rank > self.total_rank:
            raise ValueError(f"{cls}: the target budget {self.target_rank} (target_rank={target_rank}, "
                             f"target_total_rank={target_total_rank}) exceeds the initial budget "
                             f"{self.total_rank} = {len(self.layers)} matrices x r={lora_r}")
        self.total_step = None
        if total_step is not None:
            self.set_total_step(total_step)

        # Flat layout of the scored entries: (layer index, factor name, offset, shape) per factor.
        self._layout: List[Tuple[int, str, int, torch.Size]] = []
        offset = 0
        for i, (_, layer) in enumerate(self.layers):
            for fname, p in layer.scored_factors():
                self._layout.append((i, fname, offset, p.shape))
                offset += p.numel()
        self.num_scored = offset
        self.exp_avg_ipt: Optional[torch.Tensor] = None  # (num_scored,) fp32
        self.exp_avg_unc: Optional[torch.Tensor] = None
        self.last_step: Optional[int] = None
        self.global_step: Optional[int] = None
        self._frozen: Optional[Tuple[int, torch.Tensor, float]] = None  # final phase: (budget, keep, threshold)
        self._checked_models = {id(model)}

    # -- schedule -----------------------------------------------------------------------------
    def set_total_step(self, total_step: int) -> None:
        _check_int("total_step", total_step, 1)
        if total_step <= self.initial_warmup + self.final_warmup:
            raise ValueError(
                f"{type(self).__name__}: total_step={total_step} leaves no budgeting phase: it must exceed "
                f"init_warmup + final_warmup = {self.initial_warmup} + {self.final_warmup}; lower the "
                f"warmups or train longer")
        self.total_step = total_step

    def schedule_threshold(self, step: int) -> Tuple[int, bool]:
        """(budget, whether to mask at this step): the released code's name and return value."""
        if self.total_step is None:
            raise ValueError(f"{type(self).__name__}: total_step is not set; pass it or call set_total_step()")
        self.global_step = step
        b0, bT, t_i, t_f, T = self.total_rank, self.target_rank, self.initial_warmup, self.final_warmup, self.total_step
        if step <= t_i:
            return b0, False
        if step > T - t_f:
            return bT, True
        mul_coeff = 1 - (step - t_i) / (T - t_f - t_i)
        return int(bT + (b0 - bT) * (mul_coeff ** 3)), step % self.mask_interval == 0

    def budget(self, step: int) -> int:
        return self.schedule_threshold(step)[0]

    # -- importance ---------------------------------------------------------------------------
    def _factors(self) -> List[torch.Tensor]:
        """The scored parameters in layout order, checked against the layout built at construction."""
        out = []
        for (i, fname, _, shape) in self._layout:
            p = getattr(self.layers[i][1], fname, None)
            if p is None or p.shape != shape:
                raise RuntimeError(f"{type(self).__name__}: {self._label(i, fname)} changed shape since the "
                                   f"allocator was built (trimmed or rebuilt?); build a new allocator")
            out.append(p)
        return out

    def _label(self, i: int, fname: str) -> str:
        return f"{self.layers[i][0]}.{fname}"

    def update_ipt(self) -> None:
        """One EMA step of sensitivity and uncertainty for every scored entry."""
        params = self._factors()
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            i, fname = next((i, f) for (i, f, _, _), g in zip(self._layout, grads) if g is None)
            raise RuntimeError(
                f"{type(self).__name__}.update_and_mask: {self._label(i, fname)} has no gradient; call it "
                f"after loss.backward() and optimizer.step(), before optimizer.zero_grad()")
        with torch.no_grad():  # one cat per tensor kind, then whole-buffer kernels: few launches
            w = _flatten(params).float()
            g = _flatten(grads).float()
            ipt = (w * g).abs()
            if self.exp_avg_ipt is None:
                self.exp_avg_ipt = torch.zeros_like(ipt)
                self.exp_avg_unc = torch.zeros_like(ipt)
            # Same expressions (and so the same rounding) as the released code and PEFT.
            self.exp_avg_ipt = self.beta1 * self.exp_avg_ipt + (1 - self.beta1) * ipt
            self.exp_avg_unc = self.beta2 * self.exp_avg_unc + (1 - self.beta2) * (ipt - self.exp_avg_ipt).abs()
        self._frozen = None

    def triplet_scores(self) -> List[torch.Tensor]:
        """One (r,) score tensor per layer, in `self.layers` order."""
        if self.exp_avg_ipt is None:
            raise RuntimeError(f"{type(self).__name__}: no importance scores yet: update_and_mask must run "
                               f"every step from the start of training (it was first called at step "
                               f"{self.global_step})")
        score = self.exp_avg_ipt * self.exp_avg_unc
        views = _unflatten_dense_tensors(score, self._factors())
        per_layer: List[List[torch.Tensor]] = [[] for _ in self.layers]
        for (i, _, _, _), view in zip(self._layout, views):
            per_layer[i].append(view)
        return [layer.triplet_score(*v) for (_, layer), v in zip(self.layers, per_layer)]

    def mask_to_target_rank(self, model: nn.Module, curr_rank: int) -> float:
        """Zero the E of every triplet scoring <= the (b0 - curr_rank)-th smallest; return that threshold."""
        frozen = self.global_step is not None and self.total_step is not None and \
            self.global_step > self.total_step - self.final_warmup
        if frozen and self._frozen is not None and self._frozen[0] == curr_rank:
            _, keep, threshold = self._frozen  # importance is frozen: the same masks every step
        else:
            scores = torch.cat(self.triplet_scores())
            k = self.total_rank - curr_rank
            if k <= 0:
                threshold = float("-inf")  # the whole budget is left: mask nothing (kthvalue needs k >= 1)
            else:
                threshold = torch.kthvalue(scores, k)[0].item()
            keep = scores > threshold  # (b0,), layers in order
            self._frozen = (curr_rank, keep, threshold) if frozen else None
        self._apply_masks(keep)
        return threshold

    def _apply_masks(self, keep: torch.Tensor) -> None:
        """keep (b0,) -> every layer's rank_mask, and E *= keep: a few multi-tensor kernels for all layers."""
        layers = [layer for _, layer in self.layers]
        Es = [layer.lora_E for layer in layers]
        if len({E.device for E in Es} | {keep.device}) > 1:  # a model spread over devices: layer by layer
            for layer, kp in zip(layers, keep.split([l.r for l in layers])):
                _set_mask(layer, kp)
            return
        merged = [layer for layer in layers if layer.merged]
        for layer in merged:  # the merged weight must not go stale
            layer.unmerge()
        ranks = [layer.r for layer in layers]
        with torch.no_grad():
            torch._foreach_mul_(Es, list(keep.view(-1, 1).split(ranks)))  # masked E become (+-) 0
            torch._foreach_copy_([layer.rank_mask for layer in layers], list(keep.split(ranks)))
        for layer in merged:
            layer.merge()

    def update_and_mask(self, model: nn.Module, global_step: int) -> Tuple[int, Optional[float]]:
        """One allocator step: update importance, then mask to the budget when the schedule says so.

        Returns (budget, threshold or None when no masking happened), as the released code.
        """
        self._check_model(model)
        if self.total_step is None:
            raise ValueError(f"{type(self).__name__}: total_step is not set; pass it or call set_total_step()")
        if global_step < self.total_step - self.final_warmup:
            self.update_ipt()  # importance is frozen during the final phase
        curr_rank, mask_now = self.schedule_threshold(global_step)
        threshold = self.mask_to_target_rank(model, curr_rank) if mask_now else None
        self.last_step = global_step
        return curr_rank, threshold

    def _check_model(self, model: nn.Module) -> None:
        if model is None or id(model) in self._checked_models:
            return
        mine = {id(layer) for _, layer in self.layers}
        if not mine <= {id(m) for m in model.modules()}:
            raise ValueError(f"{type(self).__name__}.update_and_mask: the model passed does not hold the "
                             f"layers the allocator was built on")
        self._checked_models.add(id(model))

    def check_called(self, global_step: int) -> None:
        """Raise unless update_and_mask ran for `global_step` (call it when saving or evaluating).

        Catches the silent failure of AdaLoRA integrations that never call the allocator, so the
        ranks never change.
        """
        if self.last_step != global_step:
            last = "never" if self.last_step is None else f"last at step {self.last_step}"
            raise RuntimeError(f"{type(self).__name__}.update_and_mask was called {last}, but training is at "
                               f"step {global_step}: call it every step, after optimizer.step() and "
                               f"before zero_grad()")

    def get_rank_pattern(self) -> Dict[str, List[bool]]:
        return {name: layer.rank_mask.tolist() for name, layer in self.layers}

    # -- resumption ---------------------------------------------------------------------------
    def _per_factor(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {f"{self.layers[i][0]}.{fname}": flat[off:off + math.prod(shape)].view(shape).clone()
                for (i, fname, off, shape) in self._layout}

    def state_dict(self) -> dict:
        """Importance EMAs per scored factor, the last step and the masks: all a resume needs."""
        state = {"last_step": self.last_step, "total_step": self.total_step, "total_rank": self.total_rank,
                 "target_rank": self.target_rank, "rank_pattern": self.get_rank_pattern(),
                 "exp_avg_ipt": None, "exp_avg_unc": None}
        if self.exp_avg_ipt is not None:
            state["exp_avg_ipt"] = self._per_factor(self.exp_avg_ipt)
            state["exp_avg_unc"] = self._per_factor(self.exp_avg_unc)
        return state

    def load_state_dict(self, state: dict) -> None:
        cls = type(self).__name__
        required = ("last_step", "total_step", "total_rank", "target_rank", "rank_pattern", "exp_avg_ipt",
                    "exp_avg_unc")
        missing = [k for k in required if k not in state]
        if missing:
            raise KeyError(f"{cls}.load_state_dict: missing keys {missing}")
        for key in ("total_step", "total_rank", "target_rank"):
            if state[key] != getattr(self, key):
                raise ValueError(f"{cls}.load_state_dict: saved {key}={state[key]} but this allocator has "
                                 f"{key}={getattr(self, key)}")
        flats = []
        for stat in ("exp_avg_ipt", "exp_avg_unc"):
            saved = state[stat]
            if saved is None:
                flats.append(None)
                continue
            expected = {f"{self.layers[i][0]}.{fname}": shape for (i, fname, _, shape) in self._layout}
            if set(saved) != set(expected):
                raise KeyError(f"{cls}.load_state_dict: {stat} keys differ: missing "
                               f"{sorted(set(expected) - set(saved))}, unexpected {sorted(set(saved) - set(expected))}")
            device = self._factors()[0].device
            parts = []
            for key, shape in expected.items():
                if tuple(saved[key].shape) != tuple(shape):
                    raise ValueError(f"{cls}.load_state_dict: {stat}[{key!r}] has shape "
                                     f"{tuple(saved[key].shape)}, expected {tuple(shape)}")
                parts.append(saved[key].reshape(-1).to(device=device, dtype=torch.float32))
            flats.append(torch.cat(parts))
        pattern = state["rank_pattern"]
        mine = {name: layer for name, layer in self.layers}
        if set(pattern) != set(mine):
            raise KeyError(f"{cls}.load_state_dict: rank_pattern layers differ from the model's")
        self.exp_avg_ipt, self.exp_avg_unc = flats
        self.last_step = state["last_step"]
        self.global_step = state["last_step"]
        self._frozen = None
        for name, keep in pattern.items():
            # Masks only: E itself comes back with the model's own state dict.
            _set_mask(mine[name], torch.tensor([bool(k) for k in keep]), zero_masked=False)


# ---- registration -----------------------------------------------------------------------------

def _adalora_factory(config, in_features: int, out_features: int, bias: bool = True,
                     fan_in_fan_out: bool = False, chunks: int = 1) -> SVDLinear:
    if chunks > 1:
        raise ValueError(f"AdaLoRA on fused projections (chunks={chunks}, e.g. GPT-2's c_attn) is "
                         f"unsupported: target separate q/k/v projections, or use method='lora'")
    check_config_for("adalora", config)
    return SVDLinear(in_features, out_features, r=config.r, lora_alpha=config.lora_alpha,
                     lora_dropout=config.lora_dropout, fan_in_fan_out=fan_in_fan_out,
                     merge_weights=config.merge_weights, bias=bias)


register_method("adalora", _adalora_factory)
