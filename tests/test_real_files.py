"""The published benchmark files, as released, through our loaders, reference writers and metrics.

The files live in ../shared/data/real (never in this repository; users fetch them with data/ scripts);
every test here skips with one line when that folder is absent. LORALIB_SHARED_DATA overrides the path.

What each file is held to:
- E2E (official CSV and the LoRA repo's `mr||ref` text): the counts the dataset states (test 630 MRs /
  4,693 references, dev 547 / 4,672), the same grouping from both formats, and our formatted records equal
  to what the LoRA repo's src/format_converting_e2e.py writes (its rule, read at microsoft/LoRA@c18b175:
  `line.strip().split('||')`, context = part 0, completion = part 1 — re-stated below as `_lora_repo_e2e`).
- WebNLG 2017 dev (872 entries) and DART dev (2,768): records as src/format_converting_{webnlg,dart}.py build
  them (triples "s : p : o" joined by " | ", WebNLG lexicalisations with comment "good", DART's property
  lower-cased), references grouped by context as gpt2_decode.py groups them, reference files written and
  read back.
- GSM8K (7,473 / 1,319): every answer has one "####"; our target and our answer extraction applied to the
  gold solution give the number the release states, for every row.
- Metrics: BLEU on 630 E2E MRs equals sacrebleu's corpus BLEU with the mteval-13a tokens lower-cased (the
  cases where pymteval and sacrebleu differ — sentences shorter than 4 tokens — do not occur in a
  first-reference system), and WebNLG/DART BLEU read back from the written files equals the in-memory one.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("LORALIB_SHARED_DATA", REPO.parent / "shared" / "data" / "real"))

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"published benchmark files not at {REAL}")


def _real(rel: str) -> Path:
    path = REAL / rel
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


# -- E2E ------------------------------------------------------------------------------------------------

def _lora_repo_e2e(path: Path) -> list:
    """format_converting_e2e.py's records, re-stated from its rule (see the module docstring)."""
    out = []
    with open(path, encoding="utf8") as f:
        for line in f:
            items = line.strip().split("||")
            out.append({"context": items[0], "completion": items[1].strip("\n")})
    return out


@pytest.mark.parametrize("split,csv_name,txt_name,n_mrs,n_refs", [
    ("test", "testset_w_refs.csv", "test.txt", 630, 4693),
    ("dev", "devset.csv", "valid.txt", 547, 4672),
])
def test_e2e_both_formats_load_to_the_same_examples(split, csv_name, txt_name, n_mrs, n_refs):
    from loralib.tasks.nlg.data import read_raw

    from_csv = read_raw("e2e", _real(f"e2e-official/{csv_name}"))
    from_txt = read_raw("e2e", _real(f"lora-nlg/e2e/{txt_name}"))
    for records in (from_csv, from_txt):
        assert len(records) == n_refs
        assert len({r["id"] for r in records}) == n_mrs
    # Same rows in the same order: same MR grouping line by line (the .txt is word-tokenised, the CSV is
    # not, so the texts differ: "£20-25" vs "£ 20 - 25").
    assert [r["id"] for r in from_csv] == [r["id"] for r in from_txt]
    assert [len(r["context"].split(" | ")) for r in from_csv] == [len(r["context"].split(" | ")) for r in from_txt]
    slots = [[item.split(" : ")[0] for item in r["context"].split(" | ")] for r in from_csv]
    assert slots == [[item.split(" : ")[0] for item in r["context"].split(" | ")] for r in from_txt]


@pytest.mark.parametrize("txt_name", ["test.txt", "valid.txt"])
def test_e2e_formatted_records_equal_the_lora_repo_converter(txt_name):
    from loralib.tasks.nlg.data import read_raw

    path = _real(f"lora-nlg/e2e/{txt_name}")
    ours = [{"context": r["context"], "completion": r["completion"]} for r in read_raw("e2e", path)]
    assert ours == _lora_repo_e2e(path)


def test_e2e_reference_file_as_the_official_scripts_expect(tmp_path):
    """One block per MR, references in file order, blank-line separated, MRs in order of first appearance;
    read back by our reader to the same groups (what measure_scores.py sees)."""
    from loralib.tasks.nlg.data import read_raw
    from loralib.tasks.nlg.decode import group_references, write_outputs
    from loralib.tasks.nlg.metrics import read_e2e_references

    records = read_raw("e2e", _real("lora-nlg/e2e/test.txt"))
    groups = list(group_references(records).values())
    for g in groups:
        g.hypothesis = g.references[0]
    ref_file, pred_file = tmp_path / "refs.txt", tmp_path / "hyps.txt"
    write_outputs(groups, "e2e", ref_file, pred_file)

    blocks = ref_file.read_text(encoding="utf-8").split("\n\n")
    assert blocks[-1] == ""  # the file ends with the last block's blank line
    assert len(blocks[:-1]) == 630
    assert sum(len(b.split("\n")) for b in blocks[:-1]) == 4693
    expected = {}
    for r in records:
        expected.setdefault(r["context"], []).append(r["completion"])
    assert [b.split("\n") for b in blocks[:-1]] == list(expected.values())
    assert read_e2e_references(ref_file) == list(expected.values())
    assert len(pred_file.read_text(encoding="utf-8").splitlines()) == 630


