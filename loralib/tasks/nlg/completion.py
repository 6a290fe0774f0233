"""The NLG training examples and loss of gpt2_ft.py, as the LoRA paper's GPT2LMModel computes them.

One example is input = (context + [50256] + completion)[:seq_len]; the loss is taken on the completion
tokens only (joint_lm: on every token). A context that already ends in 50256 (the original gpt2_encode.py
--add_bos files) gets no second one.

Loss, as the original's GPT2LMModel: per predicted token (1 - eps) * (-log p[y]) + eps * mean_v(-log p[v])
(eps = label_smooth), averaged over the completion tokens of the micro-batch. Validation loss is the plain
cross-entropy (the original evaluated without smoothing).
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import LoRAConfig
from ...models.outputs import ModelOutput
from ...models.released import ENABLE_QV

EOS = 50256


def nlg_lora(r: int, alpha: float, dropout: float) -> Optional[LoRAConfig]:
    """LoRA on q and v of c_attn, as the paper (None for r = 0: full fine-tuning)."""
    if r == 0:
        return None
    return LoRAConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=("c_attn",),
                      enable_lora=ENABLE_QV)


def with_eos(context: Sequence[int]) -> List[int]:
    """The conditioning tokens: the context followed by <|endoftext|> (once)."""
    context = list(context)
    return context if context[-1:] == [EOS] else context + [EOS]


def encode_example(context: Sequence[int], completion: Sequence[int], seq_len: int, joint_lm: bool = False) -> dict:
    """input_ids = (context + eos + completion)[:seq_len]; labels = the same ids with the conditioning
    tokens set to -100 (clm), so position t's logits are scored against labels[t + 1] on completion tokens."""
    query = with_eos(context)
    ids = (query + list(completion))[:seq_len]
    labels = list(ids) if joint_lm else ([-100] * len(query) + list(completion))[:seq_len]
    return {"input_ids": ids, "labels": labels}


def load_features(path: str, seq_len: int, joint_lm: bool = False) -> List[dict]:
    from .data import read_encoded

    records = read_encoded(path)
    if not records:
        raise ValueError(f"{path}: no examples")
    features = [encode_example(r["context"], r["completion"], seq_len, joint_lm) for r in records]
    empty = sum(1 for f in features if all(t == -100 for t in f["labels"][1:]))
    if empty:
        warnings.warn(f"{path}: {empty} of {len(features)} examples have no completion token within "
                      f"--seq_len {seq_len}; they add nothing to the loss", stacklevel=2)
    return features


def check_vocab(rows: Sequence[Sequence[int]], vocab_size: int, path: str) -> None:
    """Every id must index the model's embedding; the first one that does not is named with its line."""
    for line, ids in enumerate(rows, 1):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{path}:{line}: token id {bad[0]} is outside the model's vocabulary of {vocab_size}")


def collate(features: Sequence[dict]) -> Dict[str, torch.Tensor]:
    """Right-padded input_ids (B, T) (pad 0, as the original) and labels (B, T) (pad -100). No attention
    mask: attention is causal, so the padding after a row's last token never reaches it."""
    T = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros((len(features), T), dtype=torch.long)
    labels = torch.full((len(features), T), -100, dtype=torch.long)
    for b, f in enumerate(features):
        ids[b, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        labels[b, :len(f["labels"])] = torch.tensor(f["labels"])
    return {"input_ids": ids, "labels": labels}


# -- loss -------------------------------------------------------------------------------------------

class CompletionLM(nn.Module):
    """The training view of a GPT2LMHeadModel: the same modules under the same names (so checkpoints and
    adapters hold the LM's keys), and a loss on the labelled tokens with the original's label smoothing.

    forward(input_ids (B, T), labels (B, T)) -> ModelOutput(loss): logits are computed only at the N
    positions t whose target labels[t + 1] is not -100, so the (N, V) fp32 block is all the head costs.
    Smoothing applies in training mode; eval mode gives the plain cross-entropy (the validation loss).
    """

    def __init__(self, lm: nn.Module, label_smooth: float = 0.0):
        super().__init__()
        self.transformer, self.lm_head, self.config = lm.transformer, lm.lm_head, lm.config
        self.label_smooth = label_smooth
        self.loralib_config = getattr(lm, "loralib_config", None)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> ModelOutput:
        total, count = self.loss_sum(input_ids, labels, attention_mask)
        return ModelOutput(logits=None, loss=total / count.clamp(min=1))

    def loss_sum(self, input_ids, labels, attention_mask=None):
        """(sum of the per-token losses, number of scored tokens)."""
        h = self.transformer(input_ids, attention_mask).hidden_states[:, :-1]  # (B, T-1, C)
        targets = labels[:, 1:]
        scored = targets != -100
        logits = self.lm_head(h[scored]).float()  # (N, V)
        # PyTorch's label_smoothing is the original's formula: (1 - eps) nll + eps * mean over the vocabulary.
        eps = self.label_smooth if self.training else 0.0
        total = F.cross_entropy(logits, targets[scored], label_smoothing=eps, reduction="sum")
        return total, scored.sum()


@torch.no_grad()
def validation_loss(model: CompletionLM, features: Sequence[dict], batch_size: int) -> Dict[str, float]:
    """Mean cross-entropy per completion token over the set, and its perplexity."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(features), batch_size):
        batch = collate(features[i:i + batch_size])
        s, n = model.loss_sum(batch["input_ids"].to(device), batch["labels"].to(device))
        total, count = total + float(s), count + int(n)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
