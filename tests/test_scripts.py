"""The per-paper scripts in scripts/: their flags against recipes.md, their launcher, their errors, and every
script end to end in --smoke mode.

Three layers, cheapest first:
- flags: each script runs for real (every task of its row) with PYTHON pointing at a stub that only records
  its command line; the recorded flags are held against the values of recipes.md, restated here.
- errors: bad task names, bad NPROC, a missing MNLI checkpoint... one clear message, nothing launched.
- smoke: every script with --smoke (tiny random models, tiny GLUE files, two or three optimizer steps), on
  a representative run (see SMOKE): RoBERTa-base mnli then mrpc from its MNLI checkpoint, RoBERTa-large cola,
  DeBERTa-XXL mnli then rte from it, AdaLoRA mrpc, LoRA² rte, the LoRA+ rows mnli, the sweep one grid point.
  The runs go two at a time (one thread each) and each is checked for eval_results.json and its run config.
Slow and opt-in (LORALIB_SMOKE_ALL=1 pytest -m slow tests/test_scripts.py, a few minutes): every task of every
GLUE row in smoke mode, and RoBERTa-base MNLI on two processes through torch.distributed.run (gloo).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from _script_helpers import argv_recorder, parse_flags, run_script, same_value

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
TASKS = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")
FROM_MNLI = ("mrpc", "rte", "stsb")  # the LoRA paper's tasks that start from the MNLI LoRA checkpoint
ENV_KEYS = ("NPROC", "MODEL_DIR", "DATA_DIR", "OUT_DIR", "SMOKE_DIR", "MNLI_LORA", "LR", "LR_RATIO", "SEED",
            "LRS_A", "LRS_B", "SEEDS", "JOBS", "PYTHON", "RECIPE", "KEEP_PER_DEVICE_BATCH", "BUDGET", "LORA_A_INIT")

if shutil.which("bash") is None:
    pytest.skip("the scripts need bash", allow_module_level=True)


def _run(script: str, *args: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return run_script(SCRIPTS / script, *args, steering_keys=ENV_KEYS, timeout=timeout, **env)


# -- the recipes, restated from recipes.md ------------------------------------------------------------

def _cols(table: str, names: str) -> dict:
    keys = names.split()
    rows = {}
    for line in table.strip().splitlines():
        task, *values = line.split()
        rows[task] = dict(zip(keys, values))
    return rows


# RoBERTa: max_seq_length / per-device batch / lr / epochs
ROBERTA_BASE = _cols("""
mnli 512 16 5e-4 30
sst2 512 16 5e-4 60
mrpc 512 16 4e-4 30
cola 512 32 4e-4 80
qnli 512 32 4e-4 25
qqp  512 16 5e-4 25
rte  512 32 5e-4 80
stsb 512 16 4e-4 40""", "max_seq_length per_device_train_batch_size learning_rate num_train_epochs")
ROBERTA_LARGE = _cols("""
mnli 128 4 3e-4 10
sst2 512 8 4e-4 10
mrpc 512 4 3e-4 20
cola 128 4 3e-4 20
qnli 512 4 2e-4 10
qqp  512 4 3e-4 20
rte  512 8 4e-4 20
stsb 128 4 3e-4 10""", "max_seq_length per_device_train_batch_size learning_rate num_train_epochs")
ROBERTA_COMMON = {"apply_lora": True, "lora_r": "8", "lora_alpha": "16", "warmup_ratio": "0.06",
                  "weight_decay": "0.1", "evaluation_strategy": "epoch", "save_strategy": "epoch",
                  "do_train": True, "do_eval": True}
# DeBERTa-v2-XXL: seq / batch / lr / epochs / warmup (steps, or ratio) / cls_dropout / weight_decay
DEBERTA_XXL = _cols("""
mnli 256 8  1e-4   5  1000      0.15 0
sst2 128 8  6e-5   16 1000      0    0.01
mrpc 128 32 2e-4   30 ratio:0.1 0    0.01
cola 64  4  1.3e-4 10 100       0.1  0
qnli 512 6  1e-4   8  500       0.1  0.01
qqp  320 8  1e-4   11 10000     0.2  0.01
rte  320 4  2.6e-4 11 50        0.2  0.01
stsb 128 4  2e-4   10 100       0.2  0.1""",
                    "max_seq_length per_device_train_batch_size learning_rate num_train_epochs warmup cls_dropout "
                    "weight_decay")
DEBERTA_COMMON = {"apply_lora": True, "lora_r": "16", "lora_alpha": "32", "fp16": True, "lora_a_init": "normal"}
# LoRA² on DeBERTaV3-base: r / target_rank / init_warmup / final_warmup / mask_interval / reg_orth_coef / alpha /
# lr / epochs / warmup / seq / cls_dropout / weight_decay / seed
LORA2 = _cols("""
mnli 8 3 8000 50000 100 0.1 16 5e-4   7  1000      256 0.15 0    6
sst2 8 2 6000 22000 100 0.1 16 8e-4   24 1000      128 0.0  0.01 6
cola 4 3 800  3500  10  0.1 32 8e-4   25 100       64  0.10 0    6
qqp  8 3 8000 25000 100 0.1 16 8e-4   20 2000      320 0.15 0.01 6
qnli 8 2 2000 8000  100 0.1 32 1.2e-3 5  500       512 0.1  0.01 6
rte  4 3 600  1800  1   0.3 32 1.2e-3 50 200       320 0.20 0.01 4
mrpc 8 1 600  1800  1   0.1 32 1e-3   30 ratio:0.1 320 0.0  0.01 6
stsb 4 1 800  2000  10  0.3 32 2.2e-3 25 100       128 0.2  0.1  6""",
               "lora_r target_rank init_warmup final_warmup mask_interval reg_orth_coef lora_alpha learning_rate "
               "num_train_epochs warmup max_seq_length cls_dropout weight_decay seed")
ADAPTIVE_COMMON = {"apply_lora": True, "apply_adalora": True, "lora_type": "svd", "beta1": "0.85", "beta2": "0.85",
                   "per_device_train_batch_size": "32",
                   "lora_module": "query,key,value,intermediate,layer.output,attention.output"}


def _adalora() -> dict:
    """AdaLoRA's own scripts: the LoRA² table except r (2-3, checked apart), target_rank 1, QNLI lr 5e-4,
    QQP 5 epochs, RTE seed 6."""
    rows = {task: {k: v for k, v in row.items() if k != "lora_r"} | {"target_rank": "1"} for task, row in LORA2.items()}
    rows["qnli"]["learning_rate"] = "5e-4"
    rows["qqp"]["num_train_epochs"] = "5"
    rows["rte"]["seed"] = "6"
    return rows


LORAPLUS = {
    "loraplus_gpt2_mnli.sh": ("gpt2", {
        "learning_rate": "2e-4", "loraplus_lr_ratio": "10", "lora_rank": "8", "lora_alpha": "8",
        "target_modules": "c_attn, c_proj, c_fc", "max_seq_length": "128", "per_device_train_batch_size": "32",
        "num_train_epochs": "3", "lr_scheduler_type": "linear", "adam_beta1": "0.9", "adam_beta2": "0.99",
        "adam_epsilon": "1e-8"}),
    "loraplus_roberta_base_mnli.sh": ("roberta-base", {
        "learning_rate": "5e-5", "loraplus_lr_ratio": "80", "target_modules": "query, value", "lora_rank": "8",
        "lora_alpha": "8", "max_seq_length": "128", "per_device_train_batch_size": "32", "num_train_epochs": "3"}),
    "loraplus_llama_7b_mnli.sh": ("huggyllama/llama-7b", {
        "learning_rate": "1e-4", "loraplus_lr_ratio": "1", "gradient_checkpointing": True,
        "target_modules": "q_proj, k_proj, v_proj, o_proj, up_proj, down_proj, gate_proj",
        "per_device_train_batch_size": "8", "gradient_accumulation_steps": "4", "lr_scheduler_type": "constant"}),
}


# -- recording the command lines ------------------------------------------------------------------------

@pytest.fixture
def recorder(tmp_path):
    """A stand-in interpreter that appends its argv (NUL-separated, one run a line) to a log file."""
    return argv_recorder(tmp_path)


def _check(flags: dict, expected: dict, where: str) -> None:
    for key, want in expected.items():
        if key == "warmup":
            key, want = (("warmup_ratio", want[6:]) if want.startswith("ratio:") else ("warmup_steps", want))
        assert key in flags, f"{where}: --{key} missing"
        assert same_value(flags[key], want), f"{where}: --{key} {flags[key]!r}, recipes.md says {want!r}"


def _record(recorder, tmp_path, script, *args, **env):
    stub, calls = recorder
    proc = _run(script, *args, PYTHON=stub, MODEL_DIR="M", DATA_DIR="D", OUT_DIR=tmp_path / "out", **env)
    assert proc.returncode == 0, proc.stderr
    return calls(), proc


# The papers' own tables where they differ from the released scripts (scripts/README.md, "Released run vs
# paper"): LoRA Table 9 (RoBERTa), Table 10 (DeBERTa XXL), AdaLoRA Table 8.
ROBERTA_BASE_PAPER = {task: {"lora_alpha": "8"} for task in TASKS}
ROBERTA_LARGE_PAPER = {"sst2": {"per_device_train_batch_size": "4", "max_seq_length": "128"},
                       "cola": {"learning_rate": "2e-4"},
                       "stsb": {"per_device_train_batch_size": "8", "num_train_epochs": "30", "learning_rate": "2e-4",
                                "max_seq_length": "512"}}
DEBERTA_XXL_PAPER = {task: {"warmup": "ratio:0.1", "lora_r": "8", "lora_alpha": "8"} for task in TASKS}
DEBERTA_XXL_PAPER["cola"]["learning_rate"] = "1e-4"
DEBERTA_XXL_PAPER["rte"]["learning_rate"] = "2e-4"
ADALORA_PAPER = {"qnli": {"learning_rate": "1.2e-3"}, "qqp": {"learning_rate": "5e-4"},
                 "cola": {"learning_rate": "5e-4", "reg_orth_coef": "0.5"}, "stsb": {"reg_orth_coef": "0.1"}}
PROCS = {  # the original's process count per task
    "lora_roberta_base_glue.sh": {t: 2 if t == "cola" else 8 for t in TASKS},
    "lora_roberta_large_glue.sh": dict.fromkeys(TASKS, 8), "lora_deberta_v2_xxlarge_glue.sh": dict.fromkeys(TASKS, 8),
    "adalora_deberta_v3_base_glue.sh": dict.fromkeys(TASKS, 1), "lora2_deberta_v3_base_glue.sh": dict.fromkeys(TASKS, 1)}

GLUE_ROWS = {  # script -> (entry point, hub name, per-task recipe, common flags, the paper's differing values)
    "lora_roberta_base_glue.sh": ("examples/NLU/run_glue.py", "roberta-base", ROBERTA_BASE, ROBERTA_COMMON,
                                  ROBERTA_BASE_PAPER),
    "lora_roberta_large_glue.sh": ("examples/NLU/run_glue.py", "roberta-large", ROBERTA_LARGE, ROBERTA_COMMON,
                                   ROBERTA_LARGE_PAPER),
    "lora_deberta_v2_xxlarge_glue.sh": ("examples/NLU/run_glue.py", "microsoft/deberta-v2-xxlarge", DEBERTA_XXL,
                                        DEBERTA_COMMON, DEBERTA_XXL_PAPER),
    # AdaLoRA's command, unchanged, where it builds AdaLoRA; LoRA²'s, where it builds LoRA² (no --apply_lora2)
    "adalora_deberta_v3_base_glue.sh": ("lora2/run_glue_adalora.py", "microsoft/deberta-v3-base", _adalora(),
                                        ADAPTIVE_COMMON, ADALORA_PAPER),
    "lora2_deberta_v3_base_glue.sh": ("lora2/run_glue.py", "microsoft/deberta-v3-base", LORA2, ADAPTIVE_COMMON, {}),
}
FIVE_SEEDS = {"examples/NLU/run_glue.py": lambda row: ["0", "1", "2", "3", "4"],  # the LoRA paper: median of 5
              "lora2/run_glue_adalora.py": lambda row: [str(int(row["seed"]) + i) for i in range(5)],
              "lora2/run_glue.py": lambda row: [str(int(row["seed"]) + i) for i in range(5)]}


def _global_batch(argv: list, flags: dict) -> int:
    nproc = int(argv[argv.index("--nproc_per_node") + 1]) if "--nproc_per_node" in argv else 1
    return int(flags["per_device_train_batch_size"]) * int(flags.get("gradient_accumulation_steps", 1)) * nproc


@pytest.mark.parametrize("recipe_name", ["released", "paper"])
@pytest.mark.parametrize("script", sorted(GLUE_ROWS))
def test_glue_row_passes_the_recipe_of_every_task(recorder, tmp_path, script, recipe_name):
    entry, hub_name, recipe, common, paper = GLUE_ROWS[script]
    mnli_adapter = tmp_path / "mnli_lora.bin"
    mnli_adapter.write_bytes(b"")
    env = {"RECIPE": "paper"} if recipe_name == "paper" else {}
    calls, proc = _record(recorder, tmp_path, script, MNLI_LORA=mnli_adapter, **env)
    assert len(calls) == 5 * len(TASKS), calls  # every task x the paper's 5 seeds
    seen = {}
    for argv in calls:
        assert argv[0] == str(REPO / entry), argv[:2]
        flags = parse_flags(argv[1:])
        task = flags["task_name"]
        seen.setdefault(task, []).append(flags["seed"])
        where = f"{script} {task} {recipe_name}"
        row = {k: v for k, v in recipe[task].items() if k != "seed"}
        want = {**common, **row, **(paper.get(task, {}) if recipe_name == "paper" else {}), "recipe": recipe_name}
        _check(flags, want, where)
        # one process: the paper's global batch = the per-device batch x its process count, by accumulation
        assert _global_batch(argv, flags) == int(want.get("per_device_train_batch_size", 32)) * PROCS[script][task]
        assert flags["model_name_or_path"] == f"M/{hub_name}" and flags["data_dir"] == "D", where
        out = flags.get("output_dir") or f"{flags['root_output_dir']}/model"
        assert out == str(tmp_path / "out" / task / f"seed{flags['seed']}" / "model"), where
        if entry.startswith("lora2/"):
            assert "lora_path" not in flags and "apply_lora2" not in flags and "svd_layer" not in flags, where
            if script.startswith("adalora"):  # recipes.md: AdaLoRA's own scripts use r 2-3
                assert flags["lora_r"] in ("2", "3"), where
        else:  # the LoRA paper: MRPC, RTE and STS-B start from the MNLI LoRA checkpoint
            assert flags.get("lora_path") == (str(mnli_adapter) if task in FROM_MNLI else None), where
    assert sorted(seen) == sorted(TASKS)
    assert all(seeds == FIVE_SEEDS[entry](recipe[task]) for task, seeds in seen.items()), seen
    assert proc.stderr.count(f"the paper's (the original:") == len(TASKS)  # the effective configuration, per task


def test_adalora_runs_the_two_budgets_of_its_table_1(recorder, tmp_path):
    """0.32M: final total rank 144 from r 4; 1.27M: 576 from r 12 (over the 72 adapted matrices)."""
    for budget, (r, total) in {"0.32M": ("4", "144"), "1.27M": ("12", "576")}.items():
        calls, _ = _record(recorder, tmp_path, "adalora_deberta_v3_base_glue.sh", "rte", BUDGET=budget, SEEDS="6")
        flags = parse_flags(calls[-1][1:])
        assert (flags["lora_r"], flags["target_total_rank"]) == (r, total), budget
        assert calls[-1].count("--lora_r") == 1  # the budget's r replaces the recipe's, not after it
    stub, calls = recorder
    proc = _run("adalora_deberta_v3_base_glue.sh", "rte", PYTHON=stub, BUDGET="1M", OUT_DIR=tmp_path)
    assert proc.returncode == 2 and "BUDGET must be released, 0.32M or 1.27M" in proc.stderr


@pytest.mark.parametrize("nproc, keep, per_device, accum", [
    (1, "0", "16", "8"), (2, "0", "16", "4"), (8, "0", "16", "1"), (16, "0", "8", "1"), (2, "1", "16", "1")])
def test_the_global_batch_is_the_papers_on_any_nproc(recorder, tmp_path, nproc, keep, per_device, accum):
    """RoBERTa-base MNLI: 16 per device on 8 GPUs = 128. Fewer processes accumulate, more split the batch;
    KEEP_PER_DEVICE_BATCH=1 keeps 16 per device (and says the global batch is not the paper's)."""
    calls, proc = _record(recorder, tmp_path, "lora_roberta_base_glue.sh", "mnli", NPROC=nproc,
                          KEEP_PER_DEVICE_BATCH=keep, SEEDS="0")
    argv = calls[0]
    flags = parse_flags(argv[argv.index(str(REPO / "examples/NLU/run_glue.py")) + 1:])
    assert (flags["per_device_train_batch_size"], flags["gradient_accumulation_steps"]) == (per_device, accum)
    assert ("NOT the paper's 128" in proc.stderr) == (keep == "1")
    global_ = int(per_device) * nproc * int(accum)
    assert f"global batch {global_} = per-device {per_device} x NPROC {nproc}" in proc.stderr


def _interrupting_interpreter(folder: Path) -> Path:
    """A stand-in interpreter that "finishes" each run (train_results.json and eval_results.json in its
    --output_dir), except seed 1's, which it stops after checkpoint-3 (exit 1, as a killed run)."""
    stub = folder / "finisher"
    stub.write_text('#!/usr/bin/env bash\nwhile (( $# )); do case $1 in --output_dir) out=$2 ;; --seed) seed=$2 ;; '
                    'esac; shift; done\nmkdir -p "$out"\n'
                    'if [[ $seed == 1 ]]; then mkdir -p "$out/checkpoint-3"; exit 1; fi\n'
                    'echo {} > "$out/train_results.json" && echo {} > "$out/eval_results.json"\n')
    stub.chmod(0o755)
    return stub


def test_a_rerun_skips_finished_runs_and_resumes_an_interrupted_one(recorder, tmp_path):
    """Rerunning a script after an interruption: seed 0, finished by the same command, is skipped; seed 1,
    interrupted (a checkpoint, no results), resumes from its latest checkpoint instead of being overwritten;
    seed 2 runs as the original did. Another command (RECIPE, NPROC) on those folders is an error, and so is a
    finished run with no command record (made before reruns were recorded); FRESH=1 reruns everything as the
    original scripts did."""
    out = tmp_path / "out"
    env = dict(MODEL_DIR="M", DATA_DIR="D", OUT_DIR=out)
    stopped = _run("lora_roberta_base_glue.sh", "mnli", PYTHON=_interrupting_interpreter(tmp_path), SEEDS="0 1", **env)
    assert stopped.returncode == 1
    assert (out / "mnli/seed0/model/launch_command.txt").is_file() and (out / "mnli/seed1/model/checkpoint-3").is_dir()
    stub, calls = recorder
    proc = _run("lora_roberta_base_glue.sh", "mnli", PYTHON=stub, SEEDS="0 1 2", **env)
    assert proc.returncode == 0, proc.stderr
    assert "seed0/model: finished by this command before, skipped" in proc.stderr
    assert "seed1/model: interrupted before, resumed from its latest checkpoint" in proc.stderr
    resumed, fresh = (parse_flags(argv[argv.index(str(REPO / "examples/NLU/run_glue.py")) + 1:]) for argv in calls())
    assert resumed["output_dir"].endswith("seed1/model") and resumed["resume_from_checkpoint"] == "latest"
    assert "overwrite_output_dir" not in resumed
    assert fresh["output_dir"].endswith("seed2/model") and fresh["overwrite_output_dir"] is True
    assert "resume_from_checkpoint" not in fresh

    for changed, why in (({"RECIPE": "paper"}, "another command"), ({"NPROC": "2", "KEEP_PER_DEVICE_BATCH": "1"},
                                                                    "another command")):
        other = _run("lora_roberta_base_glue.sh", "mnli", PYTHON=stub, SEEDS="0", **changed, **env)
        assert other.returncode == 2 and f"seed0/model holds a run of {why}" in other.stderr, changed
    (out / "mnli/seed0/model/launch_command.txt").unlink()
    legacy = _run("lora_roberta_base_glue.sh", "mnli", PYTHON=stub, SEEDS="0", **env)
    assert legacy.returncode == 2 and "holds a run with no launch_command.txt" in legacy.stderr
    again = _run("lora_roberta_base_glue.sh", "mnli", PYTHON=stub, SEEDS="0 1", FRESH="1", **env)
    assert again.returncode == 0, again.stderr
    assert all("--overwrite_output_dir" in argv and "--resume_from_checkpoint" not in argv for argv in calls()[2:])
    assert len(calls()) == 4


def test_reruns_of_entry_points_that_train_or_evaluate_by_default(recorder, tmp_path):
    """loraplus/run_glue.py trains and evaluates without --do_train / --do_eval (the original has no
    --overwrite_output_dir: FRESH=1 adds it); gpt2_ft.py writes no eval_results.json (eval_nlg.py scores it
    later), so its train_results.json finishes it; an OUT_DIR with glob characters is taken literally."""
    stub, calls = recorder
    out = tmp_path / "o[1] x"
    env = dict(PYTHON=stub, MODEL_DIR="M", DATA_DIR="D", OUT_DIR=out)
    assert _run("loraplus_llama_7b_mnli.sh", **env).returncode == 0
    run_dir = Path(parse_flags(calls()[0][1:])["output_dir"])
    assert (run_dir / "launch_command.txt").is_file()
    (run_dir / "checkpoint-2").mkdir()
    proc = _run("loraplus_llama_7b_mnli.sh", **env)
    assert proc.returncode == 0 and parse_flags(calls()[1][1:])["resume_from_checkpoint"] == "latest", proc.stderr
    (run_dir / "train_results.json").write_text("{}")
    assert "skipped" not in _run("loraplus_llama_7b_mnli.sh", **env).stderr  # it evaluates: not finished yet
    (run_dir / "eval_results.json").write_text("{}")
    assert "finished by this command before, skipped" in _run("loraplus_llama_7b_mnli.sh", **env).stderr
    assert _run("loraplus_llama_7b_mnli.sh", FRESH="1", **env).returncode == 0
    assert "--overwrite_output_dir" in calls()[-1]


def test_mrpc_refuses_an_unfinished_or_other_recipe_mnli_run(recorder, tmp_path):
    stub, _ = recorder
    env = dict(PYTHON=stub, MODEL_DIR="M", DATA_DIR="D", OUT_DIR=tmp_path / "out", SEEDS="0")
    mnli = tmp_path / "out/mnli/seed0/model"
    (mnli / "best_adapter").mkdir(parents=True)
    proc = _run("lora_roberta_base_glue.sh", "mrpc", **env)
    assert proc.returncode == 2 and "has not finished (no train_results.json)" in proc.stderr
    (mnli / "train_results.json").write_text("{}")
    (mnli / "run_config.json").write_text(json.dumps({"recipe": "released"}, indent=2))
    assert _run("lora_roberta_base_glue.sh", "mrpc", **env).returncode == 0
    proc = _run("lora_roberta_base_glue.sh", "mrpc", RECIPE="paper", **env)
    assert proc.returncode == 2 and "made under another recipe than RECIPE=paper" in proc.stderr


@pytest.mark.parametrize("script", sorted(LORAPLUS))
def test_loraplus_row_passes_the_recipe(recorder, tmp_path, script):
    hub_name, expected = LORAPLUS[script]
    calls, _ = _record(recorder, tmp_path, script)
    assert len(calls) == 1
    argv = calls[0]
    assert argv[0] == str(REPO / "loraplus/run_glue.py")
    flags = parse_flags(argv[1:])
    _check(flags, {"task_name": "mnli", "model_name_or_path": f"M/{hub_name}", **expected}, script)
    # the learning rate, ratio and seed are parameters (the sweep sets them)
    calls, _ = _record(recorder, tmp_path, script, LR="3e-5", LR_RATIO="16", SEED="1")
    flags = parse_flags(calls[-1][1:])
    _check(flags, {"learning_rate": "3e-5", "loraplus_lr_ratio": "16", "seed": "1"}, script)
    assert flags["output_dir"].startswith(str(tmp_path / "out" / "mnli" / "lr-3e-5_ratio-16"))


def test_sweep_covers_the_grid_with_both_seeds(recorder, tmp_path):
    calls, proc = _record(recorder, tmp_path, "loraplus_llama_7b_mnli_sweep.sh")
    summary = [a for a in calls if a[0] == "-"]  # the interpreter writing sweep_results.tsv (the stub here)
    calls = [a for a in calls if a[0] != "-"]
    assert len(summary) == 1 and summary[0][1] == str(tmp_path / "out" / "sweep_results.tsv")
    points = {(parse_flags(a[1:])["learning_rate"], parse_flags(a[1:])["loraplus_lr_ratio"], parse_flags(a[1:])["seed"])
              for a in calls}
    lrs_a, lrs_b = (1e-6, 5e-6, 1e-5, 5e-5, 1e-4), (1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 2e-4, 4e-4)
    assert len(calls) == len(points) == len(lrs_a) * len(lrs_b) * 2
    realised = {(float(a), round(float(a) * float(r), 12), s) for a, r, s in points}
    assert realised == {(a, round(b, 12), s) for a in lrs_a for b in lrs_b for s in ("0", "1")}
    assert all(parse_flags(a[1:])["model_name_or_path"] == "M/huggyllama/llama-7b" for a in calls)
    assert len(summary[0]) == 2 + len(calls)  # one row per run


def test_nproc_launches_torch_distributed_run(recorder, tmp_path):
    calls, proc = _record(recorder, tmp_path, "lora_roberta_base_glue.sh", "cola", NPROC=4, SEEDS="0")
    argv = calls[0]
    assert argv[:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                        str(REPO / "examples/NLU/run_glue.py")]
    # CoLA ran 32 per device on 2 GPUs: 4 processes keep the global 64 with 16 per device
    assert _global_batch(argv, parse_flags(argv[6:])) == 64 and "(the original: 32 x 2 process(es) x 1)" in proc.stderr
    calls, proc = _record(recorder, tmp_path, "lora_roberta_large_glue.sh", "mnli", NPROC=8, SEEDS="0")
    assert calls[-1][4] == "8" and "accumulation 1, the paper's" in proc.stderr


# -- errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, env, phrase", [
    (["nope"], {}, "unknown task 'nope'"),
    (["--fast"], {}, "unknown option --fast"),
    (["mnli"], {"NPROC": "0"}, "NPROC must be a positive integer"),
    (["mrpc"], {}, "starts from the MNLI LoRA checkpoint"),
    (["rte"], {"MNLI_LORA": "/nonexistent/mnli.bin"}, "MNLI_LORA=/nonexistent/mnli.bin does not exist"),
    (["mnli"], {"RECIPE": "table"}, "RECIPE must be released or paper"),
    (["mnli"], {"KEEP_PER_DEVICE_BATCH": "yes"}, "KEEP_PER_DEVICE_BATCH must be 0 or 1"),
    (["mnli"], {"SEEDS": "0 x"}, "SEEDS must list non-negative integers"),
    (["mnli"], {"NPROC": "3"}, "cannot be split over NPROC=3 processes"),
])
def test_errors_are_one_clear_line_and_launch_nothing(recorder, tmp_path, args, env, phrase):
    stub, calls = recorder
    proc = _run("lora_roberta_base_glue.sh", *args, PYTHON=stub, OUT_DIR=tmp_path / "out", **env)
    assert proc.returncode == 2 and phrase in proc.stderr, proc.stderr
    assert calls() == []