def _template_e2e(context: str) -> str:
    """'name : X | Type : pub | food : Y | ...' -> 'X is a pub . It serves Y food . ...'."""
    slots = dict(item.split(" : ", 1) for item in context.split(" | "))
    words = [f"{slots.get('name', 'It')} is a {slots.get('Type', 'place')} ."]
    phrases = {"food": "It serves {} food .", "price": "Its prices are {} .", "customer rating":
               "It has a {} customer rating .", "area": "It is in the {} .", "near": "It is near {} .",
               "family friendly": "Family friendly : {} ."}
    words += [text.format(slots[slot]) for slot, text in phrases.items() if slot in slots]
    return " ".join(words)


def test_e2e_bleu_on_630_mrs_equals_sacrebleu():
    """A first-reference system on the real test set: our (pymteval) BLEU equals sacrebleu's corpus BLEU on
    lower-cased mteval-13a tokens, with every MR's references as they are (1 to N each)."""
    from sacrebleu.metrics import BLEU

    from loralib.tasks.nlg.data import read_raw
    from loralib.tasks.nlg.decode import group_references
    from loralib.tasks.nlg.metrics_mteval import mteval_bleu, mteval_tokenize

    groups = list(group_references(read_raw("e2e", _real("e2e-official/testset_w_refs.csv"))).values())
    # the system: a template realiser written here (never a reference itself, so matches are partial and
    # brevity, clipping and the closest-length reference all matter)
    hyps = [_template_e2e(g.key) for g in groups]
    refs = [g.references for g in groups]
    assert len(hyps) == 630 and sum(map(len, refs)) == 4693
    assert min(len(mteval_tokenize(h)) for h in hyps) >= 4  # where pymteval and sacrebleu agree

    ours = mteval_bleu(hyps, refs)
    width = max(map(len, refs))
    tok = [" ".join(mteval_tokenize(h)) for h in hyps]
    streams = [[" ".join(mteval_tokenize(r[k])) if k < len(r) else "" for r in refs] for k in range(width)]
    want = BLEU(tokenize="none", smooth_method="none", force=True).corpus_score(tok, streams).score / 100
    assert ours == pytest.approx(want, abs=1e-9)
    assert 0.05 < ours < 0.9


# -- WebNLG and DART --------------------------------------------------------------------------------------

def _lora_repo_triples(triples) -> str:
    return " | ".join("{} : {} : {}".format(s, p, o) for s, p, o in triples)


def test_webnlg_dev_records_as_the_lora_repo_builds_them():
    from loralib.tasks.nlg.data import SEEN_CATEGORIES, read_raw

    path = _real("lora-nlg/webnlg_challenge_2017/dev.json")
    entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
    assert len(entries) == 872
    expected = []
    for i, wrapped in enumerate(entries):
        entry = wrapped[str(i + 1)]  # the converter indexes entries by their 1-based position
        context = _lora_repo_triples((t["subject"], t["property"], t["object"]) for t in entry["modifiedtripleset"])
        expected += [(context, lex["lex"], entry["category"] in SEEN_CATEGORIES)
                     for lex in entry["lexicalisations"] if lex["comment"] == "good"]
    records = read_raw("webnlg", path)
    assert [(r["context"], r["completion"], r["category"] in SEEN_CATEGORIES) for r in records] == expected
    assert len(records) == len(expected)
    # dev holds the seen categories only (the unseen five appear in the test set)
    assert {r["category"] for r in records} <= SEEN_CATEGORIES
    assert len({r["category"] for r in records}) == 10


def test_dart_dev_records_as_the_lora_repo_builds_them():
    from loralib.tasks.nlg.data import read_raw

    path = _real("lora-nlg/dart/dart-v1.1.1-full-dev.json")
    entries = json.loads(path.read_text(encoding="utf-8"))
    assert len(entries) == 2768
    expected = []
    for entry in entries:
        context = _lora_repo_triples((s, p.lower(), o) for s, p, o in entry["tripleset"])
        expected += [(context, a["text"]) for a in entry["annotations"]]
    records = read_raw("dart", path)
    assert [(r["context"], r["completion"]) for r in records] == expected


