"""lorapro/train.py (loralib.tasks.instruct.run) on a tiny Llama and a tiny MetaMathQA-format file:

- every --lora method trains and lowers the loss on a memorisation set;
- lora-pro through the driver equals direct LoRAProAdamW calls (two steps) and, for the first step, the
  closed form (B = 0: A stays, B moves by -lr (1/s) d A^T (A A^T)^-1 with d the Adam direction of g P_A);
- the exported PEFT adapter gives transformers + PEFT the logits of our model;
- bad flag combinations: one clear error, nothing written; an interrupted run resumes exactly;
- evaluation (GSM8K with a stubbed generator) writes the contract's eval_results.json and run_config.json.
"""
from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from loralib.tasks.instruct import InstructCollator, evaluation, run  # noqa: E402
from loralib.train.run import seed_everything  # noqa: E402
from lorapro import evaluate as lorapro_evaluate, flags, train as lorapro_train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _torchrun import entry_point_body, torchrun, write_worker  # noqa: E402

QA = [("What is 2 plus 3?", "2 + 3 = 5. The answer is: 5"), ("What is 4 times 2?", "4 * 2 = 8. The answer is: 8"),
      ("What is 9 minus 7?", "9 - 7 = 2. The answer is: 2"), ("What is 6 plus 1?", "6 + 1 = 7. The answer is: 7"),
      ("What is 8 minus 5?", "8 - 5 = 3. The answer is: 3"), ("What is 3 times 3?", "3 * 3 = 9. The answer is: 9"),
      ("What is 1 plus 0?", "1 + 0 = 1. The answer is: 1"), ("What is 5 minus 1?", "5 - 1 = 4. The answer is: 4")]


def make_tokenizer():
    """A character-level Llama tokenizer of the real transformers class, built offline."""
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    tokens = ["<unk>", "<s>", "</s>"] + chars + ["\u2581" + c for c in chars] + ["\u2581", "<0x0A>"]
    return transformers.LlamaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def write_tiny_llama(folder: Path, vocab: int) -> Path:
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                                      initializer_range=0.3)  # logits large enough to memorise with a frozen head
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def write_metamath(path: Path, pairs=QA) -> Path:
    rows = [{"query": q, "response": a, "type": "GSM_Rephrased"} for q, a in pairs]
    rows.insert(3, {"query": "Solve x.", "response": "x = 1", "type": "MATH_AnsAug"})  # dropped by the filter
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lorapro_assets")
    tokenizer = make_tokenizer()
    model_dir = write_tiny_llama(root / "tiny-llama", len(tokenizer))
    tokenizer.save_pretrained(model_dir)
    data = write_metamath(root / "metamath.jsonl")
    gsm = root / "gsm8k_test.jsonl"
    gsm.write_text("".join(json.dumps({"question": q, "answer": f"{a}\n#### {a[-1]}"}) + "\n" for q, a in QA[:3]))
    return {"model": str(model_dir), "data": str(data), "gsm8k": str(gsm), "root": root}


def argv(assets, out, *extra):
    return ["--model_name_or_path", assets["model"], "--dataset", "metamath", "--data_path", assets["data"],
            "--output_dir", str(out), "--n_train", "8", "--n_eval", "0", "--max_length", "256",
            "--global_batch_size", "4", "--disable_tqdm", "--logging_steps", "1", "--no-bf16", *extra]


def train_loss(p: run.Prepared) -> float:
    p.model.eval()
    try:
        return run.eval_loss(p.model, p.train_examples, InstructCollator(run.pad_id(p.tokenizer)))["loss"]
    finally:
        p.model.train()


LRS = {"lora": 2e-2, "rslora": 1e-2, "lora-pro": 2e-2, "rslora-pro": 2e-2, "loraplus": 5e-3, "adalora": 2e-2,
       "lora2": 2e-2, "full": 2e-3}


@pytest.mark.parametrize("method", list(LRS))
def test_every_method_lowers_the_loss(assets, tmp_path, method):
    out = tmp_path / method
    args = flags.train_spec(argv(assets, out, "--lora", method, "--lr", str(LRS[method]),
                                              "--max_steps", "12", "--lr_scheduler_type", "constant"))
    p = run.prepare(args)
    assert len(p.train_examples) == 8 and p.grad_accum == 4
    before = train_loss(p)
    results = run.execute(p)
    after = train_loss(p)
    assert after < 0.8 * before, (method, before, after)
    assert results["train"]["global_step"] == 12
    config = json.loads((out / "run_config.json").read_text())
    assert config["method"] == {"lora-pro": "lorapro"}.get(method, method)
    assert config["model_name_or_path"] == assets["model"]
    assert (config["lora"] is None) == (method == "full")
    if method != "full":
        assert config["lora"]["use_rslora"] == method.startswith("rslora")
    assert (out / "adapter" / "adapter.safetensors").is_file()
    assert (out / "peft_adapter").is_dir() == (method != "full")
    if method in ("adalora", "lora2"):
        assert (out / "rank_pattern.json").is_file()


