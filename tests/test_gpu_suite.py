"""benchmarks/gpu_suite.py: the CPU smoke run (--device cpu --tiny) writes every row with finite numbers,
ours and PEFT compute the same function where they carry the same adapters, the FLOP count is the
documented formula, and a failing or overrunning row is reported while the suite goes on."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_suite
        yield gpu_suite
    finally:
        sys.path.remove(str(SCRIPT.parent))


def _numbers(obj, path="$"):
    """Every int / float leaf of a JSON value with its path."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory, suite):
    out = tmp_path_factory.mktemp("gpu_suite") / "suite.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_smoke_run_has_every_row_with_finite_numbers(smoke_report, suite):
    report, stdout = smoke_report
    assert report["tiny"] is True and report["dtype"] == "float32"
    assert list(report["rows"]) == list(suite.ROWS)
    for key in ("device", "torch", "transformers", "peft"):
        assert report["meta"][key]
    rates = report["device_rates"]
    assert rates["matmul_tflops"] > 0 and rates["launch_us"] > 0
    for name, row in report["rows"].items():
        assert row["status"] == "ok", (name, row.get("error"), row.get("traceback"))
        assert row["checks"], name
        numbers = list(_numbers(row["results"]))
        assert numbers, name
        bad = [(p, v) for p, v in numbers if not math.isfinite(v)]
        assert not bad, (name, bad[:5])
        for check in row["checks"]:
            assert check["ratio"] is None or (math.isfinite(check["ratio"]) and check["ratio"] > 0), (name, check)
            assert (check["met"] is None) == (not check["target"] or check["ratio"] is None), (name, check)
    # the table is printed last, labelled as a smoke run, with a line per check
    table = stdout[stdout.index("GPU suite (TINY SMOKE RUN"):]
    assert table.count("\n| ") - 1 == sum(len(r["checks"]) for r in report["rows"].values())
    assert "torch " + torch.__version__ in table


def test_smoke_run_compares_the_same_function(smoke_report):
    """fp32 on the CPU: our model and transformers + PEFT with the same weights and LoRA factors agree."""
    rows = smoke_report[0]["rows"]
    for name in ("llama7b_step", "smollm2_step"):
        check = rows[name]["results"]["check"]
        assert check["loss_rel_diff"] < 1e-5, (name, check)
        assert check["lora_grad_rel_diff"] < 1e-4, (name, check)
    gpt2 = rows["gpt2_step"]["results"]["repeats"]
    assert len(gpt2) == 3 and all(r["ours"]["tokens_per_s"] > 0 for r in gpt2)
    llama = rows["llama7b_step"]["results"]
    for gc in ("gc_off", "gc_on"):
        for who in ("ours", "peft"):
            r = llama[gc][who]
            assert r["memory"] == r["resident"] + r["step_growth"] and 0 < r["mfu"] < 1
    assert llama["gc_on"]["ours"]["hfu"] > llama["gc_on"]["ours"]["mfu"]


def test_bf16_build_path_compares_the_same_function(suite):
    """The GPU's dtype on the CPU: the 7B-shape pair built in bf16 (ours under a bf16 default dtype, PEFT's
    fp32 adapters cast, rotary frequencies left in fp32 on both sides) still computes one function."""
    s = suite.Suite(device=torch.device("cpu"), dtype=torch.bfloat16, shapes=suite.TINY, tmp=Path("."))
    ours, theirs = suite.build_llama_pair(s)
    assert torch.get_default_dtype() == torch.float32
    lora = [p for n, p in theirs.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.bfloat16 for p in lora)
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32
    check = suite.loss_and_grads({"ours": ours, "peft": theirs}, s.ids(256, 1, 32))
    assert check["loss_rel_diff"] < 1e-3 and check["lora_grad_rel_diff"] < 2e-2, check


def test_lora_step_flops_is_the_documented_formula(suite):
    from loralib import LoRAConfig
    from loralib.models.llama import LlamaConfig, LlamaForCausalLM
    cfg = suite.TINY_LLAMA
    model = LlamaForCausalLM(LlamaConfig.from_hf(cfg), LoRAConfig(r=8, lora_alpha=16, target_modules=suite.TARGETS))
    d, i, v, L = 32, 88, 256, 2
    n = L * (4 * d * d + 3 * d * i) + d * v                 # seven projections per layer + LM head
    n_lora = L * 8 * (4 * (d + d) + 2 * (d + i) + (i + d))  # r (in + out) per adapter
    seq = 64
    attn = L * 4 * 8 * seq                                  # L s heads head_dim
    f = suite.lora_step_flops(model, seq)
    assert (f["N"], f["N_lora"], f["N_lm_head"]) == (n, n_lora, d * v)
    assert f["flops_per_token"] == 4 * n + 6 * n_lora + 6 * attn
    assert f["recompute_flops_per_token"] == 2 * (n - d * v) + 2 * n_lora + 2 * attn
    assert f["full_ft_flops_per_token"] == 6 * n + 6 * attn


def test_targets_are_marked(suite):
    row = suite.Row()
    row.check("a", "", "", 1.31, ">= 1.3")
    row.check("b", "", "", 1.21, "<= 1.2")
    row.check("c", "", "", 0.9, "")
    row.check("d", "", "", None, "<= 1.0")
    assert [c["met"] for c in row.checks] == [True, False, None, None]


def test_failed_and_overrunning_rows_are_reported(suite, monkeypatch):
    s = suite.Suite(device=torch.device("cpu"), dtype=torch.float32, shapes=suite.TINY, tmp=Path("."))

    def fails(_):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    def overruns(_):
        time.sleep(5)
        return suite.Row()

    monkeypatch.setitem(suite.ROWS, "fails", fails)
    monkeypatch.setitem(suite.ROWS, "overruns", overruns)
    out = suite.run_row("fails", s, budget=10, hard=10)
    assert out["status"] == "error" and "OutOfMemoryError" in out["error"] and "simulated" in out["traceback"]
    start = time.perf_counter()
    out = suite.run_row("overruns", s, budget=0.5, hard=1)
    assert out["status"] == "error" and "RowTimeout" in out["error"]
    assert time.perf_counter() - start < 4.5  # stopped at the hard limit, not after the 5 s sleep
    assert s.row_end == math.inf


def test_unknown_row_is_refused_before_anything_runs(suite, capsys):
    with pytest.raises(SystemExit) as exit_info:
        suite.main(["--device", "cpu", "--tiny", "--rows", "llama7b_step,nope"])
    assert exit_info.value.code == 2
    assert "--rows: unknown row(s) ['nope']" in capsys.readouterr().err
