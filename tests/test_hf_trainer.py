"""loralib.hf: LoRA+, LoRA-Pro and the rank allocator inside transformers.Trainer, on PEFT models and on
models built with loralib.inject, held to the same steps written out by hand on the loralib twin."""
import copy
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from _hf_trainer_fixtures import (adalora_model, allocator_for, assert_same, lora_state,  # noqa: E402
                                  peft_and_loralib, reference_run, tiny_llama, token_data, trainer_args)

import loralib  # noqa: E402
from loralib.optim import LoRAProAdamW, create_loraplus_optimizer  # noqa: E402
from loralib.optim.lorapro import lora_pairs  # noqa: E402


def test_import_loralib_does_not_import_transformers():
    code = "import sys, loralib, loralib.optim; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _models(which):
    """(model the Trainer runs, loralib twin the reference runs) with equal weights."""
    pm, twin = peft_and_loralib()
    return (pm, twin) if which == "peft" else (twin, copy.deepcopy(twin))


@pytest.mark.parametrize("which", ["peft", "loralib"])
def test_loraplus_trainer_equals_reference(tmp_path, which):
    from loralib.hf import LoraPlusTrainer, LoraPlusTrainingArguments

    model, twin = _models(which)
    data = token_data()
    args = LoraPlusTrainingArguments(**trainer_args(tmp_path, weight_decay=0.1), loraplus_lr_ratio=4.0,
                                     loraplus_lr_embedding=1e-3)
    trainer = LoraPlusTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert len(groups["embedding"]["params"]) == 2 and len(groups["lora_B"]["params"]) == 4

    optimizer = create_loraplus_optimizer(twin, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=4.0,
                                          loraplus_lr_embedding=1e-3, weight_decay=0.1, eps=1e-8)
    reference_run(twin, optimizer, data)
    assert_same(lora_state(model), lora_state(twin))


def test_loraplus_trainer_needs_the_ratio(tmp_path):
    from loralib.hf import LoraPlusTrainer, LoraPlusTrainingArguments

    pm, _ = peft_and_loralib()
    trainer = LoraPlusTrainer(model=pm, args=LoraPlusTrainingArguments(**trainer_args(tmp_path)),
                              train_dataset=token_data())
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        trainer.create_optimizer()


@pytest.mark.parametrize("which,mode,plain", [("peft", "full", False), ("peft", "efficient", False),
                                              ("loralib", "full", False), ("peft", "efficient", True)])
def test_lorapro_trainer_equals_reference(tmp_path, which, mode, plain):
    from transformers import Trainer

    from loralib.hf import LoRAProTrainer, LoRAProTrainingArguments, lorapro_optimizer

    model, twin = _models(which)
    data = token_data()
    args = LoRAProTrainingArguments(**trainer_args(tmp_path, weight_decay=0.05), lorapro_mode=mode)
    if plain:  # the optimizers= form in a plain Trainer
        trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(lorapro_optimizer(model, args), None))
    else:
        trainer = LoRAProTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, LoRAProAdamW) and trainer.optimizer.optimizer.mode == mode

    optimizer = LoRAProAdamW(twin, lr=1e-2, weight_decay=0.05, mode=mode, decay_base_weight=False)
    reference_run(twin, optimizer, data)
    assert_same(lora_state(model), lora_state(twin))


