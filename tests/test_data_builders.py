"""The offline data builders of the real checks: WordNet data-to-text (E2E format), templated arithmetic
(MetaMathQA / GSM8K formats) and standard-library code instructions (CodeFeedback format)."""
from __future__ import annotations

import ast
import csv
import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORDNET = Path("/usr/share/wordnet")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (WORDNET / "data.noun").is_file(), reason="WordNet not installed (apt-get install wordnet-base)")
def test_wordnet_nlg_is_e2e_csv_with_disjoint_splits(tmp_path):
    builder = _script("make_wordnet_nlg")
    assert builder.main(["--output_dir", str(tmp_path), "--sizes", "60,10,10"]) == 0
    mrs = {}
    for split in builder.SPLITS:
        with open(tmp_path / f"{split}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["mr", "ref"]
        mrs[split] = {mr for mr, _ in rows[1:]}
        for mr, ref in rows[1:]:
            fields = dict(re.fullmatch(r"(\w+)\[([^\]]+)\]", part).groups() for part in mr.split(", "))
            assert list(fields)[:3] == ["name", "type", "field"]
            # the reference realises the MR: it names the entity and the type the MR gives
            assert ref.lower().startswith(("a ", "an ")) and fields["name"] in ref.lower()
            assert ref.endswith(".")
    assert len(mrs["trainset"]) == 60 and len(mrs["devset"]) == 10 and len(mrs["testset_w_refs"]) == 10
    assert not (mrs["trainset"] & mrs["testset_w_refs"]) and not (mrs["trainset"] & mrs["devset"])


def test_wordnet_nlg_reports_a_missing_wordnet(tmp_path, capsys):
    assert _script("make_wordnet_nlg").main(["--wordnet_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")]) == 2
    assert "data.noun" in capsys.readouterr().err


def test_arith_problems_are_correct_and_in_the_datasets_formats(tmp_path):
    builder = _script("make_arith_gsm8k")
    assert builder.main(["--output_dir", str(tmp_path), "--num_train", "50", "--num_test", "40"]) == 0
    train = json.loads((tmp_path / "metamath.json").read_text())
    test = [json.loads(line) for line in (tmp_path / "gsm8k_test.jsonl").read_text().splitlines()]
    assert len(train) == 50 and 0 < len(test) <= 40
    assert {row["query"] for row in train}.isdisjoint(row["question"] for row in test)
    for text, final in [(r["response"], r["response"].rsplit("The answer is: ", 1)[1]) for r in train] + \
                       [(r["answer"], r["answer"].rsplit("#### ", 1)[1]) for r in test]:
        # every calculator annotation <<a op b=c>> is right, and the last one is the final answer
        calcs = re.findall(r"<<([^=]+)=([^>]+)>>", text)
        assert calcs
        for expression, value in calcs:
            assert eval(expression) == float(value), (expression, value)  # noqa: S307 (our own digits and + - * /)
        assert float(calcs[-1][1]) == float(final)


def test_code_instructions_are_real_functions(tmp_path):
    builder = _script("make_code_instruct")
    assert builder.main(["--output_dir", str(tmp_path), "--max_lines", "25"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "codefeedback.jsonl").read_text().splitlines()]
    assert len(rows) > 50
    for row in rows:
        code = re.search(r"```python\n(.*?)\n```", row["answer"], re.S).group(1)
        tree = ast.parse(code)
        fn = tree.body[0]
        assert isinstance(fn, ast.FunctionDef) and len(code.splitlines()) <= 25
        assert f"`{fn.name}(" in row["query"]
        assert ast.get_docstring(fn).split("\n")[0] in row["query"]


@pytest.mark.parametrize("name", ["make_wordnet_glue", "make_arith_gsm8k"])
def test_an_output_dir_on_a_file_is_one_error(name, tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as stop:
        _script(name).main(["--output_dir", str(a_file / "out")])
    assert stop.value.code == 2 and f"{a_file} is a file, not a folder" in capsys.readouterr().err


def test_an_empty_gsm8k_file_writes_nothing(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text("")
    assert _script("gsm8k_as_metamath").main([str(tmp_path / "train.jsonl"), str(tmp_path / "out.jsonl")]) == 1
    assert "no GSM8K problems in it" in capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()
