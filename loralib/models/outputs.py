"""What every model file's forward returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .cache import KVCache


@dataclass
class ModelOutput:
    """logits: (B, T, vocab) for causal LMs, (B, num_labels) for classifiers.
    loss: scalar when labels were given. past_key_values: the updated cache when use_cache.
    hidden_states: (B, T, d) last hidden state (before the head)."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    past_key_values: Optional[KVCache] = None
    hidden_states: Optional[torch.Tensor] = None
