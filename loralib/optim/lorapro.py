"""LoRA-Pro (Wang et al., ICLR 2025): LoRA steps that follow the full fine-tuning gradient as closely as a
rank-r update can.

Notation (one adapted matrix): W = W0 + s B A, B (m, r), A (r, n), s = alpha / r (rsLoRA: alpha / sqrt r),
read from each layer. g (m, n) is the full-weight gradient; LoRA's own gradients are
g_A = s B^T g (r, n) and g_B = s g A^T (m, r). A step with gradients (g_A', g_B') moves W, to first order,
by -lr times the equivalent gradient  g~ = s (B g_A' + g_B' A).

LoRA-Pro picks the (g_A', g_B') whose g~ is closest to g. With P_B = B (B^T B)^-1 B^T, P_A = A^T (A A^T)^-1 A:

    g_A' = (1/s^2) (B^T B)^-1 g_A + X A
    g_B' = (1/s^2) (I - P_B) g_B (A A^T)^-1 - B X
    g~   = P_B g + (I - P_B) g P_A       (the orthogonal projection of g onto {B Y + Z A}, for every X)

and X (r, r), which does not change g~, keeps (g_A', g_B') closest to (g_A, g_B); it solves the Sylvester
equation  (B^T B) X + X (A A^T) = -(1/s^2) (B^T B)^-1 g_A A^T. Both r x r matrices are symmetric positive
semi-definite, so with B^T B = U diag(l) U^T and A A^T = V diag(mu) V^T, X = U [(U^T C V)_ij / (l_i + mu_j)] V^T:
two symmetric eigendecompositions, no complex eig, no inverse of an ill-conditioned matrix.

Singular B^T B or A A^T (B = 0 at step 0; A = 0 under LoRA+'s swapped init): every inverse above is the
Moore-Penrose pseudo-inverse taken in the eigenbasis, eigenvalues below r * eps(dtype) * (largest
eigenvalue) counting as zero (the same cut-off as torch.linalg.pinv, which the released code used). The
formulas then still give the exact projection: at B = 0, g~ = g P_A (the projection onto {Z A}), g_A' = 0
and g_B' = (1/s) g A^T (A A^T)^-1. We do not fall back to LoRA's own gradient, which is not a projection
(s^2 g A^T A at B = 0) and would make the first step depend on the scaling.

Optimizers:
- `LoRAProAdamW(model, lr, mode="full")`: Adam moments of the m x n equivalent gradient g~ (fp32); the Adam
  direction d is treated as a full-weight gradient and mapped back to A and B with the formulas above
  (g_A = s B^T d, g_B = s d A^T). Extra memory: two fp32 m x n tensors per adapted matrix.
- `LoRAProAdamW(model, lr, mode="efficient")`: adjusts (g_A, g_B) as above, then ordinary Adam on A and B.
- `LoRAProSGD(model, lr)`: A -= lr g_A', B -= lr g_B'.
Trainable parameters that are not LoRA factors (a classifier head, biases) get plain AdamW (SGD for
LoRAProSGD) with decoupled weight decay, inside the same optimizer. Pairs of equal shapes are solved
stacked, and in efficient mode their Adam moments live in one (K, *shape) buffer per shape (each
parameter's state entries are views into it), so a step costs a few dozen kernels per distinct shape.

Fixes of the released code: A and B are paired by module (never by position in a list or a partition);
s is read from each layer (it was hard-coded to 2, so rsLoRA ran with ~2.83x the learning rate); state is
fp32 whatever the parameter dtype (it was bf16, where the second moment cannot decay); bias correction
uses the number of updates taken (step t = 1 on the first update); it runs on one device, under DDP (the
gradients are already all-reduced when step() runs) and with gradient accumulation (it reads .grad at
step time); it is an explicit optimizer, so baselines never get it by accident.

Weight decay is decoupled and applied to the effective weight W = W0 + s B A of each adapted matrix:
W <- (1 - lr * wd) W, realised exactly by scaling A and B by sqrt(1 - lr * wd) (so s B A shrinks by
1 - lr * wd) and the frozen W0 of that layer by 1 - lr * wd, in place, as the released "older" code did.
W0 then no longer equals the pretrained weight, so a run with wd > 0 must save the base weights with the
adapter. `decay_base_weight=False` decays only s B A (W is pulled toward W0 instead of toward 0) and keeps
W0 untouched. In bf16 the W0 factor (1 - lr*wd) usually rounds to 1: keep wd = 0 (the paper's setting)
or the base weights in fp32 if the decay of W0 matters.

Released behaviours, each an explicit option of `LoRAProAdamW` (default: the corrected math above), read from
github.com/mrflogs/LoRA-Pro (DeepSpeed-0.15.1/deepspeed/runtime/zero/stage_1_and_2.py at commit fe26027, the
full variant the paper's runs used; peta/optim.py at commit 2d8f44a, the older efficient variant):
- `released_clip_norm=c` (full mode): the patched DeepSpeed computed the global norm N of the raw LoRA gradients,
  replaced the gradients by the full variant's direction d, then scaled d by min(1, c / (N + 1e-6)) (its
  unscale_and_clip_grads, gradient_clipping "auto" = max_grad_norm 1.0) and stepped with SGD. The step is then
  -lr * min(1, c / (N + 1e-6)) * d: a large raw gradient shrinks the step itself. Ours (the default, and the
  training loop's max_grad_norm) clips the raw gradients before Adam's moments, whose normalisation then
  largely cancels the clip. With this option the optimizer clips (the loop's clipping must be off); other
  trainable parameters' Adam steps are scaled by the same factor (the released run had none).
- `released_weight_decay=True` (efficient mode): A <- (1 - lr wd) A and B <- (1 - lr wd) B before the Adam
  update (peta/optim.py's step_efficient), so s B A shrinks by (1 - lr wd)^2 and W0 stays; ours decays W.
- `released_scaling=True` (full mode): s = 2 (the patch's hard-coded 16 / 8) in every LoRA-Pro formula instead
  of each layer's scaling; the forward pass keeps the layer's own s. For alpha 16, r 8 LoRA nothing changes;
  for rsLoRA (s = 16 / sqrt 8) each step of A and B is s / 2 = 2.83 times the corrected one (the direction d
  does not depend on s; it is mapped back to A and B through 1 / s).
Each option is refused in the mode the released code did not use it in (ValueError).

Supported layers: loralib's Linear, MergedLinear (each enabled chunk is its own (B_g, A_g) pair), Embedding
and Conv1d/2d/3d (the pair (A, B) with s B A reshaped to the kernel), so also a transformers model after
`loralib.inject`; and PEFT's LoRA Linear (nn.Linear or GPT-2's Conv1D base) and Embedding layers of a
`peft.PeftModel` built with `LoraConfig`: each adapter of each layer is one pair (lora_A[name].weight (r, n),
lora_B[name].weight (m, r); lora_embedding_A/B for embeddings), its s read from the layer's `scaling[name]`,
which PEFT computed from lora_alpha / r or rsLoRA's lora_alpha / sqrt(r) after rank_pattern/alpha_pattern.
PEFT is never imported: its layers are recognised by these attributes. A trainable `lora_*` parameter of any
other layer (AdaLoRA's SVDLinear, PEFT's AdaLoRA or conv layers, DoRA's magnitude, lora_bias) raises a
ValueError naming it; so does an adapter with a PEFT LoRA variant (DoRA, ...), where s B A is not the update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn as nn

from ..layers import ConvLoRA, Embedding, Linear, LoRALayer, MergedLinear

_SUPPORTED = (Linear, MergedLinear, Embedding, ConvLoRA)
# the released DeepSpeed patch's scaling, hard-coded for every method (lora_alpha / lora_r = 16 / 8)
RELEASED_SCALING = 16 / 8


# -- pairing ------------------------------------------------------------------------------------

@dataclass
class LoRAPair:
    """One adapted layer: its factors and scaling; `chunks` independent (B_g, A_g) pairs are stacked in
    the parameters (MergedLinear's enabled chunks), else 1."""

    name: str
    layer: nn.Module
    A: nn.Parameter
    B: nn.Parameter
    scaling: float
    chunks: int

    def base_weight(self) -> torch.Tensor:
        """The frozen W0 that s B A is added to (decayed in place with the weight decay on W)."""
        if hasattr(self.layer, "_base_weight"):
            return self.layer._base_weight()
        return self.layer.get_base_layer().weight  # PEFT's layer wraps the original module

    def stacked(self, A: torch.Tensor, B: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Views of tensors shaped like A and B as (chunks, r, n) and (chunks, m, r)."""
        return A.reshape(self.chunks, -1, A.shape[-1]), B.reshape(self.chunks, -1, B.shape[-1])

    @property
    def full_shape(self) -> Tuple[int, int, int]:
        """(chunks, m, n): the shape of the matrices B A."""
        return self.chunks, self.B.shape[0] // self.chunks, self.A.shape[1]


def _peft_factors(module: nn.Module):
    """(adapter name, A, B) of a PEFT LoRA layer's adapters: Linear (lora_A/lora_B, nn.Linear each) and
    Embedding (lora_embedding_A/B); [] for any other module. Recognised without importing PEFT."""
    if not (isinstance(getattr(module, "scaling", None), dict) and hasattr(module, "get_base_layer")):
        return []
    found = []
    lora_A, lora_B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if isinstance(lora_A, nn.ModuleDict) and isinstance(lora_B, nn.ModuleDict):
        for key, down in lora_A.items():
            up = lora_B[key] if key in lora_B else None
            if type(down) is nn.Linear and type(up) is nn.Linear and up.bias is None:
                found.append((key, down.weight, up.weight))
    emb_A, emb_B = getattr(module, "lora_embedding_A", None), getattr(module, "lora_embedding_B", None)
    if isinstance(emb_A, nn.ParameterDict) and isinstance(emb_B, nn.ParameterDict):
        found.extend((key, emb_A[key], emb_B[key]) for key in emb_A.keys() if key in emb_B)
    variants = getattr(module, "lora_variant", None) or {}
    use_dora = getattr(module, "use_dora", None) or {}
    return [(key, A, B) for key, A, B in found if key not in variants and not use_dora.get(key, False)]


def lora_pairs(model: nn.Module) -> List[LoRAPair]:
    """The trainable LoRA pairs of `model`, by module, in module order (the same on every rank): loralib's
    layers and PEFT's LoRA Linear/Embedding layers (one pair per adapter, named "<module>.<adapter>").

    Raises ValueError for a trainable `lora_*` parameter LoRA-Pro cannot pair, or a pair with only one
    of its two factors trainable.
    """
    pairs, paired = [], set()
    for name, module in model.named_modules():
        for key, A, B in _peft_factors(module):
            trainable = [A.requires_grad, B.requires_grad]
            if not any(trainable):
                continue
            if not all(trainable):
                raise ValueError(f"LoRA-Pro needs both factors of {name!r} (adapter {key!r}) trainable")
            pairs.append(LoRAPair(f"{name}.{key}", module, A, B, float(module.scaling[key]), 1))
            paired.update((id(A), id(B)))
        if not (isinstance(module, LoRALayer) and module.has_lora):
            continue
        own = {n for n, p in module.named_parameters(recurse=False) if "lora_" in n and p.requires_grad}
        if not own:
            continue
        if not isinstance(module, _SUPPORTED) or own - {"lora_A", "lora_B"}:
            continue  # reported below, with the parameter names
        if own != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA-Pro needs both factors of {name!r} trainable; only {sorted(own)} is")
        chunks = module.n_enabled if isinstance(module, MergedLinear) else 1
        pairs.append(LoRAPair(name, module, module.lora_A, module.lora_B, float(module.scaling), chunks))
        paired.update((id(module.lora_A), id(module.lora_B)))
    stray = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n and id(p) not in paired]
    if stray:
        raise ValueError(
            f"LoRA-Pro pairs lora_A/lora_B of loralib's Linear, MergedLinear, Embedding and Conv layers and "
            f"of PEFT's LoRA Linear and Embedding layers (LoraConfig without DoRA, lora_bias or other variants); "
            f"these trainable parameters belong to no such pair: {stray[:5]}{' ...' if len(stray) > 5 else ''}")
    return pairs


# -- the projection -----------------------------------------------------------------------------

def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _sym_eig(M: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a batch of symmetric PSD matrices (..., r, r)."""
    evals, evecs = torch.linalg.eigh((M + M.transpose(-1, -2)) / 2)
    return evals.clamp_min(0), evecs


def _pinv_evals(evals: torch.Tensor) -> torch.Tensor:
    """1 / eigenvalue above the pseudo-inverse cut-off, 0 below (and everywhere for a zero matrix)."""
    cutoff = evals.shape[-1] * torch.finfo(evals.dtype).eps * evals.amax(-1, keepdim=True)
    keep = evals > cutoff
    return torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))


