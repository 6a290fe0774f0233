"""Issue 13, class 5: a DeepSpeed checkpoint is loaded without running code (DeepSpeed's own engine would
unpickle it with weights_only=False): crafted files are refused, genuine ones resume."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from loralib.train import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _torchrun import DEEPSPEED_PRELUDE  # noqa: E402


class Payload:
    """Unpickling this runs os.system: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loads_inside_are_weights_only_with_the_deepspeed_allow_list(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    marker = tmp_path / "pwned"
    evil, good = tmp_path / "evil.pt", tmp_path / "good.pt"
    torch.save({"optimizer_state_dict": Payload(marker)}, evil)
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "t": torch.ones(2)}, good)
    with ckpt._weights_only_loads():
        with pytest.raises(ValueError, match=r"evil\.pt: refused: unpickling it would build posix\.system"):
            torch.load(evil, weights_only=False)  # what DeepSpeed's TorchCheckpointEngine passes
        loaded = torch.load(good, weights_only=False)
    assert not marker.exists()
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and torch.equal(loaded["t"], torch.ones(2))
    assert torch.load is not None and torch.load.__module__.startswith("torch")  # restored


SCRIPT = DEEPSPEED_PRELUDE + textwrap.dedent("""
    import shutil, sys, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from _hardening_fixtures import FAST, collate, tiny_data, tiny_model
    from test_hardening_checkpoints import Payload
    from loralib.train import TrainConfig, train
    out, marker = Path(sys.argv[1]), Path(sys.argv[2])
    ds = {{"zero_optimization": {{"stage": 2}}, "train_batch_size": "auto"}}
    config = lambda d, resume=None: TrainConfig(output_dir=str(d), max_steps=4, save_strategy="steps", save_every=2,
                                                deepspeed_config=ds, resume_from=resume, **FAST)

    class Stop:
        def on_step_end(self, state, logs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    try:
        train(tiny_model(), tiny_data(), collate, config(out), callbacks=[Stop()])
    except KeyboardInterrupt:
        pass
    crafted = out.parent / "crafted"
    shutil.copytree(out, crafted)
    [optim] = (crafted / "checkpoint-2" / "deepspeed" / "state").glob("*optim_states.pt")
    torch.save({{"optimizer_state_dict": Payload(marker)}}, optim)
    try:
        train(tiny_model(), tiny_data(), collate, config(crafted, "latest"))
    except ValueError as e:
        print("refused:", e)
    print("resumed to step", train(tiny_model(), tiny_data(), collate, config(out, "latest")).global_step)
""")


@pytest.mark.slow
def test_a_crafted_deepspeed_checkpoint_is_refused_and_a_genuine_one_resumes(tmp_path):
    pytest.importorskip("deepspeed")
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    marker = tmp_path / "pwned"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), str(marker)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused:" in proc.stdout and "optim_states.pt: refused: unpickling it would build posix.system" in proc.stdout
    assert "resumed to step 4" in proc.stdout
    assert not marker.exists()
