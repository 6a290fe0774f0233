"""LoRA-Pro under DeepSpeed ZeRO-1/2, with an unpatched DeepSpeed and any ZeRO optimizer.

Why not hand `LoRAProAdamW` to `deepspeed.initialize` as the client optimizer: ZeRO-1/2 flattens the
client optimizer's parameter groups into one fp32 partition per rank and steps the optimizer on that flat
tensor, so an optimizer that must see whole A and B matrices finds neither (the released code paired A
and B by position inside these partitions, which is wrong whenever a partition boundary splits a pair,
e.g. on 3, 5, 6 or 7 GPUs). `LoRAProAdamW` detects this and raises.

What works instead: LoRA-Pro's "efficient" variant is a linear map of the gradients, (g_A, g_B) ->
(g_A', g_B'), that depends only on A and B, followed by ordinary Adam on A and B. So:

    loss = engine(batch); engine.backward(loss)
    lorapro_zero_step(engine)        # = adjust_zero_gradients(engine) at a boundary, then engine.step()

`adjust_zero_gradients` reads each LoRA factor's full, already-reduced gradient with DeepSpeed's public
`deepspeed.utils.safe_get_full_grad`, computes LoRA-Pro's adjustment by module (every rank holds the whole
A and B in ZeRO-1/2, and computes the same thing), and writes back with `safe_set_full_grad`, which stores
only the fragment this rank owns. DeepSpeed's own optimizer (its ZeRO-partitioned, fp32 Adam/AdamW state,
fp32 master weights under bf16) then takes the step. Pairing never depends on how parameters fall into
partitions, so any number of ranks works.

Stage: ZeRO-2 is the one to use (stage 1 works the same way and is tested too): it partitions gradients
as well as optimizer states, and LoRA-Pro only needs the small LoRA gradients gathered: two all-reduces
per pair, of r n and m r values. Tested on DeepSpeed's CPU accelerator (gloo) in fp32 with 1 and 2
processes, and run in bf16 (fp32 gradient buffers and master weights) in 1 process. ZeRO-3 is refused:
it partitions A and B themselves, and this path is untested there. The "full" variant is not available
here: its m x n Adam moments are not parameter states, so ZeRO cannot partition them; use
`LoRAProAdamW(mode="full")` under DDP (torchrun) instead.

Weight decay here is the ZeRO optimizer's (decoupled on each factor, as AdamW), not LoRA-Pro's decay of
W; the paper's runs used weight decay 0. DeepSpeed clips gradients at norm 1.0 unless the config sets
`gradient_clipping`, and the clipping acts on the adjusted gradients, whose norm is not LoRA's: set it
explicitly (0.0 turns it off).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .lorapro import lora_pairs, lorapro_gradients


def _model_of(engine_or_model) -> nn.Module:
    return engine_or_model.module if hasattr(engine_or_model, "module") else engine_or_model


def _check_stage(engine) -> None:
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
    if stage is not None and stage not in (0, 1, 2):
        raise ValueError(f"LoRA-Pro's DeepSpeed path supports ZeRO stages 1 and 2 (and 0); this engine runs "
                         f"stage {stage}, which partitions A and B themselves")


@torch.no_grad()
def adjust_zero_gradients(engine) -> int:
    """Replace the (reduced, ZeRO-partitioned) gradients of every LoRA pair by LoRA-Pro's (g_A', g_B').

    Call between `engine.backward(loss)` and `engine.step()` on a gradient-accumulation boundary, on every
    rank (it runs collectives in module order). Returns the number of pairs adjusted.
    """
    from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

    _check_stage(engine)
    count = 0
    for pair in lora_pairs(_model_of(engine)):
        gA, gB = safe_get_full_grad(pair.A), safe_get_full_grad(pair.B)
        if gA is None or gB is None:
            raise RuntimeError(f"no gradient for LoRA pair {pair.name!r}: call adjust_zero_gradients right "
                               "after engine.backward() on an accumulation boundary, before engine.step()")
        A, B = pair.stacked(pair.A.detach(), pair.B.detach())
        new_gA, new_gB = lorapro_gradients(A, B, *pair.stacked(gA, gB), pair.scaling)
        safe_set_full_grad(pair.A, new_gA.reshape(gA.shape).to(gA.dtype))
        safe_set_full_grad(pair.B, new_gB.reshape(gB.shape).to(gB.dtype))
        count += 1
    return count


def lorapro_zero_step(engine) -> None:
    """`engine.step()` with LoRA-Pro's gradient adjustment first when this micro-step is a boundary."""
    if engine.is_gradient_accumulation_boundary():
        adjust_zero_gradients(engine)
    engine.step()
