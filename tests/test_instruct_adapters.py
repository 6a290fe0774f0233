"""lorapro/evaluate.py --lora_path opens its adapter through loralib.adapter_files.open_adapter: after one short
lorapro/train.py run (2 steps) on the smoke assets' tiny Llama, the run folder, its adapter/, its
checkpoint-<step>/, its peft_adapter/ (PEFT LoRA; AdaLoRA's with its rank_pattern) and the run without its final
adapter give the same greedy predictions and eval_results.json, each recording the method of the run that made
the adapter; microsoft's released GPT-2 file loads on a gpt2 model; a RoBERTa adapter in any format is one error
naming --lora_path, raised before the model is built, with nothing written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import loralib as lora  # noqa: E402
from loralib.tasks.instruct import evaluation  # noqa: E402
from lorapro import evaluate as lorapro_evaluate, flags, train as lorapro_train  # noqa: E402
from lorapro.smoke import build_smoke_assets  # noqa: E402
from _tiny_hf import randomise_lora, tiny_roberta  # noqa: E402

RESULT_FILES = ("eval_results.json", "predictions.jsonl", "predictions_released.jsonl")
# method -> (the name run_config.json records, its flags). AdaLoRA's E starts at 0: two steps move the greedy
# tokens only with a large lr; its allocator prunes from the first step, so the PEFT folder has a rank_pattern.
METHODS = {"lora-pro": ("lorapro", ("--lr", "5e-2")),
           "adalora": ("adalora", ("--lr", "0.5", "--init_warmup_ratio", "0", "--final_warmup_ratio", "0.5",
                                   "--mask_interval", "1", "--target_rank", "4"))}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_smoke_assets(tmp_path_factory.mktemp("smoke"))


def _train(assets, out: Path, method: str) -> None:
    assert lorapro_train.main([
        "--model_name_or_path", assets["model"], "--dataset", "metamath", "--data_path", assets["metamath.jsonl"],
        "--output_dir", str(out), "--lora", method, "--n_train", "8", "--n_eval", "0", "--max_length", "512",
        "--global_batch_size", "4", "--max_steps", "2", "--lr_scheduler_type", "constant",
        "--disable_tqdm", "--no-bf16", *METHODS[method][1]]) == 0


def _evaluate(assets, out: Path, *lora_path: str) -> int:
    return lorapro_evaluate.main([
        "--model_name_or_path", assets["model"], "--eval_task", "gsm8k", "--eval_data_path",
        assets["gsm8k_test.jsonl"], "--max_new_tokens", "6", "--output_dir", str(out), "--no-bf16", *lora_path])


def _results(folder: Path) -> dict:
    return {name: (folder / name).read_text() for name in RESULT_FILES}


@pytest.mark.parametrize("method", METHODS)
def test_every_form_of_a_run_evaluates_the_same(assets, tmp_path, method):
    run, name = tmp_path / "run", METHODS[method][0]
    _train(assets, run, method)
    checkpoints = sorted(run.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-2"]
    peft_config = json.loads((run / "peft_adapter" / "adapter_config.json").read_text())
    if method == "adalora":  # pruned ranks: the PEFT folder holds modules of several ranks
        assert peft_config["rank_pattern"] and set(peft_config["rank_pattern"].values()) != {peft_config["r"]}
    interrupted = tmp_path / "cut_run"  # a run without its final adapter: its newest checkpoint is read
    shutil.copytree(run, interrupted, ignore=lambda folder, names: ("adapter", "peft_adapter") if folder == str(run)
                    else ())
    forms = {"run": run, "adapter": run / "adapter", "checkpoint": checkpoints[0], "peft": run / "peft_adapter",
             "interrupted": interrupted}
    for form, path in forms.items():
        assert _evaluate(assets, tmp_path / form, "--lora_path", str(path)) == 0, form
        assert json.loads((tmp_path / form / "run_config.json").read_text())["method"] == name, form
    recorded = json.loads((tmp_path / "peft" / "run_config.json").read_text())["lora"]
    assert recorded["target_modules"] == peft_config["target_modules"]  # the run's names, not every module path
    want = _results(tmp_path / "adapter")
    for form in forms:
        assert _results(tmp_path / form) == want, form
    # the adapter is in the predictions: the base model's differ
    assert _evaluate(assets, tmp_path / "base") == 0
    assert json.loads((tmp_path / "base" / "run_config.json").read_text())["method"] == "base"
    assert (tmp_path / "base" / "predictions.jsonl").read_text() != want["predictions.jsonl"]


def _roberta_adapters(root: Path) -> dict:
    """A RoBERTa adapter in each format: a GLUE run's (its run_config.json names the family), the same folder
    alone (no family recorded), its PEFT export, and microsoft's released layout."""
    model = lora.inject(tiny_roberta(), ["query", "value"], r=2, lora_alpha=4)
    randomise_lora(model)
    lora.save_adapter(model, root / "glue_run" / "adapter")
    (root / "glue_run" / "run_config.json").write_text(json.dumps({"method": "lora", "model_type": "roberta"}))
    lora.save_adapter(model, root / "bare_adapter")
    lora.export_peft(model, root / "peft_roberta")
    released = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    torch.save(released, root / "roberta_base_lora_mnli.bin")
    return {"run": root / "glue_run", "ours": root / "bare_adapter", "peft": root / "peft_roberta",
            "released": root / "roberta_base_lora_mnli.bin"}