def _with_evals(evecs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """U diag(values) U^T for a batch."""
    return (evecs * values.unsqueeze(-2)) @ evecs.transpose(-1, -2)


def lorapro_gradients(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor,
                      scaling, solve_x: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's (g_A', g_B') from LoRA's (g_A, g_B), with X from the Sylvester equation.

    A (..., r, n), B (..., m, r), grad_A like A, grad_B like B, scaling a float or a tensor broadcasting
    against (..., 1, 1). Computed in fp32 (fp64 for fp64 inputs); returns tensors of that dtype.
    solve_x=False takes X = 0: the same equivalent gradient, without the Sylvester solve.
    """
    dtype = torch.promote_types(_compute_dtype(A), _compute_dtype(grad_A))
    A, B, gA, gB = (t.to(dtype) for t in (A, B, grad_A, grad_B))
    if torch.is_tensor(scaling):
        scaling = scaling.to(device=A.device, dtype=dtype)
    inv_s2 = 1.0 / scaling ** 2

    r = A.shape[-2]
    # The products that reduce over m or n, two at a time: [B^T B | B^T g_B] and [A A^T ; g_A A^T].
    Bt_B_gB = B.transpose(-1, -2) @ torch.cat([B, gB], -1)             # (..., r, 2r)
    A_gA_At = torch.cat([A, gA], -2) @ A.transpose(-1, -2)             # (..., 2r, r)
    l, U = _sym_eig(Bt_B_gB[..., :r])            # B^T B = U diag(l) U^T
    mu, V = _sym_eig(A_gA_At[..., :r, :])        # A A^T = V diag(mu) V^T
    BtB_pinv = _with_evals(U, _pinv_evals(l))
    AAt_pinv = _with_evals(V, _pinv_evals(mu))

    gA_proj = inv_s2 * (BtB_pinv @ gA)                                   # (1/s^2) (B^T B)^+ g_A
    gB_perp = gB - B @ (BtB_pinv @ Bt_B_gB[..., r:])                     # (I - P_B) g_B
    gB_proj = inv_s2 * (gB_perp @ AAt_pinv)

    if not solve_x:
        return gA_proj, gB_proj
    # Sylvester: (B^T B) X + X (A A^T) = C, C = -(1/s^2) (B^T B)^+ g_A A^T, solved in the two eigenbases.
    C = -inv_s2 * (BtB_pinv @ A_gA_At[..., r:, :])
    denom = l.unsqueeze(-1) + mu.unsqueeze(-2)
    cutoff = r * torch.finfo(dtype).eps * denom.amax((-1, -2), keepdim=True)
    keep = denom > cutoff
    X_eig = torch.where(keep, (U.transpose(-1, -2) @ C @ V) / torch.where(keep, denom, torch.ones_like(denom)),
                        torch.zeros_like(denom))
    X = U @ X_eig @ V.transpose(-1, -2)
    return gA_proj + X @ A, gB_proj - B @ X


def equivalent_gradient(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor,
                        scaling) -> torch.Tensor:
    """g~ = s (B g_A + g_B A): the first-order change of W per unit step against (g_A, g_B). (..., m, n)."""
    return scaling * (B @ grad_A + grad_B @ A)


def _buckets(items: Iterable[Tuple[LoRAPair, torch.Tensor, torch.Tensor]]):
    """Group (pair, g_A, g_B) by shapes, dtypes and device: [(pairs, [g_A], [g_B]), ...]."""
    buckets: Dict[tuple, tuple] = {}
    for pair, gA, gB in items:
        key = (pair.chunks, tuple(pair.A.shape), tuple(pair.B.shape), pair.A.dtype, gA.dtype, gB.dtype,
               pair.A.device)
        pairs, gAs, gBs = buckets.setdefault(key, ([], [], []))
        pairs.append(pair)
        gAs.append(gA)
        gBs.append(gB)
    return list(buckets.values())


def _solve_bucket(pairs: List[LoRAPair], gAs: List[torch.Tensor], gBs: List[torch.Tensor]):
    """LoRA-Pro's gradients for K pairs of equal shapes in one batched call.

    Returns g_A' (K, *A.shape) and g_B' (K, *B.shape). A Llama block has three distinct shapes, so a
    whole model costs a few dozen kernels rather than a few dozen per layer.
    """
    first, K = pairs[0], len(pairs)
    chunks, (cr, n), (cm, r) = first.chunks, first.A.shape, first.B.shape
    per_chunk = lambda ts, rows, cols: torch.stack(ts).view(K * chunks, rows // chunks, cols)  # noqa: E731
    A = per_chunk([p.A.detach() for p in pairs], cr, n)
    B = per_chunk([p.B.detach() for p in pairs], cm, r)
    if K * chunks == 1:
        scaling = first.scaling
    else:
        scaling = torch.tensor([p.scaling for p in pairs for _ in range(chunks)], dtype=torch.float64)
        scaling = scaling.to(A.device).view(-1, 1, 1)
    new_gA, new_gB = lorapro_gradients(A, B, per_chunk(gAs, cr, n), per_chunk(gBs, cm, r), scaling)
    return new_gA.view(K, cr, n), new_gB.view(K, cm, r)


def adjusted_gradients(items: Iterable[Tuple[LoRAPair, torch.Tensor, torch.Tensor]]
                       ) -> List[Tuple[LoRAPair, torch.Tensor, torch.Tensor]]:
    """(pair, g_A', g_B') for each (pair, g_A, g_B), shaped like the pair's parameters (fp32/fp64);
    pairs of equal shapes are solved together."""
    out = []
    for pairs, gAs, gBs in _buckets(items):
        new_gA, new_gB = _solve_bucket(pairs, gAs, gBs)
        out.extend((pair, new_gA[k], new_gB[k]) for k, pair in enumerate(pairs))
    return out


# -- the optimizers -----------------------------------------------------------------------------

class _LoRAProBase(torch.optim.Optimizer):
    """Pairs the model's LoRA factors (param group 0, "lora": A1, B1, A2, B2, ...) and puts every other
    trainable parameter in group 1 ("other"). Holds the weight decay on W and the state-dict handling."""

    def __init__(self, model: nn.Module, defaults: dict, decay_base_weight: bool):
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"{type(self).__name__} takes the model (an nn.Module, DDP-wrapped is fine), got "
                f"{type(model).__name__}: LoRA-Pro pairs A and B by module and reads each layer's scaling")
        if not (isinstance(defaults["lr"], (int, float)) and defaults["lr"] >= 0):
            raise ValueError(f"lr must be a non-negative number, got lr={defaults['lr']!r}")
        if not defaults["weight_decay"] >= 0:
            raise ValueError(f"weight_decay must be >= 0, got weight_decay={defaults['weight_decay']!r}")
        self.pairs = lora_pairs(model)
        self.decay_base_weight = decay_base_weight
        lora_params = [p for pair in self.pairs for p in (pair.A, pair.B)]
        lora_ids = {id(p) for p in lora_params}
        other, seen = [], set()
        for p in model.parameters():
            if p.requires_grad and id(p) not in lora_ids and id(p) not in seen:
                other.append(p)
                seen.add(id(p))
        if not lora_params:
            raise ValueError(
                f"{type(self).__name__}: the model ({type(model).__name__}) has no trainable LoRA layer; LoRA-Pro "
                "adjusts the gradients of LoRA pairs (inject LoRA first: loralib.inject, or PEFT's get_peft_model)")
        groups = [{"params": lora_params, "name": "lora"}]
        if other:
            groups.append({"params": other, "name": "other"})
        super().__init__(groups, defaults)
        self._lora_group = self.param_groups[0] if lora_params else None
        self._expected_ids = [id(p) for p in lora_params]

    def _check_not_flattened(self) -> None:
        # ZeRO (DeepSpeed) replaces a client optimizer's params by flat partitions; pairs would then see
        # no gradients and LoRA-Pro would silently do nothing. Fail loudly instead.
        if self._lora_group is not None and [id(p) for p in self._lora_group["params"]] != self._expected_ids:
            raise RuntimeError(
                f"{type(self).__name__}: its parameters were replaced (DeepSpeed ZeRO flattens a client "
                "optimizer's parameters). Use loralib.optim.deepspeed_lorapro with the ZeRO engine instead.")

    def _check_finite_grads(self) -> None:
        """A non-finite gradient stops the step before any parameter changes, naming the parameter: the
        projection would otherwise fail in its eigendecomposition, or spread NaN into every factor."""
        labels, grads = [], []
        for pair in self.pairs:
            for factor, p in (("lora_A", pair.A), ("lora_B", pair.B)):
                if p.grad is not None:
                    labels.append(f"{pair.name}.{factor}")
                    grads.append(p.grad)
        for group in self.param_groups[1:]:
            for p in group["params"]:
                if p.grad is not None:
                    labels.append(f"a non-LoRA parameter of shape {tuple(p.shape)}")
                    grads.append(p.grad)
        if not grads:
            return
        by_dtype: Dict[torch.dtype, List[int]] = {}
        for i, g in enumerate(grads):  # fp64 norms stay fp64 (a norm cannot narrow); the rest in fp32
            by_dtype.setdefault(torch.float64 if g.dtype == torch.float64 else torch.float32, []).append(i)
        flags = torch.ones(len(grads), dtype=torch.bool, device=grads[0].device)
        for dtype, idx in by_dtype.items():
            norms = torch._foreach_norm([grads[i] for i in idx], 2, dtype=dtype)
            flags[torch.tensor(idx, device=flags.device)] = torch.stack([n.to(flags.device) for n in norms]).isfinite()
        finite = flags
        if bool(finite.all()):
            return
        for i in (~finite).nonzero().flatten().tolist():  # the norm can overflow where every entry is finite
            if not bool(grads[i].isfinite().all()):
                raise FloatingPointError(f"{type(self).__name__}.step: the gradient of {labels[i]} is not finite "
                                         "(nan or inf); no parameter was changed")

    def _pairs_with_grads(self):
        """(pair, g_A, g_B) for the pairs that received a gradient; a missing one counts as zero."""
        for pair in self.pairs:
            gA, gB = pair.A.grad, pair.B.grad
            if gA is None and gB is None:
                continue
            if gA is not None and gA.is_sparse or gB is not None and gB.is_sparse:
                raise ValueError(f"LoRA-Pro: sparse gradients are not supported (layer {pair.name!r})")
            yield pair, (torch.zeros_like(pair.A) if gA is None else gA), \
                (torch.zeros_like(pair.B) if gB is None else gB)

    @torch.no_grad()
    def _decay_W(self, pair: LoRAPair, lr: float, wd: float) -> None:
        """W <- (1 - lr wd) W: s B A shrinks by 1 - lr wd through A and B, W0 (optionally) in place."""
        if wd == 0 or lr == 0:
            return
        keep = 1.0 - lr * wd
        pair.A.mul_(math.sqrt(keep))
        pair.B.mul_(math.sqrt(keep))
        if self.decay_base_weight:
            pair.base_weight().mul_(keep)  # computed in fp32 for bf16 weights, rounded once

    @staticmethod
    def _write(param: torch.Tensor, update: torch.Tensor) -> None:
        """param += update (fp32/fp64 update, rounded once into the parameter's dtype)."""
        if param.dtype == update.dtype:
            param.add_(update)
        else:
            param.copy_((param.to(update.dtype) + update).to(param.dtype))

    def _write_all(self, params: List[torch.Tensor], updates: List[torch.Tensor]) -> None:
        same = [(p, u) for p, u in zip(params, updates) if p.dtype == u.dtype]
        if same:
            torch._foreach_add_([p for p, _ in same], [u for _, u in same])
        for p, u in zip(params, updates):
            if p.dtype != u.dtype:
                self._write(p, u)

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but the state keeps its fp32 dtype (torch casts it to the parameter's, e.g. bf16)."""
        mode = getattr(self, "mode", None)
        saved_modes = {g.get("mode") for g in state_dict["param_groups"]}
        if mode is not None and saved_modes != {mode}:
            raise ValueError(f"{type(self).__name__}: the state dict was saved in mode "
                             f"{sorted(map(str, saved_modes))}, this optimizer runs mode={mode!r}")
        super().load_state_dict(state_dict)
        if hasattr(self, "_moment_buffers"):
            self._moment_buffers.clear()
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(idx, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, copy=True)


class LoRAProAdamW(_LoRAProBase):
    """LoRA-Pro with Adam (see the module docstring).

    model: the model (DDP-wrapped is fine); its trainable LoRA pairs are found by module.
    mode: "full" keeps fp32 Adam moments of the m x n equivalent gradient (as the paper's released code);
        "efficient" adjusts (g_A, g_B) and keeps ordinary fp32 Adam moments of A and B.
    weight_decay: decoupled, on W = W0 + s B A for LoRA pairs (see `decay_base_weight`), on the
        parameter itself for the other trainable parameters.
    released_clip_norm, released_weight_decay, released_scaling: the released code's rules (module
        docstring), off by default: clip factor min(1, c / (N + 1e-6)) of the raw gradients' norm N applied
        to the full variant's step; A and B each decayed by (1 - lr wd) in efficient mode; s = 2.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, mode: str = "full",
                 decay_base_weight: bool = True, released_clip_norm: float = 0.0,
                 released_weight_decay: bool = False, released_scaling: bool = False):
        if mode not in ("full", "efficient"):
            raise ValueError(f"mode must be 'full' or 'efficient', got mode={mode!r}")
        check_released_options(mode, released_clip_norm, released_weight_decay, released_scaling)
        self.released_clip_norm = float(released_clip_norm or 0.0)
        self.released_weight_decay = bool(released_weight_decay)
        self.released_scaling = bool(released_scaling)
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got betas={betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got eps={eps!r}")
        self.mode = mode
        self._moment_buffers: Dict[tuple, tuple] = {}
        super().__init__(model, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, mode=mode),
                         decay_base_weight)

    def _adam(self, params: List[torch.Tensor], grads: List[torch.Tensor], group: dict, scale: float = 1.0) -> None:
        """One Adam update of each param with its grad: fp32 moments (fp64 for fp64 params), bias
        correction with step t = 1 on the first update, foreach kernels over all params; the update times
        `scale` (the released clip factor, else 1)."""
        beta1, beta2 = group["betas"]
        by_step: Dict[int, list] = {}
        for p, g in zip(params, grads):
            state = self.state[p]
            if "exp_avg" not in state:
                dtype = _compute_dtype(p)
                state["step"] = 0
                state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
                state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
            state["step"] += 1
            by_step.setdefault(state["step"], []).append((p, g.to(state["exp_avg"].dtype), state))
        for step, items in by_step.items():
            ps = [p for p, _, _ in items]
            gs = [g for _, g, _ in items]
            ms = [st["exp_avg"] for _, _, st in items]
            vs = [st["exp_avg_sq"] for _, _, st in items]
            torch._foreach_lerp_(ms, gs, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, math.sqrt(1 - beta2 ** step))
            torch._foreach_add_(denom, group["eps"])
            updates = torch._foreach_div(ms, denom)
            torch._foreach_mul_(updates, -group["lr"] * scale / (1 - beta1 ** step))
            self._write_all(ps, updates)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_not_flattened()
        self._check_finite_grads()
        clip = self._released_clip_factor() if self.released_clip_norm > 0 else 1.0
        for group in self.param_groups:
            if group["name"] == "other":
                params = [p for p in group["params"] if p.grad is not None]
                if group["weight_decay"] and params:
                    torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                self._adam(params, [p.grad for p in params], group, clip)
            elif self.mode == "full":
                for pair, gA, gB in self._pairs_with_grads():
                    self._full_step(pair, gA, gB, group, clip)
            else:
                decay = self._decay_factors if self.released_weight_decay else self._decay_W
                for pairs, gAs, gBs in _buckets(self._pairs_with_grads()):
                    new_gA, new_gB = _solve_bucket(pairs, gAs, gBs)
                    for pair in pairs:
                        decay(pair, group["lr"], group["weight_decay"])
                    self._stacked_adam([pair.A for pair in pairs], new_gA, group)
                    self._stacked_adam([pair.B for pair in pairs], new_gB, group)
        return loss

    def _stacked_adam(self, params: List[torch.Tensor], grads: torch.Tensor, group: dict) -> None:
        """Adam on K equal-shaped params with their stacked grads (K, *shape), in a few whole-bucket
        kernels: each param's moments are views into one (K, *shape) buffer per bucket."""
        beta1, beta2 = group["betas"]
        m, v = self._bucket_moments(params, grads.dtype)
        states = [self.state[p] for p in params]
        for state in states:
            state["step"] += 1
        steps = [state["step"] for state in states]
        if len(set(steps)) == 1:
            bias1, bias2 = 1 - beta1 ** steps[0], 1 - beta2 ** steps[0]
        else:  # a pair that skipped a step (no gradient) has its own count
            t = torch.tensor(steps, dtype=grads.dtype).to(grads.device).view(-1, *[1] * (grads.dim() - 1))
            bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
        m.lerp_(grads, 1 - beta1)
        v.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
        update = (v / bias2).sqrt_().add_(group["eps"])
        update = torch.div(m, update, out=update).mul_(-group["lr"]).div_(bias1)
        self._write_all(params, list(update.unbind(0)))

    def _bucket_moments(self, params: List[torch.Tensor], dtype: torch.dtype):
        """The (K, *shape) moment buffers of a bucket; built from the per-param state (zeros at first,
        the loaded tensors after load_state_dict, which empties this cache)."""
        key = tuple(id(p) for p in params)
        buffers = self._moment_buffers.get(key)
        if buffers is not None:
            return buffers
        states = [self.state[p] for p in params]
        zeros = lambda p: torch.zeros(p.shape, dtype=dtype, device=p.device)  # noqa: E731
        buffers = tuple(torch.stack([st[name].to(dtype) if name in st else zeros(p)
                                     for p, st in zip(params, states)]) for name in ("exp_avg", "exp_avg_sq"))
        for k, st in enumerate(states):
            st.setdefault("step", 0)
            st["exp_avg"], st["exp_avg_sq"] = buffers[0][k], buffers[1][k]
        # A bucket whose members changed (a pair without gradient this step) no longer owns these views.
        members = set(key)
        for other in [other for other in self._moment_buffers if members.intersection(other)]:
            del self._moment_buffers[other]
        self._moment_buffers[key] = buffers
        return buffers

    def _full_step(self, pair: LoRAPair, gA, gB, group: dict, clip: float = 1.0) -> None:
        A, B = pair.stacked(pair.A.detach(), pair.B.detach())
        scaling = RELEASED_SCALING if self.released_scaling else pair.scaling
        # the pair's state lives under its A
        dA, dB = full_mode_direction(A, B, *pair.stacked(gA, gB), scaling, self.state[pair.A],
                                     group["betas"], group["eps"])
        self._decay_W(pair, group["lr"], group["weight_decay"])
        self._write(pair.A, dA.reshape(pair.A.shape).mul_(-group["lr"] * clip))
        self._write(pair.B, dB.reshape(pair.B.shape).mul_(-group["lr"] * clip))

    def _released_clip_factor(self) -> float:
        """min(1, c / (N + 1e-6)), N the global norm of the raw gradients of every trainable parameter
        (under DDP already all-reduced): the released DeepSpeed patch's clip, taken before LoRA-Pro."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return 1.0
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        return released_clip_factor(float(norm), self.released_clip_norm)

    @torch.no_grad()
    def _decay_factors(self, pair: LoRAPair, lr: float, wd: float) -> None:
        """The released efficient variant's weight decay: A and B each scaled by (1 - lr wd); W0 untouched."""
        if wd == 0 or lr == 0:
            return
        pair.A.mul_(1.0 - lr * wd)
        pair.B.mul_(1.0 - lr * wd)


def released_clip_factor(norm: float, max_norm: float) -> float:
    """The released clip factor min(1, max_norm / (norm + 1e-6)) (DeepSpeed's unscale_and_clip_grads)."""
    return min(1.0, max_norm / (norm + 1e-6))


def check_released_options(mode: str, clip_norm: float, weight_decay: bool, scaling: bool) -> None:
    """ValueError for a released option in the mode the released code never ran it in."""
    if not (clip_norm or 0.0) >= 0:
        raise ValueError(f"released_clip_norm must be >= 0, got {clip_norm!r}")
    if clip_norm and mode != "full":
        raise ValueError("released_clip_norm is the released full variant's clipping (its DeepSpeed patch); the "
                         "efficient variant clipped the raw gradients (the default): use mode='full'")
    if scaling and mode != "full":
        raise ValueError("released_scaling is the released full variant's hard-coded s = 2; the efficient "
                         "variant took s from the LoRA config: use mode='full'")
    if weight_decay and mode != "efficient":
        raise ValueError("released_weight_decay is the released efficient variant's decay of A and B; the full "
                         "variant decayed W (the default): use mode='efficient'")


def update_adam_moments(grad: torch.Tensor, state: dict, betas: Tuple[float, float]):
    """Adam's moment update in `state` ("step", "exp_avg", "exp_avg_sq", created like grad at the first
    call): m <- beta1 m + (1 - beta1) g, v <- beta2 v + (1 - beta2) g^2. Returns (step, m, v)."""
    beta1, beta2 = betas
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
    state["step"] += 1
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return state["step"], m, v


def full_mode_direction(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor, scaling,
                        state: dict, betas: Tuple[float, float], eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """One Adam step of the full variant for a stacked pair, A (c, r, n), B (c, m, r), grads alike: updates
    state's fp32 moments of the m x n equivalent gradient g~ ("step", "exp_avg", "exp_avg_sq"; created at
    the first call) and returns Adam's direction d mapped back to (d_A, d_B); the step is -lr times them."""
    beta1, beta2 = betas
    # The projected full gradient g~ (any X gives the same one; X = 0 skips the Sylvester solve).
    new_gA, new_gB = lorapro_gradients(A, B, grad_A, grad_B, scaling, solve_x=False)
    dtype = new_gA.dtype
    A32, B32 = A.to(dtype), B.to(dtype)
    g_equiv = equivalent_gradient(A32, B32, new_gA, new_gB, scaling)                # (chunks, m, n)
    step, m, v = update_adam_moments(g_equiv, state, betas)
    # Adam's direction d, computed in g_equiv's buffer (one m x n temporary in all).
    direction = torch.sqrt(v, out=g_equiv).div_(math.sqrt(1 - beta2 ** step)).add_(eps)
    direction = torch.div(m, direction, out=direction).div_(1 - beta1 ** step)
    # Map d back to A and B as if it were a full-weight gradient.
    return lorapro_gradients(A32, B32, scaling * (B32.transpose(-1, -2) @ direction),
                             scaling * (direction @ A32.transpose(-1, -2)), scaling)


class LoRAProSGD(_LoRAProBase):
    """LoRA-Pro with plain gradient descent: A -= lr g_A', B -= lr g_B' (other parameters: SGD).

    Weight decay: decoupled, on W for LoRA pairs (see the module docstring), on the parameter otherwise.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                 decay_base_weight: bool = True):
        super().__init__(model, dict(lr=lr, weight_decay=weight_decay), decay_base_weight)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_not_flattened()
        self._check_finite_grads()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            if group["name"] == "other":
                for p in group["params"]:
                    if p.grad is not None:
                        if wd:
                            p.mul_(1 - lr * wd)
                        self._write(p, p.grad.to(_compute_dtype(p)) * -lr)
                continue
            for pair, new_gA, new_gB in adjusted_gradients(self._pairs_with_grads()):
                self._decay_W(pair, lr, wd)
                self._write(pair.A, new_gA.mul(-lr))
                self._write(pair.B, new_gB.mul(-lr))
        return loss


@torch.no_grad()
def adjust_lora_gradients(model: nn.Module) -> int:
    """Replace each LoRA pair's .grad by LoRA-Pro's (g_A', g_B') in place; returns the number of pairs.

    Any optimizer run afterwards on A and B (e.g. torch.optim.AdamW) is LoRA-Pro's "efficient" variant,
    except that its weight decay acts on each factor rather than on W.
    """
    items = [(pair, pair.A.grad, pair.B.grad) for pair in lora_pairs(model)
             if pair.A.grad is not None and pair.B.grad is not None]
    for pair, new_gA, new_gB in adjusted_gradients(items):
        pair.A.grad.copy_(new_gA)
        pair.B.grad.copy_(new_gB)
    return len(items)
