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
process. The "full" variant (m x n Adam moments, which are no parameter state ZeRO could partition) is
`ZeROLoRAProFull` below: the moments sharded by pair over the ranks, DeepSpeed running plain SGD on the
directions it writes.

Weight decay here is the ZeRO optimizer's (decoupled on each factor, as AdamW), not LoRA-Pro's decay of
W; the paper's runs used weight decay 0. DeepSpeed clips gradients at norm 1.0 unless the config sets
`gradient_clipping`, and the clipping acts on the adjusted gradients, whose norm is not LoRA's: set it
explicitly (0.0 turns it off).
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn as nn

from .lorapro import (RELEASED_SCALING, LoRAPair, full_mode_direction, lora_pairs, lorapro_gradients,
                      released_clip_factor, update_adam_moments)


def _model_of(engine_or_model) -> nn.Module:
    return engine_or_model.module if hasattr(engine_or_model, "module") else engine_or_model


def _whole(p: torch.Tensor) -> torch.Tensor:
    """A factor's whole value from DeepSpeed's fp32 master copy (gathered from the ranks' partitions; under
    bf16 more exact than the module's bf16 copy, and under ZeRO-3 the only whole copy), else the parameter."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(p)
    return p.detach() if value is None else value


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


# -- the full variant, its state sharded by pair ------------------------------------------------------

class ZeROLoRAProFull:
    """LoRAProAdamW(mode="full") under DeepSpeed ZeRO-1/2/3, its m x n fp32 Adam moments sharded by pair.

    DeepSpeed must run plain SGD (`sgd_for_full_mode(model, lr)`: momentum 0, no weight decay; the
    loop's schedule sets its lr) and no gradient clipping; `adjust(engine)` runs between engine.backward()
    and engine.step() on accumulation boundaries (the training loop's on_before_optimizer_step hook calls
    it). For each LoRA pair, in module order, every rank reads the reduced gradients and the fp32 factors
    (collectives); the pair's owner updates its moments of the equivalent gradient g~ and maps Adam's
    direction d back to (d_A, d_B) (loralib.optim.lorapro.full_mode_direction), broadcasts them, and every
    rank writes them as the pair's gradients; SGD then moves A by -lr d_A and B by -lr d_B, which is
    LoRAProAdamW's full step. Other trainable parameters (a classifier head) get Adam's direction the same
    way (AdamW without decay). `max_grad_norm` clips the raw gradients first, as the loop clips them before
    LoRAProAdamW.step() under DDP.

    Memory: a pair's moments live on its owner only. Units (pairs, other parameters) are dealt largest
    first, each to the rank holding the fewest state elements so far, so each rank keeps about 1/world of
    the full variant's state (the released code kept it wherever ZeRO's flat partitions put A and B, and
    paired A with B by position there). state_dict() / load_state_dict(): this rank's moments, which the
    loop writes to each checkpoint per rank. Weight decay is not supported (the paper's runs use 0).

    released_clipping: the released patch's rule instead (loralib.optim.lorapro's module docstring): the
    factor min(1, max_grad_norm / (N + 1e-6)) of the raw gradients' norm N scales the directions, not the
    gradients. released_scaling: s = 2 in the LoRA-Pro formulas (the patch's constant), not the layer's.
    """

    def __init__(self, betas=(0.9, 0.999), eps: float = 1e-8, max_grad_norm: float = 0.0,
                 released_clipping: bool = False, released_scaling: bool = False):
        self.betas, self.eps, self.max_grad_norm = tuple(betas), float(eps), float(max_grad_norm or 0.0)
        self.released_clipping, self.released_scaling = bool(released_clipping), bool(released_scaling)
        self.state: dict = {}  # unit name -> {"step", "exp_avg", "exp_avg_sq"}, the units this rank owns
        self._units = None  # [(name, pair or parameter, owner rank)], found and dealt at the first step

    # the training loop's hooks
    def on_before_optimizer_step(self, state, engine, optimizer) -> None:
        if hasattr(engine, "is_gradient_accumulation_boundary"):
            self.adjust(engine)

    def state_dict(self) -> dict:
        return {"state": self.state, "betas": list(self.betas), "eps": self.eps}

    def load_state_dict(self, saved: dict) -> None:
        self.state = {name: dict(entry) for name, entry in saved["state"].items()}

    @staticmethod
    def _deal(model: nn.Module, world: int):
        """[(name, pair or parameter, owner rank)] in module order: the LoRA pairs, then the other trainable
        parameters, dealt to ranks by the size of their state."""
        pairs = lora_pairs(model)
        in_pairs = {id(p) for pair in pairs for p in (pair.A, pair.B)}
        units = [(pair.name, pair, _pair_state_elements(pair)) for pair in pairs]
        units += [(name, p, _numel(p)) for name, p in model.named_parameters()
                  if p.requires_grad and id(p) not in in_pairs]
        owners = deal_by_size([size for _, _, size in units], world)
        return [(name, unit, owner) for (name, unit, _), owner in zip(units, owners)]

    @torch.no_grad()
    def adjust(self, engine) -> int:
        """Write Adam's full-variant directions as the gradients of every unit; returns the number of pairs."""
        import torch.distributed as dist
        from deepspeed.utils import safe_get_full_grad

        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if self._units is None:
            self._units = self._deal(_model_of(engine), world)
        grads = {}
        for name, unit, owner in self._units:
            params = (unit.A, unit.B) if isinstance(unit, LoRAPair) else (unit,)
            found = [safe_get_full_grad(p) for p in params]
            if any(g is None for g in found):
                raise RuntimeError(f"no gradient for {name!r}: call adjust() right after engine.backward() on an "
                                   "accumulation boundary, before engine.step()")
            grads[name] = [g.float() for g in found]
        direction_scale = 1.0
        if self.max_grad_norm > 0:  # the raw gradients' global norm, as torch.nn.utils.clip_grad_norm_
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for gs in grads.values()
                                                         for g in gs]))
            if self.released_clipping:  # the released patch: the factor scales the directions
                direction_scale = released_clip_factor(float(norm), self.max_grad_norm)
            else:
                coefficient = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
                grads = {name: [g * coefficient for g in gs] for name, gs in grads.items()}
        count = 0
        for name, unit, owner in self._units:
            mine = owner == rank
            if isinstance(unit, LoRAPair):
                A, B = unit.stacked(_whole(unit.A), _whole(unit.B))  # collectives: every rank
                if mine:
                    scaling = RELEASED_SCALING if self.released_scaling else unit.scaling
                    dA, dB = full_mode_direction(A, B, *unit.stacked(*grads[name]), scaling,
                                                 self.state.setdefault(name, {}), self.betas, self.eps)
                    directions = [dA.reshape(grads[name][0].shape), dB.reshape(grads[name][1].shape)]
                else:
                    directions = [torch.empty_like(g) for g in grads[name]]
                params = (unit.A, unit.B)
                count += 1
            else:
                directions = [_adam_direction(grads[name][0], self.state.setdefault(name, {}), self.betas, self.eps)
                              if mine else torch.empty_like(grads[name][0])]
                params = (unit,)
            for p, d in zip(params, directions):
                d = (d.float() * direction_scale).contiguous()
                if world > 1:
                    dist.broadcast(d, src=owner)
                _set_whole_grad(p, d)
        return count


