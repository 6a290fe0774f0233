"""Smoke run of benchmarks/learning_check.py (issue 4 §6) and checks of its measures and problem."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning_check.py"


@pytest.fixture(scope="module")
def lc():
    spec = importlib.util.spec_from_file_location("learning_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_measures(lc):
    ref = [1.0, 0.5, 0.25]
    assert lc.curve_distance(ref, ref) == 0.0
    # one step off by a factor e, the other exact: mean |ln ratio| over steps 1..T = 0.5
    assert lc.curve_distance([1.0, 0.5 * math.e, 0.25], ref) == pytest.approx(0.5)
    assert lc.area_between([1.0, 0.6, 0.25], ref) == pytest.approx(0.05)
    assert lc.steps_to([1.0, 0.7, 0.4, 0.3], 0.4) == 2
    assert lc.steps_to([1.0, 0.7], 0.1) is None
    assert lc.set_loss([1.0, 0.5, 0.04]) == pytest.approx(0.2)
    c2 = lc.claim2([1.0, 0.6, 0.3, 0.2, 0.04], [1.0, 0.15, 0.1, 0.05, 0.03])
    assert (c2["steps_lora"], c2["steps_loraplus"], c2["passed"]) == (3, 1, True)
    assert not lc.claim2([1.0, 0.1, 0.04], [1.0, 0.9, 0.8])["passed"]  # LoRA+ never reaches L*


def test_problem_has_the_designed_spectra(lc):
    problem = lc.make_problem(lc.ProblemConfig(n_train=64), seed=0)
    energy = {n: lc.energy_at_rank(problem.deltas[n], 4) for n in lc.LAYERS}
    assert energy["fc2"] > 0.98 > energy["fc3"] > energy["fc1"]  # fc2 ~ rank 2, fc1 full-rank-ish
    for name in lc.LAYERS:
        w0 = problem.pretrained[f"{name}.weight"]
        assert problem.deltas[name].norm() / w0.norm() == pytest.approx(0.6, rel=1e-5)
    # the target differs from the pretrained net, and the loss normaliser measures that gap
    model = lc._pretrained_model(problem)
    with torch.no_grad():
        assert lc._loss(model, problem, problem.x, problem.y).item() == pytest.approx(1.0, rel=1e-5)


def test_smoke_run(lc, tmp_path, capsys):
    report = lc.main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert set(report["runs"]) == set(lc.METHODS)
    steps = report["run"]["steps"]
    for method, res in report["runs"].items():
        curve = res["curve"]
        assert len(curve) == steps + 1 and all(math.isfinite(v) for v in curve), method
        # every method starts from W0 exactly (B = 0 or E = 0), so every curve starts at 1
        assert curve[0] == pytest.approx(1.0, rel=1e-5), method
        assert curve[-1] < curve[0], f"{method} did not learn in {steps} steps"
    for method in ("adalora", "lora2"):
        pattern = report["runs"][method]["rank_pattern"]
        assert set(pattern) == set(lc.LAYERS) and all(0 <= k <= 8 for k in pattern.values())
        assert sum(pattern.values()) <= 4 * len(lc.LAYERS)  # the schedule ended at the target budget
        assert f"{method} final rank pattern" in out
    assert "CLAIM 1 " in out and "CLAIM 2 " in out and "| method |" in out
    assert (tmp_path / "learning_check_curves.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "learning_check.json").read_text())
    assert saved["runs"]["full"]["curve"] == report["runs"]["full"]["curve"]
    assert saved["claim1"]["passed"] == (saved["claim1"]["D_lorapro"] < saved["claim1"]["D_lora"])
