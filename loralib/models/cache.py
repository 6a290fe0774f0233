"""KV cache shared by the causal LMs (GPT-2, Llama) and the generation loop.

Per layer, keys and values of shape (batch, n_kv_heads, time, head_dim), preallocated in blocks (or to a
`capacity` given up front) so a decode step writes in place instead of concatenating the whole history.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

_BLOCK = 64  # grow the time axis this many steps at a time


class KVCache:
    """Keys/values for every layer, plus how many positions are filled (`seq_len`).

    A model's attention calls `update(layer_idx, k_new, v_new)` with (B, H, T_new, D) tensors and gets
    back the (B, H, seq_len + T_new, D) views to attend over. After the last layer the model calls
    `advance(T_new)`. Beam search calls `reorder(index)` to follow the surviving beams (and to drop
    the rows of inputs that are done).
    `n_layers` may be left out (the generation loop does not know it): layers are added as they come.
    `capacity` (time steps) sizes the buffers once when the final length is known (generation).
    """

    def __init__(self, n_layers: Optional[int] = None, capacity: Optional[int] = None):
        self.n_layers = n_layers or 0
        self.capacity = capacity
        self._k: List[Optional[torch.Tensor]] = [None] * self.n_layers
        self._v: List[Optional[torch.Tensor]] = [None] * self.n_layers
        # reorder() writes into these spare buffers and swaps, so no step allocates (large fresh
        # allocations cost page faults, on CPU more than the copy itself).
        self._spare_k: List[Optional[torch.Tensor]] = [None] * self.n_layers
        self._spare_v: List[Optional[torch.Tensor]] = [None] * self.n_layers
        self.seq_len = 0

    def update(self, layer_idx: int, k_new: torch.Tensor, v_new: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if layer_idx >= self.n_layers:
            grow = layer_idx + 1 - self.n_layers
            for buffers in (self._k, self._v, self._spare_k, self._spare_v):
                buffers += [None] * grow
            self.n_layers = layer_idx + 1
        start, end = self.seq_len, self.seq_len + k_new.shape[2]
        k_buf, v_buf = self._k[layer_idx], self._v[layer_idx]
        if k_buf is None or k_buf.shape[2] < end:
            capacity = ((end + _BLOCK - 1) // _BLOCK) * _BLOCK
            if self.capacity is not None and self.capacity >= end:
                capacity = self.capacity
            k_buf = self._grow(k_buf, k_new, capacity, start)
            v_buf = self._grow(v_buf, v_new, capacity, start)
            self._k[layer_idx], self._v[layer_idx] = k_buf, v_buf
        k_buf[:, :, start:end] = k_new
        v_buf[:, :, start:end] = v_new
        return k_buf[:, :, :end], v_buf[:, :, :end]

    @staticmethod
    def _grow(old: Optional[torch.Tensor], like: torch.Tensor, capacity: int, filled: int) -> torch.Tensor:
        b, h, _, d = like.shape
        new = like.new_empty((b, h, capacity, d))
        if old is not None and filled > 0:
            new[:, :, :filled] = old[:, :, :filled]
        return new

    def advance(self, n_new: int) -> None:
        self.seq_len += n_new

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (a (B',) long tensor), e.g. the beams that survive a step. Only the
        filled positions are copied, into a spare buffer that then becomes the cache."""
        n = self.seq_len
        for i in range(self.n_layers):
            if self._k[i] is None:
                continue
            self._k[i], self._spare_k[i] = self._gather(self._k[i], self._spare_k[i], index, n)
            self._v[i], self._spare_v[i] = self._gather(self._v[i], self._spare_v[i], index, n)

    @staticmethod
    def _gather(buf: torch.Tensor, spare: Optional[torch.Tensor], index: torch.Tensor, n: int):
        """(buf[index] as the new buffer, the old buffer as the next spare). The spare's rows past
        len(index) are left out of the view (the batch may shrink), its positions past n are unused."""
        rows = index.shape[0]
        if spare is None or spare.shape[0] < rows or spare.shape[2] < buf.shape[2] or \
                spare.dtype != buf.dtype or spare.device != buf.device:
            spare = buf.new_empty((rows,) + tuple(buf.shape[1:]))
        out = spare[:rows]
        torch.index_select(buf[:, :, :n], 0, index, out=out[:, :, :n])
        return out, buf
