"""Issue 13, class 1: numbers that are silently wrong. A non-finite loss or weight stops training before
anything is written from it (every method: the loop is shared); STS-B scores outside [0, 5] or nan are
refused as file:line; nan predictions never score well; `loralib compare` never shows a non-finite number
as a measurement."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _glue_fixtures import write_glue_tsv  # noqa: E402
from _hardening_fixtures import (FAST, accuracy, adapter_tensors, collate, tiny_data, tiny_model,  # noqa: E402
                                 write_tiny_roberta)  # noqa: E402

from loralib.optim.lorapro import LoRAProAdamW  # noqa: E402
from loralib.repro.compare import read_runs  # noqa: E402
from loralib.tasks.glue import compute_metrics, load_glue  # noqa: E402
from loralib.tasks.glue.metrics import pearson, spearmanr  # noqa: E402
from loralib.train import TrainConfig, train  # noqa: E402
from loralib.train.guards import NonFiniteError  # noqa: E402


def _config(tmp_path, **kw):
    return TrainConfig(output_dir=str(tmp_path / "run"), **{**FAST, "max_steps": 6, **kw})


def _finite_log(out: Path) -> bool:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if (
        out / "metrics.jsonl").exists() else []
    return all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


def _nan_sample_data():
    data = tiny_data()
    data[8]["x"] = data[8]["x"].clone()  # in the 4th batch of seed 42
    data[8]["x"][2] = float("nan")
    return data


@pytest.mark.parametrize("optimizer", ["adamw", "lorapro"])
def test_a_nan_loss_stops_the_run_before_its_update_and_before_anything_is_written(tmp_path, optimizer):
    factory = (lambda m: LoRAProAdamW(m, lr=1e-2, mode="efficient")) if optimizer == "lorapro" else None
    config = _config(tmp_path, max_steps=8, save_strategy="steps", save_every=1)
    model = tiny_model()
    with pytest.raises(NonFiniteError, match=r"loss is nan at step \d+") as err:
        train(model, _nan_sample_data(), collate, config, optimizer_factory=factory)
    assert isinstance(err.value, ValueError)  # the entry points print it as one line
    step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    assert step > 1, "the bad sample should not fall in the first batch (seed 42)"
    out = tmp_path / "run"
    assert f"last good checkpoint: {out / f'checkpoint-{step - 1}'}" in str(err.value)
    assert {p.name for p in out.iterdir() if p.name.startswith("checkpoint-")} == {
        f"checkpoint-{s}" for s in range(1, step)}
    assert not (out / "adapter").exists() and _finite_log(out)
    saved = load_file(str(out / f"checkpoint-{step - 1}" / "adapter" / "adapter.safetensors"))
    for name, tensor in adapter_tensors(model).items():  # the bad step's update was not applied
        assert torch.equal(saved[name], tensor), name


def test_a_too_high_learning_rate_ends_in_one_error_not_a_nan_adapter(tmp_path):
    config = _config(tmp_path, lr=1e37, schedule="constant", max_steps=30, save_strategy="no")
    with pytest.raises(NonFiniteError, match=r"loss is (nan|inf) at step \d+"):
        train(tiny_model(), tiny_data(), collate, config)
    assert not (tmp_path / "run" / "adapter").exists()


def test_non_finite_weights_with_a_finite_loss_are_not_written(tmp_path):
    config = _config(tmp_path, lr=float("inf"), max_steps=1, save_strategy="no")
    with pytest.raises(NonFiniteError, match=r"parameter '.*' holds nan / inf after step 1"):
        train(tiny_model(), tiny_data(), collate, config)
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_nan_metric_is_never_the_best(tmp_path):
    calls = []

    def eval_fn(model):
        calls.append(1)
        return {"accuracy": float("nan")} if len(calls) == 1 else accuracy(model)

    config = _config(tmp_path, eval_strategy="steps", eval_every=3, metric_for_best="accuracy")
    result = train(tiny_model(), tiny_data(), collate, config, eval_fn=eval_fn)
    assert result.best_step == 6 and math.isfinite(result.best_metric)


# -- STS-B data and metrics ---------------------------------------------------------------------------

@pytest.mark.parametrize("score, why", [("nan", "outside STS-B's range"), ("99", "outside STS-B's range"),
                                        ("-0.5", "outside STS-B's range"), ("inf", "outside STS-B's range")])
def test_stsb_scores_outside_0_to_5_are_refused_with_file_and_line(tmp_path, score, why):
    root = write_glue_tsv(tmp_path, tasks=("stsb",))
    path = root / "STS-B" / "train.tsv"
    lines = path.read_text().splitlines()
    fields = lines[3].split("\t")
    lines[3] = "\t".join(fields[:-1] + [score])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:4: score '{score}' is {why}"):
        load_glue("stsb", root, "train")
    assert len(load_glue("stsb", root, "dev")) == 6  # 0.000 and 5.000 are in range


def test_non_finite_predictions_never_score_well(caplog):
    labels = np.array([0.0, 1.0, 2.5, 4.0, 5.0])
    for predictions in (np.full(5, np.nan), np.array([0.0, 1.0, np.nan, 4.0, 5.0]), np.array([0, 1, 2, 3, np.inf])):
        scores = compute_metrics("stsb", predictions, labels)
        assert all(math.isnan(v) for v in scores.values()), scores
        assert math.isnan(spearmanr(predictions, labels)) and math.isnan(pearson(predictions, labels))
    assert "predictions are nan / inf" in caplog.text
    logits = np.zeros((4, 2))
    logits[1, 0] = np.nan  # argmax would pick class 0 for this row
    assert math.isnan(compute_metrics("mrpc", logits, [0, 0, 1, 1])["accuracy"])
    assert compute_metrics("mrpc", np.array([0, 0, 1, 1]), [0, 0, 1, 1])["accuracy"] == 1.0  # ids: untouched


def test_compare_never_shows_a_non_finite_measurement(tmp_path):
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "eval_results.json").write_text('{"task": "stsb", "split": "dev", "num_examples": 5, '
                                           '"pearson": Infinity, "spearmanr": NaN}')
    [measured] = [r.measured for r in read_runs(tmp_path / "runs")]
    assert {m[2] for m in measured} == {"pearson", "spearmanr"} and all(math.isnan(m[3]) for m in measured)


# -- an entry point end to end --------------------------------------------------------------------------

def test_run_glue_refuses_a_diverging_run_in_one_line(tmp_path, capsys, monkeypatch):
    """The paper scripts share the loop: a too-high learning rate is one line and exit 2, not accuracy 0.5."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("LORALIB_PROGRESS", "off")  # stderr then holds only what the run says on its own
    from test_run_glue import NLU

    write_tiny_roberta(tmp_path / "roberta")
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(tmp_path / "roberta"), "--task_name", "sst2", "--data_dir",
            str(write_glue_tsv(tmp_path / "glue", tasks=("sst2",))), "--output_dir", str(out), "--do_train",
            "--do_eval", "--apply_lora", "--max_steps", "4", "--learning_rate", "1e30",
            "--per_device_train_batch_size", "2", "--save_strategy", "no", "--disable_tqdm"]
    capsys.readouterr()
    assert NLU.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss is nan at step" in err[0], err
    assert not (out / "adapter").exists() and not (out / "eval_results.json").exists()
