"""What the NLG runs record for `loralib compare`, and the errors of a checkpoint flag given the wrong thing:

- gpt2_beam.py writes decoding.json (the search settings) into --work_dir before decoding, also into a training
  folder that already holds run_config.json; another decoding replaces it with a warning; a failed check
  writes none;
- gpt2_ft.py's run_config.json names the --model_card's model only for a GPT-2 of that size (a tiny folder is
  recorded by its path and size), and args.world_size is the processes that ran, not the flag's default 0;
- a Llama folder as --init_checkpoint / --base_checkpoint, or a .jsonl as --init_checkpoint: one error naming
  the flag (and no advice to load the file with weights_only=False).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from loralib.models import gpt2_checkpoint
from loralib.tasks.nlg import beam

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_nlg_train import _lora_file, ft_args, gpt2_beam, gpt2_ft, write_encoded  # noqa: E402
from test_nlg_beam_adapters import base_dir  # noqa: E402,F401  (the module-scoped tiny GPT-2 folder fixture)

DECODING_KEYS = {"beam", "length_penalty", "no_repeat_ngram_size", "repetition_penalty", "eval_len", "decoding",
                 "num_examples", "data"}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama folder (what .cache/smollm2-135m-instruct is, in small)."""
    import transformers

    folder = tmp_path_factory.mktemp("llama") / "llama-tiny"
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("nlg-records")
    return {"data": write_encoded(root / "test.jsonl", n=4, seed=7), "lora": _lora_file(root / "lora.pt")}


def _beam_argv(files, base_dir, work, *extra):
    return ["--data", str(files["data"]), "--batch_size", "2", "--seq_len", "40", "--eval_len", "5", "--beam", "2",
            "--model_card", "gpt2.md", "--init_checkpoint", str(files["lora"]), "--base_checkpoint", str(base_dir),
            "--lora_alpha", "32", "--work_dir", str(work), "--output_file", "predict.jsonl", *extra]


# -- decoding.json ----------------------------------------------------------------------------------

def test_decoding_json_records_the_search_even_in_a_training_folder(tmp_path, files, base_dir, caplog):
    work = tmp_path / "run"
    work.mkdir()
    (work / "run_config.json").write_text(json.dumps({"method": "lora"}))  # a training folder's record
    gpt2_beam.run_beam(_beam_argv(files, base_dir, work, "--length_penalty", "0.8"))
    record = json.loads((work / "decoding.json").read_text())
    assert set(record) == DECODING_KEYS
    assert record == {"beam": 2, "length_penalty": 0.8, "no_repeat_ngram_size": 4, "repetition_penalty": 1.0,
                      "eval_len": 5, "decoding": "lora_repo", "num_examples": 4, "data": str(files["data"])}
    assert json.loads((work / "run_config.json").read_text()) == {"method": "lora"}  # the training's, untouched

    # the same decoding again: rewritten silently; another one: the old record removed with a warning naming
    # what changed, the new one written with the predictions
    with caplog.at_level(logging.WARNING, logger="loralib.nlg"):
        gpt2_beam.run_beam(_beam_argv(files, base_dir, work, "--length_penalty", "0.8"))
        assert not [r for r in caplog.records if "decoding.json" in r.getMessage()]
        gpt2_beam.run_beam(_beam_argv(files, base_dir, work, "--length_penalty", "0.5", "--decoding", "transformers"))
    warned = [r.getMessage() for r in caplog.records if "decoding.json" in r.getMessage()]
    assert len(warned) == 1 and "length_penalty 0.8 -> 0.5" in warned[0]
    assert "decoding 'lora_repo' -> 'transformers'" in warned[0]
    record = json.loads((work / "decoding.json").read_text())
    assert (record["length_penalty"], record["decoding"]) == (0.5, "transformers")


def test_a_decode_stopped_halfway_leaves_no_record_of_its_settings(tmp_path, files, base_dir, monkeypatch):
    """decoding.json is written with the predictions: a decode that stops halfway leaves none (and removes one
    of another decoding, which no longer describes what the folder will hold), never the new settings beside
    the old predictions."""
    def no_search(*args, **kwargs):
        raise RuntimeError("stopped while decoding")

    work = tmp_path / "run"
    gpt2_beam.run_beam(_beam_argv(files, base_dir, work, "--beam", "2"))
    assert json.loads((work / "decoding.json").read_text())["beam"] == 2
    with monkeypatch.context() as m:
        m.setattr(beam, "beam_search", no_search)
        with pytest.raises(RuntimeError, match="stopped while decoding"):
            gpt2_beam.run_beam(_beam_argv(files, base_dir, work, "--beam", "3"))
    assert not (work / "decoding.json").exists() and (work / "predict.jsonl").exists()
    gpt2_beam.run_beam(_beam_argv(files, base_dir, work, "--beam", "3"))
    assert json.loads((work / "decoding.json").read_text())["beam"] == 3

    # a check that fails (an adapter of another rank) leaves no record behind
    code = gpt2_beam.main(_beam_argv(files, base_dir, tmp_path / "bad", "--lora_dim", "8"))
    assert code == 2 and not (tmp_path / "bad" / "decoding.json").exists()


# -- run_config.json of gpt2_ft.py ------------------------------------------------------------------

