"""LoRA layers: W x + (B A x) * scaling, with the pretrained W frozen.

Drop-in for microsoft's loralib 0.1.2: the same class names, constructor signatures, parameter names
(`lora_A`, `lora_B`), shapes, initialisation (and so the same parameters under the same seed) and
merge-on-eval behaviour. Differences, each a fix of the released code:

- `MergedLinear` computes the low-rank path per enabled chunk; it never builds a dense delta-W in the
  unmerged forward, and a layer with no enabled chunk is a plain linear layer instead of a crash.
- `Conv1d` and `Conv3d` get factor shapes whose product has as many entries as the kernel (0.1.2's do
  not, upstream issue #115); `Conv2d` keeps 0.1.2's shapes exactly.
- Merging and unmerging compute B @ A in fp32 and cast the result back to the weight's dtype; merging
  a merged layer or unmerging an unmerged one does nothing.
- `state_dict()` always holds the pretrained (unmerged) weight, also while the layer is merged, and
  loading a state dict into a merged layer re-merges with the loaded factors. A model saved after
  `eval()` therefore never gets B A added twice. `loralib.merged_state_dict` gives folded weights.
- `use_rslora=True` scales by lora_alpha / sqrt(r) (rank-stabilised LoRA) instead of lora_alpha / r.
- `init_lora_weights` (Linear, MergedLinear chunk by chunk): True (kaiming A, zero B), "gaussian" (A ~ N(0, 1/r^2), zero B), "pissa" /
  "pissa_niter_<N>" (factors from the weight's top-r singular triplets, residual kept as the weight, see
  loralib.init_methods) or "lora_ga" (set later by loralib.init_methods.loraga_init), as PEFT names them.
  Weight-dependent initialisation runs in `init_from_weight()`, once the layer holds its real weight.
- Bad hyperparameters raise a ValueError naming the argument.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import init_methods


def _warn_if_rank_exceeds(r: int, in_features: int, out_features: int) -> None:
    """A rank above min(in, out) adds parameters but no expressiveness (B A has rank <= min(in, out)) and makes
    LoRA-Pro's r x r systems singular: said once per layer, not refused (PEFT accepts it too)."""
    if r > min(in_features, out_features):
        warnings.warn(f"LoRA rank r={r} exceeds min(in_features={in_features}, out_features={out_features}) of "
                      f"this layer: B A cannot have rank above {min(in_features, out_features)}", stacklevel=3)


