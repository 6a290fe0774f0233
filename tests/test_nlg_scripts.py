"""scripts/lora_gpt2_nlg.sh: its flags against the LoRA paper's NLG recipe, its launcher, its errors, and the
whole pipeline (train -> beam -> decode -> evaluate) in --smoke mode on a tiny random GPT-2.

- flags: the script runs every size and task with PYTHON pointing at a stub that records its command lines;
  each recorded command is held against the original README's commands and the paper's Table 11, restated here.
- errors: bad sizes, tasks, missing data or model: one clear line, nothing launched.
- smoke: `--smoke` builds the tiny assets (scripts/_nlg_smoke_assets.py) and runs GPT-2 M on E2E end to end;
  the run folder must hold what `loralib compare` reads (eval_results.json, run_config.json).
"""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from _script_helpers import argv_recorder, parse_flags, run_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "lora_gpt2_nlg.sh"
ENV_KEYS = ("NPROC", "MODEL_DIR", "DATA_DIR", "OUT_DIR", "SMOKE_DIR", "PYTHON", "LENGTH_PENALTY", "SEEDS", "RECIPE",
            "KEEP_PER_DEVICE_BATCH")
TASKS = ("e2e", "webnlg", "dart")

if shutil.which("bash") is None:
    pytest.skip("the scripts need bash", allow_module_level=True)

# The README's gpt2_ft.py command (E2E, GPT-2 M), and the paper's Table 11 per task.
TRAIN_COMMON = {"train_batch_size": "8", "grad_acc": "1", "valid_batch_size": "4", "seq_len": "512", "clip": "0.0",
                "lr": "0.0002", "correct_bias": True, "adam_beta2": "0.999", "scheduler": "linear",
                "warmup_step": "500", "max_epoch": "5", "save_interval": "1000", "lora_dim": "4",
                "lora_alpha": "32", "platform": "local"}
TRAIN_TASK = {"e2e": {"weight_decay": "0.01", "lora_dropout": "0.1", "label_smooth": "0.1"},
              "webnlg": {"weight_decay": "0.01", "lora_dropout": "0.1", "label_smooth": "0.1"},
              "dart": {"weight_decay": "0.0", "lora_dropout": "0.0", "label_smooth": "0.0"}}
BEAM = {"batch_size": "1", "seq_len": "512", "eval_len": "64", "lora_dim": "4", "lora_alpha": "32", "beam": "10",
        "length_penalty": "0.8", "no_repeat_ngram_size": "4", "repetition_penalty": "1.0", "eos_token_id": "628",
        "platform": "local"}
DECODE = {"e2e": {"ref_type": "e2e"},
          "webnlg": {"ref_type": "webnlg", "ref_num": "6", "tokenize": True, "lower": True},
          "dart": {"ref_type": "dart", "ref_num": "6", "tokenize": True, "lower": True}}
SIZES = {"md": ("gpt2.md", "gpt2-medium"), "lg": ("gpt2.lg", "gpt2-large")}


def _run(*args, timeout=300, **env) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, *args, steering_keys=ENV_KEYS, timeout=timeout, **env)


@pytest.fixture
def recorder(tmp_path):
    """A stand-in interpreter: records its argv (NUL-separated, one run a line); answers `-c` (the script
    reading train_results.json) with a step number."""
    return argv_recorder(tmp_path, answer_to_dash_c="123")


@pytest.fixture
def inputs(tmp_path):
    """DATA_DIR and MODEL_DIR with the (empty) files the script checks for."""
    data, models = tmp_path / "D", tmp_path / "M"
    for task in TASKS:
        (data / task).mkdir(parents=True)
        for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "test_formatted.jsonl"):
            (data / task / name).write_text("")
    for _, name in SIZES.values():
        (models / name).mkdir(parents=True)
    return data, models


def _check(flags: dict, expected: dict, where: str) -> None:
    for key, want in expected.items():
        assert key in flags, f"{where}: --{key} missing"
        assert flags[key] == want, f"{where}: --{key} {flags[key]!r}, the recipe says {want!r}"


# the paper's Table 11 where it differs from the README's commands: E2E's length penalty
PAPER_BEAM = {"e2e": {"length_penalty": "0.9"}}


@pytest.mark.parametrize("recipe", ["released", "paper"])
def test_every_size_and_task_gets_the_recipe(recorder, inputs, tmp_path, recipe):
    stub, calls = recorder
    data, models = inputs
    out = tmp_path / "out"
    proc = _run("md", "lg", "all", PYTHON=stub, DATA_DIR=data, MODEL_DIR=models, OUT_DIR=out, RECIPE=recipe)
    assert proc.returncode == 0, proc.stderr
    runs = calls()
    assert len(runs) == 4 * len(SIZES) * len(TASKS) * 3, runs  # x the paper's 3 seeds
    i = 0
    seeds = ("110", "111", "112")  # the README's 110 and the next two
    for (size, (card, model)), task, seed in itertools.product(SIZES.items(), TASKS, seeds):
        ft, beam, decode, evaluate = runs[i:i + 4]
        i += 4
        where = f"{size} {task} {seed} {recipe}"
        assert ft[0].endswith("examples/NLG/gpt2_ft.py") and beam[0].endswith("examples/NLG/gpt2_beam.py")
        assert decode[0].endswith("examples/NLG/gpt2_decode.py")
        assert evaluate[0].endswith("examples/NLG/eval_nlg.py")
        run_dir = str(out / size / task / f"seed{seed}")
        f = parse_flags(ft[1:])
        _check(f, TRAIN_COMMON | TRAIN_TASK[task] | {"random_seed": seed, "recipe": recipe}, f"{where} gpt2_ft.py")
        _check(f, {"model_card": card, "init_checkpoint": str(models / model), "work_dir": run_dir,
                   "train_data": str(data / task / "train.jsonl"), "valid_data": str(data / task / "valid.jsonl")},
               where)
        b = parse_flags(beam[1:])
        beam_recipe = BEAM | (PAPER_BEAM.get(task, {}) if recipe == "paper" else {})
        _check(b, beam_recipe | {"model_card": card, "base_checkpoint": str(models / model), "work_dir": run_dir,
                          "init_checkpoint": f"{run_dir}/model.123.pt", "data": str(data / task / "test.jsonl")},
               f"{where} gpt2_beam.py")
        d = parse_flags(decode[1:])
        _check(d, DECODE[task] | {"sample_file": f"{run_dir}/{b['output_file']}",
                                  "input_file": str(data / task / "test_formatted.jsonl")}, f"{where} decode")
        assert ("output_category_file" in d) == (task == "webnlg"), where
        e = parse_flags(evaluate[1:])
        _check(e, {"task": task, "output_dir": run_dir, "ref_file": d["output_ref_file"],
                   "pred_file": d["output_pred_file"]}, f"{where} eval_nlg.py")
        if task == "webnlg":  # seen / unseen / all BLEU need each input's category
            assert e["category_file"] == d["output_category_file"]