def test_lorapro_trainer_bf16_autocast_equals_reference(tmp_path):
    from loralib.hf import LoRAProTrainer, LoRAProTrainingArguments

    # The reference runs on a second, identical PEFT model: in bf16 the forward/backward of PEFT's layers and of
    # ours (a fused hand-written backward) round differently, so only the same layers can agree to 1e-5 and
    # isolate what is tested here, the Trainer's wiring of LoRA-Pro under autocast.
    model, _ = peft_and_loralib()
    twin, _ = peft_and_loralib()
    data = token_data()
    trainer = LoRAProTrainer(model=model, args=LoRAProTrainingArguments(**trainer_args(tmp_path, bf16=True)),
                             train_dataset=data)
    trainer.train()
    state = trainer.optimizer.optimizer.state
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.values() if "exp_avg" in s)
    reference_run(twin, LoRAProAdamW(twin, lr=1e-2, mode="full", decay_base_weight=False), data, bf16=True)
    assert_same(lora_state(model), lora_state(twin))


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_lorapro_trainer_resume_equals_uninterrupted(tmp_path, mode):
    from loralib.hf import LoRAProTrainer, LoRAProTrainingArguments

    data = token_data()
    full, _ = peft_and_loralib()
    args = LoRAProTrainingArguments(**trainer_args(tmp_path / "a", save_strategy="steps", save_steps=2),
                                    lorapro_mode=mode)
    LoRAProTrainer(model=full, args=args, train_dataset=data).train()

    resumed, _ = peft_and_loralib()
    args = LoRAProTrainingArguments(**trainer_args(tmp_path / "b"), lorapro_mode=mode)
    LoRAProTrainer(model=resumed, args=args, train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert_same(lora_state(full), lora_state(resumed), atol=1e-6)
    # the restart really began at step 2 with Adam's state: from scratch it ends elsewhere
    fresh, _ = peft_and_loralib()
    LoRAProTrainer(model=fresh, args=args, train_dataset=data[4:] + data[4:]).train()
    assert not torch.allclose(lora_state(fresh)[("model.layers.0.self_attn.q_proj", "A")],
                              lora_state(full)[("model.layers.0.self_attn.q_proj", "A")], atol=1e-4)


@pytest.mark.parametrize("mode,released", [("full", ("clipping", "scaling")), ("efficient", ("weight_decay",))])
def test_lorapro_trainer_released_options_equal_reference(tmp_path, mode, released):
    """The released rules (issue 14) in LoRAProTrainer: one step equals LoRAProAdamW given the same options, the
    Trainer leaving the raw gradients unclipped under the released clipping; the default rules step elsewhere."""
    from loralib.hf import LoRAProTrainer, LoRAProTrainingArguments

    data = token_data(n=4)  # 2 micro-batches x accumulation 2: one optimizer step
    max_norm, wd = 1e-3, (0.1 if mode == "efficient" else 0.0)  # max_norm below the gradients' norm: clipping acts
    flags = {f"lorapro_released_{key}": key in released for key in ("clipping", "weight_decay", "scaling")}
    model, twin = peft_and_loralib(use_rslora=True, r=4, lora_alpha=6)  # s = 3, not the released s = 2
    args = LoRAProTrainingArguments(**trainer_args(tmp_path, num_train_epochs=1, warmup_steps=0, weight_decay=wd,
                                                   max_grad_norm=max_norm), lorapro_mode=mode, **flags)
    trainer = LoRAProTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert trainer.state.global_step == 1
    clip = max_norm if "clipping" in released else 0.0
    options = dict(released_clip_norm=clip, released_weight_decay="weight_decay" in released,
                   released_scaling="scaling" in released)
    got = trainer.optimizer.optimizer
    assert (got.released_clip_norm, got.released_weight_decay, got.released_scaling) == tuple(options.values())

    reference = LoRAProAdamW(twin, lr=1e-2, weight_decay=wd, mode=mode, decay_base_weight=False, **options)
    reference_run(twin, reference, data, epochs=1, warmup=0, max_grad_norm=float("inf") if clip else max_norm)
    assert_same(lora_state(model), lora_state(twin))
    _, default = peft_and_loralib(use_rslora=True, r=4, lora_alpha=6)
    reference_run(default, LoRAProAdamW(default, lr=1e-2, weight_decay=wd, mode=mode, decay_base_weight=False),
                  data, epochs=1, warmup=0, max_grad_norm=max_norm)
    assert any(not torch.allclose(a, b, atol=1e-5)
               for a, b in zip(lora_state(model).values(), lora_state(default).values()))


def test_released_clipping_needs_the_lorapro_trainer(tmp_path):
    from loralib.hf import LoRAProTrainingArguments, lorapro_optimizer

    pm, _ = peft_and_loralib()
    args = LoRAProTrainingArguments(**trainer_args(tmp_path), lorapro_released_clipping=True)
    with pytest.raises(ValueError, match="use LoRAProTrainer"):
        lorapro_optimizer(pm, args)


def test_lorapro_rejects_the_sgd_trick(tmp_path):
    from loralib.hf import LoRAProTrainingArguments, lorapro_optimizer

    pm, _ = peft_and_loralib()
    with pytest.raises(ValueError, match="optim='sgd'"):
        lorapro_optimizer(pm, LoRAProTrainingArguments(**trainer_args(tmp_path), optim="sgd"))


# -- PEFT layers as LoRA-Pro pairs ------------------------------------------------------------------

def test_peft_pairs_read_each_layers_scaling():
    """rsLoRA, rank_pattern and alpha_pattern: s comes from the layer PEFT built."""
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                             rank_pattern={"layers.1.self_attn.q_proj": 2},
                             alpha_pattern={"layers.0.self_attn.v_proj": 3})
    pm = peft.get_peft_model(base, config)
    got = {pair.name.split("model.layers.")[1]: (pair.A.shape[0], pair.scaling) for pair in lora_pairs(pm)}
    assert got == {"0.self_attn.q_proj.default": (4, 8 / 2), "0.self_attn.v_proj.default": (4, 3 / 2),
                   "1.self_attn.q_proj.default": (2, 8 / 2 ** 0.5), "1.self_attn.v_proj.default": (4, 8 / 2)}