def _check_hparams(r, lora_alpha, lora_dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be a non-negative int (0 disables LoRA), got r={r!r}")
    if r > 0 and not (isinstance(lora_alpha, (int, float)) and math.isfinite(lora_alpha) and lora_alpha > 0):
        raise ValueError(f"lora_alpha must be a positive number when r > 0, got lora_alpha={lora_alpha!r}")
    if not (0.0 <= float(lora_dropout) < 1.0):
        raise ValueError(f"lora_dropout must lie in [0, 1), got lora_dropout={lora_dropout!r}")


def widened(t: torch.Tensor) -> torch.Tensor:
    """t in at least fp32 (bf16/fp16 -> fp32, fp64 stays fp64): the precision merging is done in."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """alpha / r for LoRA, alpha / sqrt(r) for rsLoRA (Kalajdzievski, 2023)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALayer:
    """State shared by every LoRA layer: rank, scaling, dropout on the LoRA path, merge flags."""

    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool,
                 use_rslora: bool = False):
        _check_hparams(r, lora_alpha, lora_dropout)
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        # nn.Identity keeps the layer picklable and visible in print(model), unlike 0.1.2's lambda.
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights

    # -- merging -------------------------------------------------------------------------------
    # Subclasses define `_base_weight()` (the tensor B A is folded into) and `delta_weight()`
    # (B A * scaling laid out like that tensor, in at least fp32). Merging keeps a copy of the
    # (small) factors it folded in, so unmerging subtracts exactly what was added even if the
    # factors were changed in the meantime (an optimizer step or a copy_ while merged).
    def merge(self) -> None:
        """Fold B A * scaling into the frozen weight (in fp32, cast back). A no-op if already merged.

        As in 0.1.2 the `merged` flag is set also for a layer without LoRA (r = 0)."""
        if self.merged:
            return
        if self.has_lora:
            weight = self._base_weight()
            weight.data = (widened(weight.data) + self.delta_weight()).to(weight.dtype)
            self._merged_factors = {name: p.detach().clone() for name, p in self._lora_factors().items()}
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the merged B A * scaling from the frozen weight again. A no-op if not merged."""
        if not self.merged:
            return
        if self.has_lora:
            weight = self._base_weight()
            weight.data = (widened(weight.data) - self._merged_delta()).to(weight.dtype)
            self._merged_factors = None
        self.merged = False

    def _lora_factors(self):
        return {name: p for name, p in self.named_parameters(recurse=False) if name.startswith("lora_")}

    def _merged_delta(self) -> torch.Tensor:
        """delta_weight() of the factors as they were when merged."""
        snapshot = getattr(self, "_merged_factors", None)
        if snapshot is None:
            return self.delta_weight()
        current = {name: p.data for name, p in self._lora_factors().items()}
        try:
            for name, p in self._lora_factors().items():
                p.data = snapshot[name]
            return self.delta_weight()
        finally:
            for name, p in self._lora_factors().items():
                p.data = current[name]

    def _unmerged_weight(self) -> torch.Tensor:
        """The frozen weight without the merged update, in its own dtype (for state_dict while merged)."""
        w = self._base_weight()
        return (widened(w.detach()) - self._merged_delta()).to(w.dtype)

    def rebuild_buffers(self) -> None:
        """Recompute derived buffers (after materialising a layer built on the meta device)."""

    def _add_adapter_parameters(self) -> None:
        """Parameters a variant adds next to lora_A / lora_B (DoRA's magnitude vector); none for LoRA."""

    def _reset_factors(self) -> None:
        """lora_A / lora_B for init_lora_weights True (kaiming A) or "gaussian" (A ~ N(0, 1/r^2), PEFT's);
        B zero; then the weight-dependent part (PiSSA, DoRA's magnitude) once the real weight is in place."""
        if not hasattr(self, "lora_A"):
            return
        if self.init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        init_methods.clear_initial_factors(self)
        if getattr(self, "_weight_ready", False) and not self._base_weight().is_meta:
            self.rebuild_buffers()  # a loader may not have rebuilt them yet; the init reads them
            self.init_from_weight()

    def _finish_build(self) -> None:
        """End of __init__: the weight has its final layout, so weight-dependent init can run."""
        self._weight_ready = True
        if self.has_lora and not self._base_weight().is_meta:
            with torch.no_grad():
                self.init_from_weight()

    @torch.no_grad()
    def init_from_weight(self) -> None:
        """Weight-dependent initialisation: PiSSA's SVD of the current weight (which then holds the residual).
        "lora_ga" keeps the plain init until loralib.init_methods.loraga_init sets the factors."""
        if init_methods.is_pissa(self.init_lora_weights):
            init_methods.pissa_init_(self)

    def _weight_key(self) -> str:
        """The state-dict key of the weight B A is folded into (ConvLoRA: "conv.weight")."""
        return "weight"

    def _base_weight(self) -> torch.Tensor:
        return self.weight

    def _linear_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b + lora_forward(x) for the linear LoRA layers (LoRA, AdaLoRA, LoRA²)."""
        result = F.linear(x, transpose_if(self.weight, self.fan_in_fan_out), bias=self.bias)
        if self.has_lora and not self.merged:
            # In place: F.linear does not keep its output for backward.
            result += self.lora_forward(x).to(result.dtype)
        return result

    @property
    def has_lora(self) -> bool:
        return self.r > 0 and hasattr(self, "lora_A")

    def _train_merge(self, mode: bool) -> None:
        """0.1.2's contract: eval() merges and train() unmerges, when merge_weights is set."""
        if not self.merge_weights:
            return
        if mode:
            self.unmerge()
        else:
            self.merge()

    def _register_merge_safe_state_hooks(self: nn.Module) -> None:
        # The state dict always carries the unmerged weight; loading into a merged layer unmerges
        # with the old factors first and merges with the new ones after (children loaded too).
        weight_key = self._weight_key()

        def save_hook(module, state_dict, prefix, local_metadata):
            key = prefix + weight_key
            if module.merged and module.has_lora and key in state_dict:
                state_dict[key] = module._unmerged_weight()

        def load_pre_hook(module, state_dict, prefix, *args):
            module._remerge_after_load = module.merged
            module.unmerge()

        def load_post_hook(module, incompatible_keys):
            if getattr(module, "_remerge_after_load", False):
                module.merge()
            module._remerge_after_load = False

        self.register_state_dict_post_hook(save_hook)
        self.register_load_state_dict_pre_hook(load_pre_hook)
        self.register_load_state_dict_post_hook(load_post_hook)


def transpose_if(w: torch.Tensor, flag: bool) -> torch.Tensor:
    return w.transpose(0, 1) if flag else w


class Embedding(nn.Embedding, LoRALayer):
    """Embedding with LoRA. Shapes: lora_A (r, num_embeddings), lora_B (embedding_dim, r).

    The factors are reversed on purpose (A is zero, B normal) so the looked-up rows of A stay sparse:
    out = W[x] + A.T[x] @ B.T * scaling. LoRA dropout is not applied to embeddings, as in 0.1.2.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: int = 1,
                 merge_weights: bool = True, use_rslora: bool = False, **kwargs):
        self.init_lora_weights = True  # the embedding's own init (A zero, B normal), as 0.1.2 and PEFT
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=0.0,
                           merge_weights=merge_weights, use_rslora=use_rslora)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.scaling = lora_scaling(r, lora_alpha, use_rslora)
            self.weight.requires_grad = False
            self._add_adapter_parameters()
        self.reset_parameters()
        self._register_merge_safe_state_hooks()
        self._finish_build()

    def reset_parameters(self) -> None:
        nn.Embedding.reset_parameters(self)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
            if getattr(self, "_weight_ready", False) and not self.weight.is_meta:
                self.init_from_weight()

    def delta_weight(self) -> torch.Tensor:
        """(num_embeddings, embedding_dim), in fp32 (fp64 for fp64 factors)."""
        return (widened(self.lora_B) @ widened(self.lora_A)).transpose(0, 1) * self.scaling

    def train(self, mode: bool = True):
        nn.Embedding.train(self, mode)
        self._train_merge(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.Embedding.forward(self, x)
        if self.has_lora and not self.merged:
            after_A = F.embedding(x, self.lora_A.transpose(0, 1), self.padding_idx, self.max_norm,
                                  self.norm_type, self.scale_grad_by_freq, self.sparse)
            result = result + (after_A @ self.lora_B.transpose(0, 1)) * self.scaling
        return result


class Linear(nn.Linear, LoRALayer):
    """Linear layer with LoRA: y = x W^T + b + dropout(x) A^T B^T * scaling.

    Shapes: weight (out, in), or (in, out) with fan_in_fan_out=True as GPT-2's Conv1D stores it;
    lora_A (r, in), kaiming-uniform; lora_B (out, r), zeros.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True,
                 use_rslora: bool = False, init_lora_weights=True, **kwargs):
        self.init_lora_weights = init_methods.check_init(init_lora_weights)
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights, use_rslora=use_rslora)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            _warn_if_rank_exceeds(r, in_features, out_features)
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
            self.scaling = lora_scaling(r, lora_alpha, use_rslora)
            self.weight.requires_grad = False
            self._add_adapter_parameters()
            init_methods.add_initial_factors(self)  # PiSSA / LoRA-GA: A0, B0 (their residual's record)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)
        self._register_merge_safe_state_hooks()
        self._finish_build()

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        self._reset_factors()

    def rebuild_buffers(self) -> None:
        init_methods.materialise_initial_factors(self)

    def delta_weight(self) -> torch.Tensor:
        """B A * scaling in fp32, laid out like `weight` ((in, out) when fan_in_fan_out)."""
        return transpose_if(widened(self.lora_B) @ widened(self.lora_A), self.fan_in_fan_out) * self.scaling

    def train(self, mode: bool = True):
        nn.Linear.train(self, mode)
        self._train_merge(mode)
        return self

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank path alone: (..., in) -> (..., out), never forming B A."""
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        # scaling applied to the small (r, out) factor instead of the (..., out) result
        return (x @ self.lora_A.transpose(0, 1)) @ (self.lora_B.transpose(0, 1) * self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_lora or self.merged:
            return F.linear(x, transpose_if(self.weight, self.fan_in_fan_out), bias=self.bias)
        # The fused function with one run over all columns: its hand-written backward keeps only x (once, when
        # there is no dropout), x A^T and the weights, and adds both paths' input gradients into one tensor.
        x_lora = self.lora_dropout(x.to(self.lora_A.dtype))
        return FusedChunkLoRA.apply(x, x_lora, self.weight, self.bias, self.lora_A,
                                     self.lora_B.transpose(0, 1) * self.scaling, ((0, 0, self.out_features),),
                                     self.fan_in_fan_out)


class MergedLinear(nn.Linear, LoRALayer):
    """One fused projection (GPT-2's c_attn = q|k|v) with LoRA on the enabled chunks only.

    The output is split into len(enable_lora) equal chunks of out_g = out / len(enable_lora) rows;
    chunk g, if enabled, gets its own B_g A_g. Shapes with n = sum(enable_lora) enabled chunks:
    lora_A (r * n, in) = [A_1; ...; A_n], lora_B (out_g * n, r) = [B_1; ...; B_n].
    The unmerged forward computes x A_g^T B_g^T for all chunks with two small matmuls (see lora_forward)
    and adds the result into the enabled output columns; no dense delta-W is ever formed, and the backward
    is written by hand (FusedChunkLoRA) so that it keeps no more than a plain linear layer would.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0.0, enable_lora: List[bool] = [False],
                 fan_in_fan_out: bool = False, merge_weights: bool = True, use_rslora: bool = False,
                 init_lora_weights=True, **kwargs):
        self.init_lora_weights = init_methods.check_init(init_lora_weights)  # PiSSA / LoRA-GA: chunk by chunk
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights, use_rslora=use_rslora)
        enable_lora = [bool(e) for e in enable_lora]
        if len(enable_lora) == 0 or out_features % len(enable_lora) != 0:
            raise ValueError(
                f"enable_lora has {len(enable_lora)} entries, which does not divide "
                f"out_features={out_features} into equal chunks")
        self.enable_lora = enable_lora
        self.fan_in_fan_out = fan_in_fan_out
        self.chunk_size = out_features // len(enable_lora)
        self.n_enabled = sum(enable_lora)
        self.column_runs = self._column_runs()
        if r > 0 and self.n_enabled > 0:
            _warn_if_rank_exceeds(r, in_features, self.chunk_size)
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * self.n_enabled, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((self.chunk_size * self.n_enabled, r)))
            self.scaling = lora_scaling(r, lora_alpha, use_rslora)
            self.weight.requires_grad = False
            # Not persistent: 0.1.2's state dict has no such key, and it is derived from enable_lora.
            self.register_buffer("lora_columns", self._enabled_columns(), persistent=False)
            self._add_adapter_parameters()
            init_methods.add_initial_factors(self)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)
        self._register_merge_safe_state_hooks()
        self._finish_build()

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        self._reset_factors()

    def _enabled_columns(self) -> torch.Tensor:
        """Indices of the output features that belong to enabled chunks, (out_g * n,)."""
        chunks = [g for g, on in enumerate(self.enable_lora) if on]
        return torch.cat([torch.arange(g * self.chunk_size, (g + 1) * self.chunk_size) for g in chunks]
                         ).to(self.weight.device)

    def rebuild_buffers(self) -> None:
        if self.has_lora:
            self.lora_columns = self._enabled_columns()
        init_methods.materialise_initial_factors(self)

    def _chunked_factors(self):
        """A as (n, r, in) and B as (n, out_g, r)."""
        A = self.lora_A.view(self.n_enabled, self.r, -1)
        B = self.lora_B.view(self.n_enabled, self.chunk_size, self.r)
        return A, B

    def delta_weight(self) -> torch.Tensor:
        """Zero-padded B_g A_g * scaling, (out, in) in fp32, or (in, out) with fan_in_fan_out."""
        A, B = self._chunked_factors()
        per_chunk = torch.bmm(widened(B), widened(A)).reshape(-1, self.in_features)  # (out_g * n, in)
        delta = per_chunk.new_zeros((self.out_features, self.in_features))
        delta.index_copy_(0, self.lora_columns, per_chunk)
        return transpose_if(delta, self.fan_in_fan_out) * self.scaling

    def train(self, mode: bool = True):
        nn.Linear.train(self, mode)
        self._train_merge(mode)
        return self

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out_g * n): the enabled chunks' low-rank outputs, side by side.

        x A^T gives every chunk's r coordinates at once, (..., n r); one matmul with the block-diagonal
        diag(B_1, ..., B_n)^T (n r, n out_g), built from the small factors, maps each chunk's coordinates
        to its own outputs. The scaling is folded into that small matrix rather than the big output."""
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        return (x @ self.lora_A.transpose(0, 1)) @ self._scaled_blocks()

    def _scaled_blocks(self) -> torch.Tensor:
        """diag(B_1, ..., B_n)^T * scaling, (n r, n out_g)."""
        blocks = torch.block_diag(*self.lora_B.view(self.n_enabled, self.chunk_size, self.r).unbind(0))
        return blocks.transpose(0, 1) * self.scaling

    def _column_runs(self):
        """(out_start, lora_start, width) for each run of consecutive enabled chunks."""
        runs, lora_start = [], 0
        for g, on in enumerate(self.enable_lora):
            if not on:
                continue
            if runs and runs[-1][0] + runs[-1][2] == g * self.chunk_size:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + self.chunk_size)
            else:
                runs.append((g * self.chunk_size, lora_start, self.chunk_size))
            lora_start += self.chunk_size
        return runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_lora or self.merged:
            return F.linear(x, transpose_if(self.weight, self.fan_in_fan_out), bias=self.bias)
        x_lora = self.lora_dropout(x.to(self.lora_A.dtype))
        return FusedChunkLoRA.apply(x, x_lora, self.weight, self.bias, self.lora_A, self._scaled_blocks(),
                                     self.column_runs, self.fan_in_fan_out)


class FusedChunkLoRA(torch.autograd.Function):
    """y = x W^T + b, plus (x_lora A^T) Bs in the enabled column runs, with a hand-written backward.

    Autograd through in-place slice adds would clone the whole (..., out) gradient once per run, and
    index_add would keep a copy of the low-rank output; this keeps only x_lora, x A^T (..., n r) and the
    weights, as an unadapted linear layer plus a rank-n r one would. Shapes: x, x_lora (..., in);
    weight (out, in) or (in, out) with fan_in_fan_out; lora_A (n r, in); Bs (n r, n out_g).
    `Linear` uses it with one run over all columns (n = 1, Bs = B^T s): against autograd through
    x A^T B^T this adds the two input gradients in place (no (..., in) temporary) and records one node.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_A, Bs, runs, fan_in_fan_out):
        result = F.linear(x, transpose_if(weight, fan_in_fan_out), bias=bias)
        after_A = x_lora @ lora_A.transpose(0, 1)
        # accumulate each run straight into its columns of the output (no (..., n out_g) temporary)
        result2, a2 = result.view(-1, result.shape[-1]), after_A.reshape(-1, after_A.shape[-1]).to(result.dtype)
        for out_start, lora_start, width in runs:
            result2[:, out_start:out_start + width].addmm_(a2, Bs[:, lora_start:lora_start + width].to(result.dtype))
        ctx.runs, ctx.fan_in_fan_out = runs, fan_in_fan_out
        ctx.x_dtype = x.dtype
        ctx.shared_input = x_lora is x  # no dropout: both paths' input gradients go into one tensor
        ctx.weight_needs_grad = weight.requires_grad
        ctx.save_for_backward(x if weight.requires_grad else None, x_lora, weight, after_A, lora_A, Bs)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return result

    @staticmethod
    def backward(ctx, grad):
        # Under autocast the forward ran in a lower precision than the saved fp32 tensors: compute in the
        # gradient's dtype and hand each gradient back in its input's dtype.
        x, x_lora, weight, after_A, lora_A, Bs = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dt = grad.dtype
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
        Bs_dt, a2 = Bs.to(dt), after_A.reshape(-1, after_A.shape[-1]).to(dt)
        grad_after_A, grad_Bs_runs = None, []
        for out_start, lora_start, width in ctx.runs:
            g_run = g2[:, out_start:out_start + width]  # a strided view, no copy
            B_run = Bs_dt[:, lora_start:lora_start + width].transpose(0, 1)
            if grad_after_A is None:
                grad_after_A = g_run @ B_run
            else:
                grad_after_A.addmm_(g_run, B_run)
            if needs[5]:
                grad_Bs_runs.append(a2.transpose(0, 1) @ g_run)
        grad_x = grad_x_lora = grad_w = grad_b = grad_A = grad_Bs = None
        if needs[1] or needs[4]:
            A_dt = lora_A.to(dt)
        if needs[0]:
            w = weight.to(dt)
            grad_x = g2 @ (w.t() if ctx.fan_in_fan_out else w)  # (N, in)
            if ctx.shared_input and needs[1]:
                grad_x.addmm_(grad_after_A, A_dt)  # both paths' input gradients in one tensor, no temporary
            grad_x = grad_x.view(x_lora.shape).to(ctx.x_dtype)
        if needs[1] and not ctx.shared_input:
            grad_x_lora = (grad_after_A @ A_dt).view(x_lora.shape).to(x_lora.dtype)
        if needs[2]:
            x2 = x.reshape(-1, x.shape[-1]).to(dt)
            grad_w = (x2.transpose(0, 1) @ g2 if ctx.fan_in_fan_out else g2.transpose(0, 1) @ x2).to(weight.dtype)
        if ctx.has_bias and needs[3]:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        if needs[4]:
            grad_A = (grad_after_A.transpose(0, 1) @ x_lora.reshape(-1, x_lora.shape[-1]).to(dt)).to(lora_A.dtype)
        if needs[5]:
            grad_Bs = (grad_Bs_runs[0] if len(grad_Bs_runs) == 1 else torch.cat(grad_Bs_runs, dim=1)).to(Bs.dtype)
        return grad_x, grad_x_lora, grad_w, grad_b, grad_A, grad_Bs, None, None


