"""loralib.hf on 2 CPU processes: LoRAProTrainer under torchrun (DDP, full mode) and under the Trainer's
DeepSpeed ZeRO-2 (both modes, unpatched DeepSpeed; the full one also resumed from a checkpoint) train the PEFT model's adapter exactly as one process
running the steps by hand on the loralib twin (global batch 4: 2 processes x 1 x accumulation 2 there,
2 x accumulation 2 here; the sequential sampler deals the samples round-robin, so each step sees the same 4)."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from _hf_trainer_fixtures import assert_same, lora_state, peft_and_loralib, reference_run, token_data  # noqa: E402
from _torchrun import torchrun, write_worker  # noqa: E402

from loralib.optim import LoRAProAdamW  # noqa: E402

WORKER = """
import sys, torch
sys.path.insert(0, {tests!r})
from _hf_trainer_fixtures import lora_state, peft_and_loralib, token_data, trainer_args
from loralib.hf import LoRAProTrainer, LoRAProTrainingArguments

out, mode, deepspeed, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "ds", sys.argv[4] == "resume"
extra = dict(deepspeed={{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                         "gradient_clipping": "auto", "zero_optimization": {{"stage": 2}}}}) if deepspeed else {{}}


def run(folder, **overrides):
    model, _ = peft_and_loralib()
    args = LoRAProTrainingArguments(**trainer_args(folder, per_device_train_batch_size=1, max_grad_norm={clip},
                                                   **extra, **overrides), lorapro_mode=mode)
    trainer = LoRAProTrainer(model=model, args=args, train_dataset=token_data())
    return model, trainer


model, trainer = run(out + "/a", **(dict(save_strategy="steps", save_steps=2) if resume else {{}}))
trainer.train()
if deepspeed:
    assert type(trainer.accelerator.deepspeed_engine_wrapped).__name__ == "_LoRAProEngineWrapper"
if trainer.args.process_index == 0:
    torch.save(lora_state(model), out + "/lora.pt")
if resume:
    model, trainer = run(out + "/b")
    trainer.train(resume_from_checkpoint=out + "/a/checkpoint-2")
    if trainer.args.process_index == 0:
        torch.save(lora_state(model), out + "/lora_resumed.pt")
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode,launcher,resume", [("full", "ddp", False), ("efficient", "ds", False),
                                                  ("full", "ds", True)])
def test_two_processes_equal_one(tmp_path, mode, launcher, resume):
    if launcher == "ds":
        pytest.importorskip("deepspeed")
    # Under DeepSpeed the efficient mode's clipping acts on the adjusted gradients: compared unclipped.
    clip = 0.0 if (launcher, mode) == ("ds", "efficient") else 1.0
    from pathlib import Path

    worker = write_worker(tmp_path / "worker.py", WORKER.format(tests=str(Path(__file__).parent), clip=clip),
                          deepspeed=launcher == "ds")
    torchrun(worker, [tmp_path, mode, launcher, "resume" if resume else "no"], nproc=2, timeout=600)
    _, twin = peft_and_loralib()
    optimizer = LoRAProAdamW(twin, lr=1e-2, mode=mode, decay_base_weight=False)
    reference_run(twin, optimizer, token_data(), max_grad_norm=clip if clip else float("inf"))
    assert_same(torch.load(tmp_path / "lora.pt"), lora_state(twin))
    if resume:  # each rank's share of the full mode's moments came back with the checkpoint
        assert sorted(p.name for p in (tmp_path / "a" / "checkpoint-2").glob("lorapro_full_rank*.pt")) == [
            "lorapro_full_rank0.pt", "lorapro_full_rank1.pt"]
        assert_same(torch.load(tmp_path / "lora_resumed.pt"), lora_state(twin))