def _whole_batch_grads(model, collate, examples):
    """The loop's gradient for one optimizer step: mean over micro-batches of one example each."""
    model.zero_grad(set_to_none=True)
    for example in examples:
        (model(**collate([example])).loss / len(examples)).backward()


def test_lorapro_through_the_driver_equals_the_optimizer_and_the_closed_form(assets, tmp_path):
    from loralib.optim import LoRAProAdamW

    lr, eps, steps = 1e-2, 1e-3, 2
    out = tmp_path / "pro"
    args = flags.train_spec(argv(assets, out, "--lora", "lora-pro", "--lr", str(lr), "--max_steps",
                                              str(steps), "--global_batch_size", "8", "--lr_scheduler_type",
                                              "constant", "--warmup_ratio", "0", "--max_grad_norm", "0",
                                              "--adam_epsilon", str(eps), "--lora_alpha", "8"))
    p = run.prepare(args)
    run.execute(p)
    trained = {n: t.detach().clone() for n, t in p.model.named_parameters() if "lora_" in n}

    # The same model, built as the driver builds it, stepped by direct LoRAProAdamW calls on the whole set.
    seed_everything(0)
    model = run.load_model(Path(assets["model"]), p.method.lora, "fp32").train()
    run.mark_trainable(model, p.method)
    init = {n: t.detach().clone() for n, t in model.named_parameters() if "lora_" in n}
    opt = LoRAProAdamW(model, lr=lr, eps=eps, mode="full")
    collate = InstructCollator(run.pad_id(p.tokenizer))
    examples = p.train_examples
    for step in range(steps):
        _whole_batch_grads(model, collate, examples)
        opt.step()
        if step == 0:
            first = {n: t.detach().clone() for n, t in model.named_parameters() if "lora_" in n}
    for name, value in model.named_parameters():
        if "lora_" in name:
            assert torch.allclose(trained[name], value.detach(), atol=2e-5, rtol=1e-4), name

    # Closed form of the first step at B = 0 (methods.md §5): g~ = g P_A, d = g~ / (|g~| + eps) (Adam, step 1),
    # A unchanged, B = -lr (1/s) d A^T (A A^T)^-1.
    name = "model.layers.0.self_attn.q_proj"
    A = init[f"{name}.lora_A"].double()
    gB = _lora_b_grad_at_init(assets, p)
    s = p.model.model.layers[0].self_attn.q_proj.scaling
    gAt = gB / s                                     # g_B = s g A^T at any B, so g A^T = g_B / s (m, r)
    g_equiv = gAt @ torch.linalg.inv(A @ A.T) @ A    # g P_A (m, n)
    d = g_equiv / (g_equiv.abs() + eps)
    want_B = -lr / s * d @ A.T @ torch.linalg.inv(A @ A.T)
    assert torch.equal(first[f"{name}.lora_A"], init[f"{name}.lora_A"])
    assert torch.allclose(first[f"{name}.lora_B"].double(), want_B, atol=1e-6, rtol=1e-4)
    assert want_B.abs().max() > 1e-4  # the step did something


def _lora_b_grad_at_init(assets, p) -> torch.Tensor:
    seed_everything(0)
    model = run.load_model(Path(assets["model"]), p.method.lora, "fp32").train()
    run.mark_trainable(model, p.method)
    _whole_batch_grads(model, InstructCollator(run.pad_id(p.tokenizer)), p.train_examples)
    return model.model.layers[0].self_attn.q_proj.lora_B.grad.double()


