"""DoRA (Liu et al. 2024): weight-decomposed LoRA, as PEFT 0.21.2's `use_dora=True` computes it.

    W' = m * (W + s B A) / ||W + s B A||_row            m: `lora_magnitude_vector` (out,), trainable

with the norm taken over the input dimension of each output row (PEFT's "column norm" of W^T), m
initialised to ||W + s B A|| (= ||W|| for B = 0) and the norm treated as a constant in backward (DoRA
§4.3, PEFT), so gradients reach m directly and A, B only through the low-rank path. Forward, for
f = m / ||W + s B A|| (out,):

    no LoRA dropout (or eval):   y = f * (x W^T + s x A^T B^T) + b
    with dropout d = drop(x):    y = x W^T + b + (f - 1) * (d W^T) + f * s d A^T B^T      (PEFT's)

The norm is computed without autograd from W + delta_weight() in fp32; no identity matrix is pushed
through the factors and no dense update is kept for backward (PEFT does both). Merging writes
f * (W + s B A) into the weight in fp32; the unmerged weight is kept while merged, so unmerging
restores it bit for bit (cost: one copy of each DoRA weight while merged).
Layers: DoRALinear, DoRAMergedLinear (a fused q|k|v: m over the whole projection), DoRAEmbedding (m per
embedding coordinate) and DoRAConv1d/2d/3d (m per output channel), as PEFT defines them for its layers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import layers
from .layers import FusedChunkLoRA, transpose_if, widened


class DoRAMixin:
    """The DoRA part shared by the linear layers; the host defines `delta_weight()` and `_dora_path`."""

    def _add_adapter_parameters(self) -> None:
        self.lora_magnitude_vector = nn.Parameter(self.weight.new_ones(self.out_features))

    @property
    def dropout_inactive(self) -> bool:
        return isinstance(self.lora_dropout, nn.Identity) or not self.training

    @torch.no_grad()
    def init_from_weight(self) -> None:
        super().init_from_weight()  # PiSSA first: m is the norm of the weight it leaves plus s B0 A0
        self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m = ||W + s B A||_row for the current W, A, B."""
        self.lora_magnitude_vector.data.copy_(self.weight_norm().to(self.lora_magnitude_vector.dtype))

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, (out,), fp32, of the unmerged weight; no autograd."""
        weight = self._unmerged_weight() if self.merged else self._base_weight()
        full = transpose_if(widened(weight.detach()) + self.delta_weight(), self.fan_in_fan_out)
        return torch.linalg.vector_norm(full.flatten(1), dim=1)  # a kernel (out, in, k, ...): all but out

    def dora_scale(self) -> torch.Tensor:
        """f = m / ||W + s B A||, (out,); differentiable in m only."""
        m = self.lora_magnitude_vector
        return m / self.weight_norm().to(m.dtype)

    def _scale_view(self, f: torch.Tensor) -> torch.Tensor:
        """f shaped to multiply the weight as stored ((out, in), (in, out) with fan_in_fan_out, or a kernel
        (out, in, k, ...))."""
        if self.fan_in_fan_out:
            return f.view(1, -1)
        return f.view(-1, *([1] * (self._base_weight().dim() - 1)))

    # -- merging: exact, by keeping the unmerged weight ---------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if self.has_lora:
            weight = self._base_weight()
            f = self._scale_view(widened(self.dora_scale()))
            self._unmerged_data = weight.data.clone()
            weight.data = (f * (widened(weight.data) + self.delta_weight())).to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.has_lora:
            self._base_weight().data = self._unmerged_data
            self._unmerged_data = None
        self.merged = False

    def _unmerged_weight(self) -> torch.Tensor:
        return self._unmerged_data.clone()

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = transpose_if(self.weight, self.fan_in_fan_out)
        if not self.has_lora or self.merged:
            return F.linear(x, weight, self.bias)
        f = self.dora_scale()
        if self.dropout_inactive:
            out = self._dora_path(x)
            out = out * f.to(out.dtype)
        else:
            dropped = self.lora_dropout(x)
            path = self._dora_path(dropped)
            out = F.linear(x, weight) + path * f.to(path.dtype) - F.linear(dropped, weight)
        return out if self.bias is None else out + self.bias


class DoRALinear(DoRAMixin, layers.Linear):
    """loralib.Linear with DoRA. Shapes: weight (out, in) (or (in, out) with fan_in_fan_out), lora_A (r, in),
    lora_B (out, r), lora_magnitude_vector (out,)."""

    def _dora_path(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + s x A^T B^T, no bias: (..., in) -> (..., out)."""
        base = F.linear(x, transpose_if(self.weight, self.fan_in_fan_out))
        low = (x.to(self.lora_A.dtype) @ self.lora_A.transpose(0, 1)) @ (self.lora_B.transpose(0, 1) * self.scaling)
        return base + low.to(base.dtype)


class DoRAMergedLinear(DoRAMixin, layers.MergedLinear):
    """loralib.MergedLinear (a fused q|k|v projection) with DoRA over the whole projection, as PEFT applies
    DoRA to GPT-2's c_attn: m has one entry per output row, disabled chunks included (their update is
    zero, but their magnitude trains)."""

    def _dora_path(self, x: torch.Tensor) -> torch.Tensor:
        x_lora = x.to(self.lora_A.dtype)
        return FusedChunkLoRA.apply(x, x_lora, self.weight, None, self.lora_A, self._scaled_blocks(),
                                     self.column_runs, self.fan_in_fan_out)


class DoRAEmbedding(DoRAMixin, layers.Embedding):
    """loralib.Embedding with DoRA, as PEFT's: the magnitude has one entry per embedding coordinate,
    (embedding_dim,), and the norm runs over the vocabulary: f = m / ||W + s (B A)^T||_col, and
    y = f * (W[x] + s A^T[x] B^T). Shapes: weight (num, dim), lora_A (r, num), lora_B (dim, r)."""

    fan_in_fan_out = True  # W (num, dim) read transposed: rows = embedding coordinates, as PEFT reads it

    def _add_adapter_parameters(self) -> None:
        self.lora_magnitude_vector = nn.Parameter(self.weight.new_ones(self.embedding_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_lora or self.merged:
            return nn.Embedding.forward(self, x)
        f = self.dora_scale()
        out = layers.Embedding.forward(self, x)
        return out * f.to(out.dtype)


class DoRAConvMixin(DoRAMixin):
    """A loralib convolution with DoRA: one magnitude per output channel, the norm over the rest of the
    kernel (as PEFT's DoRA convolutions), y = conv(x, f * (W + delta-W)) + b with f = m / ||W + delta-W||
    (the norm detached). delta-W is this layer's (B A).view(kernel) * s (see loralib.layers.ConvLoRA)."""

    fan_in_fan_out = False

    def _add_adapter_parameters(self) -> None:
        self.lora_magnitude_vector = nn.Parameter(self.conv.weight.new_ones(self.conv.weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_lora or self.merged:
            return self.conv(x)
        delta = (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling
        f = self._scale_view(self.dora_scale())
        weight = (self.conv.weight + delta.to(self.conv.weight.dtype)) * f.to(self.conv.weight.dtype)
        return self.conv._conv_forward(x, weight, self.conv.bias)


class DoRAConv1d(DoRAConvMixin, layers.Conv1d):
    pass


class DoRAConv2d(DoRAConvMixin, layers.Conv2d):
    pass


class DoRAConv3d(DoRAConvMixin, layers.Conv3d):
    pass