def test_peft_step_equals_loralib_step_with_rslora():
    pm, twin = peft_and_loralib(use_rslora=True, r=4, lora_alpha=6)
    batch = token_data(n=2)
    for model in (pm, twin):
        optimizer = LoRAProAdamW(model, lr=1e-2, mode="full")
        inputs = {k: torch.stack([it[k] for it in batch]) for k in batch[0]}
        model(**inputs).loss.backward()
        optimizer.step()
    assert_same(lora_state(pm), lora_state(twin))


def test_peft_layers_lorapro_cannot_pair_are_named():
    base = tiny_llama()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        LoRAProAdamW(pm)
    ada = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj"],
                                                                total_step=10))
    with pytest.raises(ValueError, match="lora_E"):
        LoRAProAdamW(ada)


# -- the rank allocator --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["adalora", "lora2"])
def test_allocator_callback_equals_reference(tmp_path, method):
    from transformers import TrainingArguments

    from loralib.hf import RankAllocatorCallback, RegularizedTrainer
    from loralib.lora2 import compute_lora2_orth_regu

    data = token_data(n=12)
    orth = loralib.compute_orth_regu if method == "adalora" else compute_lora2_orth_regu
    regu = lambda m: orth(m, regu_weight=0.1)  # noqa: E731
    model = adalora_model(method)
    twin = copy.deepcopy(model)
    allocator = allocator_for(model, method)
    args = TrainingArguments(**trainer_args(tmp_path, max_grad_norm=1.0))
    RegularizedTrainer(model=model, args=args, train_dataset=data, regularizer=regu,
                       callbacks=[RankAllocatorCallback(allocator)]).train()
    ref_alloc = allocator_for(twin, method)
    optimizer = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    reference_run(twin, optimizer, data, after_step=lambda step: ref_alloc.update_and_mask(twin, step),
                  regularizer=regu)
    assert allocator.last_step == ref_alloc.last_step == 5
    assert allocator.get_rank_pattern() == ref_alloc.get_rank_pattern()
    ranks = [int(m.lora_E.ne(0).sum()) for _, m in allocator.layers]
    assert sum(ranks) == allocator.target_rank < allocator.total_rank  # it did prune, to the final budget
    ours = {n: p for n, p in model.named_parameters() if "lora_" in n}
    theirs = dict(twin.named_parameters())
    for name, p in ours.items():
        torch.testing.assert_close(p, theirs[name], atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


def test_allocator_callback_resume_equals_uninterrupted(tmp_path):
    from transformers import Trainer, TrainingArguments

    from loralib.hf import ALLOCATOR_STATE_NAME, RankAllocatorCallback

    data = token_data(n=12)
    full = adalora_model()
    alloc_full = allocator_for(full)
    args = TrainingArguments(**trainer_args(tmp_path / "a", save_strategy="steps", save_steps=3))
    Trainer(model=full, args=args, train_dataset=data, callbacks=[RankAllocatorCallback(alloc_full)]).train()
    assert (tmp_path / "a" / "checkpoint-3" / ALLOCATOR_STATE_NAME).is_file()

    resumed = adalora_model()
    alloc = allocator_for(resumed)
    args = TrainingArguments(**trainer_args(tmp_path / "a"))
    Trainer(model=resumed, args=args, train_dataset=data, callbacks=[RankAllocatorCallback(alloc)]).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert alloc.last_step == 5 and alloc.get_rank_pattern() == alloc_full.get_rank_pattern()
    torch.testing.assert_close(alloc.exp_avg_ipt, alloc_full.exp_avg_ipt, atol=1e-6, rtol=0)
    theirs = dict(full.named_parameters())
    for name, p in resumed.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p, theirs[name], atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


def _peft_adalora():
    config = peft.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=6, lora_alpha=8,
                                target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    pm = peft.get_peft_model(tiny_llama(), config)
    from _hf_trainer_fixtures import randomise

    randomise([p for n, p in pm.named_parameters() if "lora_B" in n], seed=3)  # B = 0 would score nothing
    return pm


def test_callback_drives_peft_adalora(tmp_path):
    """PEFT's AdaLoRA under a plain Trainer prunes nothing (PEFT issues #432, #1801); with the callback it
    equals PEFT's documented loop, update_and_allocate(step) after optimizer.step()."""
    from transformers import Trainer, TrainingArguments

    from loralib.hf import RankAllocatorCallback

    data = token_data(n=12)
    pruned = lambda m: sum(int(p.eq(0).sum()) for n, p in m.named_parameters() if "lora_E" in n)  # noqa: E731
    plain = _peft_adalora()
    Trainer(model=plain, args=TrainingArguments(**trainer_args(tmp_path / "p")), train_dataset=data).train()
    assert pruned(plain) == 0

    model = _peft_adalora()
    Trainer(model=model, args=TrainingArguments(**trainer_args(tmp_path / "a", save_strategy="steps", save_steps=2)),
            train_dataset=data, callbacks=[RankAllocatorCallback(model)]).train()
    assert pruned(model) == 4 * 4 - 4 * 2  # 4 matrices from rank 4 to the budget 4 x target_r=2

    twin = _peft_adalora()
    optimizer = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    reference_run(twin, optimizer, data, after_step=twin.base_model.update_and_allocate)
    theirs = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p, theirs[name], atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")

    # Resume before pruning began (PEFT saves an AdaLoRA adapter trimmed to its rank_pattern, which the
    # Trainer then cannot load into the untrimmed model: a PEFT limitation, documented in loralib.hf).
    resumed = _peft_adalora()
    Trainer(model=resumed, args=TrainingArguments(**trainer_args(tmp_path / "a")), train_dataset=data,
            callbacks=[RankAllocatorCallback(resumed)]).train(resume_from_checkpoint=str(tmp_path / "a/checkpoint-2"))
    for name, p in resumed.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p, theirs[name], atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


def test_allocator_callback_refuses_the_trainers_deepspeed(tmp_path):
    from types import SimpleNamespace

    from loralib.hf import RankAllocatorCallback

    callback = RankAllocatorCallback(allocator_for(adalora_model()))
    with pytest.raises(ValueError, match="DeepSpeed is not supported"):
        callback.on_train_begin(SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}},
                                                output_dir=str(tmp_path)), SimpleNamespace(global_step=0), None)


