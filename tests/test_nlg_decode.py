"""gpt2_decode (beam ids -> grouped reference and hypothesis files) and the evaluate step (eval_results.json),
on fake beam output written by hand; the real metrics only in the last test, when engineer H1's module is there."""
import json
import sys
import types
from pathlib import Path

import pytest

from loralib.tasks.nlg import decode as dec
from loralib.tasks.nlg import evaluate as ev
from loralib.tasks.nlg.bpe import GPT2BPE, VocabularyError
from loralib.tasks.nlg.data import DataFormatError, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TIKTOKEN_FILE = ROOT / ".cache" / "gpt2-bpe" / "gpt2.tiktoken"
pytestmark = pytest.mark.skipif(not TIKTOKEN_FILE.is_file(), reason=f"{TIKTOKEN_FILE} missing (make fetches it)")
sys.path.insert(0, str(ROOT / "examples" / "NLG"))


@pytest.fixture(scope="module")
def bpe():
    return GPT2BPE.from_path(TIKTOKEN_FILE)


def test_post_processing_as_the_original():
    assert dec.standard_tokenize("Hello, World's end.") == "Hello , World ' s end ."
    assert dec.post_process("It's  £30-ish!", tokenize=True, lower=True) == "it ' s £ 30 - ish !"
    assert dec.post_process("Keep As Is.", tokenize=False, lower=False) == "Keep As Is."
    assert dec.cut_at_stop(" A pub.\n\nGarbage<|endoftext|>more") == "A pub."
    assert dec.cut_at_stop("A pub.<|endoftext|>x\n\ny") == "A pub."
    assert dec.padded_references(["a", "b"], 4) == ["a", "b", "a", "a"]
    assert dec.padded_references(["a", "b", "c"], 2) == ["a", "b"]


E2E_INPUT = [
    {"context": "name : Aromi | Type : pub", "completion": "Aromi is a pub.", "id": 0},
    {"context": "name : Aromi | Type : pub", "completion": "A pub: Aromi.<|endoftext|>", "id": 0},
    {"context": "name : Blue Spice | area : riverside", "completion": "Blue Spice is by the river.", "id": 1},
    {"context": "name : Aromi | Type : pub", "completion": "Aromi, a pub.", "id": 0},   # same context, later line
    {"context": "name : Cotto | food : Thai", "completion": "Cotto serves Thai food.", "id": 2},
]


def _beam_file(path, bpe, predictions):
    """Fake gpt2_beam.py output: {"id": line, "predict": ids of the continuation}."""
    write_jsonl([{"id": i, "predict": bpe.encode(text) + tail} for i, text, tail in predictions], path)
    return path


def test_e2e_round_trip_through_the_command_line(tmp_path, bpe):
    import gpt2_decode

    write_jsonl(E2E_INPUT, tmp_path / "test_formatted.jsonl")
    # one prediction per group is enough; generation runs past the stop strings and must be cut there
    _beam_file(tmp_path / "predict.jsonl", bpe, [
        (0, " Aromi is a pub in town.\n\nname : Aromi", []),
        (2, " Blue Spice is near the river.", [50256, 464]),
        (4, " Cotto has Thai food.<|endoftext|>", []),
    ])
    assert gpt2_decode.main([
        "--vocab", str(TIKTOKEN_FILE), "--sample_file", str(tmp_path / "predict.jsonl"),
        "--input_file", str(tmp_path / "test_formatted.jsonl"), "--output_ref_file", str(tmp_path / "ref.txt"),
        "--output_pred_file", str(tmp_path / "pred.txt")]) == 0
    assert (tmp_path / "ref.txt").read_text(encoding="utf-8") == (
        "Aromi is a pub.\nA pub: Aromi.\nAromi, a pub.\n\n"
        "Blue Spice is by the river.\n\n"
        "Cotto serves Thai food.\n\n")
    assert (tmp_path / "pred.txt").read_text(encoding="utf-8") == (
        "Aromi is a pub in town.\nBlue Spice is near the river.\nCotto has Thai food.\n")


