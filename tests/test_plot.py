"""`loralib plot` (loralib.repro.plot): curves from metrics.jsonl as loralib.train writes it (a real tiny run, one
resumed), the records of GLUE / NLG / instruction runs, seeds as a band, torn and unreadable files named."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_loop import build, collate, data  # noqa: E402

from loralib.cli import main as cli_main  # noqa: E402
from loralib.repro import plot  # noqa: E402
from loralib.train import TrainConfig, train  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _write(folder: Path, records, config=None, tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    if config is not None:
        (folder / "run_config.json").write_text(json.dumps(config))
    return folder


def _glue(seed, losses, accs, method="lora", lr=1e-3, ratio=None):
    records = [{"step": 10 * (i + 1), "epoch": 0.1, "loss": v, "lr": lr, "tok_per_s": 500.0}
               for i, v in enumerate(losses)]
    records += [{"step": 10 * (i + 1), "epoch": 0.1, "eval_accuracy": a, "eval_loss": 1.0} for i, a in enumerate(accs)]
    config = {"method": method, "task": "wn-lex", "loraplus_lr_ratio": ratio, "args": {"learning_rate": lr, "seed": seed}}
    return records, config


def test_resumed_training_run_has_no_duplicated_steps(tmp_path):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=6, per_device_batch_size=4, lr=1e-2, progress_bar=False,
                log_every=1, save_every=2, eval_every=2, device="cpu")
    evaluate = lambda m: {"accuracy": 0.5}  # noqa: E731
    train(build(), data(), collate, TrainConfig(**base), eval_fn=evaluate)
    first = plot.read_curves(tmp_path / "run", [])
    # a crash after step 5's records: resume from checkpoint-4 and log steps 5 and 6 again
    shutil.rmtree(tmp_path / "run" / "checkpoint-6")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 99.0, "lr": 0.0}) + "\n")
    train(build(), data(), collate, TrainConfig(resume_from="latest", **base), eval_fn=evaluate)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    warnings = []
    curves = plot.read_curves(tmp_path / "run", warnings)
    assert warnings == [] and curves.method == "run"  # no run_config.json: named by its folder
    assert sorted(curves.loss) == [1, 2, 3, 4, 5, 6] and curves.loss == pytest.approx(first.loss)
    assert curves.metric == "accuracy" and curves.evals == {2: 0.5, 4: 0.5, 6: 0.5}
    # the file itself: the loop dropped the records after the checkpoint; a second copy of a step would be
    # replaced by its later record
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    _write(tmp_path / "dup", [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    assert plot.read_curves(tmp_path / "dup", []).loss == {1: 3.0, 2: 1.5}


def test_metrics_of_glue_nlg_and_instruction_runs(tmp_path):
    records, config = _glue(0, [1.0, 0.8], [0.4, 0.6])
    glue = plot.read_curves(_write(tmp_path / "glue", records, config), [])
    assert (glue.method, glue.task, glue.lr, glue.seed, glue.metric) == ("lora", "wn-lex", 1e-3, 0, "accuracy")
    nlg = _write(tmp_path / "nlg", [{"step": 5, "loss": 4.0}, {"step": 5, "epoch": 1, "eval_loss": 3.5,
                                                                 "eval_ppl": 33.1}],
                 {"method": "lora", "args": {"lr": 2e-4, "random_seed": 110}})
    curves = plot.read_curves(nlg, [])
    assert (curves.metric, curves.evals, curves.seed, curves.lr) == ("loss", {5: 3.5}, 110, 2e-4)
    # AdaLoRA's rank records and non-numeric values are left alone
    inst = _write(tmp_path / "inst", [{"step": 2, "loss": 2.0}, {"step": 2, "ranks": {"a": 3}},
                                      {"step": 2, "eval_loss": None}, {"step": 4, "eval_loss": 1.9}],
                  {"method": "lora", "loraplus_lr_ratio": 16, "task": "gsm8k", "args": {"learning_rate": 2e-5}})
    curves = plot.read_curves(inst, [])
    assert (curves.method, curves.loss, curves.evals) == ("loraplus", {2: 2.0}, {4: 1.9})
    # evaluated after training only (make demo): eval_results.json at the last step
    demo = _write(tmp_path / "demo", [{"step": 37, "loss": 1.2}, {"step": 150, "loss": 0.5}], {"method": "full"})
    (demo / "eval_results.json").write_text(json.dumps({"task": "wn-lex", "split": "dev", "num_examples": 600,
                                                        "accuracy": 0.8233}))
    (demo / "train_results.json").write_text(json.dumps({"global_step": 150}))
    curves = plot.read_curves(demo, [])
    assert (curves.metric, curves.evals) == ("accuracy", {150: 0.8233})


def test_torn_and_unreadable_files_are_named(tmp_path, capsys):
    records, config = _glue(0, [1.0, 0.8, 0.7], [0.5])
    _write(tmp_path / "runs" / "torn", records, config, tail='{"step": 40, "lo')
    _write(tmp_path / "runs" / "bad", [{"step": 1, "loss": 1.0}], tail='not json\n{"step": 3, "loss": 0.5}\n')
    warnings = []
    torn = plot.read_curves(tmp_path / "runs" / "torn", warnings)
    assert sorted(torn.loss) == [10, 20, 30]
    assert warnings == [f"{tmp_path / 'runs' / 'torn' / 'metrics.jsonl'}: line 5 is torn (a run stopped "
                        "mid-write?); skipped it"]
    assert plot.read_curves(tmp_path / "runs" / "bad", warnings) is None
    assert "bad/metrics.jsonl: line 2 is not a JSON object" in warnings[1]

    pytest.importorskip("matplotlib")
    assert cli_main(["plot", str(tmp_path / "runs")]) == 0
    captured = capsys.readouterr()
    assert "bad/metrics.jsonl: line 2" in captured.err and "torn/metrics.jsonl: line 5 is torn" in captured.err
    assert (tmp_path / "runs" / "curves.png").read_bytes().startswith(PNG)
    # nothing readable, or nothing there: one error line, exit 1
    assert cli_main(["plot", str(tmp_path / "runs" / "bad")]) == 1
    assert "no run could be read" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["plot", str(tmp_path / "empty")]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_seeds_drawn_as_a_band_methods_as_colours(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    runs = []
    for seed, losses, accs in ((0, [1.0, 0.6], [0.5, 0.7]), (1, [1.2, 0.8], [0.4, 0.6])):
        records, config = _glue(seed, losses, accs)
        runs.append(_write(tmp_path / f"lora-s{seed}", records, config))
    records, config = _glue(0, [1.1, 0.3], [0.5, 0.9], method="lora", ratio=16)
    runs.append(_write(tmp_path / "loraplus", records, config))
    records, config = _glue(0, [1.1, 0.9], [0.3, 0.4], method="full", lr=5e-5)
    runs.append(_write(tmp_path / "full", records, config))

    drawn = {}
    real = plot.write_curves

    def keep(curves, out, title="Training curves"):
        import matplotlib.pyplot as plt
        monkeypatch.setattr(plt, "close", lambda fig: drawn.setdefault("fig", fig))
        return real(curves, out, title)

    monkeypatch.setattr(plot, "write_curves", keep)
    out, warnings = plot.plot_runs(runs, tmp_path / "figs" / "curves.png")
    assert warnings == [] and out.read_bytes().startswith(PNG)
    left, right = drawn["fig"].axes
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["full", "lora (2 seeds)", "loraplus"]
    lines = {line.get_label(): line for line in left.get_lines()}
    assert list(lines["lora (2 seeds)"].get_ydata()) == pytest.approx([1.1, 0.7])  # the mean of the seeds
    assert list(right.get_lines()[1].get_ydata()) == pytest.approx([0.45, 0.65])
    bands = [c for c in left.collections if isinstance(c, matplotlib.collections.PolyCollection)]
    assert len(bands) == 1  # the two seeds' min..max; single runs have none
    colours = {label: line.get_color() for label, line in lines.items()}
    assert len(set(map(str, colours.values()))) == 3
    assert right.get_title() == "evaluation: accuracy"
    assert plot.default_out([tmp_path / "lora-s0", tmp_path / "full"]) == tmp_path.resolve() / "curves.png"
