"""The language-model head and its next-token loss, shared by the decoder-only models (GPT-2, Llama).

    logits = h W^T                      h (B, T, C) the last hidden states, W (V, C) the head weight
    loss   = mean over t, labels[t + 1] != -100, of -log softmax(logits[t])[labels[t + 1]]

`head_logits_and_loss` is what a model's forward calls. While training, the loss and its gradient come
from `lm_head_with_loss`, which never keeps the fp32 log-probabilities (B T, V) nor a gradient as large;
otherwise (evaluation, generation, a head that is not a plain bias-free nn.Linear) the head runs as a
module and `causal_lm_loss` scores its logits. Both give the same loss and the same gradients.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def head_logits_and_loss(head: nn.Module, h: torch.Tensor, labels: Optional[torch.Tensor],
                         logits_to_keep: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(logits, loss) of the LM head on the hidden states h (B, T, C).

    logits (B, T, V), or (B, logits_to_keep, V) for the last positions only (generation needs just the
    last one); loss = `causal_lm_loss` with labels (B, T), else None. When the loss will be
    differentiated and the head is a plain bias-free nn.Linear, its gradient is formed in the forward
    already, chunk by chunk (`lm_head_with_loss`); the logits still carry gradients either way.
    """
    if (labels is not None and torch.is_grad_enabled() and type(head) is nn.Linear and head.bias is None
            and (h.requires_grad or head.weight.requires_grad) and fused_head_applies(head.weight)):
        return lm_head_with_loss(h, head.weight, labels)
    logits = head(h[:, -logits_to_keep:] if logits_to_keep else h)
    return logits, (causal_lm_loss(logits, labels) if labels is not None else None)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits[:, t] against labels[:, t + 1], skipping -100. The labels are shifted
    (a -100 appended) rather than the logits, so the (B, T, V) logits are not copied."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=-100)


def fused_head_applies(weight: torch.Tensor) -> bool:
    """Whether lm_head_with_loss may take this head weight. Not a trained weight that DeepSpeed ZeRO-3 has
    partitioned (it carries ds_id): that one is whole only while its own module runs, and the fused path
    hands autograd its gradient outside the module, where the partition it would be added to is empty."""
    return not (weight.requires_grad and hasattr(weight, "ds_id"))


def lm_head_with_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      chunk_rows: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, V), loss) as `causal_lm_loss(h @ weight^T, labels)`, for training.

    The plain path keeps fp32 log-probabilities (B T, V) for backward and makes a gradient just as large
    in it; here the loss's gradient with respect to h (and weight, when it trains) is computed during the
    forward, `chunk_rows` rows at a time, so only the logits themselves stay alive: for GPT-2 at batch 8 x
    256 that is 400 MiB instead of 1.2 GiB. Gradients reaching `logits` from another loss still flow.
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    loss, logits = _LMHeadLoss.apply(h.flatten(0, 1), weight, shifted.flatten(), chunk_rows)
    return logits.view(*h.shape[:-1], -1), loss


class _LMHeadLoss(torch.autograd.Function):
    """loss = mean over targets != -100 of -log softmax(z_n)[target_n], z = h W^T; returns (loss, z).

    d loss / d z_n = (softmax(z_n) - onehot(target_n)) / n_valid, so the forward folds each row chunk's
    gradient into dh = dz W and dW = dz^T h and keeps those; backward scales them by the incoming
    gradient. Shapes: h (N, C), weight (V, C), targets (N,).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        ctx.set_materialize_grads(False)
        logits = h @ weight.t()  # (N, V)
        valid = targets != -100
        n_valid = valid.sum()
        row_scale = valid / n_valid.clamp(min=1)  # a row's share of the mean; 0 for ignored rows
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk_rows):
            rows = slice(s, s + chunk_rows)
            log_p = F.log_softmax(logits[rows].float(), dim=-1)  # (n, V), a new fp32 tensor
            target = targets[rows].clamp(min=0).unsqueeze(1)
            total -= (log_p.gather(1, target).squeeze(1) * valid[rows]).sum()
            if need_h or need_w:
                dz = log_p.exp_()  # softmax, in place
                dz.scatter_add_(1, target, -torch.ones_like(target, dtype=dz.dtype))
                dz = dz.mul_(row_scale[rows].unsqueeze(1)).to(weight.dtype)
                if need_h:
                    grad_h[rows] = dz @ weight
                if need_w:
                    grad_w.addmm_(dz.t().float(), h[rows].float())
        ctx.save_for_backward(h, weight, grad_h, grad_w)
        return total / n_valid, logits

    @staticmethod
    def backward(ctx, grad_loss, grad_logits):
        h, weight, grad_h, grad_w = ctx.saved_tensors
        dh = dw = None
        if grad_loss is not None:
            dh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
            dw = (grad_w * grad_loss).to(weight.dtype) if grad_w is not None else None
        if grad_logits is not None:  # the logits were used by another loss as well
            if ctx.needs_input_grad[0]:
                extra = grad_logits @ weight
                dh = extra if dh is None else dh + extra
            if ctx.needs_input_grad[1]:
                extra = grad_logits.t() @ h
                dw = extra if dw is None else dw + extra
        return dh, dw, None, None
