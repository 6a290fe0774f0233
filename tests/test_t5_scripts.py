"""scripts/lorapro_t5_glue.sh: its flags against the LoRA-GA setting (a stub interpreter records each command line,
which lorapro/run_t5_glue.py's real parser must accept), and --smoke end to end with `loralib compare` matching
the registry's T5-base rows."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from _script_helpers import argv_recorder, parse_flags, run_script, same_value

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "lorapro_t5_glue.sh"
ENV_KEYS = ("NPROC", "MODEL_DIR", "DATA_DIR", "OUT_DIR", "SMOKE_DIR", "SEEDS", "LR", "GLUE_TASKS", "PYTHON")
if shutil.which("bash") is None:
    pytest.skip("the scripts need bash", allow_module_level=True)
sys.path.insert(0, str(REPO / "lorapro"))
import run_t5_glue  # noqa: E402

# conf/model/t5base.yaml, conf/peft/all.yaml and reproduce/utils.py of LoRA-GA, restated
SETTING = {"lora_r": "8", "lora_alpha": "16", "lora_dropout": "0", "lr": "1e-4", "num_train_epochs": "1",
           "per_device_train_batch_size": "32", "global_batch_size": "32", "warmup_ratio": "0.03",
           "lr_scheduler_type": "cosine", "weight_decay": "0", "max_length": "128", "eval_mode": "score",
           "model_name_or_path": "M/t5-base", "data_dir": "D"}
ROWS = ["lora", "rslora", "loraplus", "adalora", "lora-pro", "rslora-pro", "full", "dora", "pissa", "lora-ga"]


def _env(**extra):
    # the scripts' subprocesses must import this checkout's loralib
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **extra}


def test_every_row_gets_the_setting(tmp_path):
    stub, recorded = argv_recorder(tmp_path)
    proc = run_script(SCRIPT, steering_keys=ENV_KEYS, **_env(PYTHON=stub, MODEL_DIR="M", DATA_DIR="D",
                                                                 OUT_DIR=tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    calls = recorded()
    assert len(calls) == len(ROWS) * 5 * 3
    seen = set()
    for argv in calls:
        assert argv[0] == str(REPO / "lorapro" / "run_t5_glue.py")
        flags = parse_flags(argv[1:])
        for key, value in SETTING.items():
            assert same_value(flags[key], value), (key, flags[key], value)
        assert flags["output_dir"] == str(tmp_path / "out" / flags["task"] / flags["lora"] / f"seed{flags['seed']}")
        spec = run_t5_glue.spec_from_argv(argv[1:])  # the real parser takes every flag
        assert spec.lr == 1e-4 and spec.lora == flags["lora"] and spec.task == flags["task"]
        seen.add((flags["task"], flags["lora"], flags["seed"]))
    assert seen == {(t, m, s) for t in ("mnli", "sst2", "cola", "qnli", "mrpc") for m in ROWS for s in "012"}


def test_the_global_batch_stays_32_on_any_nproc(tmp_path):
    stub, recorded = argv_recorder(tmp_path)
    proc = run_script(SCRIPT, "lora", steering_keys=ENV_KEYS, **_env(PYTHON=stub, MODEL_DIR="M", DATA_DIR="D",
                      OUT_DIR=tmp_path / "out", NPROC="4", SEEDS="0", GLUE_TASKS="cola"))
    assert proc.returncode == 0, proc.stderr
    argv = recorded()[0]
    flags = parse_flags(argv[argv.index(str(REPO / "lorapro" / "run_t5_glue.py")) + 1:])
    assert (flags["per_device_train_batch_size"], flags["global_batch_size"]) == ("8", "32")  # 8 x 4 processes
    proc = run_script(SCRIPT, "lora", steering_keys=ENV_KEYS, **_env(PYTHON=stub, NPROC="3", OUT_DIR=tmp_path))
    assert proc.returncode == 2 and "cannot be split over NPROC=3" in proc.stderr


def test_unknown_method_is_refused(tmp_path):
    proc = run_script(SCRIPT, "vera", steering_keys=ENV_KEYS, **_env(OUT_DIR=tmp_path))
    assert proc.returncode == 2 and "unknown task 'vera'" in proc.stderr


def test_bad_flag_gives_one_error_line(tmp_path):
    code = run_t5_glue.main(["--model_name_or_path", str(tmp_path), "--task", "mrpc", "--data_dir", str(tmp_path),
                             "--output_dir", str(tmp_path / "o"), "--lora", "adalora", "--lorapro_mode", "full"])
    assert code == 2 and not (tmp_path / "o").exists()


def test_smoke_runs_and_compare_matches_the_reported_rows(tmp_path):
    from loralib.repro.compare import compare_rows, read_runs

    out = tmp_path / "runs"
    proc = run_script(SCRIPT, "--smoke", "lora", steering_keys=ENV_KEYS, timeout=600,
                      **_env(SMOKE_DIR=tmp_path / "smoke", OUT_DIR=out, SEEDS="0", GLUE_TASKS="cola"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "cola" / "lora" / "seed0" / "run_config.json").read_text())
    assert config["args"]["global_batch_size"] == 32 and config["gradient_accumulation_steps"] == 8  # 4 x 8
    rows = compare_rows(read_runs(out), paper="lorapro")
    by_metric = {row.metric: row for row in rows}
    assert set(by_metric) == {"accuracy", "matthews_correlation"} and {row.task for row in rows} == {"cola"}
    accuracy = by_metric["accuracy"]
    assert accuracy.reported.value == 69.35  # LoRA's CoLA row of the T5-base table
    assert accuracy.model == "t5-base" and accuracy.run.method == "lora" and 0 <= accuracy.value <= 1
    assert by_metric["matthews_correlation"].reported is None  # the setting reports accuracy only
