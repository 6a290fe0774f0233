"""Initialisations of the LoRA factors from the pretrained weight (PiSSA) or its gradient (LoRA-GA).

Both move the start of training away from B A = 0 and keep the model's output unchanged at step 0 by
storing the residual W0 - s B0 A0 as the frozen weight (s = the layer's scaling). Shapes: W (out, in)
(a fan_in_fan_out layer's weight is read transposed), A (r, in), B (out, r). As PEFT 0.21.2 does:

PiSSA (Meng et al. 2024), init_lora_weights="pissa" or "pissa_niter_<N>":
    W0 = U S V^T (full SVD, or torch.svd_lowrank(W0, r, niter=N));
    A0 = diag(sqrt(S_r / s)) V_r^T,  B0 = U_r diag(sqrt(S_r / s))   so that s B0 A0 = U_r S_r V_r^T.
LoRA-GA (Wang et al. 2024), init_lora_weights="lora_ga" then `loraga_init(model, train_step)`:
    G = the mean gradient of W0 over the backward passes of `train_step` (a user callback);
    G ~ U S V^T (torch.svd_lowrank, q = min(4 r, min(out, in)), niter 4), first 2 r triplets;
    direction "ArB2r": A0 = V_{1..r}^T, B0 = U_{r+1..2r} diag(S_{r+1..2r}) (also "ArBr", "A2rBr", "random");
    scale "stable": B0 *= out^(1/4) / sqrt(stable_gamma), out = the stored weight's first dimension as in PEFT
    (also "weight_svd", "gd_scale", "unit").

Layers made with these inits keep (A0, B0) as buffers `lora_A0`, `lora_B0` (zero until the init has run;
saved with the adapter), with the invariant  W_stored = W0 - s B0 A0  (W0 the original weight). Hence:
- loading an adapter (or checkpoint) puts its own residual in place: the weight becomes
  W_stored + s (B0_old A0_old - B0_new A0_new), unless the weight itself is loaded too; a LoRA-GA adapter
  therefore loads on the ORIGINAL base model without its gradient being estimated again; a weight loaded
  without lora_A0 / lora_B0 is taken as an original weight (B0, A0 = 0 until the init runs again);
- re-running an init starts from W0 = W_stored + s B0 A0, not from the residual;
- a trained adapter is a plain LoRA of rank 2 r against W0 (`as_plain_lora`, PEFT's conversion):
    delta-W = s (B A - B0 A0) = s' [B | -B0] [A ; A0]  with s' = s (alpha doubled, or * sqrt 2 for rsLoRA).
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn

INIT_CHOICES = 'True, "gaussian", "pissa", "pissa_niter_<N>", "lora_ga"'
LORAGA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
LORAGA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")
_PISSA = re.compile(r"pissa(_niter_(\d+))?")


def check_init(init_lora_weights):
    """The value itself if it is one PEFT's names we implement, else a ValueError listing them."""
    if init_lora_weights is True or init_lora_weights in ("gaussian", "lora_ga"):
        return init_lora_weights
    if isinstance(init_lora_weights, str) and _PISSA.fullmatch(init_lora_weights):
        return init_lora_weights
    raise ValueError(f"init_lora_weights={init_lora_weights!r} is not one of {INIT_CHOICES}")


def is_pissa(init_lora_weights) -> bool:
    return isinstance(init_lora_weights, str) and _PISSA.fullmatch(init_lora_weights) is not None


def mutates_weight(init_lora_weights) -> bool:
    """True for the inits that replace the frozen weight by a residual (PiSSA, LoRA-GA)."""
    return is_pissa(init_lora_weights) or init_lora_weights == "lora_ga"


