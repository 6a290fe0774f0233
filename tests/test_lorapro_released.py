"""LoRA-Pro's released rules as options (issue 14, item 5): each one, on a tiny run, differs from the corrected
default and equals a by-hand computation of the released rule (mrflogs/LoRA-Pro: the DeepSpeed patch
stage_1_and_2.py at fe26027 for clipping and s = 2, peta/optim.py at 2d8f44a for the efficient weight decay)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import loralib
from loralib.optim import LoRAProAdamW, adjust_lora_gradients
from loralib.optim.lorapro import RELEASED_SCALING, lora_pairs

D = torch.float64
LR = 1e-2


def _model(use_rslora=False, head=False):
    """Two LoRA layers (r 8, alpha 16, so s = 2, or rsLoRA s = 16 / sqrt 8) with nonzero B, optionally a
    trained plain head."""
    torch.manual_seed(0)
    layers = [loralib.Linear(12, 16, r=8, lora_alpha=16, use_rslora=use_rslora), nn.Tanh(),
              loralib.Linear(16, 10, r=8, lora_alpha=16, use_rslora=use_rslora)]
    if head:
        layers += [nn.Tanh(), nn.Linear(10, 3)]
    model = nn.Sequential(*layers).to(D)
    loralib.mark_only_lora_as_trainable(model)
    if head:
        for p in model[4].parameters():
            p.requires_grad = True
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_(std=0.3)
    return model


def _batch(step, out):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 12, generator=gen, dtype=D), torch.randn(8, out, generator=gen, dtype=D)


def _backward(model, step, loss_scale=1.0):
    out = model[-1].out_features
    x, y = _batch(step, out)
    (loss_scale * F.mse_loss(model(x), y)).backward()


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _factors(model):
    return torch.cat([p.detach().flatten() for p in _trainable(model)])


# -- clipping ----------------------------------------------------------------------------------------

def test_released_clipping_scales_the_step_not_the_gradient():
    """Released: c = 1 / max(1, (N + 1e-6) / max_norm) (DeepSpeed's unscale_and_clip_grads, N the raw
    gradients' norm) multiplies the full variant's step; by hand that is the unclipped corrected optimizer at
    lr * c. Ours clips the raw gradients before Adam, which then mostly cancels the clip."""
    max_norm, scale = 1.0, 50.0  # a loss scaled up so that the raw gradients' norm is far above max_norm
    released, by_hand, ours = _model(head=True), _model(head=True), _model(head=True)
    opt_released = LoRAProAdamW(released, lr=LR, mode="full", released_clip_norm=max_norm)
    opt_by_hand = LoRAProAdamW(by_hand, lr=LR, mode="full")
    opt_ours = LoRAProAdamW(ours, lr=LR, mode="full")
    factors = []
    for step in range(3):
        for model in (released, by_hand, ours):
            model.zero_grad()
            _backward(model, step, scale)
        opt_released.step()
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in _trainable(by_hand)))
        c = 1.0 / max(1.0, (norm + 1e-6) / max_norm)
        factors.append(c)
        for group in opt_by_hand.param_groups:
            group["lr"] = LR * c
        opt_by_hand.step()
        torch.nn.utils.clip_grad_norm_(_trainable(ours), max_norm)  # the loop's clipping, then the step
        opt_ours.step()
        torch.testing.assert_close(_factors(released), _factors(by_hand), rtol=1e-9, atol=1e-11)
    assert max(factors) < 0.5  # the clip was active at every step
    moved_released = (_factors(released) - _factors(_model(head=True))).norm()
    moved_ours = (_factors(ours) - _factors(_model(head=True))).norm()
    assert moved_released < 0.6 * moved_ours  # the released step shrinks with the clip; ours does not


def test_released_clipping_inactive_below_the_threshold_equals_the_default():
    released, ours = _model(), _model()
    opt_released = LoRAProAdamW(released, lr=LR, mode="full", released_clip_norm=1e6)
    opt_ours = LoRAProAdamW(ours, lr=LR, mode="full")
    for step in range(2):
        for model, opt in ((released, opt_released), (ours, opt_ours)):
            model.zero_grad()
            _backward(model, step)
            opt.step()
    torch.testing.assert_close(_factors(released), _factors(ours), rtol=1e-12, atol=1e-14)


# -- scaling -----------------------------------------------------------------------------------------

def test_released_scaling_is_s_over_2_times_the_corrected_step():
    """With rsLoRA (s = 16 / sqrt 8) the released s = 2 leaves Adam's direction d unchanged (g~ only scales by
    s / 2) and maps it back through 1 / 2 instead of 1 / s: the released run equals the corrected one at
    lr * s / 2 (eps 0 makes Adam exactly scale-free). For LoRA (s = 2) nothing changes."""
    s = 16 / math.sqrt(8)
    released, by_hand, ours = _model(True), _model(True), _model(True)
    assert all(pair.scaling == pytest.approx(s) for pair in lora_pairs(ours))
    opt_released = LoRAProAdamW(released, lr=LR, eps=0.0, mode="full", released_scaling=True)
    opt_by_hand = LoRAProAdamW(by_hand, lr=LR * s / RELEASED_SCALING, eps=0.0, mode="full")
    opt_ours = LoRAProAdamW(ours, lr=LR, eps=0.0, mode="full")
    for step in range(3):
        for model, opt in ((released, opt_released), (by_hand, opt_by_hand), (ours, opt_ours)):
            model.zero_grad()
            _backward(model, step)
            opt.step()
        torch.testing.assert_close(_factors(released), _factors(by_hand), rtol=1e-9, atol=1e-11)
    start = _factors(_model(True))
    ratio = (_factors(released) - start).norm() / (_factors(ours) - start).norm()
    assert ratio == pytest.approx(s / 2, rel=0.05)  # ~2.83x the corrected step

    plain, plain_released = _model(), _model()
    for model, kw in ((plain, {}), (plain_released, {"released_scaling": True})):
        opt = LoRAProAdamW(model, lr=LR, mode="full", **kw)
        _backward(model, 0)
        opt.step()
    torch.testing.assert_close(_factors(plain), _factors(plain_released), rtol=0, atol=0)


# -- weight decay ------------------------------------------------------------------------------------

def test_released_weight_decay_decays_each_factor():
    """Released efficient mode: A <- (1 - lr wd) A, B <- (1 - lr wd) B, then Adam on the adjusted gradients;
    by hand: adjust_lora_gradients + torch.optim.AdamW (whose decoupled decay is exactly that). Ours decays W:
    A and B by sqrt(1 - lr wd), W0 by (1 - lr wd)."""
    wd = 0.5
    released, by_hand, ours = _model(), _model(), _model()
    opt_released = LoRAProAdamW(released, lr=LR, weight_decay=wd, mode="efficient", released_weight_decay=True)
    opt_by_hand = torch.optim.AdamW(_trainable(by_hand), lr=LR, weight_decay=wd)
    opt_ours = LoRAProAdamW(ours, lr=LR, weight_decay=wd, mode="efficient")
    for step in range(3):
        for model in (released, by_hand, ours):
            model.zero_grad()
            _backward(model, step)
        opt_released.step()
        adjust_lora_gradients(by_hand)
        opt_by_hand.step()
        opt_ours.step()
        torch.testing.assert_close(_factors(released), _factors(by_hand), rtol=1e-9, atol=1e-11)
    assert (_factors(released) - _factors(ours)).abs().max() > 1e-4
    torch.testing.assert_close(released[0].weight, _model()[0].weight, rtol=0, atol=0)  # W0 untouched
    assert not torch.equal(ours[0].weight, _model()[0].weight)  # ours decays W0 (decay_base_weight=True)


def test_released_options_refused_in_the_other_mode():
    model = _model()
    with pytest.raises(ValueError, match="released_clip_norm"):
        LoRAProAdamW(model, mode="efficient", released_clip_norm=1.0)
    with pytest.raises(ValueError, match="released_scaling"):
        LoRAProAdamW(model, mode="efficient", released_scaling=True)
    with pytest.raises(ValueError, match="released_weight_decay"):
        LoRAProAdamW(model, mode="full", released_weight_decay=True)
    with pytest.raises(ValueError, match="released_clip_norm must be >= 0"):
        LoRAProAdamW(model, mode="full", released_clip_norm=-1.0)


# -- the flags of lorapro/train.py -------------------------------------------------------------------

def _args(*argv):
    from lorapro import flags

    return flags.build_parser("train.py").parse_args(["--output_dir", "x", *argv])


def test_train_flags_reach_the_optimizer_and_are_checked():
    from loralib.methods import build_optimizer
    from lorapro import flags

    args = _args("--lora", "rslora-pro", "--lorapro_released_clipping", "--lorapro_released_scaling",
                 "--max_grad_norm", "0.5")
    method = flags.method_of(args, "llama")
    opt = build_optimizer(_model(True), method, flags.optimizer_settings(args))
    assert (opt.released_clip_norm, opt.released_scaling, opt.released_weight_decay) == (0.5, True, False)
    assert flags.optimizer_settings(args).lorapro_released() == {"clipping": True, "weight_decay": False, "scaling": True}
    args = _args("--lora", "lora-pro", "--lorapro_mode", "efficient", "--lorapro_released_weight_decay",
                 "--weight_decay", "0.1")
    assert build_optimizer(_model(), flags.method_of(args, "llama"), flags.optimizer_settings(args)).released_weight_decay
    default = _args("--lora", "lora-pro")
    opt = build_optimizer(_model(), flags.method_of(default, "llama"), flags.optimizer_settings(default))
    assert (opt.released_clip_norm, opt.released_scaling, opt.released_weight_decay) == (0.0, False, False)
    for argv, flag in ((("--lora", "lora", "--lorapro_released_clipping"), "lorapro_released_clipping"),
                       (("--lora", "lora-pro", "--lorapro_mode", "efficient", "--lorapro_released_scaling"),
                        "lorapro_released_scaling"),
                       (("--lora", "lora-pro", "--lorapro_released_weight_decay"), "lorapro_released_weight_decay")):
        with pytest.raises(ValueError, match=flag):
            flags.method_of(_args(*argv), "llama")


def test_released_clip_factor_and_deepspeed_wiring():
    """The factor is DeepSpeed's; under DeepSpeed the full variant's callback gets both released rules and the
    engine's own clipping is off (the callback applies the factor to the directions it writes)."""
    from loralib.optim.deepspeed_lorapro import lorapro_under_deepspeed
    from loralib.optim.lorapro import released_clip_factor
    from loralib.train import TrainConfig

    assert released_clip_factor(9.0, 1.0) == 1.0 / max(1.0, (9.0 + 1e-6) / 1.0)
    assert released_clip_factor(0.5, 1.0) == 1.0
    config = TrainConfig(output_dir="x", max_steps=1, deepspeed_config={"zero_optimization": {"stage": 2}},
                         max_grad_norm=1.0)
    config, _factory, callbacks = lorapro_under_deepspeed(config, "full", released_clipping=True,
                                                          released_scaling=True)
    assert config.max_grad_norm == 0.0
    assert callbacks[0].released_clipping and callbacks[0].released_scaling and callbacks[0].max_grad_norm == 1.0