def test_defaults_and_processes(recorder, inputs, tmp_path):
    stub, calls = recorder
    data, models = inputs
    proc = _run(PYTHON=stub, DATA_DIR=data, MODEL_DIR=models, OUT_DIR=tmp_path / "out", NPROC="2",
                LENGTH_PENALTY="0.7", SEEDS="110")
    assert proc.returncode == 0, proc.stderr
    runs = calls()
    assert len(runs) == 4  # md e2e by default
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert runs[0][:5] == launcher and runs[1][:5] == launcher  # training and beam search on NPROC processes
    assert runs[2][0].endswith("gpt2_decode.py") and runs[3][0].endswith("eval_nlg.py")  # one process each
    assert parse_flags(runs[1][6:])["length_penalty"] == "0.7"  # LENGTH_PENALTY overrides either recipe
    # the README trained 8 a batch on one process: 2 processes keep the global batch 8 with 4 each
    train = parse_flags(runs[0][6:])
    assert (train["train_batch_size"], train["grad_acc"]) == ("4", "1")
    assert "global batch 8 = per-device 4 x NPROC 2 x accumulation 1, the paper's" in proc.stderr


@pytest.mark.parametrize("args, env, phrase", [
    (["md", "wikitext"], {}, "unknown task 'wikitext'"),
    (["--beam"], {}, "unknown option --beam"),
    (["md"], {"NPROC": "0"}, "NPROC must be a positive integer"),
    (["lg", "dart"], {"remove": "D/dart/test_formatted.jsonl"},
     "test_formatted.jsonl is missing: run python data/prepare_nlg.py"),
    (["lg", "dart"], {"remove": "M/gpt2-large"}, "gpt2-large is missing: run python -m loralib.models.hub gpt2-large"),
])
def test_errors_are_one_clear_line_and_launch_nothing(recorder, inputs, tmp_path, args, env, phrase):
    stub, calls = recorder
    data, models = inputs
    env = dict(env)
    if "remove" in env:
        doomed = tmp_path / env.pop("remove")
        shutil.rmtree(doomed) if doomed.is_dir() else doomed.unlink()
    proc = _run(*args, PYTHON=stub, DATA_DIR=data, MODEL_DIR=models, OUT_DIR=tmp_path / "out", **env)
    assert proc.returncode == 2 and phrase in proc.stderr, proc.stderr
    assert calls() == []


def test_help_describes_the_script():
    proc = _run("--help")
    assert proc.returncode == 0 and "scripts/lora_gpt2_nlg.sh" in proc.stdout and "--smoke" in proc.stdout


def test_smoke_runs_the_pipeline_end_to_end(tmp_path):
    """GPT-2 M on E2E: train 2 steps -> beam search -> decode -> the E2E metrics, on the tiny assets."""
    proc = _run("--smoke", SMOKE_DIR=tmp_path / "smoke", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "smoke" / "runs" / "lora_gpt2_nlg" / "md" / "e2e" / "seed110"  # smoke: the first seed
    results = json.loads((run / "eval_results.json").read_text())
    assert results["task"] == "e2e" and results["split"] == "test"
    assert {"bleu", "nist", "meteor", "rouge_l", "cider"} <= set(results)
    config = json.loads((run / "run_config.json").read_text())
    # the smoke's GPT-2 is a tiny random one in a folder named gpt2-medium: recorded by its path and size
    assert config["method"] == "lora" and config["model_name_or_path"].endswith("nlg/models/gpt2-medium")
    assert config["model_size"]["n_layer"] < 24 and config["args"]["world_size"] == 1
    assert config["global_batch_size"] == 8 and config["recipe"] == "released"  # the README's batch, one process
    test_lines = (tmp_path / "smoke" / "nlg" / "data" / "e2e" / "test.jsonl").read_text().splitlines()
    decoding = json.loads((run / "decoding.json").read_text())  # the search, for `loralib compare`
    assert decoding["eval_len"] == 8 and decoding["beam"] == 10 and decoding["num_examples"] == len(test_lines)
    predictions = [json.loads(x) for x in (run / "predict.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == list(range(len(test_lines)))
    assert all(0 < len(p["predict"]) <= 8 for p in predictions)  # the smoke run's --eval_len 8
    assert (run / "model.2.pt").is_file() and (run / "hyp_e2e.txt").read_text().count("\n") == results["num_examples"]