def _oriented(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """(out, in) view of a tensor laid out like layer.weight."""
    return w.transpose(0, 1) if getattr(layer, "fan_in_fan_out", False) else w


# -- the record of the residual: buffers lora_A0 / lora_B0 ------------------------------------------------
def add_initial_factors(layer: nn.Module) -> None:
    """Register lora_A0 (r, in) / lora_B0 (out, r) on a layer whose init replaces W by a residual, and the
    load hooks that keep W_stored = W0 - s B0 A0 when they are loaded (see the module docstring)."""
    if not mutates_weight(layer.init_lora_weights):
        return
    layer.register_buffer("lora_A0", torch.zeros_like(layer.lora_A.data))
    layer.register_buffer("lora_B0", torch.zeros_like(layer.lora_B.data))
    layer.initial_factors_set = False

    def before_load(module, state_dict, prefix, *args):
        weight_loaded = prefix + "weight" in state_dict
        module._old_initial = None if weight_loaded else _initial_product(module)
        module._weight_loaded = weight_loaded
        module._record_loaded = prefix + "lora_A0" in state_dict

    def after_load(module, incompatible_keys):
        old, weight_loaded, record_loaded = module._old_initial, module._weight_loaded, module._record_loaded
        module._old_initial = module._weight_loaded = module._record_loaded = None
        if module.lora_A0.is_meta:
            return
        if weight_loaded and not record_loaded:  # a plain (original) weight: no residual is in place
            module.lora_A0.zero_()
            module.lora_B0.zero_()
        module.initial_factors_set = bool(module.lora_B0.abs().sum() > 0 or module.lora_A0.abs().sum() > 0)
        if weight_loaded:
            return
        new = _initial_product(module)
        if (old is None) == (new is None) and (new is None or torch.equal(old, new)):
            return
        with torch.no_grad():
            W = _oriented(module, module._base_weight().data.float())
            W = W + (old if old is not None else 0) - (new if new is not None else 0)
            module._base_weight().data = _oriented(module, W).to(module._base_weight().dtype).contiguous()

    # before the merge-safe hooks (registered after this): unmerged when adjusting, re-merged after
    layer.register_load_state_dict_pre_hook(before_load)
    layer.register_load_state_dict_post_hook(after_load)


def clear_initial_factors(layer: nn.Module) -> None:
    """Zero lora_A0 / lora_B0 of a layer whose init has not run (a fresh, possibly to_empty'd, layer)."""
    if hasattr(layer, "lora_A0") and not layer.initial_factors_set and not layer.lora_A0.is_meta:
        layer.lora_A0.zero_()
        layer.lora_B0.zero_()


def materialise_initial_factors(layer: nn.Module) -> None:
    """rebuild_buffers: zero buffers for lora_A0 / lora_B0 still on the meta device after loading."""
    if hasattr(layer, "lora_A0") and layer.lora_A0.is_meta:
        device = layer.lora_A.device
        layer.lora_A0 = torch.zeros(layer.lora_A0.shape, device=device, dtype=layer.lora_A.dtype)
        layer.lora_B0 = torch.zeros(layer.lora_B0.shape, device=device, dtype=layer.lora_B.dtype)
        layer.initial_factors_set = False


def _chunks(layer: nn.Module):
    """(output rows of W (out, in), rows of lora_A, rows of lora_B) of each low-rank block: the whole layer for
    a Linear, each enabled chunk (q, v of GPT-2's c_attn) for a MergedLinear, which is initialised chunk by
    chunk as if each were its own projection."""
    if not hasattr(layer, "enable_lora"):
        return [(slice(None), slice(None), slice(None))]
    r, size = layer.r, layer.chunk_size
    enabled = [g for g, on in enumerate(layer.enable_lora) if on]
    return [(slice(g * size, (g + 1) * size), slice(i * r, (i + 1) * r), slice(i * size, (i + 1) * size))
            for i, g in enumerate(enabled)]


def _product(layer: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """s B A laid out (out, in), fp32, for factors shaped like the layer's lora_A, lora_B."""
    out_features = layer.weight.shape[1] if layer.fan_in_fan_out else layer.weight.shape[0]
    P = A.new_zeros((out_features, A.shape[1]), dtype=torch.float32)
    for rows, a_rows, b_rows in _chunks(layer):
        P[rows] = layer.scaling * (B[b_rows].float() @ A[a_rows].float())
    return P


def _initial_product(layer: nn.Module) -> Optional[torch.Tensor]:
    """s B0 A0 (out, in) in fp32, or None where no init has run."""
    if not getattr(layer, "initial_factors_set", False) or layer.lora_A0.is_meta:
        return None
    return _product(layer, layer.lora_A0, layer.lora_B0)


def original_weight(layer: nn.Module) -> torch.Tensor:
    """W0 = W_stored + s B0 A0, (out, in), fp32."""
    W = _oriented(layer, layer._base_weight().data.float())
    initial = _initial_product(layer)
    return W if initial is None else W + initial


def _set_factors_and_residual(layer: nn.Module, A: torch.Tensor, B: torch.Tensor) -> None:
    """lora_A = A0 = A, lora_B = B0 = B (cast to the factors' dtype); weight = W0 - s B0 A0 in fp32, cast
    back to W's dtype, computed from the factors as stored so that the step-0 output is W0's up to rounding."""
    weight = layer.weight
    W0 = original_weight(layer)
    layer.lora_A.data.copy_(A.to(layer.lora_A.dtype))
    layer.lora_B.data.copy_(B.to(layer.lora_B.dtype))
    residual = W0 - _product(layer, layer.lora_A.data, layer.lora_B.data)
    weight.data = _oriented(layer, residual).to(weight.dtype).contiguous()
    layer.lora_A0 = layer.lora_A.data.clone()  # assigned, not copied: they may still be on the meta device
    layer.lora_B0 = layer.lora_B.data.clone()
    layer.initial_factors_set = True


@torch.no_grad()
def pissa_init_(layer: nn.Module) -> None:
    """PiSSA on one loralib Linear, or on each enabled chunk of a MergedLinear (see the module docstring);
    the weight becomes the residual."""
    weight = layer.weight
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"PiSSA needs a float32/float16/bfloat16 weight, got {weight.dtype}")
    W0, r = original_weight(layer), layer.r
    niter = _PISSA.fullmatch(layer.init_lora_weights).group(2)
    A = torch.empty_like(layer.lora_A.data, dtype=torch.float32)
    B = torch.empty_like(layer.lora_B.data, dtype=torch.float32)
    for rows, a_rows, b_rows in _chunks(layer):
        if niter is None:
            U, S, Vh = torch.linalg.svd(W0[rows], full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:
            U, S, V = torch.svd_lowrank(W0[rows], r, niter=int(niter))
            Vh = V.t()
        root = torch.sqrt(S / layer.scaling)
        A[a_rows], B[b_rows] = root[:, None] * Vh, U * root[None, :]
    _set_factors_and_residual(layer, A, B)


def loraga_factors(grad: torch.Tensor, weight: torch.Tensor, r: int, scaling: float, direction: str = "ArB2r",
                   scale: str = "stable", stable_gamma: float = 16,
                   stable_rows: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, in), B0 (out, r)) in fp32 from the gradient G (out, in) of the weight W (out, in).

    stable_rows: the "out" of the stable scale, default G's rows. PEFT takes the first dimension of the
    weight as stored, which for a fan_in_fan_out weight (GPT-2's Conv1D, (in, out)) is `in`; loraga_init
    passes that to stay equal to PEFT."""
    G = grad.float()
    U, S, V = torch.svd_lowrank(G, q=min(4 * r, min(G.shape)), niter=4)
    U, S, Vh = U[:, :2 * r], S[:2 * r], V.t()[:2 * r]
    if direction == "ArBr":  # A the odd, B the even triplets
        a_idx, b_idx = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    elif direction == "A2rBr":
        a_idx, b_idx = torch.arange(r, 2 * r), torch.arange(0, r)
    elif direction == "ArB2r":
        a_idx, b_idx = torch.arange(0, r), torch.arange(r, 2 * r)
    elif direction == "random":
        a_idx = b_idx = torch.randperm(2 * r)[:r]
    else:
        raise ValueError(f"LoRA-GA direction={direction!r} is not one of {LORAGA_DIRECTIONS}")
    A, S_B = Vh[a_idx], S[b_idx]
    B = U[:, b_idx] * S_B[None, :]
    if scale == "stable":
        B = B * ((stable_rows or G.shape[0]) ** 0.25 / stable_gamma ** 0.5)
    elif scale == "weight_svd":
        _, weight_S, _ = torch.svd_lowrank(weight.float(), q=r, niter=4)
        if S_B[0] > 0:
            B = B * (weight_S[0] / S_B[0])
    elif scale == "gd_scale":
        A, B = A / scaling, B / scaling
    elif scale != "unit":
        raise ValueError(f"LoRA-GA scale={scale!r} is not one of {LORAGA_SCALES}")
    return A, B


def loraga_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(path, layer) of the adapted layers made with init_lora_weights="lora_ga", in module order."""
    for path, module in model.named_modules():
        if getattr(module, "init_lora_weights", None) == "lora_ga" and getattr(module, "has_lora", False):
            yield path, module


def estimate_gradients(model: nn.Module, train_step: Callable[[], None],
                       only: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """The mean gradient of each LoRA-GA layer's frozen weight over `train_step`'s backward passes.

    Only those weights require grad meanwhile (every other parameter is frozen and restored after), so
    autograd keeps one gradient per target weight, in the weight's dtype, as PEFT's preprocess_loraga
    does. A backward pass is counted when the layer's output receives a gradient, so gradient
    checkpointing's recomputation counts once. The LoRA path adds nothing here (B = 0 before init)."""
    targets = [(path, layer) for path, layer in loraga_layers(model) if only is None or path in only]
    if not targets:
        raise ValueError("loraga_init: no layer of the model was built with init_lora_weights='lora_ga'")
    was_training = model.training
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    counts = {path: 0 for path, _ in targets}
    handles = []

    def counter(path):
        def hook(module, inputs, output):
            if output.requires_grad:
                output.register_hook(lambda g: counts.__setitem__(path, counts[path] + 1))
        return hook

    try:
        for p in model.parameters():
            p.requires_grad = False
        for path, layer in targets:
            if layer.merged:
                layer.unmerge()
            layer.weight.requires_grad = True
            layer.weight.grad = None
            handles.append(layer.register_forward_hook(counter(path)))
        model.train()
        with torch.enable_grad():
            train_step()
        grads = {}
        for path, layer in targets:
            if counts[path] == 0 or layer.weight.grad is None:
                raise ValueError(f"loraga_init: train_step ran no backward pass through {path!r}")
            grads[path] = layer.weight.grad.detach() / counts[path]
            layer.weight.grad = None
        return grads
    finally:
        for h in handles:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad = saved.get(name, p.requires_grad)
        model.train(was_training)


@torch.no_grad()
def loraga_init(model: nn.Module, train_step: Callable[[], None], direction: str = "ArB2r",
                scale: str = "stable", stable_gamma: float = 16, one_matrix_at_a_time: bool = False) -> nn.Module:
    """LoRA-GA: set A0, B0 of every init_lora_weights="lora_ga" layer from the gradient `train_step`
    produces (PEFT's preprocess_loraga + lora_ga_init), and W0 to the residual W0 - s B0 A0.

    train_step: a callable that runs forward and backward on N batches (loss.backward(), no optimizer
    step); it must see the same batches each time it is called. Peak memory: the model's training
    activations plus one gradient per LoRA-GA weight in the weight's dtype, all held until train_step
    returns (as PEFT), each freed right after its layer's SVD (torch.svd_lowrank: O((out + in) 4 r) more).
    one_matrix_at_a_time: call train_step once per layer, with only that weight's gradient alive: the
    peak drops to the activations plus the largest single gradient, for L times the compute (same result)."""
    if direction not in LORAGA_DIRECTIONS:
        raise ValueError(f"LoRA-GA direction={direction!r} is not one of {LORAGA_DIRECTIONS}")
    if scale not in LORAGA_SCALES:
        raise ValueError(f"LoRA-GA scale={scale!r} is not one of {LORAGA_SCALES}")
    paths = [path for path, _ in loraga_layers(model)]
    if not paths:
        raise ValueError("loraga_init: no layer of the model was built with init_lora_weights='lora_ga'")
    # one matrix at a time: a layer already set computes W_res + s B0 A0 = W0, so the later layers' gradients
    # are those of the original model (up to rounding)
    modules = dict(model.named_modules())
    for group in ([[path] for path in paths] if one_matrix_at_a_time else [paths]):
        grads = estimate_gradients(model, train_step, only=group)
        for path in group:
            layer = modules[path]
            grad, W = _oriented(layer, grads.pop(path)), _oriented(layer, layer.weight.data)
            A, B = torch.empty_like(layer.lora_A.data), torch.empty_like(layer.lora_B.data)
            dtype = layer.weight.dtype  # PEFT rounds the factors to the weight's dtype before the residual
            for rows, a_rows, b_rows in _chunks(layer):
                # PEFT's "out" of the stable scale: the stored weight's first dimension (in, for fan_in_fan_out)
                stored_rows = W.shape[1] if layer.fan_in_fan_out else W[rows].shape[0]
                A_c, B_c = loraga_factors(grad[rows], W[rows], layer.r, layer.scaling, direction, scale, stable_gamma,
                                          stable_rows=stored_rows)
                A[a_rows], B[b_rows] = A_c.to(dtype), B_c.to(dtype)
            _set_factors_and_residual(layer, A, B)
            if hasattr(layer, "reset_magnitude"):  # DoRA: m = ||W_res + s B0 A0|| (= ||W0|| up to rounding)
                layer.reset_magnitude()
    return model


def as_plain_lora(layer: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(A' (2r, in), B' (out, 2r), scaling) with B' A' s = s (B A - B0 A0): the trained adapter of a
    PiSSA / LoRA-GA layer as a plain LoRA against the original weight W0 = W_res + s B0 A0. For a
    MergedLinear, per enabled chunk i: A'_i = [A_i; A0_i], B'_i = [B_i, -B0_i], laid out as its own factors
    (A' (n 2r, in), B' (n out_g, 2r))."""
    if not getattr(layer, "initial_factors_set", False):
        raise ValueError(f"a {type(layer).__name__} with init_lora_weights={layer.init_lora_weights!r} whose "
                         "initialisation has not run has no initial factors to convert against")
    A, A0 = layer.lora_A.detach(), layer.lora_A0.to(layer.lora_A.dtype)
    B, B0 = layer.lora_B.detach(), layer.lora_B0.to(layer.lora_B.dtype)
    chunks = _chunks(layer)
    A2 = torch.cat([torch.cat([A[a], A0[a]], dim=0) for _, a, _ in chunks], dim=0)
    B2 = torch.cat([torch.cat([B[b], -B0[b]], dim=1) for _, _, b in chunks], dim=0)
    return A2, B2, layer.scaling