WEBNLG_INPUT = [
    {"context": "Aarhus : leaderName : Jacob_Bundsgaard", "completion": "The leader of Aarhus is Jacob Bundsgaard.",
     "category": "City", "id": 0},
    {"context": "Aarhus : leaderName : Jacob_Bundsgaard", "completion": "Aarhus's leader: J. Bundsgaard.",
     "category": "City", "id": 0},
    {"context": "Aaron_Boogaard : height : 1.905", "completion": "Aaron Boogaard is 1.905 m tall.",
     "category": "Athlete", "id": 1},
    {"context": "Abilene : isPartOf : Texas", "completion": "Abilene is in Texas.", "category": "City", "id": 2},
    {"context": "Abilene : isPartOf : Texas", "completion": "Abilene, Texas.", "category": "City", "id": 2},
    {"context": "Abilene : isPartOf : Texas", "completion": "Texas has Abilene.", "category": "City", "id": 2},
]


def test_webnlg_reference_folder_filters_and_categories(tmp_path, bpe):
    records = WEBNLG_INPUT
    predictions = {0: bpe.encode(" Jacob Bundsgaard leads Aarhus."), 2: bpe.encode(" Aaron Boogaard: 1.905 m."),
                   5: bpe.encode(" Abilene is part of Texas.")}
    groups = dec.decode_beam(records, predictions, bpe)
    dec.write_outputs(groups, "webnlg", tmp_path / "refs", tmp_path / "hyp", ref_num=3, tokenize=True, lower=True,
                      output_category_file=tmp_path / "cats")
    read = lambda name: (tmp_path / name).read_text(encoding="utf-8")  # noqa: E731
    assert read("refs/reference0") == ("the leader of aarhus is jacob bundsgaard .\naaron boogaard is 1 . 905 m tall .\n"
                                       "abilene is in texas .\n")
    assert read("refs/reference1") == ("aarhus ' s leader : j . bundsgaard .\naaron boogaard is 1 . 905 m tall .\n"
                                       "abilene , texas .\n")
    assert read("refs/reference2") == ("the leader of aarhus is jacob bundsgaard .\naaron boogaard is 1 . 905 m tall .\n"
                                       "texas has abilene .\n")
    assert sorted(p.name for p in (tmp_path / "refs").iterdir()) == ["reference0", "reference1", "reference2"]
    assert read("hyp") == "jacob bundsgaard leads aarhus .\naaron boogaard : 1 . 905 m .\nabilene is part of texas .\n"
    assert read("cats") == "City\nAthlete\nCity\n"

    seen = dec.decode_beam(records, predictions, bpe, filter="seen")
    unseen = dec.decode_beam(records, predictions, bpe, filter="unseen")
    assert [g.hypothesis for g in seen] == ["Jacob Bundsgaard leads Aarhus.", "Abilene is part of Texas."]
    assert [g.references for g in unseen] == [["Aaron Boogaard is 1.905 m tall."]]
    # the LoRA repo's own formatted files mark seen categories with a boolean "cate"
    legacy = [{"context": r["context"], "completion": r["completion"], "cate": r["category"] == "City"} for r in records]
    assert [g.key for g in dec.decode_beam(legacy, predictions, bpe, filter="unseen")] == ["Aaron_Boogaard : height : 1.905"]


def test_ref_unique_file_sets_the_groups(tmp_path, bpe):
    import gpt2_decode

    write_jsonl(E2E_INPUT, tmp_path / "in.jsonl")
    (tmp_path / "unique.txt").write_text("7\n7\n7\n8\n8\n", encoding="utf-8")  # regroups lines 0-2 and 3-4
    _beam_file(tmp_path / "p.jsonl", bpe, [(1, " first", []), (4, " second", [])])
    gpt2_decode.main(["--vocab", str(TIKTOKEN_FILE), "--sample_file", str(tmp_path / "p.jsonl"), "--input_file",
                      str(tmp_path / "in.jsonl"), "--ref_unique_file", str(tmp_path / "unique.txt"),
                      "--output_ref_file", str(tmp_path / "r.txt"), "--output_pred_file", str(tmp_path / "h.txt")])
    assert (tmp_path / "r.txt").read_text(encoding="utf-8") == (
        "Aromi is a pub.\nA pub: Aromi.\nBlue Spice is by the river.\n\nAromi, a pub.\nCotto serves Thai food.\n\n")
    assert (tmp_path / "h.txt").read_text(encoding="utf-8") == "first\nsecond\n"


