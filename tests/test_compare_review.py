"""`loralib compare`, the review's defects: an AdaLoRA run meets only the budget row of its own budget; T5 GLUE
runs (LoRA-GA setting) meet LoRA-Pro's T5 table through the CLI; a row without a reported number still shows its
protocol problems (a repeated seed counted once); a partial test set is named ("20 of 630 examples"); NLG runs of
another decoding are other rows and a decoding unlike Table 11's is named. Run folders are hand-made, as the
entry points write them, except the T5 one, which a tiny T5 trains."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from loralib.repro import compare
from loralib.repro.registry import load_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tests' fixture modules

DEBERTA = "microsoft/deberta-v3-base"
MODULES = ("query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense")


def _run(folder: Path, config: dict, results: dict, files: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "run_config.json").write_text(json.dumps(config))
    (folder / "eval_results.json").write_text(json.dumps(results))
    for name, content in (files or {}).items():
        (folder / name).write_text(json.dumps(content))
    return folder


def _table_rows(out: str) -> list:
    """The markdown table's body rows as lists of cells."""
    return [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| run ")]


def _adalora(root: Path, name: str, seed: int, args: dict, with_pattern: bool = True) -> Path:
    """An AdaLoRA MRPC run as lora2/run_glue_adalora.py writes it: the flags under "args", the 72 adapted
    matrices of DeBERTaV3-base (12 layers x 6) in rank_pattern.json."""
    pattern = {f"deberta.encoder.layer.{i}.{m}": [True, False] for i in range(12) for m in MODULES}
    config = {"method": "adalora", "model_name_or_path": DEBERTA, "lora": {"r": args.get("lora_r", 2)},
              "args": {"seed": seed, "lora_r": 2, "target_rank": 1, "target_total_rank": None, **args}}
    return _run(root / name, config, {"task": "mrpc", "split": "dev", "num_examples": 408, "accuracy": 0.9},
                {"rank_pattern.json": {"rank_pattern": pattern, "trimmed": False}} if with_pattern else None)


# -- 1. AdaLoRA's budget ----------------------------------------------------------------------------

def test_the_released_adalora_budget_meets_no_budget_row(tmp_path, capsys):
    _adalora(tmp_path, "released/seed6", 6, {})   # r 2, target_rank 1 x 72 matrices: about 0.17M
    assert compare.main([str(tmp_path), "--paper", "adalora", "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert not [row for row in _table_rows(out) if "budget" in row[9]]   # held against neither budget row
    [accuracy] = [row for row in _table_rows(out) if row[4] == "accuracy"]
    assert accuracy[5] == "—" and accuracy[9] == "—"   # no reported number, no paper
    assert accuracy[10].startswith("budget final total rank 72 (target_rank 1 x 72 adapted matrices) matches no "
                                   "row of the table (budget 0.32M: total rank 144; budget 1.27M: total rank 576)")
    assert "so no reported number is shown beside it" in out


@pytest.mark.parametrize("args, setting", [({"lora_r": 4, "target_total_rank": 144}, "budget 0.32M"),
                                           ({"lora_r": 12, "target_total_rank": 576}, "budget 1.27M"),
                                           ({"lora_r": 4, "target_rank": 2}, "budget 0.32M")])  # 2 x 72 = 144
def test_a_table_budget_meets_its_own_row_only(tmp_path, args, setting):
    _adalora(tmp_path, "run/seed0", 0, args)
    rows = [row for row in compare.compare_rows(compare.read_runs(tmp_path), load_registry(), paper="adalora")
            if row.metric == "accuracy"]
    assert [row.reported.setting for row in rows] == [setting] and rows[0].reported.total_rank == rows[0].run.total_rank


def test_a_budget_that_cannot_be_read_is_said(tmp_path):
    _adalora(tmp_path, "run/seed0", 0, {}, with_pattern=False)   # target_rank 1, matrices not countable
    [row] = [row for row in compare.compare_rows(compare.read_runs(tmp_path), load_registry(), paper="adalora")
             if row.metric == "accuracy"]
    assert row.reported is None and row.budget_unmatched
    assert row.unmet[0].startswith("budget not recorded (target_rank 1, but no rank_pattern.json")


def test_the_lorapro_adalora_row_has_no_budget_and_still_matches(tmp_path):
    config = {"method": "adalora", "model_name_or_path": "meta-llama/Llama-2-7b-hf", "lora": {"r": 8},
              "args": {"seed": 0}}
    _run(tmp_path / "gsm8k", config, {"task": "gsm8k", "split": "test", "num_examples": 1319, "accuracy": 0.5})
    [row] = compare.compare_rows(compare.read_runs(tmp_path), load_registry(), paper="lorapro")
    assert row.reported.value == 50.72 and not row.budget_unmatched


# -- 2. T5 GLUE through the CLI ---------------------------------------------------------------------

T5_RESULTS = {"task": "cola", "split": "dev", "num_examples": 1043, "accuracy": 0.7, "matthews_correlation": 0.3}


@pytest.mark.parametrize("key", ["paper_setting", "setting"])   # "setting": folders written before the rename
def test_t5_runs_in_the_lora_ga_setting_meet_the_t5_table(tmp_path, capsys, key):
    _run(tmp_path / "cola/lora/seed0", {"method": "lora", "model_name_or_path": "t5-base", "lora": {"r": 8},
                                        key: "lora-ga", "args": {"seed": 0}}, T5_RESULTS)
    assert compare.main([str(tmp_path), "--paper", "lorapro", "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "## lora-ga" not in out and "not a paper's setting" not in out
    [accuracy] = [row for row in _table_rows(out) if row[4] == "accuracy"]
    assert accuracy[5].startswith("69.35") and accuracy[9] == "lorapro"


def test_a_trained_t5_run_meets_the_t5_table_through_the_cli(tmp_path, capsys, monkeypatch):
    """What the T5 run itself writes (loralib.tasks.t5glue), read by the CLI's entry."""
    from _glue_fixtures import write_glue_tsv
    from loralib.tasks import t5glue

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lorapro"))
    from smoke_t5 import build_smoke_model

    monkeypatch.setenv("LORALIB_PROGRESS", "off")
    model = build_smoke_model(tmp_path / "models" / "t5-base")
    data = write_glue_tsv(tmp_path / "glue", ("cola",))
    out_dir = tmp_path / "runs" / "cola" / "lora" / "seed0"
    spec = t5glue.T5GlueRun(model_name_or_path=str(model), task="cola", data_dir=str(data), output_dir=str(out_dir),
                            lora="lora", max_steps=1, per_device_train_batch_size=2, global_batch_size=2,
                            disable_tqdm=True)
    t5glue.execute(t5glue.prepare(spec))
    assert json.loads((out_dir / "run_config.json").read_text())["paper_setting"] == "lora-ga"
    assert compare.main([str(tmp_path / "runs"), "--paper", "lorapro", "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "## lora-ga" not in out
    [accuracy] = [row for row in _table_rows(out) if row[4] == "accuracy"]
    assert accuracy[5].startswith("69.35") and accuracy[1] == "t5-base"


def test_real_data_runs_still_go_to_their_own_table(tmp_path, capsys):
    _run(tmp_path / "real", {"method": "lora", "model_name_or_path": "t5-base", "setting": "real data, small model",
                             "lora": {"r": 8}}, T5_RESULTS)
    assert compare.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("## real data, small model")


# -- 3. a row without a reported number shows its protocol problems -------------------------------

def test_a_rerun_of_one_seed_is_counted_once_and_said_without_a_paper_number(tmp_path, capsys):
    config = {"method": "lora", "model_name_or_path": "models/all-MiniLM-L6-v2", "lora": {"r": 8},
              "args": {"seed": 0}}
    for name, accuracy in (("a", 0.2), ("b", 0.2)):
        _run(tmp_path / name, config, {"task": "wn-lex", "split": "dev", "num_examples": 500, "accuracy": accuracy})
    assert compare.main([str(tmp_path), "--out", str(tmp_path / "c.png")]) == 0
    [row] = _table_rows(capsys.readouterr().out)
    assert row[5] == "—" and row[6] == "20.00" and row[7] == "1"   # one seed, no spread between its reruns
    assert row[10] == "seed 0 run more than once: each seed counted once (the mean of its runs)"


# -- 4. partial test sets ---------------------------------------------------------------------------

def test_a_partial_test_set_is_named(tmp_path, capsys):
    gpt2 = {"method": "lora", "model_name_or_path": "gpt2-medium", "lora": {"r": 4}}
    for seed in (0, 1, 2):
        _run(tmp_path / f"e2e/seed{seed}", {**gpt2, "args": {"random_seed": seed}},
             {"task": "e2e", "split": "test", "num_examples": 20, "bleu": 0.7})
    llama = {"method": "lora", "model_name_or_path": "meta-llama/Llama-2-7b-hf", "lora": {"r": 8}}
    for seed in (0, 1, 2):
        _run(tmp_path / f"gsm8k/seed{seed}", {**llama, "args": {"seed": seed}},
             {"task": "gsm8k", "split": "test", "num_examples": 2 if seed else 1319, "accuracy": 0.4})
    rows = {row.task: row for row in compare.compare_rows(compare.read_runs(tmp_path), load_registry())
            if row.reported is not None and row.metric in ("bleu", "accuracy")}
    assert "20 of 630 examples" in rows["e2e"].unmet
    assert rows["gsm8k"].unmet == ["2 of 1319 examples (2 of 3 runs)"]
    assert compare.main([str(tmp_path), "--out", str(tmp_path / "c.png")]) == 0
    assert "e2e test: tuetschek/e2e-dataset testset_w_refs.csv: 630 MRs" in capsys.readouterr().out


def test_whole_splits_and_unknown_sizes_are_not_marked(tmp_path):
    llama = {"method": "lora", "model_name_or_path": "meta-llama/Llama-2-7b-hf", "lora": {"r": 8}}
    _run(tmp_path / "he", {**llama, "args": {"seed": 0}},
         {"task": "humaneval", "split": "test", "num_examples": 164, "pass@1": 0.2})
    _run(tmp_path / "web", {"method": "lora", "model_name_or_path": "gpt2-medium", "lora": {"r": 4},
                            "args": {"random_seed": 0}},
         {"task": "webnlg", "split": "test", "num_examples": 7, "bleu_all": 55.0})   # size not held: no guess
    rows = compare.compare_rows(compare.read_runs(tmp_path), load_registry())
    assert not [note for row in rows for note in row.unmet if "examples" in note]


# -- 5. NLG decoding --------------------------------------------------------------------------------

def _decoded(root: Path, name: str, seed: int, task: str, length_penalty: float, beam: int = 10) -> None:
    decoding = {"beam": beam, "length_penalty": length_penalty, "no_repeat_ngram_size": 4, "repetition_penalty": 1.0,
                "eval_len": 64, "decoding": "lora_repo", "num_examples": 630, "data": f"/data/{name}/test.jsonl"}
    _run(root / name, {"method": "lora", "model_name_or_path": "gpt2-medium", "lora": {"r": 4},
                       "args": {"random_seed": seed, "work_dir": str(root / name)}},
         {"task": task, "split": "test", "num_examples": 630, "bleu": 0.7}, {"decoding.json": decoding})


def test_runs_of_another_decoding_are_another_row_and_named(tmp_path, capsys):
    for seed in (0, 1, 2):
        _decoded(tmp_path, f"lp09/seed{seed}", seed, "e2e", 0.9)
    for seed in (0, 1):
        _decoded(tmp_path, f"lp08/seed{seed}", seed, "e2e", 0.8)
    rows = [row for row in compare.compare_rows(compare.read_runs(tmp_path), load_registry(), paper="lora")
            if row.reported is not None and row.metric == "bleu"]
    by_lp = {row.run.decoding["length_penalty"]: row for row in rows}
    assert sorted(len(row.runs) for row in rows) == [2, 3] and set(by_lp) == {0.8, 0.9}
    assert "decoding: length_penalty 0.8 (table 0.9)" in by_lp[0.8].unmet
    assert not [note for note in by_lp[0.9].unmet if "decoding" in note]
    assert by_lp[0.8].name == "lp08/seed{0,1} (beam 10, lp 0.8, no-repeat 4, rep 1, len 64, lora_repo)"
    assert compare.main([str(tmp_path), "--paper", "lora", "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "Decoding (LoRA paper, Table 11 (GPT-2 NLG inference hyper-parameters)): e2e beam 10, length_penalty 0.9" in out


def test_webnlg_and_dart_take_length_penalty_0_8(tmp_path):
    _decoded(tmp_path, "dart/seed0", 0, "dart", 0.8, beam=4)
    [row] = [row for row in compare.compare_rows(compare.read_runs(tmp_path), load_registry(), paper="lora")
             if row.reported is not None]
    assert [note for note in row.unmet if note.startswith("decoding")] == ["decoding: beam 4 (table 10)"]


def test_a_bad_decoding_file_is_one_error_naming_the_key(tmp_path, capsys):
    _decoded(tmp_path, "e2e/seed0", 0, "e2e", 0.9)
    bad = json.loads((tmp_path / "e2e/seed0/decoding.json").read_text())
    (tmp_path / "e2e/seed0/decoding.json").write_text(json.dumps({**bad, "beam": "ten"}))
    assert compare.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "decoding.json: key 'beam' is 'ten', not int" in err and err.count("error:") == 1


# -- the registry fields these use ------------------------------------------------------------------

def test_the_registry_refuses_a_bad_budget_or_decoding():
    from loralib.repro.registry import REGISTRY_FILE, RegistryError, parse_registry

    data = json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))
    budget_row = next(i for i, row in enumerate(data["reported"]) if row.get("total_rank") == 144)
    data["reported"][budget_row]["total_rank"] = 0
    with pytest.raises(RegistryError, match=rf"reported\[{budget_row}\].*field 'total_rank' must be >= 1"):
        parse_registry(data, "registry.json")
    data = json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))
    data["protocols"]["lora-nlg"]["decoding"]["e2e"]["beam"] = "10"
    with pytest.raises(RegistryError, match=r"protocols\['lora-nlg'\] decoding\['e2e'\]: field 'beam' must be"):
        parse_registry(data, "registry.json")


def test_a_smaller_model_in_a_folder_named_like_the_papers_is_not_held_against_it(tmp_path, capsys):
    """An NLG run of a tiny GPT-2 kept in a folder named gpt2-medium records model_size (the card's name only
    for a model of its size): it goes to its own table, not against Table 3's GPT-2 M row."""
    _run(tmp_path / "tiny", {"method": "lora", "model_name_or_path": "/x/models/gpt2-medium", "lora": {"r": 4},
                             "model_size": {"n_layer": 2, "n_embd": 64, "n_head": 2}, "args": {"random_seed": 0}},
         {"task": "e2e", "split": "test", "num_examples": 630, "bleu": 0.7})
    assert compare.main([str(tmp_path), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## model of another size (n_layer 2, n_embd 64, n_head 2)") and "70.40" not in out