class ConvLoRA(nn.Module, LoRALayer):
    """A torch convolution (kept as `.conv`, so its keys are `conv.weight`, `conv.bias`) with LoRA.

    The kernel W (out, in / groups, k, ..., k) with d spatial dims is updated by (B A).view(W.shape):
    lora_A (r k, in k^(d-1)), lora_B (out / groups * k, r k). For d = 2 these are 0.1.2's shapes;
    for d = 1 and d = 3 they are the shapes whose product has as many entries as the kernel.
    Only square kernels given as one int are supported, as in 0.1.2.
    """

    def __init__(self, conv_module, in_channels: int, out_channels: int, kernel_size: int, r: int = 0,
                 lora_alpha: int = 1, lora_dropout: float = 0.0, merge_weights: bool = True,
                 use_rslora: bool = False, **kwargs):
        nn.Module.__init__(self)
        self.init_lora_weights = True
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights, use_rslora=use_rslora)
        if not isinstance(kernel_size, int):
            raise ValueError(f"kernel_size must be one int for a LoRA convolution, got {kernel_size!r}")
        spatial_dims = self.conv.weight.dim() - 2
        if r > 0:
            self.lora_A = nn.Parameter(
                self.conv.weight.new_zeros((r * kernel_size, in_channels * kernel_size ** (spatial_dims - 1))))
            self.lora_B = nn.Parameter(
                self.conv.weight.new_zeros((out_channels // self.conv.groups * kernel_size, r * kernel_size)))
            self.scaling = lora_scaling(r, lora_alpha, use_rslora)
            self.conv.weight.requires_grad = False
            self._add_adapter_parameters()
        self.reset_parameters()
        self.merged = False
        self._register_merge_safe_state_hooks()
        self._finish_build()

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
            if getattr(self, "_weight_ready", False) and not self.conv.weight.is_meta:
                self.init_from_weight()

    # Read-through attributes so code that used the wrapped conv keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.conv.bias

    def _weight_key(self) -> str:
        return "conv.weight"

    def _base_weight(self) -> torch.Tensor:
        return self.conv.weight

    def delta_weight(self) -> torch.Tensor:
        return (widened(self.lora_B) @ widened(self.lora_A)).view(self.conv.weight.shape) * self.scaling

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)
        self._train_merge(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_lora and not self.merged:
            delta = (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling
            return self.conv._conv_forward(x, self.conv.weight + delta.to(self.conv.weight.dtype),
                                           self.conv.bias)
        return self.conv(x)


class Conv1d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv1d, *args, **kwargs)


class Conv2d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv2d, *args, **kwargs)


class Conv3d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv3d, *args, **kwargs)
