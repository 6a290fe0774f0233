"""examples/NLU/run_glue.py --lora_path takes every adapter format loralib.adapter_files.open_adapter recognises.

A tiny RoBERTa (and DeBERTa-v2) classifier's LoRA and head, trained two steps by run_glue.py itself, is written
three more ways from the same tensors: our save_adapter folder, microsoft's released .bin layout, and a PEFT
folder (get_peft_model + save_pretrained on the transformers model, the head through modules_to_save).
Evaluating each (the run folder and its checkpoint-2/ too) gives the same eval_results.json and the same logits;
a GPT-2 adapter is one error naming --lora_path, before anything is written. (The tiny models and GLUE files
are test_run_glue's.)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from test_run_glue import NLU, files  # noqa: E402,F401 (the tiny models and GLUE files: a fixture)
from test_run_glue import _base as run_glue_base  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import loralib as lora  # noqa: E402

HF_CLASSIFIER = {"roberta": transformers.RobertaForSequenceClassification,
                 "deberta": transformers.DebertaV2ForSequenceClassification}
HEAD = {"roberta": ("classifier",), "deberta": ("pooler", "classifier")}  # the trained modules outside the encoder


def _base(files, out, *extra, family="roberta"):
    return run_glue_base(files, family, "rte", out, *extra)  # later flags win: --learning_rate


def _ids():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 1  # RoBERTa's pad
    return ids, mask


def _logits(model, ids, mask):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def _peft_folder(family, files, tensors, r, alpha, folder: Path) -> Path:
    """The adapter as PEFT writes it for the transformers model: its LoRA targets, the head in modules_to_save."""
    hf = HF_CLASSIFIER[family].from_pretrained(files[family], num_labels=2)
    targets = sorted({k.split(".")[-2] for k in tensors if "lora_" in k})  # query, value (DeBERTa: *_proj)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                    lora_dropout=0.0, modules_to_save=list(HEAD[family])))
    state = {"base_model.model." + (k + ".weight" if "lora_" in k else k): v for k, v in tensors.items()}
    loaded = peft.set_peft_model_state_dict(model, state)
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    model.save_pretrained(folder)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert set(saved) == set(state) and all(torch.equal(saved[k], v) for k, v in state.items())
    return folder, model


@pytest.fixture(scope="module", params=["roberta", "deberta"])
def adapters(request, files, tmp_path_factory):
    """(family, {format: path} of the same adapter, the PEFT model (transformers) it is)."""
    family = request.param
    root = tmp_path_factory.mktemp("formats_" + family)
    run = root / "run"
    trained = NLU.run_glue(_base(files, run, "--do_train", "--apply_lora", "--lora_r", "4", "--learning_rate", "3e-2",
                                 "--max_steps", "2", "--save_steps", "2", family=family))
    tensors = load_file(str(run / "adapter" / "adapter.safetensors"))
    assert {k.split(".")[0] for k in tensors if "lora_" not in k} == set(HEAD[family])
    assert all(v.abs().max() > 0 for k, v in tensors.items() if k.endswith("lora_B"))  # trained: B moved off 0
    config = json.loads((run / "run_config.json").read_text())["lora"]
    assert config["lora_alpha"] == 2 * config["r"]  # as microsoft's released files imply
    lora.save_adapter(trained.model, root / "ours")
    torch.save(tensors, root / f"{family}_lora_rte.bin")
    peft_dir, peft_model = _peft_folder(family, files, tensors, config["r"], config["lora_alpha"], root / "peft")
    paths = {"run folder": run, "checkpoint": run / "checkpoint-2", "adapter/": run / "adapter",
             "save_adapter": root / "ours", "microsoft .bin": root / f"{family}_lora_rte.bin", "peft": peft_dir}
    return family, paths, peft_model


def test_every_format_evaluates_to_the_same_results(files, adapters, tmp_path):
    family, paths, peft_model = adapters
    ids, mask = _ids()
    results, logits = {}, {}
    for name, path in paths.items():
        out = tmp_path / name.replace(" ", "_").replace("/", "")
        result = NLU.run_glue(_base(files, out, "--do_eval", "--lora_path", str(path), family=family))
        results[name] = json.loads((out / "eval_results.json").read_text())
        logits[name] = _logits(result.model, ids, mask)
        assert json.loads((out / "run_config.json").read_text())["lora_path"] == str(path)
    reference = results["adapter/"]
    assert set(reference) == {"task", "split", "num_examples", "accuracy"}
    for name in paths:
        assert results[name] == reference, name
        torch.testing.assert_close(logits[name], logits["adapter/"], rtol=0, atol=1e-6, msg=name)
    # and the PEFT folder is what PEFT itself computes on the transformers model
    torch.testing.assert_close(_logits(peft_model, ids, mask), logits["peft"], rtol=1e-5, atol=1e-5)


def test_training_from_a_peft_folder_keeps_its_factors(files, adapters, tmp_path, capsys):
    family, paths, _ = adapters
    source = lora.open_adapter(paths["peft"])
    train = ["--do_train", "--max_steps", "1", "--learning_rate", "0", "--save_strategy", "no",
             "--lora_path", str(paths["peft"])]
    # LoRA flags that ask for other layers than the adapter's are refused, not ignored
    assert NLU.main(_base(files, tmp_path / "o", *train, "--apply_lora", "--lora_r", "8", family=family)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--lora_path" in err and "r=4, lora_alpha=8.0" in err, err
    result = NLU.run_glue(_base(files, tmp_path / "o", *train, "--apply_lora", "--lora_r", "4", family=family))
    state = result.model.state_dict()
    for key in source.lora_keys + source.extra_keys:
        assert torch.equal(state[key], source.tensors[key]), key
    config = json.loads((tmp_path / "o" / "run_config.json").read_text())
    assert (config["method"], config["lora"]["r"], config["lora"]["lora_alpha"]) == ("lora", 4, 8)


def test_a_gpt2_adapter_is_one_error_naming_lora_path(files, tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    factors = {}
    for i in range(2):
        factors[f"transformer.h.{i}.attn.c_attn.lora_A"] = torch.randn(8, 32, generator=g)
        factors[f"transformer.h.{i}.attn.c_attn.lora_B"] = torch.randn(64, 4, generator=g)
    torch.save(factors, tmp_path / "gpt2_md_lora_e2e.pt")
    out = tmp_path / "o"
    assert NLU.main(_base(files, out, "--do_eval", "--lora_path", str(tmp_path / "gpt2_md_lora_e2e.pt"))) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--lora_path" in err and "gpt2" in err and "roberta" in err, err
    assert not out.exists()
