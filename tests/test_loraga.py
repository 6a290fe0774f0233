"""LoRA-GA held to PEFT 0.21.2 (preprocess_loraga + init_lora_weights="lora_ga", LoraGAConfig defaults:
direction "ArB2r", scale "stable", stable_gamma 16): on the same train_step batches the initial s B A and the
adjusted W0 to 1e-5, the output at step 0 unchanged; then LoRA-Pro trains from it."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import loralib as lora
from test_dora import TARGETS, Tiny
from test_pissa import seeded_svd_lowrank

peft = pytest.importorskip("peft")

BATCHES = [torch.randn(6, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _train_step(model):
    def step():
        for x in BATCHES:
            (10 * model(x).pow(2).sum()).backward()  # a gradient large enough to test
    return step


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("ArBr", "gd_scale"), ("A2rBr", "unit"),
                                             ("ArB2r", "weight_svd")])
def test_initial_products_and_residuals_equal_peft(direction, scale, monkeypatch):
    seeded_svd_lowrank(monkeypatch)
    torch.manual_seed(0)
    base = Tiny()
    ga = peft.LoraGAConfig(direction=direction, scale=scale)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=ga)
    theirs_base = copy.deepcopy(base)
    peft.preprocess_loraga(theirs_base, config, _train_step(theirs_base))
    theirs = peft.get_peft_model(theirs_base, config)
    ours = lora.inject(copy.deepcopy(base), TARGETS, r=2, lora_alpha=4, init_lora_weights="lora_ga",
                       merge_weights=False)
    lora.loraga_init(ours, _train_step(ours), direction=direction, scale=scale)
    for name in TARGETS:
        mine, ref = getattr(ours, name), theirs.base_model.model.get_submodule(name)
        ba = mine.scaling * mine.lora_B @ mine.lora_A
        ref_ba = ref.scaling["default"] * ref.lora_B["default"].weight @ ref.lora_A["default"].weight
        torch.testing.assert_close(ba, ref_ba, rtol=0, atol=1e-5, msg=name)
        assert ba.abs().max() > 1e-3
        torch.testing.assert_close(mine.weight, ref.base_layer.weight, rtol=0, atol=1e-5, msg=name)
    x = torch.randn(4, 12)
    torch.testing.assert_close(ours(x), base(x), rtol=0, atol=1e-5)
    # every gradient was released, and what was frozen before is frozen again
    assert all(p.grad is None for p in ours.parameters())
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        f"{t}.{f}" for t in TARGETS for f in ("lora_A", "lora_B"))


def test_inject_runs_the_train_step_and_then_lora_pro_trains(monkeypatch):
    torch.manual_seed(0)
    base = Tiny()
    model = copy.deepcopy(base)
    lora.inject(model, TARGETS, r=2, lora_alpha=4, init_lora_weights="lora_ga", use_rslora=True,
                loraga_train_step=_train_step(model))
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), base(x), rtol=0, atol=1e-5)
    opt = lora.LoRAProAdamW(model, lr=1e-2)
    before = model.q.lora_A.detach().clone()
    for _ in range(2):
        (10 * model(x).pow(2).sum()).backward()  # a gradient large enough to test
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(model.q.lora_A, before)


def test_loraga_with_dora_keeps_the_base_output():
    torch.manual_seed(0)
    base = Tiny()
    model = copy.deepcopy(base)
    lora.inject(model, TARGETS, r=2, lora_alpha=4, init_lora_weights="lora_ga", use_dora=True,
                loraga_train_step=_train_step(model))
    assert model.q.lora_B.abs().sum() > 0
    x = torch.randn(4, 12)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-5)


def test_errors_name_the_fault():
    model = lora.inject(Tiny(), TARGETS, r=2)
    with pytest.raises(ValueError, match="no layer of the model was built with init_lora_weights='lora_ga'"):
        lora.loraga_init(model, lambda: None)
    model = lora.inject(Tiny(), TARGETS, r=2, init_lora_weights="lora_ga")
    with pytest.raises(ValueError, match="train_step ran no backward pass through 'q'"):
        lora.loraga_init(model, lambda: None)
    with pytest.raises(ValueError, match="direction='AB'"):
        lora.loraga_init(model, lambda: None, direction="AB")
    with pytest.raises(ValueError, match=r"LoRA-GA does not compose with LoRA²"):
        lora.LoRAConfig(method="lora2", init_lora_weights="lora_ga")
    with pytest.raises(ValueError, match="loraga_train_step is given but init_lora_weights"):
        lora.inject(Tiny(), TARGETS, loraga_train_step=lambda: None)


def test_a_loraga_adapter_loads_on_the_original_base_and_resumes(tmp_path):
    """The adapter carries A0, B0 (lora_A0 / lora_B0): loading it into a fresh model on the ORIGINAL weights
    puts the residual in place without estimating the gradient again; so does a PEFT export (rank 2r)."""
    torch.manual_seed(0)
    base = Tiny()
    model = copy.deepcopy(base)
    lora.inject(model, TARGETS, r=2, lora_alpha=4, init_lora_weights="lora_ga", loraga_train_step=_train_step(model),
                merge_weights=False)
    with torch.no_grad():
        model.q.lora_A.add_(0.05)  # "trained"
    x = torch.randn(4, 12)
    lora.save_adapter(model, tmp_path / "own")
    fresh = lora.load_adapter(copy.deepcopy(base), tmp_path / "own")
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-5)
    # loading it again (a resume) does not subtract twice
    fresh.load_state_dict(lora.lora_state_dict(model), strict=False)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-5)
    lora.export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-5)


# -- lorapro/train.py --lora dora | pissa | lora-ga ---------------------------------------------------------
from test_lorapro_train import argv, assets, train_loss  # noqa: E402,F401  (assets: a module fixture)


@pytest.mark.parametrize("method, extra", [("dora", ()), ("pissa", ()), ("lora-ga", ("--use_rslora",)),
                                           ("lora-pro", ("--init_lora_weights", "pissa_niter_2"))])
def test_driver_trains_the_baseline_and_both_adapter_folders_load_on_the_original_model(assets, tmp_path, method,
                                                                                        extra):
    import transformers
    from loralib.tasks.instruct import evaluation, run
    from lorapro import flags

    out = tmp_path / "run"
    args = flags.train_spec(argv(assets, out, "--lora", method, "--lr", "2e-2", "--max_steps", "8",
                                              "--lr_scheduler_type", "constant", *extra))
    p = run.prepare(args)
    before = train_loss(p)
    run.execute(p)
    assert train_loss(p) < 0.9 * before
    config = json.loads((out / "run_config.json").read_text())
    assert config["method"] == {"lora-pro": "lorapro"}.get(method, method)
    assert config["lora"]["use_dora"] == (method == "dora")
    ids = torch.tensor([p.train_examples[1]["input_ids"]])
    want = p.model.eval()(ids).logits
    hf = transformers.LlamaForCausalLM.from_pretrained(assets["model"]).eval()
    theirs = peft.PeftModel.from_pretrained(hf, str(out / "peft_adapter")).eval()
    torch.testing.assert_close(theirs(ids).logits, want, rtol=0, atol=1e-4)
    for folder in ("adapter", "peft_adapter"):
        eval_args = flags.evaluation_spec(
            ["--model_name_or_path", assets["model"], "--eval_task", "gsm8k", "--eval_data_path", assets["gsm8k"],
             "--lora_path", str(out / folder), "--output_dir", str(tmp_path / folder), "--no-bf16"])
        got = evaluation.prepare_evaluation(eval_args).model.eval()(ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4, msg=folder)


@pytest.mark.parametrize("extra, message", [
    (["--lora", "adalora", "--use_dora"], "--use_dora does not compose with --lora adalora"),
    (["--lora", "lora2", "--init_lora_weights", "pissa"], "--init_lora_weights pissa does not compose with --lora lora2"),
    (["--lora", "full", "--use_rslora"], "--use_rslora does not compose with --lora full"),
    (["--lora", "rslora-pro", "--use_dora"], "DoRA (--use_dora) does not compose with LoRA-Pro (--lora rslora-pro)"),
    (["--lora", "lora", "--init_lora_weights", "olora"], "init_lora_weights='olora' is not one of"),
])
def test_driver_refuses_what_does_not_compose(assets, tmp_path, capsys, extra, message):
    from lorapro import train as lorapro_train

    try:
        code = lorapro_train.main(argv(assets, tmp_path / "o", *extra))
    except SystemExit as exit:  # argparse's own refusal of a flag value
        code = exit.code
    assert code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_lorapro_script_runs_a_baseline_row_and_compare_matches_it(tmp_path):
    """scripts/lorapro_gsm8k.sh --smoke lora-ga trains and evaluates (--loraga_batches passed), and `loralib
    compare` matches the run to the registry's lorapro row of that name (53.6 on GSM8K)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=sys.executable, SEEDS="0", SMOKE_DIR=str(tmp_path / "smoke"),
               OUT_DIR=str(tmp_path / "out"), PYTHONPATH=str(repo), LORAGA_BATCHES="2")
    proc = subprocess.run(["bash", str(repo / "scripts" / "lorapro_gsm8k.sh"), "--smoke", "lora-ga"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "lora-ga" / "seed0"
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["method"] == "lora-ga" and config["args"]["loraga_batches"] == 2
    assert (run_dir / "eval_results.json").is_file() and (run_dir / "peft_adapter").is_dir()
    cmp = subprocess.run([sys.executable, "-m", "loralib.repro.compare", str(tmp_path / "out"), "--paper", "lorapro",
                          "--out", str(tmp_path / "c.png")], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=300)
    assert "53.6" in cmp.stdout and "lora-ga" in cmp.stdout, (cmp.stdout, cmp.stderr[-2000:])


def test_peft_converted_loraga_adapter_imports_on_the_original_base(tmp_path):
    torch.manual_seed(0)
    base = Tiny()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig())
    residual_base = copy.deepcopy(base)
    peft.preprocess_loraga(residual_base, config, _train_step(residual_base))
    theirs = peft.get_peft_model(residual_base, config)
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial copy
    theirs.save_pretrained(tmp_path / "init")
    theirs.peft_config["default"].init_lora_weights = "lora_ga"
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(0.05)
    theirs.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    x = torch.randn(4, 12)
    ours = lora.import_peft(copy.deepcopy(base), tmp_path / "conv")  # the ORIGINAL weights
    assert ours.q.r == 4
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_one_matrix_at_a_time_gives_the_same_init_with_one_gradient_alive(monkeypatch):
    seeded_svd_lowrank(monkeypatch)
    torch.manual_seed(0)
    base = Tiny()
    together = lora.inject(copy.deepcopy(base), TARGETS, r=2, lora_alpha=4, init_lora_weights="lora_ga")
    lora.loraga_init(together, _train_step(together))
    apart = lora.inject(copy.deepcopy(base), TARGETS, r=2, lora_alpha=4, init_lora_weights="lora_ga")
    alive = []

    def step():
        alive.append(sum(p.requires_grad for p in apart.parameters()))
        _train_step(apart)()

    lora.loraga_init(apart, step, one_matrix_at_a_time=True)
    assert alive == [1, 1, 1]  # one train_step per layer, one weight with a gradient in each
    for name in TARGETS:
        a, b = getattr(together, name), getattr(apart, name)
        torch.testing.assert_close(b.lora_B @ b.lora_A, a.lora_B @ a.lora_A, rtol=0, atol=1e-5)
        torch.testing.assert_close(b.weight, a.weight, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_fused_projection_gets_peft_loraga_of_each_chunk(fan_in_fan_out, monkeypatch):
    """q|k|v fused in one MergedLinear (LoRA on q, v) vs PEFT on three separate projections (nn.Linear, or
    Conv1D for a fan_in_fan_out weight): the same gradients, so the same chunk factors and residuals."""
    from transformers.pytorch_utils import Conv1D

    seeded_svd_lowrank(monkeypatch)
    torch.manual_seed(0)
    fused = lora.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True], fan_in_fan_out=fan_in_fan_out,
                              init_lora_weights="lora_ga", merge_weights=False)
    W0 = (fused.weight.t() if fan_in_fan_out else fused.weight).detach().clone()

    class Separate(nn.Module):
        def __init__(self):
            super().__init__()
            for name, rows in (("q", slice(0, 4)), ("k", slice(4, 8)), ("v", slice(8, 12))):
                layer = Conv1D(4, 8) if fan_in_fan_out else nn.Linear(8, 4)
                with torch.no_grad():
                    layer.weight.copy_(W0[rows].t() if fan_in_fan_out else W0[rows])
                    layer.bias.copy_(fused.bias[rows])
                setattr(self, name, layer)

        def forward(self, x):
            return torch.cat([self.q(x), self.k(x), self.v(x)], -1)

    separate = Separate()
    batches = [torch.randn(5, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def step_of(model):
        def step():
            for x in batches:
                (10 * model(x).tanh().pow(2).sum()).backward()
        return step

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig())
    peft.preprocess_loraga(separate, config, step_of(separate))
    theirs = peft.get_peft_model(separate, config)
    ours = nn.Sequential(fused)
    lora.loraga_init(ours, step_of(ours))
    delta = fused.delta_weight()
    delta, W = (delta.t(), fused.weight.t()) if fan_in_fan_out else (delta, fused.weight)
    for name, rows in (("q", slice(0, 4)), ("v", slice(8, 12))):
        ref = theirs.base_model.model.get_submodule(name)
        ref_ba = ref.scaling["default"] * ref.lora_B["default"].weight @ ref.lora_A["default"].weight
        # gradients through a fused and through separate layers differ in rounding: 1e-5 relative to entries ~2
        torch.testing.assert_close(delta[rows], ref_ba, rtol=1e-5, atol=1e-5)
        ref_w = ref.base_layer.weight
        torch.testing.assert_close(W[rows], ref_w.t() if fan_in_fan_out else ref_w, rtol=1e-5, atol=1e-5)
    assert delta.abs().max() > 1e-3 and torch.equal(delta[4:8], torch.zeros_like(delta[4:8]))
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), x @ W0.t() + fused.bias, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method, zero3", [("dora", False), ("lora-ga", False), ("dora", True), ("pissa", True)])
def test_baselines_on_two_processes_equal_one(assets, tmp_path, method, zero3):
    """torchrun DDP: the magnitude vector is reduced like any parameter and every rank computes the same LoRA-GA
    init (from the same first batches). DeepSpeed ZeRO-3 partitions the weights, DoRA's magnitude and PiSSA's
    residual record included, and rank 0 evaluates on the base read again. Either way the adapter (lora_A0 /
    lora_B0 included) equals one process's, and so do the answers."""
    from pathlib import Path
    from test_lorapro_train import PARTITION_ALL, _adapter, _subprocess, _torchrun_deepspeed, _write
    from loralib.tasks.instruct import run
    from lorapro import train as lorapro_train

    flags = ["--lora", method, "--lr", "1e-2", "--max_steps", "2", "--loraga_batches", "2", "--max_grad_norm", "0"]
    if zero3:
        flags += ["--gradient_checkpointing", "--do_eval", "--eval_data_path", assets["gsm8k"], "--max_new_tokens", "6"]
    lorapro_train.run(argv(assets, tmp_path / "one", *flags))
    if zero3:
        pytest.importorskip("deepspeed")
        ds3 = _write(tmp_path / "ds3.json", {"zero_optimization": {"stage": 3, **PARTITION_ALL}})
        _torchrun_deepspeed(tmp_path, argv(assets, tmp_path / "two", *flags, "--deepspeed", ds3))
    else:
        train_py = Path(run.__file__).resolve().parents[3] / "lorapro" / "train.py"
        _subprocess(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(train_py),
                     *argv(assets, tmp_path / "two", *flags)])
    single, double = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert single.keys() == double.keys()
    assert all(torch.allclose(single[k], double[k], atol=1e-5) for k in single)
    assert any(k.endswith("lora_magnitude_vector" if method == "dora" else "lora_A0") for k in single)
    if zero3:
        assert (tmp_path / "two" / "predictions.jsonl").read_text() == (tmp_path / "one" / "predictions.jsonl").read_text()
