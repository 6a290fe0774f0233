"""torch.compile on our model files and LoRA layers, and TrainConfig.torch_compile in the loop.

- the training forward of a tiny GPT-2 and a tiny Llama with LoRA (dropout on, padded batch) is one graph,
  no break (torch._dynamo.explain);
- compiled forward + backward ("aot_eager": the same graph capture and autograd tracing as inductor, without
  generating code) gives the eager loss and LoRA gradients;
- the loop with torch_compile trains like eager, its checkpoints hold plain names (no `_orig_mod.`), and a
  resumed compiled run ends where the uninterrupted one does;
- one inductor run (marked slow; skipped without a C compiler): the loss equals eager's.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import loralib
from loralib.adapters import ADAPTER_WEIGHTS
from loralib.models import gpt2, llama
from loralib.train import TrainConfig, list_checkpoints, train

from _gpt2_fixtures import hf_config as gpt2_config
from _llama_fixtures import tiny_config as llama_config

FAMILIES = {
    "gpt2": (gpt2, lambda: gpt2_config().to_dict(), ("c_attn", "c_proj", "c_fc")),
    "llama": (llama, lambda: llama_config().to_dict(),
              ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}


def lora_model(family: str, dropout: float = 0.0, n_layer=None):
    module, config, targets = FAMILIES[family]
    torch.manual_seed(0)
    cfg = config()
    if n_layer:
        cfg["n_layer" if family == "gpt2" else "num_hidden_layers"] = n_layer
    model = module.build(cfg, "causal-lm", lora=loralib.LoRAConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets)).train()
    loralib.mark_only_lora_as_trainable(model)
    with torch.no_grad():  # B = 0 would leave A without gradient
        for _, layer in loralib.lora_layers(model):
            layer.lora_B.normal_(std=0.1)
    return model


def padded_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the explicit-mask path
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("padded", [True, False])
def test_training_forward_has_no_graph_break(family, padded):
    batch = padded_batch()
    if not padded:
        del batch["attention_mask"]
    explanation = torch._dynamo.explain(lora_model(family, dropout=0.1))(**batch)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compiled_step_equals_eager(family):
    batch = padded_batch()
    results = []
    for compiled in (False, True):
        model = lora_model(family)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        loss = run(**batch).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    assert grads_e and grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-6, msg=name)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8):
        g = torch.Generator().manual_seed(3)
        self.rows = torch.randint(3, 90, (n, 10), generator=g)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _collate(rows):
    ids = torch.stack(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _train(out, compile_backend, resume=None):
    model = lora_model("gpt2", n_layer=1)
    config = TrainConfig(output_dir=str(out), max_steps=4, per_device_batch_size=2, lr=1e-2, save_every=2,
                         log_every=1, progress_bar=False, eval_at_end=False, device="cpu", resume_from=resume,
                         torch_compile=compile_backend)
    train(model, _Tokens(), _collate, config)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return model, losses


@pytest.mark.slow
def test_loop_compiled_trains_like_eager_and_resumes(tmp_path):
    eager, eager_losses = _train(tmp_path / "eager", False)
    compiled, losses = _train(tmp_path / "compiled", "aot_eager")
    assert len(losses) == 4
    assert losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)

    checkpoints = list_checkpoints(tmp_path / "compiled")
    assert [step for step, _ in checkpoints] == [2, 4]
    for _, path in checkpoints:
        keys = list(load_file(path / "adapter" / ADAPTER_WEIGHTS))
        assert keys and not any("_orig_mod" in k for k in keys), keys[:3]
        assert all(k in dict(compiled.named_parameters()) for k in keys), keys[:3]

    # resume the compiled run from step 2 (its later checkpoint removed): it ends where the whole run did
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "compiled", resumed_dir)
    shutil.rmtree(resumed_dir / checkpoints[1][1].name)
    resumed, resumed_losses = _train(resumed_dir, "aot_eager", resume="latest")
    assert resumed_losses == pytest.approx(losses, rel=1e-6, abs=1e-7)
    for (name, p), q in zip(resumed.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_bad_torch_compile_setting_is_named(tmp_path):
    with pytest.raises(ValueError, match="torch_compile"):
        TrainConfig(output_dir=str(tmp_path), max_steps=1, torch_compile="no_such_backend")
    with pytest.raises(ValueError, match="torch_compile.*deepspeed"):
        TrainConfig(output_dir=str(tmp_path), max_steps=1, torch_compile=True, deepspeed_config={})


def test_every_entry_point_has_the_flag():
    """--torch_compile parses on each driver (off unless given); each passes it to TrainConfig.torch_compile."""
    import inspect
    import sys
    from pathlib import Path

    from loralib.train import hf_flags  # the GLUE entry points' shared flags
    from loralib.tasks.instruct import run as instruct
    from loralib.tasks.nlg import train as nlg
    from loralib.tasks.t5glue import run as t5glue
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "NLG"))
    import gpt2_ft
    from lorapro import flags as lorapro_flags
    from lorapro import run_t5_glue
    from test_run_glue import ENTRIES

    parsers = [e.build_parser() for e in ENTRIES.values()] + [lorapro_flags.build_parser(), gpt2_ft.build_parser(),
                                                              run_t5_glue.build_parser()]
    for parser in parsers:
        flag = next(a for a in parser._actions if "--torch_compile" in a.option_strings)
        assert flag.dest == "torch_compile" and flag.default is False
    for module in (hf_flags, instruct, nlg, t5glue):  # hf_flags: the GLUE entry points' TrainConfig
        assert "torch_compile=" in inspect.getsource(module), module.__name__


@pytest.mark.slow
def test_inductor_loss_equals_eager():
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: torch.compile's CPU backend (inductor) cannot build its kernels")
    batch = padded_batch()
    losses = []
    for compiled in (False, True):
        model = lora_model("gpt2", n_layer=1)
        run = torch.compile(model) if compiled else model
        loss = run(**batch).loss
        loss.backward()
        losses.append((loss.item(), model.transformer.h[0].attn.c_attn.lora_A.grad.clone()))
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-5)
    torch.testing.assert_close(losses[1][1], losses[0][1], rtol=1e-4, atol=1e-6)