def test_peft_export_gives_transformers_the_same_logits(assets, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "rs"
    args = flags.train_spec(argv(assets, out, "--lora", "rslora-pro", "--lr", "2e-2", "--max_steps", "3"))
    p = run.prepare(args)
    run.execute(p)
    ids = torch.tensor([p.train_examples[0]["input_ids"]])
    ours = p.model.eval()(ids).logits
    hf = transformers.LlamaForCausalLM.from_pretrained(assets["model"]).eval()
    base = hf(ids).logits
    wrapped = peft.PeftModel.from_pretrained(hf, str(out / "peft_adapter")).eval()
    theirs = wrapped(ids).logits
    assert (ours - base).abs().max() > 1e-3  # the adapter changes the output
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    config = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == 8 and config["lora_alpha"] == 16


def _write(path: Path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.mark.parametrize("extra, message", [
    (["--lora", "lora", "--lorapro_mode", "efficient"], "--lorapro_mode applies"),
    (["--lora", "lora-pro", "--loraplus_lr_ratio", "4"], "--loraplus_lr_ratio applies"),
    (["--lora", "lora", "--target_rank", "2"], "--target_rank / --init_rank apply"),
    (["--lora", "lora-pro", "--weight_decay", "0.1", "--deepspeed", "DS2"], "--lorapro_mode full under --deepspeed"),
    (["--lora", "adalora", "--deepspeed", "DS3"], "with a ZeRO-3 --deepspeed config is not supported"),
    (["--lora", "lora", "--deepspeed", "DS4"], "stage=4"),
    (["--lora", "lora", "--deepspeed", "missing.json"], "no such file"),
    (["--per_device_train_batch_size", "3"], "not a multiple"),
    (["--gradient_accumulation_steps", "3"], "!= --global_batch_size"),
    (["--target_modules", "nonexistent_proj"], "matches no projection"),
    (["--template", "chat"], "no chat template"),
    (["--lora_dropout", "1.5"], "--lora_dropout"),
    (["--data_path", "missing.jsonl"], "missing.jsonl"),
])
def test_bad_flags_give_one_clear_error_and_write_nothing(assets, tmp_path, capsys, extra, message):
    ds2 = _write(tmp_path / "ds2.json", {"zero_optimization": {"stage": 2}})
    ds3 = _write(tmp_path / "ds3.json", {"zero_optimization": {"stage": 3}})
    ds4 = _write(tmp_path / "ds4.json", {"zero_optimization": {"stage": 4}})
    extra = [{"DS2": ds2, "DS3": ds3, "DS4": ds4}.get(e, e) for e in extra]
    out = tmp_path / "out"
    assert lorapro_train.main(argv(assets, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorapro/train.py: error:") and message in err[0], err
    assert not out.exists()


def test_unknown_method_and_busy_output_dir(assets, tmp_path, capsys):
    with pytest.raises(SystemExit):
        flags.train_spec(argv(assets, tmp_path / "x", "--lora", "vera"))
    assert "unknown method 'vera'" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert lorapro_train.main(argv(assets, busy, "--max_steps", "1")) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


def test_an_interrupted_run_resumes_exactly(assets, tmp_path):
    common = ["--lora", "lora-pro", "--lr", "1e-2", "--max_steps", "4", "--save_steps", "2"]
    whole = tmp_path / "whole"
    lorapro_train.run(argv(assets, whole, *common))
    cut = tmp_path / "cut"
    lorapro_train.run(argv(assets, cut, *common))
    # Make "cut" look like a run killed after its step-2 checkpoint.
    import shutil
    for name in ("checkpoint-4", "adapter", "peft_adapter", "train_results.json"):
        shutil.rmtree(cut / name) if (cut / name).is_dir() else (cut / name).unlink()
    lorapro_train.run(argv(assets, cut, *common, "--resume_from_checkpoint", "latest"))
    from safetensors.torch import load_file
    a = load_file(str(whole / "adapter" / "adapter.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_training_then_gsm8k_evaluation_writes_the_contract_files(assets, tmp_path, monkeypatch):
    import loralib.tasks.instruct.gsm8k as gsm8k

    seen = {}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen.update(kwargs, n=len(prompts), training=model.training)
        return ["The answer is: 5\n#### 5", "#### 1", "nothing"]

    monkeypatch.setattr(gsm8k, "generate_texts", fake_generate)
    out = tmp_path / "eval"
    assert lorapro_train.main(argv(assets, out, "--max_steps", "1", "--do_eval", "--eval_data_path", assets["gsm8k"],
                         "--max_new_tokens", "7", "--eval_batch_size", "2")) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results == {"task": "gsm8k", "split": "test", "num_examples": 3, "accuracy": pytest.approx(1 / 3),
                       "accuracy_released": pytest.approx(1 / 3)}  # --eval_mode both (the default)
    assert seen["n"] == 3 and seen["max_new_tokens"] == 7 and seen["batch_size"] == 2 and not seen["training"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, False]

    # lorapro/evaluate.py on the saved adapter: same evaluation, its own output folder.
    out2 = tmp_path / "eval2"
    assert lorapro_evaluate.main(["--model_name_or_path", assets["model"], "--eval_task", "gsm8k", "--eval_data_path",
                              assets["gsm8k"], "--lora_path", str(out / "adapter"), "--output_dir", str(out2),
                              "--no-bf16"]) == 0
    assert json.loads((out2 / "eval_results.json").read_text())["accuracy"] == pytest.approx(1 / 3)
    assert json.loads((out2 / "run_config.json").read_text())["method"] == "lora"


# -- several processes (subprocesses: DDP and DeepSpeed keep a process group) -----------------------------

# ZeRO-3 with every parameter partitioned and released after each use (by default DeepSpeed keeps tensors
# under 1e5 elements whole, and keeps gathered ones that are soon used again: a tiny model would never be
# partitioned when it matters)
PARTITION_ALL = {"stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
                 "stage3_prefetch_bucket_size": 0}
def _deepspeed_worker(tmp_path: Path) -> Path:
    """lorapro/train.py's driver behind the DeepSpeed test-machine prelude and the quiet exit of _torchrun."""
    return write_worker(tmp_path / "train_ds.py", entry_point_body("lorapro.train"))


def _torchrun_deepspeed(tmp_path: Path, args) -> None:
    """lorapro/train.py's driver on 2 processes (torchrun)."""
    torchrun(_deepspeed_worker(tmp_path), args)


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter" / "adapter.safetensors"))


def _subprocess(cmd, **env):
    import os
    import subprocess
    # the repository root on the path: the workers import the paper folder (lorapro.train), which is not installed
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]), **env)
    done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=full_env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_lorapro_on_two_processes_equals_one(assets, tmp_path, mode):
    common = ["--lora", "lora-pro", "--lorapro_mode", mode, "--lr", "1e-2", "--max_steps", "2"]
    one = tmp_path / "one"
    lorapro_train.run(argv(assets, one, *common))
    two = tmp_path / "two"
    _subprocess(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 str(Path(run.__file__).resolve().parents[3] / "lorapro" / "train.py"), *argv(assets, two, *common)])
    a, b = _adapter(one), _adapter(two)
    assert json.loads((two / "run_config.json").read_text())["gradient_accumulation_steps"] == 2
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if k.endswith("lora_B"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_lorapro_under_deepspeed_equals_the_efficient_mode(assets, tmp_path, stage):
    pytest.importorskip("deepspeed")
    common = ["--lora", "lora-pro", "--lr", "1e-2", "--max_steps", "2", "--max_grad_norm", "0"]
    plain = tmp_path / "plain"
    lorapro_train.run(argv(assets, plain, *common, "--lorapro_mode", "efficient"))
    ds = tmp_path / "ds"
    shipped = json.loads((Path(run.__file__).resolve().parents[3] / "lorapro" / f"ds_zero{stage}.json").read_text())
    shipped["zero_optimization"].update(PARTITION_ALL if stage == 3 else {})
    config = _write(tmp_path / "ds.json", shipped)  # the configs lorapro/README.md points to
    _subprocess([str(_deepspeed_worker(tmp_path)),
                 *argv(assets, ds, *common, "--lorapro_mode", "efficient", "--deepspeed", config)])
    assert json.loads((ds / "run_config.json").read_text())["lorapro_mode"] == "efficient"
    a, b = _adapter(plain), _adapter(ds)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_zero3_on_two_processes_equals_one_process_and_evaluates(assets, tmp_path, method):
    """ZeRO-3 partitions the model, LoRA factors included, over 2 processes (with gradient checkpointing):
    the adapter written whole equals the one-process run's, and rank 0's evaluation and PEFT export, which
    read the base again with the trained adapter, give the same files."""
    pytest.importorskip("deepspeed")
    common = ["--lora", method, "--lr", "1e-2" if method == "lora" else "2e-3", "--max_steps", "2",
              "--max_grad_norm", "0", "--gradient_checkpointing", "--do_eval", "--eval_data_path", assets["gsm8k"],
              "--max_new_tokens", "6"]
    one = tmp_path / "one"
    lorapro_train.run(argv(assets, one, *common))
    two = tmp_path / "two"
    config = _write(tmp_path / "ds3.json", {"zero_optimization": {"stage": 3, **PARTITION_ALL}})
    _torchrun_deepspeed(tmp_path, argv(assets, two, *common, "--deepspeed", config))
    a, b = _adapter(one), _adapter(two)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(not torch.equal(a[k], b[k].new_zeros(b[k].shape)) for k in a)
    assert (json.loads((two / "eval_results.json").read_text())
            == json.loads((one / "eval_results.json").read_text()))
    assert (two / "predictions.jsonl").read_text() == (one / "predictions.jsonl").read_text()
    if method == "lora":
        peft_one = (one / "peft_adapter" / "adapter_model.safetensors").read_bytes()
        assert len(peft_one) > 0 and (two / "peft_adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_full_lorapro_under_deepspeed_on_two_processes_equals_one_and_resumes(assets, tmp_path):
    """The paper's variant (m x n Adam moments) under ZeRO-2 on 2 processes, its moments sharded by pair:
    the same adapter as LoRAProAdamW(mode="full") on one process (gradient clipping at 1.0 in both), and a
    run resumed from its step-2 checkpoint (each rank's moments restored) ends where the whole run did."""
    pytest.importorskip("deepspeed")
    import shutil

    common = ["--lora", "lora-pro", "--lr", "1e-2", "--max_steps", "4", "--save_steps", "2"]
    one = tmp_path / "one"
    lorapro_train.run(argv(assets, one, *common))
    config = _write(tmp_path / "ds2.json", {"zero_optimization": {"stage": 2}})
    two = tmp_path / "two"
    _torchrun_deepspeed(tmp_path, argv(assets, two, *common, "--deepspeed", config))
    assert json.loads((two / "run_config.json").read_text())["lorapro_mode"] == "full"
    a, b = _adapter(one), _adapter(two)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert {p.name for p in (two / "checkpoint-2").glob("callbacks_*.pt")} == {"callbacks_0.pt", "callbacks_1.pt"}

    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    for late in ("checkpoint-4", "adapter", "peft_adapter"):
        shutil.rmtree(resumed / late)
    _torchrun_deepspeed(tmp_path, argv(assets, resumed, *common, "--deepspeed", config,
                                       "--resume_from_checkpoint", "latest"))
    c = _adapter(resumed)
    assert all(torch.allclose(b[k], c[k], atol=1e-7) for k in b)


@pytest.mark.slow
def test_adalora_under_deepspeed_zero2_on_two_processes_equals_one(assets, tmp_path):
    pytest.importorskip("deepspeed")
    common = ["--lora", "adalora", "--lr", "2e-2", "--max_steps", "6", "--init_warmup_ratio", "0.2",
              "--final_warmup_ratio", "0.3", "--mask_interval", "1"]
    one = tmp_path / "one"
    lorapro_train.run(argv(assets, one, *common))
    config = _write(tmp_path / "ds2.json", {"zero_optimization": {"stage": 2}})
    two = tmp_path / "two"
    _torchrun_deepspeed(tmp_path, argv(assets, two, *common, "--deepspeed", config))
    a, b = _adapter(one), _adapter(two)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    pattern = json.loads((one / "rank_pattern.json").read_text())
    assert json.loads((two / "rank_pattern.json").read_text()) == pattern
    kept = [bit for bits in pattern["rank_pattern"].values() for bit in bits]
    assert 0 < sum(kept) < len(kept)  # the allocator pruned


@pytest.mark.parametrize("method", ["rslora", "adalora"])
def test_evaluate_py_loads_our_adapter_and_the_peft_one_into_the_trained_model(assets, tmp_path, method):
    """AdaLoRA's PEFT folder is its exact plain-LoRA form, with a pruned rank pattern."""
    out = tmp_path / "t"
    extra = ["--init_warmup_ratio", "0.2", "--final_warmup_ratio", "0.3", "--mask_interval", "1"]
    args = flags.train_spec(argv(assets, out, "--lora", method, "--lr", "2e-2", "--max_steps", "6",
                                              *(extra if method == "adalora" else [])))
    p = run.prepare(args)
    run.execute(p)
    ids = torch.tensor([p.train_examples[1]["input_ids"]])
    want = p.model.eval()(ids).logits
    for folder in ("adapter", "peft_adapter"):
        eval_args = flags.evaluation_spec(
            ["--model_name_or_path", assets["model"], "--eval_task", "gsm8k", "--eval_data_path", assets["gsm8k"],
             "--lora_path", str(out / folder), "--output_dir", str(tmp_path / folder), "--no-bf16"])
        q = evaluation.prepare_evaluation(eval_args)
        got = q.model.eval()(ids).logits
        assert torch.allclose(got, want, atol=1e-5), (folder, (got - want).abs().max())
        if method == "adalora" and folder == "peft_adapter":
            config = json.loads((out / folder / "adapter_config.json").read_text())
            kept = json.loads((out / "rank_pattern.json").read_text())["rank_pattern"]
            assert {path: sum(bits) for path, bits in kept.items() if sum(bits)} == {  # pruned ranks left out
                path: config["rank_pattern"].get(path, config["r"]) for path in config["target_modules"]}
            assert 0 < sum(map(sum, kept.values())) < sum(map(len, kept.values()))
        assert len(q.eval_records) == 3 and q.eval_records[0]["target"] == "5"
