"""DeepSpeed ZeRO-3 in the loop (loralib.train.zero3): the helpers without DeepSpeed, and full fine-tuning of
our GPT-2 file (tied embedding and LM head, the head trained) on 2 partitioned CPU processes == 1 plain
process. The adapter-only ZeRO-3 runs are in test_train_distributed.py, test_lorapro_distributed.py and
test_lorapro_train.py."""
from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import loralib
from loralib.models.gpt2 import GPT2Config, GPT2LMHeadModel
from loralib.models.lm_head import fused_head_applies
from loralib.train import TrainConfig, train
from loralib.train import zero3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _torchrun import torchrun, write_worker  # noqa: E402


def _lora_model():
    torch.manual_seed(0)
    model = nn.Sequential(loralib.Linear(4, 6, r=2, lora_alpha=4), nn.Linear(6, 2))
    loralib.mark_only_lora_as_trainable(model)
    return model


def test_helpers_are_the_plain_operations_without_zero3():
    model = _lora_model()
    assert not zero3.is_partitioned(model)
    state = zero3.gathered_state_dict(model)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with zero3.writable(model, ["0.lora_A"]):
        with torch.no_grad():
            model[0].lora_A.fill_(0.5)
    assert torch.all(model[0].lora_A == 0.5)


def test_disable_merging_keeps_w_untouched_in_eval():
    model = _lora_model()
    with torch.no_grad():
        model[0].lora_B.normal_()
    before = model[0].weight.detach().clone()
    assert zero3.disable_merging(model) == 1 and zero3.disable_merging(model) == 0
    model.eval()
    assert torch.equal(model[0].weight, before) and not model[0].merged


def test_the_fused_lm_head_is_skipped_only_for_a_trained_partitioned_weight():
    weight = nn.Parameter(torch.zeros(3, 2))
    assert fused_head_applies(weight)
    weight.ds_id = 7  # what DeepSpeed ZeRO-3 attaches to the parameters it partitions
    assert not fused_head_applies(weight)
    weight.requires_grad_(False)
    assert fused_head_applies(weight)


# ZeRO-3 with every parameter partitioned and released after each use (by default DeepSpeed keeps tensors
# under 1e5 elements whole, and keeps gathered ones that are soon used again: a tiny model would never be
# partitioned when it matters)
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
                               "stage3_prefetch_bucket_size": 0}}

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_zero3 as t
    t.train_gpt2(sys.argv[1], zero3=True)
""")


def train_gpt2(out_dir, zero3: bool = False):
    """Every weight of a tiny GPT-2 trained (head tied to wte), 3 steps of a global batch of 4."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                       embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0))
    for p in model.parameters():
        p.requires_grad = True
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 50, (12,), generator=gen)} for _ in range(16)]

    def collate(items):
        ids = torch.stack([d["input_ids"] for d in items])
        return {"input_ids": ids, "labels": ids}

    held_out = collate(data[:4])

    def eval_fn(m):  # the same forward on every rank: ZeRO-3's gathers are collectives
        with torch.no_grad():
            return {"loss": m(**held_out).loss.item()}

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # "best" = the highest loss, so that loading it at the end really replaces the last weights
    config = TrainConfig(output_dir=str(out_dir), max_steps=3, per_device_batch_size=4 // world, lr=1e-2,
                         max_grad_norm=0.0, save_strategy="no", progress_bar=False, device="cpu",
                         eval_strategy="steps", eval_every=1, metric_for_best="loss", greater_is_better=True,
                         load_best_at_end=True,
                         deepspeed_config=ZERO3 if zero3 else None)
    return train(model, data, collate, config, eval_fn=eval_fn)


@pytest.mark.slow
def test_full_fine_tuning_with_a_tied_head_under_zero3_on_two_processes_equals_one(tmp_path):
    pytest.importorskip("deepspeed")
    torchrun(write_worker(tmp_path / "worker.py", SCRIPT.format(tests=str(Path(__file__).parent))), [tmp_path / "two"])
    result = train_gpt2(tmp_path / "one")
    assert result.best_step is not None and result.best_step < 3  # the final adapter is an earlier step's
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter" / "adapter.safetensors"))
    best_two = load_file(str(tmp_path / "two" / "best_adapter" / "adapter.safetensors"))
    assert all(torch.equal(two[k], best_two[k]) for k in two)  # loaded into the partitions, saved again
    assert one.keys() == two.keys() and "transformer.wte.weight" in one
    for key in one:
        assert torch.allclose(one[key], two[key], atol=2e-5, rtol=0), (key, (one[key] - two[key]).abs().max())
    torch.manual_seed(0)
    initial = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    assert not torch.allclose(initial.transformer.wte.weight, one["transformer.wte.weight"])  # it trained
