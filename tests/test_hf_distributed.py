"""loralib.hf on 2 CPU processes: LoRA-Pro (both modes), LoRA+ and AdaLoRA's allocator callback through
transformers.Trainer under torchrun (DDP), and LoRA-Pro (both modes) and LoRA+ under the Trainer's DeepSpeed
ZeRO-2 (unpatched), train what one process running the steps by hand on the loralib twin trains (global batch
4: 2 processes x 1 x accumulation 2 there, 2 x accumulation 2 here; the sequential sampler deals the samples
round-robin, so each step sees the same 4). The DeepSpeed full mode is also resumed from a checkpoint.
One launch per launcher, every method in it."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from _hf_trainer_fixtures import (adalora_model, allocator_for, assert_same, lora_state,  # noqa: E402
                                  peft_and_loralib, reference_run, token_data)
from _torchrun import torchrun, write_worker  # noqa: E402

from loralib.optim import LoRAProAdamW, create_loraplus_optimizer  # noqa: E402

WORKER = """
import sys, torch
sys.path.insert(0, {tests!r})
from transformers import Trainer, TrainingArguments
from _hf_trainer_fixtures import adalora_model, allocator_for, lora_state, peft_and_loralib, token_data, trainer_args
from loralib.hf import (LoraPlusTrainer, LoraPlusTrainingArguments, LoRAProTrainer, LoRAProTrainingArguments,
                        RankAllocatorCallback)

out, deepspeed = sys.argv[1], sys.argv[2] == "ds"
ds = dict(deepspeed={{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                      "gradient_clipping": "auto", "zero_optimization": {{"stage": 2}}}}) if deepspeed else {{}}


def args_for(folder, clip=1.0, **overrides):
    return trainer_args(f"{{out}}/{{folder}}", per_device_train_batch_size=1, max_grad_norm=clip, **ds, **overrides)


def save(name, model, trainer):
    if trainer.args.process_index == 0:
        torch.save(lora_state(model) if name != "adalora" else
                   {{n: p.detach() for n, p in model.named_parameters() if "lora_" in n}}, f"{{out}}/{{name}}.pt")


for mode in ("full", "efficient"):
    # Under DeepSpeed the efficient mode's clipping acts on the adjusted gradients: compared unclipped.
    clip = 0.0 if deepspeed and mode == "efficient" else 1.0
    resume = deepspeed and mode == "full"
    model, _ = peft_and_loralib()
    extra = dict(save_strategy="steps", save_steps=2) if resume else {{}}
    trainer = LoRAProTrainer(model=model, args=LoRAProTrainingArguments(**args_for(mode, clip, **extra),
                             lorapro_mode=mode), train_dataset=token_data())
    trainer.train()
    if deepspeed:
        assert type(trainer.accelerator.deepspeed_engine_wrapped).__name__ == "_LoRAProEngineWrapper"
    save(f"lorapro-{{mode}}", model, trainer)
    if resume:
        model, _ = peft_and_loralib()
        trainer = LoRAProTrainer(model=model, args=LoRAProTrainingArguments(**args_for(mode + "-b", clip),
                                 lorapro_mode=mode), train_dataset=token_data())
        trainer.train(resume_from_checkpoint=f"{{out}}/{{mode}}/checkpoint-2")
        save(f"lorapro-{{mode}}-resumed", model, trainer)

model, _ = peft_and_loralib()
trainer = LoraPlusTrainer(model=model, args=LoraPlusTrainingArguments(**args_for("loraplus"), loraplus_lr_ratio=4.0,
                          loraplus_lr_embedding=1e-3), train_dataset=token_data())
trainer.train()
save("loraplus", model, trainer)

if not deepspeed:
    model = adalora_model()
    trainer = Trainer(model=model, args=TrainingArguments(**args_for("adalora")), train_dataset=token_data(n=12),
                      callbacks=[RankAllocatorCallback(allocator_for(model))])
    trainer.train()
    save("adalora", model, trainer)
"""


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp", "ds"])
def test_two_processes_equal_one(tmp_path, launcher):
    if launcher == "ds":
        pytest.importorskip("deepspeed")
    worker = write_worker(tmp_path / "worker.py", WORKER.format(tests=str(Path(__file__).parent)),
                          deepspeed=launcher == "ds")
    torchrun(worker, [tmp_path, launcher], nproc=2, timeout=600)
    data = token_data()

    for mode in ("full", "efficient"):
        clip = float("inf") if launcher == "ds" and mode == "efficient" else 1.0
        _, twin = peft_and_loralib()
        reference_run(twin, LoRAProAdamW(twin, lr=1e-2, mode=mode, decay_base_weight=False), data, max_grad_norm=clip)
        assert_same(torch.load(tmp_path / f"lorapro-{mode}.pt"), lora_state(twin))
        if launcher == "ds" and mode == "full":  # each rank's share of the moments came back with the checkpoint
            assert sorted(p.name for p in (tmp_path / "full" / "checkpoint-2").glob("lorapro_full_rank*.pt")) == [
                "lorapro_full_rank0.pt", "lorapro_full_rank1.pt"]
            assert_same(torch.load(tmp_path / "lorapro-full-resumed.pt"), lora_state(twin))

    _, twin = peft_and_loralib()
    reference_run(twin, create_loraplus_optimizer(twin, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=4.0,
                                                  loraplus_lr_embedding=1e-3), data)
    assert_same(torch.load(tmp_path / "loraplus.pt"), lora_state(twin))

    if launcher == "ddp":
        twin = adalora_model()
        allocator = allocator_for(twin)
        optimizer = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        reference_run(twin, optimizer, token_data(n=12), after_step=lambda step: allocator.update_and_mask(twin, step))
        assert sum(int(m.lora_E.ne(0).sum()) for _, m in allocator.layers) == allocator.target_rank
        expected = {n: p.detach() for n, p in twin.named_parameters() if "lora_" in n}
        assert_same(torch.load(tmp_path / "adalora.pt"), expected)
