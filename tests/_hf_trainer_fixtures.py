"""Tiny Llama, its PEFT and loralib twins, token data, and the reference loop the Trainer runs are held to."""
import copy

import torch

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def token_data(n=8, length=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, length), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def randomise(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def peft_and_loralib(seed=0, r=4, lora_alpha=8, use_rslora=False, targets=TARGETS):
    """(peft_model, loralib_model): one base, LoRA on `targets`, equal random factors in both."""
    import peft

    import loralib

    base = tiny_llama(seed)
    twin = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets,
                                                   lora_dropout=0.0, use_rslora=use_rslora))
    loralib.inject(twin, targets, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora)
    from loralib.optim.lorapro import lora_pairs

    pairs = lora_pairs(pm)
    randomise([p for pair in pairs for p in (pair.A, pair.B)], seed)
    for pair in pairs:
        path = pair.name[len("base_model.model."):].rsplit(".", 1)[0]
        layer = twin.get_submodule(path)
        with torch.no_grad():
            layer.lora_A.copy_(pair.A)
            layer.lora_B.copy_(pair.B)
    return pm, twin


def trainer_args(output_dir, **overrides):
    base = dict(output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                num_train_epochs=2, learning_rate=1e-2, warmup_steps=1, lr_scheduler_type="linear",
                max_grad_norm=1.0, weight_decay=0.0, train_sampling_strategy="sequential", report_to="none",
                use_cpu=True, save_strategy="no", logging_steps=1000, disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    base.update(overrides)
    return base


def reference_run(model, optimizer, data, batch=2, accum=2, epochs=2, warmup=1, max_grad_norm=1.0,
                  after_step=None, regularizer=None, bf16=False):
    """What the Trainer does, written out: sequential batches, (bf16 autocast) loss / accum, clip, step,
    (after_step(step)), linear schedule, zero_grad."""
    from transformers import get_linear_schedule_with_warmup

    micro = [data[i:i + batch] for i in range(0, len(data), batch)]
    steps_per_epoch = len(micro) // accum
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, steps_per_epoch * epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    step = 0
    for _ in range(epochs):
        for s in range(steps_per_epoch):
            for items in micro[s * accum:(s + 1) * accum]:
                inputs = {k: torch.stack([it[k] for it in items]) for k in items[0]}
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(**inputs).loss
                if regularizer is not None:
                    loss = loss + regularizer(model)
                (loss / accum).backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            if after_step is not None:
                after_step(step)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    return model


def lora_state(model):
    """LoRA factors by (module path, factor) for a PEFT model or a loralib one, so both compare."""
    from loralib.optim.lorapro import lora_pairs

    out = {}
    for pair in lora_pairs(model):
        path = pair.name
        if path.startswith("base_model.model."):
            path = path[len("base_model.model."):].rsplit(".", 1)[0]
        out[(path, "A")] = pair.A.detach().clone()
        out[(path, "B")] = pair.B.detach().clone()
    return out


def assert_same(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")


def adalora_model(method="adalora"):
    """A tiny Llama with loralib's AdaLoRA (or LoRA²) layers on q and v, r 4."""
    import loralib
    from loralib.config import LoRAConfig

    model = tiny_llama()
    loralib.inject(model, ["q_proj", "v_proj"], config=LoRAConfig(r=4, lora_alpha=8, method=method, lora2_k=2,
                                                                  target_modules=("q_proj", "v_proj")))
    return model


def allocator_for(model, method="adalora"):
    from loralib.adalora import RankAllocator
    from loralib.lora2 import LoRA2RankAllocator

    cls = RankAllocator if method == "adalora" else LoRA2RankAllocator
    return cls(model, lora_r=4, target_rank=2, init_warmup=1, final_warmup=1, mask_interval=1,
               beta1=0.85, beta2=0.85, total_step=6)