def test_sweep_refuses_jobs_with_several_processes(recorder, tmp_path):
    stub, calls = recorder
    proc = _run("loraplus_llama_7b_mnli_sweep.sh", PYTHON=stub, JOBS="2", NPROC="2", OUT_DIR=tmp_path)
    assert proc.returncode == 2 and "leave NPROC at 1" in proc.stderr and calls() == []


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("[!_]*.sh")))
def test_help_describes_the_script(script):
    proc = _run(script, "--help")
    assert proc.returncode == 0 and f"scripts/{script}" in proc.stdout and "--smoke" in proc.stdout


def test_every_script_is_covered():
    """The GLUE scripts are run here; every other script must be run by another tests/test_*scripts.py file."""
    here = {*GLUE_ROWS, *LORAPLUS, "loraplus_llama_7b_mnli_sweep.sh"}
    others = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*scripts.py") if p.name != Path(__file__).name)
    uncovered = [p.name for p in SCRIPTS.glob("[!_]*.sh") if p.name not in here and p.name not in others]
    assert not uncovered, f"scripts no test runs: {uncovered}"
    assert here <= {p.name for p in SCRIPTS.glob("[!_]*.sh")}


# -- smoke assets ----------------------------------------------------------------------------------------

def _assets_module():
    spec = importlib.util.spec_from_file_location("smoke_assets", SCRIPTS / "_smoke_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    _assets_module().build(root)
    return root


def test_smoke_models_keep_the_switches_of_the_models_they_stand_for(smoke_dir):
    import transformers

    config = lambda name: json.loads((smoke_dir / "models" / name / "config.json").read_text())  # noqa: E731
    xxl, v3 = config("microsoft/deberta-v2-xxlarge"), config("microsoft/deberta-v3-base")
    assert xxl["conv_kernel_size"] == 3 and v3.get("conv_kernel_size", 0) == 0
    assert xxl["position_buckets"] > 0 and xxl["position_biased_input"] is False
    assert config("roberta-large")["num_hidden_layers"] > config("roberta-base")["num_hidden_layers"]
    llama = transformers.AutoTokenizer.from_pretrained(smoke_dir / "models" / "huggyllama" / "llama-7b")
    assert llama.pad_token is None and config("huggyllama/llama-7b")["vocab_size"] == len(llama)
    gpt2 = transformers.AutoTokenizer.from_pretrained(smoke_dir / "models" / "gpt2")
    assert config("gpt2")["eos_token_id"] == gpt2.eos_token_id < config("gpt2")["vocab_size"]
    assert (smoke_dir / "glue" / "MNLI" / "dev_mismatched.tsv").is_file()


def test_smoke_assets_are_built_once_and_refuse_unknown_models(smoke_dir, capsys):
    assets = _assets_module()
    weights = smoke_dir / "models" / "gpt2" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assets.build(smoke_dir, ["gpt2"])
    assert weights.stat().st_mtime_ns == before
    assert assets.main(["--root", str(smoke_dir), "--models", "gpt5"]) == 2
    assert "no smoke model for 'gpt5'" in capsys.readouterr().err


# -- smoke runs ------------------------------------------------------------------------------------------

# case -> (arguments, extra environment, {run folder under OUT_DIR: metric names}). A representative run of
# every script; the LoRA rows of RoBERTa-base and DeBERTa-XXL also chain MRPC / RTE on their own MNLI run.
SMOKE = {
    "lora_roberta_base_glue.sh": (["--smoke"], {}, {"mnli/seed0/model": {"accuracy", "mnli-mm"},
                                                    "mrpc/seed0/model": {"accuracy", "f1"}}),
    "lora_roberta_large_glue.sh": (["--smoke", "cola"], {}, {"cola/seed0/model": {"matthews_correlation"}}),
    "lora_deberta_v2_xxlarge_glue.sh": (["--smoke"], {}, {"mnli/seed0/model": {"accuracy", "mnli-mm"},
                                                          "rte/seed0/model": {"accuracy"}}),
    "adalora_deberta_v3_base_glue.sh": (["--smoke"], {}, {"mrpc/seed6/model": {"accuracy", "f1"}}),
    "lora2_deberta_v3_base_glue.sh": (["--smoke"], {}, {"rte/seed4/model": {"accuracy"}}),
    "loraplus_gpt2_mnli.sh": (["--smoke"], {}, {"mnli/lr-2e-4_ratio-10": {"accuracy", "mnli-mm"}}),
    "loraplus_roberta_base_mnli.sh": (["--smoke"], {}, {"mnli/lr-5e-5_ratio-80": {"accuracy", "mnli-mm"}}),
    "loraplus_llama_7b_mnli.sh": (["--smoke"], {}, {"mnli/lr-0.0001_ratio-1_seed-0": {"accuracy", "mnli-mm"}}),
    "loraplus_llama_7b_mnli_sweep.sh": (["--smoke"], {"SEEDS": "1"},
                                        {"mnli/lr-1e-4_ratio-4_seed-1": {"accuracy", "mnli-mm"}}),
    # RECIPE=paper: the paper tables' values where they differ (RoBERTa-large SST-2: batch 4 x 8 GPUs, seq 128;
    # DeBERTa XXL CoLA: warmup ratio 0.1, lr 1e-4; AdaLoRA CoLA: gamma 0.5; LoRA²: the table's head dropout)
    "lora_roberta_large_glue.sh paper": (["--smoke", "sst2"], {"RECIPE": "paper"}, {"sst2/seed0/model": {"accuracy"}}),
    "lora_deberta_v2_xxlarge_glue.sh paper": (["--smoke", "cola"], {"RECIPE": "paper"},
                                              {"cola/seed0/model": {"matthews_correlation"}}),
    # a Table 1 budget on the 12-matrix stand-in: the same average final rank (2 per matrix: 24 from r 4)
    "adalora_deberta_v3_base_glue.sh budget": (["--smoke", "rte"], {"BUDGET": "0.32M"},
                                               {"rte/seed6/model": {"accuracy"}}),
    "adalora_deberta_v3_base_glue.sh paper": (["--smoke", "cola"], {"RECIPE": "paper"},
                                              {"cola/seed6/model": {"matthews_correlation"}}),
    "lora2_deberta_v3_base_glue.sh paper": (["--smoke", "cola"], {"RECIPE": "paper"},
                                            {"cola/seed6/model": {"matthews_correlation"}}),
}
# the paper's global batch of each smoke run (per-device x the original's processes x accumulation)
SMOKE_GLOBAL = {"lora_roberta_base_glue.sh": {"mnli": 128, "mrpc": 128}, "lora_roberta_large_glue.sh": {"cola": 32},
                "lora_roberta_large_glue.sh paper": {"sst2": 32},
                "lora_deberta_v2_xxlarge_glue.sh": {"mnli": 64, "rte": 32},
                "lora_deberta_v2_xxlarge_glue.sh paper": {"cola": 32}}


@pytest.fixture(scope="module")
def smoke_runs(request, smoke_dir, tmp_path_factory):
    """Start the smoke runs of the collected test_smoke_run cases, two at a time; {case: future}."""
    cases = [item.callspec.params["case"] for item in request.session.items
             if getattr(item, "originalname", None) == "test_smoke_run" and hasattr(item, "callspec")]
    root = tmp_path_factory.mktemp("smoke_runs")

    def run(case):
        args, env, _ = SMOKE[case]
        out = root / case
        start = time.perf_counter()
        proc = _run(case.split()[0], *args, SMOKE_DIR=smoke_dir, OUT_DIR=out, **env)
        return proc, out, time.perf_counter() - start

    pool = ThreadPoolExecutor(max_workers=2)
    futures = {case: pool.submit(run, case) for case in dict.fromkeys(cases)}
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.parametrize("case", list(SMOKE))
def test_smoke_run(smoke_runs, smoke_dir, case):
    proc, out, seconds = smoke_runs[case].result()
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = SMOKE[case][2]
    found = sorted(str(p.parent.relative_to(out)) for p in out.rglob("eval_results.json"))
    assert found == sorted(runs), found
    for folder, metrics in runs.items():
        results = json.loads((out / folder / "eval_results.json").read_text())
        assert set(results) == {"task", "split", "num_examples"} | metrics, folder
        config = json.loads((out / folder / "run_config.json").read_text())
        assert config["args"]["max_steps"] in (2, 3), folder  # the smoke cap, after the recipe's flags
        assert Path(config["model_path"]).is_relative_to(smoke_dir / "models"), config["model_path"]
        task = folder.split("/")[0]
        # the paper's global batch, on the smoke run's one process, recorded with the recipe
        assert config["global_batch_size"] == SMOKE_GLOBAL.get(case, {}).get(task, 32), (folder, config["args"])
        assert config["recipe"] == ("paper" if case.endswith(" paper") else "released")
        if task in FROM_MNLI and case.startswith("lora_") and not case.endswith(" paper"):  # chained on its MNLI run
            assert config["lora_path"] == str(out / "mnli" / "seed0" / "model" / "best_adapter")
    if case == "lora2_deberta_v3_base_glue.sh":  # LoRA² as released: head dropout 0.15 (the flag said 0.2)
        assert config["method"] == "lora2" and "cls_dropout 0.2 is ignored" in proc.stderr
        assert (config["cls_dropout"], config["args"]["cls_dropout"]) == (0.15, 0.2)  # used, and as given
    if case == "adalora_deberta_v3_base_glue.sh budget":
        assert (config["args"]["lora_r"], config["args"]["target_total_rank"]) == (4, 24)
    if case == "adalora_deberta_v3_base_glue.sh paper":
        assert config["method"] == "adalora" and config["args"]["reg_orth_coef"] == 0.5
    if "sweep" in case:
        header, *rows = (out / "sweep_results.tsv").read_text().splitlines()
        assert header.split("\t")[:6] == ["lr_A", "lr_B", "ratio", "seed", "accuracy", "accuracy_mm"]
        assert [r.split("\t")[:4] for r in rows] == [["1e-4", "4e-4", "4", "1"]] and rows[0].split("\t")[4]
    print(f"{case}: {seconds:.1f} s")


opt_in = pytest.mark.skipif(os.environ.get("LORALIB_SMOKE_ALL") != "1", reason="opt-in: LORALIB_SMOKE_ALL=1")


@pytest.mark.slow
@opt_in
@pytest.mark.parametrize("script", sorted(GLUE_ROWS))
def test_smoke_every_task(smoke_dir, tmp_path, script):
    proc = _run(script, "--smoke", "all", SMOKE_DIR=smoke_dir, OUT_DIR=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(list(tmp_path.rglob("eval_results.json"))) == len(TASKS)


@pytest.mark.slow
@opt_in
def test_smoke_on_two_processes(smoke_dir, tmp_path):
    proc = _run("lora_roberta_base_glue.sh", "--smoke", "mnli", SMOKE_DIR=smoke_dir, OUT_DIR=tmp_path, NPROC=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "torch.distributed.run --standalone --nproc_per_node 2" in proc.stderr
    results = json.loads((tmp_path / "mnli" / "seed0" / "model" / "eval_results.json").read_text())
    assert results["num_examples"] == 6 and results["mnli-mm"]["num_examples"] == 6