def test_bad_beam_output_is_refused_and_nothing_is_written(tmp_path, bpe, capsys):
    import gpt2_decode

    write_jsonl(E2E_INPUT, tmp_path / "in.jsonl")
    args = ["--vocab", str(TIKTOKEN_FILE), "--sample_file", str(tmp_path / "p.jsonl"), "--input_file",
            str(tmp_path / "in.jsonl"), "--output_ref_file", str(tmp_path / "r.txt"), "--output_pred_file",
            str(tmp_path / "h.txt")]
    cases = [
        ('{"id": 0, "predict": [1, 2]}\n{"id": 9, "predict": [1]}\n', DataFormatError, r"p\.jsonl:2: id 9 is not a line"),
        ('{"id": 0, "predict": [1, 2]}\n{"id": 2, "predict": [50300]}\n', VocabularyError, r"p\.jsonl:2: token id 50300"),
        ('{"id": 0, "predict": [1, 2]}\n{"id": 2}\n', DataFormatError, r"p\.jsonl:2: expected"),
        ('{"id": 0, "predict": [1, 2]}\n{oops\n', DataFormatError, r"p\.jsonl:2: not valid JSON"),
        ('{"id": 0, "predict": [1]}\n{"id": 2, "predict": [1]}\n', DataFormatError,
         r"no prediction for 1 of 3 inputs, the first at input line 5"),
    ]
    for text, error, message in cases:
        (tmp_path / "p.jsonl").write_text(text, encoding="utf-8")
        with pytest.raises(error, match=message):
            gpt2_decode.run(args)
        assert gpt2_decode.main(args) == 2   # the command line: one line naming the file, no traceback
        err = capsys.readouterr().err.strip()
        assert err.startswith("gpt2_decode.py: error: ") and "\n" not in err and "Traceback" not in err
        assert not (tmp_path / "r.txt").exists() and not (tmp_path / "h.txt").exists()
    with pytest.raises(DataFormatError, match="needs a \"category\""):
        dec.decode_beam(E2E_INPUT, {0: [1], 2: [1], 4: [1]}, bpe, filter="seen")
    (tmp_path / "u.txt").write_text("1\n2\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"u\.txt: 2 lines, the input file has 5"):
        dec.read_ref_unique(tmp_path / "u.txt", 5)


# -- evaluate -----------------------------------------------------------------------------------------

@pytest.fixture
def fake_metrics(monkeypatch):
    """Metric functions that record their inputs, standing in for engineer H1's module."""
    calls = {}

    def e2e_metrics(hyps, refs):
        calls["e2e"] = (hyps, refs)
        return {"BLEU": 0.5, "NIST": 7.0, "METEOR": 0.4, "ROUGE_L": 0.6, "CIDEr": 2.0}

    ter_key = {"eval_py": "ter", "sacrebleu": "ter_sacrebleu"}

    def webnlg_metrics(hyps, refs, categories=None, num_refs=None, ter="eval_py"):
        assert num_refs == 6  # the LoRA repository's multi-bleu-detok -nr 6
        calls["webnlg"], calls["ter"] = (hyps, refs, categories), ter
        return {"bleu": 50.0, "meteor": 0.4, ter_key[ter]: 0.5, "bleu_seen": 60.0, "bleu_unseen": 40.0,
                "bleu_all": 50.0}

    def dart_metrics(hyps, refs, num_refs=None, ter="eval_py"):
        calls["dart"], calls["ter"] = (hyps, refs), ter
        return {"bleu": 40.0, "meteor": 0.3, ter_key[ter]: 0.6}

    fake = types.SimpleNamespace(e2e_metrics=e2e_metrics, webnlg_metrics=webnlg_metrics, dart_metrics=dart_metrics)
    monkeypatch.setattr(ev, "_metrics", lambda: fake)
    return calls


def test_eval_nlg_writes_eval_results_from_decoded_files(tmp_path, bpe, fake_metrics, capsys):
    import eval_nlg

    groups = dec.decode_beam(E2E_INPUT, {0: bpe.encode(" A."), 2: bpe.encode(" B."), 4: bpe.encode(" C.")}, bpe)
    dec.write_outputs(groups, "e2e", tmp_path / "ref.txt", tmp_path / "pred.txt")
    run = tmp_path / "run"
    assert eval_nlg.main(["--task", "e2e", "--ref_file", str(tmp_path / "ref.txt"), "--pred_file",
                          str(tmp_path / "pred.txt"), "--output_dir", str(run)]) == 0
    assert json.loads((run / "eval_results.json").read_text()) == {
        "task": "e2e", "split": "test", "num_examples": 3, "bleu": 0.5, "nist": 7.0, "meteor": 0.4, "rouge_l": 0.6,
        "cider": 2.0}
    assert fake_metrics["e2e"] == (["A.", "B.", "C."], [["Aromi is a pub.", "A pub: Aromi.", "Aromi, a pub."],
                                                        ["Blue Spice is by the river."], ["Cotto serves Thai food."]])
    assert [p.name for p in run.iterdir()] == ["eval_results.json"]   # no temporary file left behind

    # mismatched files: refused, and the previous results stay as they were
    (tmp_path / "pred.txt").write_text("A.\nB.\n", encoding="utf-8")
    assert eval_nlg.main(["--task", "e2e", "--ref_file", str(tmp_path / "ref.txt"), "--pred_file",
                          str(tmp_path / "pred.txt"), "--output_dir", str(run)]) == 2
    assert "pred.txt: 2 hypotheses, but" in capsys.readouterr().err
    assert json.loads((run / "eval_results.json").read_text())["bleu"] == 0.5


def test_eval_nlg_from_beam_output_scores_webnlg_by_category(tmp_path, bpe, fake_metrics):
    import eval_nlg

    write_jsonl(WEBNLG_INPUT, tmp_path / "test_formatted.jsonl")
    _beam_file(tmp_path / "predict.jsonl", bpe, [(0, " Jacob Bundsgaard leads Aarhus.", [50256]),
                                                 (2, " Aaron is tall.", []), (3, " Abilene, Texas!", [])])
    eval_nlg.main(["--task", "webnlg", "--input_file", str(tmp_path / "test_formatted.jsonl"), "--sample_file",
                   str(tmp_path / "predict.jsonl"), "--vocab", str(TIKTOKEN_FILE), "--output_dir", str(tmp_path)])
    hyps, refs, cats = fake_metrics["webnlg"]
    # the README's WebNLG decode: tokenised, lower-cased, six references per input
    assert hyps == ["jacob bundsgaard leads aarhus .", "aaron is tall .", "abilene , texas !"]
    assert refs[1] == ["aaron boogaard is 1 . 905 m tall ."] * 6 and len(refs[2]) == 6
    assert cats == ["City", "Athlete", "City"]
    result = json.loads((tmp_path / "eval_results.json").read_text())
    assert (result["task"], result["num_examples"], result["bleu_unseen"], result["bleu_all"]) == ("webnlg", 3, 40.0, 50.0)

    # the same through gpt2_decode's reference folder + category file
    groups = dec.decode_beam(WEBNLG_INPUT, {0: [40], 2: [40], 3: [40]}, bpe)
    dec.write_outputs(groups, "webnlg", tmp_path / "refs", tmp_path / "hyp", ref_num=6,
                      output_category_file=tmp_path / "cats")
    record = ev.evaluate_files("webnlg", tmp_path / "refs", tmp_path / "hyp", tmp_path / "cats")
    assert fake_metrics["webnlg"][2] == ["City", "Athlete", "City"] and len(fake_metrics["webnlg"][1][0]) == 6
    assert record["num_examples"] == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/reference0: no reference files"):
        ev.evaluate_files("dart", tmp_path / "empty", tmp_path / "hyp")


def test_decoded_files_read_back_with_the_metrics_module(tmp_path, bpe):
    """H1's reader takes gpt2_decode's E2E layout back to the same groups; both modules agree on the seen
    categories. (The metric values themselves are tested with the metrics.)"""
    metrics = pytest.importorskip("loralib.tasks.nlg.metrics")
    from loralib.tasks.nlg.data import SEEN_CATEGORIES

    groups = dec.decode_beam(E2E_INPUT, {0: [40], 2: [40], 4: [40]}, bpe)
    dec.write_outputs(groups, "e2e", tmp_path / "ref.txt", tmp_path / "pred.txt")
    assert metrics.read_e2e_references(tmp_path / "ref.txt") == [g.references for g in groups]
    assert set(metrics.SEEN_CATEGORIES) == set(SEEN_CATEGORIES)