def test_model_record_names_the_card_only_for_a_gpt2_of_its_size():
    class Config:
        def __init__(self, n_layer, n_embd, n_head):
            self.n_layer, self.n_embd, self.n_head = n_layer, n_embd, n_head

    assert gpt2_checkpoint.model_record("gpt2.md", Config(24, 1024, 16), "models/gpt2-medium") == \
        {"model_name_or_path": "gpt2-medium"}
    assert gpt2_checkpoint.model_record("gpt2.md", Config(24, 1024, 8), "x/gpt2-medium") == \
        {"model_name_or_path": "x/gpt2-medium", "model_size": {"n_layer": 24, "n_embd": 1024, "n_head": 8}}


def test_a_tiny_model_is_recorded_as_itself(tmp_path, files, base_dir, monkeypatch):
    work = tmp_path / "run"
    with pytest.warns(UserWarning, match="non-standard size"):
        gpt2_ft.train_nlg(ft_args(files["data"], base_dir, work, "--max_step", "1", "--save_interval", "1"))
    config = json.loads((work / "run_config.json").read_text())
    assert config["model_name_or_path"] == str(base_dir)
    assert config["model_size"] == {"n_layer": 2, "n_embd": 16, "n_head": 2}
    assert config["args"]["world_size"] == 1  # one process ran (the flag's default was 0)

    # a decoding-only run records its base model alike
    beam_work = tmp_path / "beam"
    gpt2_beam.run_beam(_beam_argv(files, base_dir, beam_work))
    decoded = json.loads((beam_work / "run_config.json").read_text())
    assert (decoded["model_name_or_path"], decoded["model_size"]["n_embd"]) == (str(base_dir), 16)

    # the card's name when the model is the card's size (a tiny stand-in card)
    monkeypatch.setitem(gpt2_checkpoint.MODEL_CARDS, "gpt2.md", ("gpt2-medium", 16, 2, 2))
    gpt2_ft.train_nlg(ft_args(files["data"], base_dir, tmp_path / "card", "--max_step", "1"))
    config = json.loads((tmp_path / "card" / "run_config.json").read_text())
    assert config["model_name_or_path"] == "gpt2-medium" and "model_size" not in config


@pytest.mark.parametrize("env, want", [(None, 1), ("2", 2)])
def test_the_recorded_world_size_is_the_processes_that_ran(tmp_path, files, base_dir, monkeypatch, env, want):
    """NPROC=2 scripts/lora_gpt2_nlg.sh recorded args.world_size 0, the accepted flag's default."""
    if env is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", env)  # what torchrun sets in every process
    parsed = gpt2_ft.build_parser().parse_args(ft_args(files["data"], base_dir, tmp_path / "x", "--max_step", "1"))
    assert gpt2_ft.spec_from_args(parsed).record["world_size"] == want
    assert gpt2_beam.parse(_beam_argv(files, base_dir, tmp_path / "y")).record["world_size"] == want


# -- a checkpoint flag given the wrong thing --------------------------------------------------------

def test_a_llama_folder_is_one_error_naming_the_flag(tmp_path, files, base_dir, llama_dir, capsys):
    code = gpt2_ft.main(ft_args(files["data"], llama_dir, tmp_path / "ft", "--max_step", "1"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"--init_checkpoint {llama_dir} is a llama model, not a GPT-2" in err
    assert not (tmp_path / "ft").exists()

    code = gpt2_beam.main(_beam_argv(files, llama_dir, tmp_path / "beam"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"--base_checkpoint {llama_dir} is a llama model, not a GPT-2" in err
    assert not (tmp_path / "beam").exists()


def test_a_file_that_is_no_checkpoint_is_one_error_naming_the_flag(tmp_path, files, base_dir, capsys):
    argv = _beam_argv(files, base_dir, tmp_path / "beam")
    argv[argv.index("--init_checkpoint") + 1] = str(files["data"])  # the .jsonl test set, by mistake
    assert gpt2_beam.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--init_checkpoint {files['data']}: not a PyTorch checkpoint (" in err and err.count("\n") == 1, err
    assert "weights_only" not in err and "JSON" in err
    assert not (tmp_path / "beam").exists()

    assert gpt2_ft.main(ft_args(files["data"], files["data"], tmp_path / "ft", "--max_step", "1")) == 2
    err = capsys.readouterr().err
    assert f"--init_checkpoint {files['data']}: not a PyTorch checkpoint" in err and "weights_only" not in err

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    refused = r"--base_checkpoint .*empty\.pt: not a PyTorch checkpoint \(the file is empty\)"
    with pytest.raises(ValueError, match=refused):
        gpt2_checkpoint.load_gpt2(str(empty), "gpt2.md", None, flag="--base_checkpoint")
    archive = tmp_path / "objects.pt"
    torch.save({"step": torch.tensor(1), "config": object.__new__(_Opaque)}, archive)
    with pytest.raises(ValueError, match=r"objects\.pt: not a PyTorch checkpoint \(a torch archive that holds objects "
                                         r"other than tensors"):
        gpt2_checkpoint.read_state_dict(archive, "--init_checkpoint")


class _Opaque:
    """A class torch.load(weights_only=True) refuses to rebuild."""
