"""Issue 14: `loralib compare` applies each reported table's protocol — runs that differ only by seed are one
row, each run's value taken at its best evaluation where the table selects the best epoch (metrics.jsonl),
the seeds aggregated as the table did (LoRA GLUE: median of 5; AdaLoRA, LoRA-Pro: mean of 5 / 3), ± the
seeds' standard deviation — and names what was not as the table did it. Also the registry's protocols and
corrected cells, and the derived STS-B metric."""
from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path

import pytest

from loralib.repro import compare
from loralib.repro.registry import REGISTRY_FILE, RegistryError, load_registry, parse_registry
from loralib.tasks.glue.metrics import compare_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tests' fixture modules (_glue_fixtures, ...)

ROBERTA = {"method": "lora", "model_name_or_path": "roberta-base", "lora": {"r": 8, "lora_alpha": 16},
           "loraplus_lr_ratio": None}


def _run(root: Path, name: str, config: dict, results: dict, evals: list | None = None, seed_key: str = "seed",
         seed: int = 0) -> Path:
    """A run folder as the entry points write it: run_config.json (seed under "args"), eval_results.json and,
    given `evals` ([{metric: value}] one per epoch), metrics.jsonl with training lines between evaluations."""
    folder = root / name
    folder.mkdir(parents=True)
    config = copy.deepcopy(config)
    config["args"] = {**config.get("args", {}), seed_key: seed, "output_dir": str(folder), "learning_rate": 5e-4}
    (folder / "run_config.json").write_text(json.dumps(config))
    (folder / "eval_results.json").write_text(json.dumps(results))
    if evals is not None:
        lines = []
        for epoch, metrics in enumerate(evals, 1):
            lines.append({"step": 10 * epoch - 5, "epoch": epoch - 0.5, "loss": 0.5, "lr": 1e-4})
            lines.append({"step": 10 * epoch, "epoch": float(epoch), **{f"eval_{k}": v for k, v in metrics.items()}})
        (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


# five seeds of LoRA RoBERTa-base RTE, four epochs each: the best epoch is not the last
RTE_EPOCHS = [[0.70, 0.86, 0.84, 0.83], [0.72, 0.85, 0.87, 0.80], [0.69, 0.81, 0.88, 0.86],
              [0.75, 0.84, 0.83, 0.82], [0.71, 0.79, 0.85, 0.90]]


@pytest.fixture
def five_seeds(tmp_path):
    root = tmp_path / "results"
    for seed, epochs in enumerate(RTE_EPOCHS):
        _run(root, f"lora/rte/seed-{seed}", {**ROBERTA, "task": "rte"},
             {"task": "rte", "split": "dev", "num_examples": 277, "accuracy": epochs[-1]},
             [{"accuracy": a} for a in epochs], seed=seed)
    return root


def _rows(root, **kw):
    return compare.compare_rows(compare.read_runs(root), load_registry(), **kw)


def test_lora_glue_is_the_median_of_five_seeds_at_the_best_epoch(five_seeds, capsys):
    [row] = [r for r in _rows(five_seeds, paper="lora") if r.reported is not None]
    best = [max(epochs) for epochs in RTE_EPOCHS]                       # 0.86 0.87 0.88 0.84 0.90
    assert row.values == pytest.approx(best) and len(row.runs) == 5
    assert row.shown == pytest.approx(100 * statistics.median(best))    # 87.0, not the last epochs' median 83
    assert row.shown_spread == pytest.approx(100 * statistics.stdev(best))
    assert (row.reported.value, row.reported.std, row.unmet) == (86.6, 0.7, [])
    assert compare.main([str(five_seeds), "--paper", "lora"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "| rte |" in x)
    assert line == ("| lora/rte/seed-{0,1,2,3,4} | roberta-base | lora | rte | accuracy | 86.60 ± 0.70 | "
                    f"87.00 ± {100 * statistics.stdev(best):.2f} | 5/5 | +0.40 | lora | as the table |")


def test_an_incomplete_seed_set_and_a_missing_history_are_marked(five_seeds, capsys):
    for seed in (3, 4):
        for path in (five_seeds / f"lora/rte/seed-{seed}").iterdir():
            path.unlink()
        (five_seeds / f"lora/rte/seed-{seed}").rmdir()
    (five_seeds / "lora/rte/seed-2/metrics.jsonl").unlink()   # evaluated only after training
    [row] = [r for r in _rows(five_seeds, paper="lora") if r.reported is not None]
    assert row.values == pytest.approx([0.86, 0.87, 0.86])      # seed 2: its final 0.86, not its best 0.88
    assert row.unmet == ["3 of 5 seeds", "last evaluation for 1 of 3 runs"]
    assert compare.main([str(five_seeds), "--paper", "lora"]) == 0
    text = capsys.readouterr().out
    assert "| 3/5 |" in text and "3 of 5 seeds; last evaluation for 1 of 3 runs |" in text
    assert "Protocol lora-glue: median of 5 seeds, best epoch" in text


def test_other_settings_are_another_row_and_a_repeated_seed_is_named(five_seeds):
    _run(five_seeds, "lora/rte-lr/seed-0", {**ROBERTA, "task": "rte", "args": {"warmup_ratio": 0.1}},
         {"task": "rte", "split": "dev", "accuracy": 0.5}, [{"accuracy": 0.5}])
    _run(five_seeds, "lora/rte/again-0", {**ROBERTA, "task": "rte"}, {"task": "rte", "split": "dev", "accuracy": 0.8},
         [{"accuracy": 0.8}], seed=0)
    rows = [r for r in _rows(five_seeds, paper="lora") if r.reported is not None]
    assert sorted(len(r.runs) for r in rows) == [1, 6]
    six = next(r for r in rows if len(r.runs) == 6)
    # seed 0 twice (a rerun) counts once, the mean of its runs: 5 seeds, not 6, and the row says so
    assert six.unmet == ["seed 0 run more than once: each seed counted once (the mean of its runs)"]
    assert six.values[0] == pytest.approx((0.86 + 0.8) / 2) and len(six.values) == 5
    alone = next(r for r in rows if len(r.runs) == 1)
    assert alone.shown == pytest.approx(50.0) and "1 of 5 seeds" in alone.unmet


def test_adalora_stsb_is_the_mean_average_correlation_of_five_seeds(tmp_path):
    root = tmp_path / "results"
    pairs = [(0.91, 0.90), (0.92, 0.915), (0.90, 0.905), (0.915, 0.91), (0.93, 0.92)]
    config = {"method": "adalora", "model_name_or_path": "microsoft/deberta-v3-base", "lora": {"r": 4},
              "args": {"lora_r": 4, "target_rank": 1, "target_total_rank": 144}}   # BUDGET=0.32M
    for seed, (p, s) in enumerate(pairs):
        _run(root, f"ada/stsb/{seed}", config, {"task": "stsb", "split": "dev", "pearson": p, "spearmanr": s},
             [{"pearson": 0.99, "spearmanr": 0.99}], seed=seed)   # selection not stated: the history is not used
    rows = _rows(root, paper="adalora")
    [corr] = [r for r in rows if r.metric == "average_correlation"]  # the 0.32M row only: the run's budget
    means = [(p + s) / 2 for p, s in pairs]
    assert corr.values == pytest.approx(means) and corr.shown == pytest.approx(100 * statistics.fmean(means))
    assert corr.shown_spread == pytest.approx(100 * statistics.stdev(means))
    assert corr.reported.value == 91.63 and corr.unmet == ["selection not stated (final evaluation)"]
    # pearson and spearmanr are still shown (no paper row): a derived metric adds a row only where reported
    assert corr.reported.setting == "budget 0.32M"
    assert sorted(r.metric for r in rows) == ["average_correlation", "pearson", "spearmanr"]


def test_lorapro_is_mean_and_std_of_three_seeds_and_nlg_best_epoch_cannot_be_selected(tmp_path, capsys):
    root = tmp_path / "results"
    llama = {"method": "lora", "model_name_or_path": "meta-llama/Llama-2-7b-hf", "lora": {"r": 8}}
    for seed, acc in enumerate((0.41, 0.43, 0.42)):
        _run(root, f"gsm8k/lora/seed{seed}", llama, {"task": "gsm8k", "split": "test", "accuracy": acc}, seed=seed)
    gpt2 = {"method": "lora", "model_name_or_path": "gpt2-medium", "lora": {"r": 4}}
    for seed, bleu in enumerate((0.70, 0.69)):  # gpt2_ft.py: eval_loss per interval, BLEU only after decoding
        _run(root, f"e2e/seed{seed}", gpt2, {"task": "e2e", "split": "test", "bleu": bleu},
             [{"loss": 1.2}, {"loss": 1.1}], seed_key="random_seed", seed=110 + seed)
    rows = {(r.task, r.reported.paper): r for r in _rows(root)
            if r.reported is not None and r.metric in ("accuracy", "bleu")}
    gsm = rows["gsm8k", "lorapro"]
    assert gsm.shown == pytest.approx(42.0) and gsm.shown_spread == pytest.approx(1.0) and gsm.unmet == []
    e2e = rows["e2e", "lora"]
    assert e2e.shown == pytest.approx(69.5) and e2e.unmet == ["2 of 3 seeds", "last evaluation, not best epoch"]
    assert compare.main([str(root)]) == 0
    text = capsys.readouterr().out
    assert ("| gsm8k/lora/seed{0,1,2} | meta-llama/Llama-2-7b-hf | lora | gsm8k | accuracy | 42.08 ± 0.04 "
            "[second-hand] | 42.00 ± 1.00 | 3/3 | -0.08 | lorapro | as the table |") in text
    assert "needs a beam decode and a BLEU score per saved checkpoint" in text


def test_the_chart_draws_the_seeds_spread(five_seeds, tmp_path, monkeypatch):
    import matplotlib.axes

    bars = []
    original = matplotlib.axes.Axes.bar

    def recording_bar(self, *args, **kwargs):
        bars.append((kwargs.get("label"), kwargs.get("yerr")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", recording_bar)
    rows = [r for r in _rows(five_seeds, paper="lora") if r.reported is not None]
    out = compare.write_chart(rows, tmp_path / "c.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    measured = dict(bars)["measured (± std over seeds)"]
    assert measured == pytest.approx([rows[0].shown_spread]) and dict(bars)["reported"] == [0.7]


# -- registry ---------------------------------------------------------------------------------------

def test_every_table_records_its_protocol_and_every_value_names_table_and_row():
    reg = load_registry()
    lora_glue = reg.protocols["lora-glue"]
    assert (lora_glue.seeds, lora_glue.aggregation, lora_glue.selection) == (5, "median", "best")
    assert (reg.protocols["lora-nlg"].seeds, reg.protocols["lora-nlg"].aggregation) == (3, "mean")
    assert (reg.protocols["adalora-glue"].seeds, reg.protocols["adalora-glue"].selection) == (5, None)
    assert (reg.protocols["lorapro-llama"].seeds, reg.protocols["lorapro-llama"].aggregation) == (3, "mean")
    assert reg.protocols["loraplus"].seeds is None and "not known" in reg.protocols["loraplus"].source
    for row in reg.reported:
        assert "row '" in row.source or row.paper == "lora2", row.source
        assert "Table" in row.source or "README" in row.source or row.paper != "lora", row.source


def test_the_corrected_cells():
    reg = load_registry()

    def one(**kw):
        [row] = reg.find(**kw)
        return row

    ft = one(paper="lora", model="microsoft/deberta-v2-xxlarge", method="full", task="mnli")
    assert ft.value == 91.8 and ft.alternatives[0].value == 91.7 and "Table 2" in ft.source
    lora = one(paper="lora", model="microsoft/deberta-v2-xxlarge", method="lora", task="mnli")
    assert (lora.value, lora.std, lora.alternatives[0].std) == (91.9, 0.2, 0.1)
    params = one(paper="lora", model="roberta-base", method="lora", metric="trainable_params")
    assert (params.value, params.alternatives[0].value) == (0.3, 0.8)
    web = one(paper="lora", model="gpt2-medium", method="full", task="webnlg", metric="bleu_unseen")
    assert (web.value, web.alternatives[0].value, web.marks) == (27.7, 30.4, ())
    assert one(paper="lora", model="gpt2-medium", method="full", task="dart").value == 46.2
    # The GPT-2 DART / WebNLG cells name the paper's Table 13 / 14; the README differs from it in 16 cells
    # (issue 14), each kept as the README's alternative.
    nlg = [row for task in ("dart", "webnlg") for row in reg.find(paper="lora", task=task)]
    assert len(nlg) == 32 and all(("Table 13" if row.task == "dart" else "Table 14") in row.source for row in nlg)
    assert not [row for row in nlg if row.marks]
    differing = [row for row in nlg if row.alternatives]
    assert len(differing) == 16 and all("README" in row.alternatives[0].source for row in differing)
    assert {(row.model, row.method) for row in differing} == {
        (model, method) for model in ("gpt2-medium", "gpt2-large") for method in ("full", "prefix")}
    assert not reg.find(paper="adalora", task="stsb", metric="pearson")
    assert len(reg.find(paper="adalora", task="stsb", metric="average_correlation")) == 5


@pytest.mark.parametrize("edit, where, field_", [
    (lambda d: d["protocols"]["lora-glue"].__setitem__("aggregation", "mode"), "protocols['lora-glue']",
     "'aggregation'"),
    (lambda d: d["protocols"]["lora-nlg"].__setitem__("seeds", 0), "protocols['lora-nlg']", "'seeds'"),
    (lambda d: d["reported"][6].__setitem__("protocol", "lora-glu"), "reported[6]", "'protocol'"),
    (lambda d: d["reported"][6].__setitem__("alternatives", [{"value": "91"}]), "reported[6]", "'value'"),
])
def test_a_malformed_protocol_names_the_entry_and_field(edit, where, field_):
    data = json.loads(REGISTRY_FILE.read_text())
    edit(data)
    with pytest.raises(RegistryError) as info:
        parse_registry(data, "registry.json")
    assert str(info.value).startswith("registry.json: " + where) and f"field {field_}" in str(info.value)


def test_compare_metrics_adds_the_average_correlation():
    assert compare_metrics({"pearson": 0.9, "spearmanr": 0.8}) == pytest.approx(
        {"pearson": 0.9, "spearmanr": 0.8, "average_correlation": 0.85})
    assert compare_metrics({"eval_pearson": 0.5, "eval_spearmanr": 0.7, "step": 3})["eval_average_correlation"] == \
        pytest.approx(0.6)
    assert compare_metrics({"accuracy": 0.9}) == {"accuracy": 0.9}
    nan = compare_metrics({"pearson": None, "spearmanr": 0.8})["average_correlation"]
    assert nan != nan


def test_a_resumed_history_counts_a_step_once_and_a_broken_line_is_named(five_seeds, capsys):
    log = five_seeds / "lora/rte/seed-0/metrics.jsonl"
    log.write_text(log.read_text() + json.dumps({"step": 20, "epoch": 2.0, "eval_accuracy": 0.95}) + "\n{\"step\": 4")
    [run] = [r for r in compare.read_runs(five_seeds) if r.name == "lora/rte/seed-0"]
    assert run.evaluations("rte", "accuracy") == [0.70, 0.95, 0.84, 0.83]  # step 20 re-logged; torn line skipped
    assert run.evaluations("mnli-mm", "accuracy") == []                   # only the first dev set is evaluated
    log.write_text("{\"step\": 4\n" + log.read_text())
    assert compare.main([str(five_seeds)]) == 1
    assert f"{log}:1: not valid JSON" in capsys.readouterr().err


def test_real_glue_runs_of_two_seeds_are_one_row_with_their_best_epochs(tmp_path, monkeypatch):
    """run_glue.py as the scripts call it (--evaluation_strategy epoch): two seeds in two folders group by their
    run_config.json, and each counts with the best of its per-epoch evaluations in metrics.jsonl."""
    pytest.importorskip("transformers")
    from _glue_fixtures import write_glue_tsv
    from _hardening_fixtures import write_tiny_roberta

    from test_run_glue import NLU

    monkeypatch.setenv("LORALIB_PROGRESS", "off")
    model, data = write_tiny_roberta(tmp_path / "roberta-base"), write_glue_tsv(tmp_path / "glue", tasks=("rte",))
    for seed in (1, 2):
        argv = ["--model_name_or_path", str(model), "--task_name", "rte", "--data_dir", str(data), "--output_dir",
                str(tmp_path / "runs" / f"seed{seed}"), "--do_train", "--do_eval", "--apply_lora", "--lora_r", "2",
                "--num_train_epochs", "3", "--evaluation_strategy", "epoch", "--save_strategy", "no",
                "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--max_seq_length", "32",
                "--seed", str(seed), "--disable_tqdm"]
        assert NLU.main(argv) == 0
    runs = compare.read_runs(tmp_path / "runs")
    assert [len(run.evaluations("rte", "accuracy")) for run in runs] == [3, 3]
    [group] = compare.seed_groups(runs)
    [row] = [r for r in compare.compare_rows(runs, load_registry(), paper="lora") if r.reported is not None]
    assert len(group) == 2 and row.reported.value == 86.6  # the folder is named roberta-base: LoRA's RTE row
    assert row.values == [max(run.evaluations("rte", "accuracy")) for run in runs]
    assert row.unmet == ["2 of 5 seeds", "6 of 277 examples"]  # the fixture's RTE dev set is 6 of GLUE's 277


def test_the_released_evaluation_score_is_held_against_the_paper_too(tmp_path):
    """lorapro/evaluate.py --eval_mode both writes "accuracy" (ours) and "accuracy_released" (LoRA-Pro's released
    script's rule); both rows meet the paper's accuracy row, each under its own name."""
    root = tmp_path / "results"
    llama = {"method": "lora", "model_name_or_path": "meta-llama/Llama-2-7b-hf", "lora": {"r": 8}}
    for seed, (ours, released) in enumerate(((0.43, 0.41), (0.45, 0.42), (0.44, 0.40))):
        _run(root, f"gsm8k/lora/seed{seed}", llama,
             {"task": "gsm8k", "split": "test", "accuracy": ours, "accuracy_released": released}, seed=seed)
    rows = {r.metric: r for r in _rows(root) if r.reported is not None and r.task == "gsm8k"}
    assert set(rows) == {"accuracy", "accuracy_released"}
    assert rows["accuracy"].reported == rows["accuracy_released"].reported
    assert rows["accuracy_released"].shown == pytest.approx(41.0) and rows["accuracy"].shown == pytest.approx(44.0)