def test_a_roberta_adapter_is_one_error_naming_the_flag_before_the_model_is_built(assets, tmp_path, capsys,
                                                                                 monkeypatch):
    built = []
    monkeypatch.setattr(evaluation, "load_model", lambda *args: built.append(args))
    for form, path in _roberta_adapters(tmp_path / "roberta").items():
        out = tmp_path / f"eval_{form}"
        assert _evaluate(assets, out, "--lora_path", str(path)) == 2, form
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"lorapro/evaluate.py: error: --lora_path '{path}'"), (form, err)
        assert "roberta" in err[0] and "llama" in err[0], (form, err)
        assert not out.exists() and not built, form


def test_a_path_that_is_no_adapter_names_the_flag(assets, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "empty"):
        assert _evaluate(assets, tmp_path / "out", "--lora_path", str(path)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"lorapro/evaluate.py: error: --lora_path '{path}'"), err
        assert not (tmp_path / "out").exists()


def test_a_released_gpt2_file_evaluates_on_a_gpt2_model(assets, tmp_path):
    """microsoft's released GPT-2 layout (c_attn's lora_A stacks q's and v's) loads as load_gpt2_nlg_adapter."""
    import transformers
    from _gpt2_fixtures import hf_model, ours_like
    from loralib.models.released import load_gpt2_nlg_adapter

    hf = hf_model()
    hf.save_pretrained(tmp_path / "gpt2")
    transformers.AutoTokenizer.from_pretrained(assets["model"]).save_pretrained(tmp_path / "gpt2")
    g, n_embd = torch.Generator().manual_seed(0), hf.config.n_embd
    factors = {}
    for i in range(hf.config.n_layer):
        factors[f"module.transformer.h.{i}.attn.c_attn.lora_A"] = 0.3 * torch.randn(8, n_embd, generator=g)
        factors[f"module.transformer.h.{i}.attn.c_attn.lora_B"] = 0.3 * torch.randn(2 * n_embd, 4, generator=g)
    released = tmp_path / "gpt2_md_lora_e2e.pt"
    torch.save({"model_state_dict": factors}, released)
    spec = flags.evaluation_spec(["--model_name_or_path", str(tmp_path / "gpt2"), "--eval_task", "gsm8k",
                                  "--eval_data_path", assets["gsm8k_test.jsonl"], "--lora_path", str(released),
                                  "--output_dir", str(tmp_path / "out"), "--no-bf16"])
    got = evaluation.prepare_evaluation(spec)
    assert got.lora.r == 4 and got.lora.enable_lora == (True, False, True) and got.method_name == "lora"
    want = load_gpt2_nlg_adapter(ours_like(hf, lora=got.lora), released)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(got.model.eval()(ids).logits, want.eval()(ids).logits, rtol=0, atol=0)
        assert not torch.allclose(got.model(ids).logits, ours_like(hf)(ids).logits)  # the adapter is in