def deal_by_size(sizes: Sequence[int], world: int) -> List[int]:
    """The owner rank of each unit: largest first, each to the rank holding the fewest elements so far
    (ties: the lower index, the lower rank), so every rank computes the same split."""
    load, owners = [0] * world, [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += sizes[index]
    return owners


def _shape(p: torch.Tensor) -> torch.Size:
    return torch.Size(getattr(p, "ds_shape", p.shape))  # the whole shape of a ZeRO-3-partitioned parameter


def _numel(p: torch.Tensor) -> int:
    return int(_shape(p).numel())


def _pair_state_elements(pair: LoRAPair) -> int:
    """Elements of one moment of the pair's equivalent gradient, chunks x m x n = rows of B x columns of A."""
    return _shape(pair.B)[0] * _shape(pair.A)[-1]


def _adam_direction(grad: torch.Tensor, state: dict, betas, eps: float) -> torch.Tensor:
    """Adam's bias-corrected direction m / (sqrt(v) + eps) for one parameter, fp32 moments in `state`."""
    step, m, v = update_adam_moments(grad, state, betas)
    return m / (v.sqrt() / math.sqrt(1 - betas[1] ** step) + eps) / (1 - betas[0] ** step)


def sgd_for_full_mode(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer DeepSpeed runs under ZeROLoRAProFull: SGD on every trainable parameter, momentum 0,
    no weight decay (the directions it applies are Adam's already)."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.0,
                           weight_decay=0.0)


# -- for the training loop ------------------------------------------------------------------------------

class ZeROLoRAProEfficient:
    """The loop callback of the efficient variant: adjust the reduced gradients right before engine.step()
    (the loop calls on_before_optimizer_step only on accumulation boundaries)."""

    def on_before_optimizer_step(self, state, engine, optimizer) -> None:
        if hasattr(engine, "is_gradient_accumulation_boundary"):
            adjust_zero_gradients(engine)


def lorapro_under_deepspeed(config, mode: str, betas=(0.9, 0.999), eps: float = 1e-8,
                            released_clipping: bool = False, released_scaling: bool = False):
    """What loralib.train.train needs to run LoRA-Pro under DeepSpeed: (config, optimizer_factory,
    callbacks) for a TrainConfig whose deepspeed_config is set.

    efficient: DeepSpeed's partitioned AdamW (the loop's default optimizer) on gradients adjusted by
        ZeROLoRAProEfficient; the config is unchanged (DeepSpeed clips the adjusted gradients).
    full: DeepSpeed runs sgd_for_full_mode on the directions ZeROLoRAProFull writes, which clips the raw
        gradients at config.max_grad_norm itself, so DeepSpeed's clipping is turned off; ZeRO is told to
        accept SGD (zero_allow_untested_optimizer). A weight decay > 0 is a ValueError.
    released_clipping / released_scaling (full only): ZeROLoRAProFull's released rules. The released
    efficient weight decay (A and B each by 1 - lr wd) is what DeepSpeed's AdamW does here anyway.
    """
    import dataclasses

    from ..train.distributed import read_deepspeed_config

    if mode == "efficient":
        return config, None, [ZeROLoRAProEfficient()]
    if mode != "full":
        raise ValueError(f"LoRA-Pro mode must be 'full' or 'efficient', got {mode!r}")
    if config.weight_decay:
        raise ValueError(f"weight_decay={config.weight_decay} with LoRA-Pro's full variant under DeepSpeed is not "
                         "supported (DeepSpeed runs plain SGD on its directions): use 0, the paper's setting, the "
                         "efficient variant, or torchrun")
    ds = dict(read_deepspeed_config(config.deepspeed_config), zero_allow_untested_optimizer=True)
    callback = ZeROLoRAProFull(betas, eps, max_grad_norm=config.max_grad_norm,  # the raw gradients' norm
                               released_clipping=released_clipping, released_scaling=released_scaling)
    config = dataclasses.replace(config, max_grad_norm=0.0, deepspeed_config=ds)
    return config, (lambda model: sgd_for_full_mode(model, config.lr)), [callback]
