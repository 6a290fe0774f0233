"""`loralib compare`: runs outside the papers' settings (run_config.json "setting") get their own table, and
method names are read through the method registry (loralib.methods)."""
from __future__ import annotations

import json
from pathlib import Path

from loralib.repro import compare


def _run(folder: Path, config: dict, results: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "run_config.json").write_text(json.dumps(config))
    (folder / "eval_results.json").write_text(json.dumps(results))


def test_real_data_runs_are_shown_apart(tmp_path, capsys):
    e2e = {"task": "e2e", "split": "test", "num_examples": 40}
    _run(tmp_path / "real" / "lora", {"method": "lora", "model_name_or_path": ".cache/smollm2-135m-instruct",
                                      "setting": "real data, small model", "lora": {"r": 8}},
         {**e2e, "bleu": 62.38, "nist": 7.108})
    _run(tmp_path / "real" / "none", {"method": "none", "model_name_or_path": ".cache/smollm2-135m-instruct",
                                      "setting": "real data, small model", "lora": None},
         {**e2e, "bleu": 0.0})
    _run(tmp_path / "glue" / "mrpc", {"method": "lora", "model_name_or_path": "roberta-base", "lora": {"r": 8}},
         {"task": "mrpc", "split": "validation", "num_examples": 408, "accuracy": 0.875})
    assert compare.main([str(tmp_path), "--out", str(tmp_path / "chart.png")]) == 0
    out = capsys.readouterr().out
    paper_table, side = out.split("## real data, small model", 1)
    assert "glue/mrpc" in paper_table and "real/lora" not in paper_table
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in side.splitlines() if line.startswith("| real/")}
    assert rows["real/lora"][-2:] == ["62.38", "7.11"]
    assert rows["real/none"][-2:] == ["0.00", "—"]  # the un-tuned run measured no NIST: a dash, not a zero


def test_method_names_come_from_the_registry():
    assert compare.method_of({"method": "lora-pro-full"}) == "lorapro"
    assert compare.method_of({"method": "FT"}) == "full"
    assert compare.method_of({"method": "lora", "loraplus_lr_ratio": 16}) == "loraplus"
    assert compare.method_of({"method": "adapter"}) == "adapter"  # a paper's baseline we do not implement
    assert compare.method_of({}) is None


def test_only_real_data_runs_print_their_table_alone(tmp_path, capsys):
    _run(tmp_path / "lora", {"method": "lora-pro", "model_name_or_path": ".cache/smollm2-135m-instruct",
                             "setting": "real data, small model", "lora": {"r": 8}},
         {"task": "e2e", "split": "test", "num_examples": 40, "bleu": 62.79})
    assert compare.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## real data, small model") and "| reported |" not in out
    assert "| lora | smollm2-135m-instruct | lorapro | e2e | test | 62.79 |" in out
    assert not (tmp_path / "compare.png").exists()  # no paper row: nothing to chart