def _deepspeed_worker(rank, world, port, out):
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist

    # skip the JIT build of DeepSpeed's shared-memory all-reduce (as tests/test_lorapro_distributed.py)
    deepspeed.ops.__compatible_ops__ = dict(deepspeed.ops.__compatible_ops__, deepspeed_shm_comm=False)
    deepspeed.init_distributed(dist_backend="gloo")
    from loralib.optim.deepspeed_lorapro import ZeROLoRAProFull, sgd_for_full_mode

    model = _model(True, head=True).float()
    config = {"train_micro_batch_size_per_gpu": 8 // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=sgd_for_full_mode(model, lr=LR), config=config)
    full = ZeROLoRAProFull(max_grad_norm=1.0, released_clipping=True, released_scaling=True)
    for step in range(3):
        x, y = _batch(step, 3)
        x, y = x.float().chunk(world)[rank], y.float().chunk(world)[rank]
        engine.backward(50.0 * F.mse_loss(engine(x), y))
        full.adjust(engine)
        engine.step()
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_deepspeed_full_released_rules_equal_lorapro_adamw(tmp_path):
    """ZeRO-2 (1 process, DeepSpeed's CPU accelerator) with ZeROLoRAProFull's released clipping and scaling ==
    LoRAProAdamW with the same two options."""
    pytest.importorskip("deepspeed")
    import sys
    from pathlib import Path

    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _torchrun import free_port

    out = str(tmp_path / "ds.pt")
    mp.spawn(_deepspeed_worker, args=(1, free_port(), out), nprocs=1, join=True)
    got = torch.load(out)
    model = _model(True, head=True).float()
    opt = LoRAProAdamW(model, lr=LR, mode="full", released_clip_norm=1.0, released_scaling=True)
    for step in range(3):
        x, y = _batch(step, 3)
        opt.zero_grad()
        (50.0 * F.mse_loss(model(x.float()), y.float())).backward()
        opt.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[name], p.detach(), rtol=1e-5, atol=2e-6)


