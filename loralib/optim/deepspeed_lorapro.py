"""LoRA-Pro under DeepSpeed ZeRO-1/2/3, with an unpatched DeepSpeed and any ZeRO optimizer.

Why not hand `LoRAProAdamW` to `deepspeed.initialize` as the client optimizer: ZeRO flattens the
client optimizer's parameter groups into one fp32 partition per rank and steps the optimizer on that flat
tensor, so an optimizer that must see whole A and B matrices finds neither (the released code paired A
and B by position inside these partitions, which is wrong whenever a partition boundary splits a pair,
e.g. on 3, 5, 6 or 7 GPUs). `LoRAProAdamW` detects this and raises.

What works instead: LoRA-Pro's "efficient" variant is a linear map of the gradients, (g_A, g_B) ->
(g_A', g_B'), that depends only on A and B, followed by ordinary Adam on A and B. So:

    loss = engine(batch); engine.backward(loss)
    lorapro_zero_step(engine)        # = adjust_zero_gradients(engine) at a boundary, then engine.step()

`adjust_zero_gradients` reads each LoRA factor's full, already-reduced gradient with DeepSpeed's public
`deepspeed.utils.safe_get_full_grad`, computes LoRA-Pro's adjustment by module (every rank computes the
same thing), and writes back with `safe_set_full_grad`, which stores only the fragment this rank owns.
The factors' values: ZeRO-1/2 keep A and B whole on every rank; ZeRO-3 partitions them too, and their
whole fp32 master copies are gathered with `safe_get_full_fp32_param`. DeepSpeed's own optimizer (its
ZeRO-partitioned, fp32 Adam/AdamW state, fp32 master weights under bf16) then takes the step. Pairing
never depends on how parameters fall into partitions, so any number of ranks works.

Stage: ZeRO-2 is the one to use for LoRA (stage 1 works the same way): it partitions gradients as well
as optimizer states, and LoRA-Pro only needs the small LoRA gradients gathered: two all-reduces per pair,
of r n and m r values. ZeRO-3 (needed when the frozen model itself does not fit on one device) adds two
gathers of the factors per pair and step. Tested on DeepSpeed's CPU accelerator (gloo) in fp32 with 1 and
2 processes for stages 1, 2 and 3, and run in bf16 (fp32 gradient buffers and master weights) in 1
process. The "full" variant is not available here: its m x n Adam moments are not parameter states, so
ZeRO cannot partition them; use `LoRAProAdamW(mode="full")` under DDP (torchrun) instead.

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


def _whole(p: torch.Tensor) -> torch.Tensor:
    """A factor's whole value: the fp32 master copy of a ZeRO-3 partitioned parameter (gathered), else
    the parameter itself."""
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p)
    return p.detach()


def _set_whole_grad(p: torch.Tensor, value: torch.Tensor) -> None:
    """safe_set_full_grad(p, value), padded under ZeRO-3: DeepSpeed's stage-3 setter (0.19) cuts this
    rank's slice out of value.flatten() at the padded partition size, which runs past the end when
    p.numel() is not a multiple of the world size, so it is handed the zero-padded vector."""
    from deepspeed.utils import safe_set_full_grad

    if hasattr(p, "ds_id"):
        import torch.distributed as dist

        padded = p.ds_tensor.ds_numel * dist.get_world_size(group=p.ds_process_group)
        value = torch.nn.functional.pad(value.flatten(), (0, padded - value.numel()))
    safe_set_full_grad(p, value)


@torch.no_grad()
def adjust_zero_gradients(engine) -> int:
    """Replace the (reduced, ZeRO-partitioned) gradients of every LoRA pair by LoRA-Pro's (g_A', g_B').

    Call between `engine.backward(loss)` and `engine.step()` on a gradient-accumulation boundary, on every
    rank (it runs collectives in module order). Returns the number of pairs adjusted.
    """
    from deepspeed.utils import safe_get_full_grad

    count = 0
    for pair in lora_pairs(_model_of(engine)):
        gA, gB = safe_get_full_grad(pair.A), safe_get_full_grad(pair.B)
        if gA is None or gB is None:
            raise RuntimeError(f"no gradient for LoRA pair {pair.name!r}: call adjust_zero_gradients right "
                               "after engine.backward() on an accumulation boundary, before engine.step()")
        A, B = pair.stacked(_whole(pair.A), _whole(pair.B))
        new_gA, new_gB = lorapro_gradients(A, B, *pair.stacked(gA, gB), pair.scaling)
        _set_whole_grad(pair.A, new_gA.reshape(gA.shape).to(gA.dtype))
        _set_whole_grad(pair.B, new_gB.reshape(gB.shape).to(gB.dtype))
        count += 1
    return count


def lorapro_zero_step(engine) -> None:
    """`engine.step()` with LoRA-Pro's gradient adjustment first when this micro-step is a boundary."""
    if engine.is_gradient_accumulation_boundary():
        adjust_zero_gradients(engine)
    engine.step()