@pytest.mark.parametrize("task,rel,n_entries", [
    ("webnlg", "lora-nlg/webnlg_challenge_2017/dev.json", 872),
    ("dart", "lora-nlg/dart/dart-v1.1.1-full-dev.json", 2768),
])
def test_multi_reference_files_written_and_scored(task, rel, n_entries, tmp_path):
    """gpt2_decode.py's grouping (by context: entries with the same triples merge, as in the LoRA repo),
    reference0..5 written, read back by eval_nlg's reader, BLEU equal to the in-memory computation."""
    from loralib.tasks.nlg.data import read_raw
    from loralib.tasks.nlg.decode import group_references, padded_references, write_outputs
    from loralib.tasks.nlg.evaluate import parse_outputs, reference_files
    from loralib.tasks.nlg.metrics import multi_bleu_detok

    records = read_raw(task, _real(rel))
    groups = list(group_references(records).values())
    n_contexts = len({r["context"] for r in records})
    assert len(groups) == n_contexts <= n_entries
    for g in groups:
        g.hypothesis = g.references[0]
    write_outputs(groups, task, tmp_path / "refs", tmp_path / "hyps.txt", ref_num=6)
    ref_files = reference_files(tmp_path / "refs")
    assert len(ref_files) == 6
    hyps, refs = parse_outputs(task, [f.read_text(encoding="utf-8") for f in ref_files],
                               (tmp_path / "hyps.txt").read_text(encoding="utf-8"),
                               [str(f) for f in ref_files], "hyps.txt")
    assert len(refs) == len(hyps) == n_contexts
    assert refs == [padded_references(g.references, 6) for g in groups]
    assert multi_bleu_detok(hyps, refs) == pytest.approx(
        multi_bleu_detok([g.hypothesis for g in groups], [padded_references(g.references, 6) for g in groups]))
    # each group's first reference is its hypothesis: every hypothesis is matched exactly once
    assert multi_bleu_detok(hyps, refs) == pytest.approx(100.0)


# -- GSM8K ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split,n_rows", [("train", 7473), ("test", 1319)])
def test_gsm8k_rows_and_answers(split, n_rows):
    from loralib.tasks.instruct.data import gsm8k_target, read_rows
    from loralib.tasks.instruct.gsm8k import extract_gsm8k_answer, normalize_number

    path = _real(f"gsm8k/{split}.jsonl")
    rows = [row for _, row in read_rows(path)]
    assert len(rows) == n_rows
    for row in rows:
        answer = row["answer"]
        assert answer.count("####") == 1
        stated = answer.split("####")[1].strip()
        assert gsm8k_target(answer) == stated.replace(",", "")
        assert extract_gsm8k_answer(answer) == normalize_number(stated)


def test_gsm8k_test_records_prompt_and_extraction():
    """load_records on the real test file: 1,319 records, the Alpaca prompt holds the question verbatim, and
    the extraction applied to every gold solution returns the gold number."""
    from loralib.tasks.instruct.data import load_records
    from loralib.tasks.instruct.gsm8k import extract_gsm8k_answer, gsm8k_accuracy
    from loralib.tasks.instruct.prompts import ALPACA_PROMPT, format_prompt

    records = load_records("gsm8k", _real("gsm8k/test.jsonl"))
    assert len(records) == 1319
    prompts = [format_prompt(r["query"]) for r in records]
    assert all(r["query"] in p and p == ALPACA_PROMPT.format(query=r["query"]) and p.endswith("### Response:\n") for r, p in zip(records, prompts))
    assert gsm8k_accuracy([extract_gsm8k_answer(r["answer"]) for r in records],
                          [r["target"] for r in records]) == 1.0
    # the numbers are integers in GSM8K; a few carry thousands separators in the release
    assert sum("," in r["answer"].split("####")[1] for r in records) > 0
    assert Counter(r["target"].lstrip("-").isdigit() for r in records)[True] == 1319


def test_gsm8k_train_as_metamath_rows(tmp_path):
    """data/gsm8k_as_metamath.py on the real train split: 7,473 MetaMathQA-layout rows that the metamath loader
    keeps whole (type GSM_AnsAug), each the GSM8K question and solution unchanged; the released LoRA-Pro
    extraction (`####\\s*(\\d+)`) finds the gold number in every integer solution."""
    import subprocess
    import sys

    from loralib.tasks.instruct.data import load_records, read_rows
    from loralib.tasks.instruct.gsm8k import extract_gsm8k_answer_released

    dest = tmp_path / "metamath.jsonl"
    done = subprocess.run([sys.executable, str(REPO / "data" / "gsm8k_as_metamath.py"),
                           str(_real("gsm8k/train.jsonl")), str(dest)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    gsm8k = [row for _, row in read_rows(_real("gsm8k/train.jsonl"))]
    records = load_records("metamath", dest)
    assert len(records) == len(gsm8k) == 7473
    assert all(r["query"] == g["question"] and r["answer"] == g["answer"] for r, g in zip(records, gsm8k))
    plain = [g for g in gsm8k if g["answer"].split("####")[1].strip().isdigit()]
    assert len(plain) > 7000
    assert all(extract_gsm8k_answer_released(g["answer"]) == int(g["answer"].split("####")[1]) for g in plain)