def test_released_clipping_through_lorapro_train(tmp_path):
    """lorapro/train.py --lorapro_released_clipping on a tiny Llama: the loop leaves the gradients alone and the
    run equals direct LoRAProAdamW(released_clip_norm=--max_grad_norm) steps; without the flag (the loop clips
    the raw gradients) the adapter differs; run_config.json records the rules."""
    import json
    from pathlib import Path

    from loralib.tasks.instruct import InstructCollator, run
    from loralib.train.run import seed_everything
    from lorapro import flags
    from lorapro.smoke import build_smoke_assets

    assets = build_smoke_assets(tmp_path / "smoke")
    # One step, from B = 0 (well conditioned; later steps of a tiny fp32 run amplify rounding, lorapro/README.md
    # "Numerics"); eps 1e-3: Adam's first direction is ~ sign(g~), which rounding could flip where g~ ~ 0.
    lr, clip, steps, eps = 1e-2, 0.05, 1, 1e-3

    def train(out, *extra):
        args = flags.train_spec([
            "--model_name_or_path", assets["model"], "--dataset", "metamath", "--data_path", assets["metamath.jsonl"],
            "--output_dir", str(out), "--n_train", "4", "--n_eval", "0", "--global_batch_size", "4",
            "--max_steps", str(steps), "--lr", str(lr), "--lr_scheduler_type", "constant", "--warmup_ratio", "0",
            "--max_grad_norm", str(clip), "--adam_epsilon", str(eps), "--lora", "lora-pro", "--no-bf16",
            "--disable_tqdm", *extra])
        p = run.prepare(args)
        run.execute(p)
        return p, {n: t.detach().clone() for n, t in p.model.named_parameters() if "lora_" in n}

    p, released = train(tmp_path / "released", "--lorapro_released_clipping")
    _, ours = train(tmp_path / "ours")
    config = json.loads((tmp_path / "released" / "run_config.json").read_text())
    assert config["lorapro_released"] == {"clipping": True, "weight_decay": False, "scaling": False}

    seed_everything(0)
    model = run.load_model(Path(assets["model"]), p.method.lora, "fp32").train()
    run.mark_trainable(model, p.method)
    opt = LoRAProAdamW(model, lr=lr, eps=eps, mode="full", released_clip_norm=clip)
    collate = InstructCollator(run.pad_id(p.tokenizer))
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        for example in p.train_examples:  # the loop's gradient: the mean over micro-batches of one example
            (model(**collate([example])).loss / len(p.train_examples)).backward()
        assert opt._released_clip_factor() < 1.0  # the clip is active
        opt.step()
    for name, value in model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(released[name], value.detach(), atol=2e-6, rtol=1e-4)
    assert max((released[n] - ours[n]).abs().max().item() for n in ours) > 1e-4