# -- against loralib's own loop ------------------------------------------------------------------------

def _loop_order(n, batch, epochs, seed):
    """The sample order loralib.train's sampler visits, epoch after epoch (one process)."""
    from loralib.train.distributed import ShardedBatches

    sampler = ShardedBatches(n, batch, 1, 0, seed=seed)
    return [i for epoch in range(epochs) for b in sampler.batches(epoch) for i in b]


@pytest.mark.parametrize("method", ["lorapro-full", "lorapro-efficient", "loraplus", "adalora"])
def test_trainer_equals_loralib_train(tmp_path, method):
    """N Trainer steps on the PEFT model (our model for AdaLoRA) equal N steps of loralib.train on the loralib
    twin: the Trainer reads, in order, the samples loralib.train's shuffled sampler deals over 2 epochs."""
    from transformers import Trainer, TrainingArguments

    from loralib.hf import (LoraPlusTrainer, LoraPlusTrainingArguments, LoRAProTrainer, LoRAProTrainingArguments,
                            RankAllocatorCallback)
    from loralib.train import TrainConfig, train

    data = token_data(n=12 if method == "adalora" else 8)
    order = _loop_order(len(data), 2, 2, seed=7)
    hf_args = trainer_args(tmp_path / "hf", num_train_epochs=1)
    if method == "adalora":
        model = adalora_model()
        twin = copy.deepcopy(model)
        allocator, twin_allocator = allocator_for(model), allocator_for(twin)
        trainer = Trainer(model=model, args=TrainingArguments(**hf_args), train_dataset=[data[i] for i in order],
                          callbacks=[RankAllocatorCallback(allocator)])
        factory = None
    else:
        model, twin = peft_and_loralib()
        twin_allocator = None
        if method == "loraplus":
            trainer = LoraPlusTrainer(model=model, args=LoraPlusTrainingArguments(**hf_args, loraplus_lr_ratio=4.0),
                                      train_dataset=[data[i] for i in order])
            factory = lambda m: create_loraplus_optimizer(m, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=4.0)  # noqa
        else:
            mode = method.split("-")[1]
            trainer = LoRAProTrainer(model=model, args=LoRAProTrainingArguments(**hf_args, lorapro_mode=mode),
                                     train_dataset=[data[i] for i in order])
            factory = lambda m: LoRAProAdamW(m, lr=1e-2, mode=mode, decay_base_weight=False)  # noqa: E731
    trainer.train()

    config = TrainConfig(output_dir=str(tmp_path / "loop"), num_epochs=2, per_device_batch_size=2, grad_accum_steps=2,
                         lr=1e-2, warmup_steps=1, schedule="linear", max_grad_norm=1.0, save_strategy="no",
                         seed=7, progress_bar=False, device="cpu", log_every=1000)
    collate = lambda items: {k: torch.stack([it[k] for it in items]) for k in items[0]}  # noqa: E731
    train(twin, data, collate, config, optimizer_factory=factory, allocator=twin_allocator)
    if method == "adalora":
        assert allocator.get_rank_pattern() == twin_allocator.get_rank_pattern()
        theirs = dict(twin.named_parameters())
        assert_same({n: p for n, p in model.named_parameters() if "lora_" in n},
                    {n: theirs[n] for n, p in model.named_parameters() if "lora_" in n})
    else:
        assert_same(lora_state(model), lora_state(twin))


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_peft_gpt2_conv1d_step_with_weight_decay_on_W(mode):
    """PEFT's LoRA on GPT-2's Conv1D (fan_in_fan_out) pairs like loralib's; decay_base_weight shrinks each W0."""
    from _tiny_hf import tiny_gpt2

    from _hf_trainer_fixtures import randomise

    base = tiny_gpt2()
    twin = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                   fan_in_fan_out=True, lora_dropout=0.0))
    loralib.inject(twin, ["c_attn"], r=4, lora_alpha=8)
    pairs = lora_pairs(pm)
    randomise([p for pair in pairs for p in (pair.A, pair.B)])
    for pair in pairs:
        layer = twin.get_submodule(pair.name[len("base_model.model."):].rsplit(".", 1)[0])
        with torch.no_grad():
            layer.lora_A.copy_(pair.A)
            layer.lora_B.copy_(pair.B)
    ids = token_data(n=2)
    for model in (pm, twin):
        model.train()
        optimizer = LoRAProAdamW(model, lr=1e-2, weight_decay=0.1, mode=mode, decay_base_weight=True)
        for _ in range(2):
            model(input_ids=torch.stack([d["input_ids"] for d in ids]),
                  labels=torch.stack([d["labels"] for d in ids])).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert_same(lora_state(pm), lora_state(twin))
    for pair in pairs:
        path = pair.name[len("base_model.model."):].rsplit(".", 1)[0]
        torch.testing.assert_close(pair.base_weight(), twin.get_submodule(path).weight, atol=1e-6, rtol=0)
    assert not torch.equal(pairs[0].base_weight(), tiny_gpt2().transformer.h[0].attn.c_attn.weight)
