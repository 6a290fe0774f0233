"""loralib.hf on 2 CPU processes: LoRAProTrainer under torchrun (DDP, full mode) and under the Trainer's
DeepSpeed ZeRO-2 (efficient mode, unpatched DeepSpeed) train the PEFT model's adapter exactly as one process
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

out, mode, deepspeed = sys.argv[1], sys.argv[2], sys.argv[3] == "ds"
model, _ = peft_and_loralib()
extra = dict(deepspeed={{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                         "gradient_clipping": "auto", "zero_optimization": {{"stage": 2}}}}) if deepspeed else {{}}
args = LoRAProTrainingArguments(**trainer_args(out, per_device_train_batch_size=1, max_grad_norm={clip}, **extra),
                                lorapro_mode=mode)
trainer = LoRAProTrainer(model=model, args=args, train_dataset=token_data())
trainer.train()
if deepspeed:
    assert type(trainer.accelerator.deepspeed_engine_wrapped).__name__ == "_LoRAProEngineWrapper"
if trainer.args.process_index == 0:
    torch.save(lora_state(model), out + "/lora.pt")
"""


@pytest.mark.parametrize("mode,launcher", [("full", "ddp"), ("efficient", "ds")])
def test_two_processes_equal_one(tmp_path, mode, launcher):
    pytest.importorskip("deepspeed") if launcher == "ds" else None
    # Under DeepSpeed the clipping acts on the adjusted gradients (loralib.hf.LoRAProTrainer): compare unclipped.
    clip = 1.0 if launcher == "ddp" else 0.0
    from pathlib import Path

    worker = write_worker(tmp_path / "worker.py", WORKER.format(tests=str(Path(__file__).parent), clip=clip),
                          deepspeed=launcher == "ds")
    torchrun(worker, [tmp_path, mode, launcher], nproc=2, timeout=600)
    _, twin = peft_and_loralib()
    optimizer = LoRAProAdamW(twin, lr=1e-2, mode=mode, decay_base_weight=False)
    reference_run(twin, optimizer, token_data(), max_grad_norm=clip if clip else float("inf"))
    assert_same(torch.load(tmp_path / "lora.pt"), lora_state(twin))
