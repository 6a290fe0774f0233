"""NLG files read, decoded and scored as the official scripts do (issue 21), and bad NLG input named by file and
line before anything is written (issue 13 §6).

References here are literal re-readings of the official code, run on the same files:
- measure_scores.read_lines / load_data (E2E): codecs.open(path, 'rb', 'UTF-8'), line iteration, strip();
- eval.py's parse (WebNLG/DART): codecs.open(path, 'r', 'utf-8').read().split('\\n');
- the original gpt2_decode.py's grouping loop: refer_dict[key]['sample'] assigned in sample-file order;
- pyter3 (the package eval.py imports as `pyter`) for TER, when installed (pip install pyter3==0.3); by-hand
  values otherwise.
"""
from __future__ import annotations

import codecs
import json
import os
import random
import sys
from pathlib import Path

import pytest

from loralib.tasks.nlg import evaluate as ev
from loralib.tasks.nlg import decode as dec
from loralib.tasks.nlg.bpe import GPT2BPE
from loralib.tasks.nlg.data import DataFormatError, read_encoded, read_raw, write_jsonl
from loralib.tasks.nlg.lines import EXTRA_LINE_BREAKS, eval_py_lines, parse_e2e_references
from loralib.tasks.nlg.ter import ReferenceDistance, eval_py_sentence_ter, pyter_ter
from test_nlg_decode import fake_metrics as recorded  # noqa: F401 (the metric functions replaced by recorders)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LORALIB_SHARED_DATA") or ROOT.parent / "shared" / "data" / "real")
TIKTOKEN_FILE = ROOT / ".cache" / "gpt2-bpe" / "gpt2.tiktoken"
needs_bpe = pytest.mark.skipif(not TIKTOKEN_FILE.is_file(), reason=f"{TIKTOKEN_FILE} missing (make fetches it)")
sys.path.insert(0, str(ROOT / "examples" / "NLG"))
sys.path.insert(0, str(ROOT / "data"))

BREAKS = EXTRA_LINE_BREAKS + ("\r",)  # \r splits in both readers' worlds; the others only in the E2E script's


# -- the official readers, read literally -------------------------------------------------------------

def official_read_lines(path, multi_ref=False):
    """measure_scores.py's read_lines."""
    buf = [[]] if multi_ref else []
    with codecs.open(str(path), "rb", "UTF-8") as fh:
        for line in fh:
            line = line.strip()
            if multi_ref:
                if not line:
                    buf.append([])
                else:
                    buf[-1].append(line)
            else:
                buf.append(line)
    if multi_ref and not buf[-1]:
        del buf[-1]
    return buf


def official_load(ref_file, sys_file):
    """measure_scores.py's load_data for plain-text files: (references, outputs); unequal counts raise."""
    data_sys = official_read_lines(sys_file)
    data_ref = official_read_lines(ref_file, multi_ref=True)
    if len(data_ref) == 1:
        data_ref = [[inst] for inst in data_ref[0]]
    if len(data_ref) != len(data_sys):
        raise ValueError("Files have different number of lines!!!")
    return data_ref, data_sys


def eval_py_parse(path):
    """eval.py's reading of one file: every \\n-separated piece, the one after the final newline included."""
    with codecs.open(str(path), "r", "utf-8") as f:
        return f.read().split("\n")


# -- (1) line splitting -------------------------------------------------------------------------------

@pytest.mark.parametrize("char", BREAKS + ("\x1f", "\xa0"), ids=lambda c: f"U+{ord(c):04X}")
def test_e2e_files_are_cut_into_lines_as_measure_scores_cuts_them(tmp_path, recorded, char):
    ref, hyp = tmp_path / "ref.txt", tmp_path / "pred.txt"
    ref.write_text(f"The Eagle is a pub.{char}It is cheap.\nA pub, The Eagle. \n\nAromi is a cafe.\n\n",
                   encoding="utf-8")
    hyp.write_text(f"The Eagle.\nAromi{char} is a cafe.\n", encoding="utf-8", newline="")
    try:
        want_refs, want_hyps = official_load(ref, hyp)
    except ValueError:
        want_refs = want_hyps = None
    if char in BREAKS:  # a line break to the official reader: the reference line is two references
        assert official_read_lines(ref, multi_ref=True)[0] == ["The Eagle is a pub.", "It is cheap.",
                                                               "A pub, The Eagle."]
    assert parse_e2e_references(ref.read_text(encoding="utf-8"), str(ref)) == \
        official_read_lines(ref, multi_ref=True)
    if want_hyps is None:  # the hypothesis file then has three lines for two inputs: both refuse it
        with pytest.raises(DataFormatError, match=rf"pred\.txt:2: U\+{ord(char):04X} is a line break"):
            ev.evaluate_files("e2e", ref, hyp)
        return
    ev.evaluate_files("e2e", ref, hyp)
    assert recorded["e2e"] == (want_hyps, want_refs)


def test_e2e_hypotheses_split_like_the_references_score_the_same(tmp_path, recorded):
    """A hypothesis line that the official reader splits in two, balanced by one more reference group."""
    for char in EXTRA_LINE_BREAKS:
        ref, hyp = tmp_path / "ref.txt", tmp_path / "pred.txt"
        ref.write_text("A.\n\nB.\n\nC.\n", encoding="utf-8")
        hyp.write_text(f"a{char}b\nc\n", encoding="utf-8")
        ev.evaluate_files("e2e", ref, hyp)
        assert recorded["e2e"] == official_load(ref, hyp)[::-1] == (["a", "b", "c"], [["A."], ["B."], ["C."]])


@pytest.mark.parametrize("char", BREAKS, ids=lambda c: f"U+{ord(c):04X}")
def test_webnlg_and_dart_files_are_cut_as_eval_py_cuts_them(tmp_path, recorded, char):
    (tmp_path / "refs").mkdir()
    columns = [f"first{char}ref\nsecond ref\n", "first alt\nsecond alt\n"]
    for k, text in enumerate(columns):
        (tmp_path / "refs" / f"reference{k}").write_text(text, encoding="utf-8", newline="")
    (tmp_path / "hyp").write_text(f"one{char}hyp\ntwo\n", encoding="utf-8", newline="")
    ev.evaluate_files("dart", tmp_path / "refs", tmp_path / "hyp")
    (hyps, refs), ter = recorded["dart"], recorded["ter"]
    # eval.py's pieces, less the empty one after the final newline (its METEOR bug, not reproduced)
    official_hyps = eval_py_parse(tmp_path / "hyp")
    assert official_hyps[-1] == "" and hyps == official_hyps[:-1] == [f"one{char}hyp", "two"]
    official_refs = [eval_py_parse(tmp_path / "refs" / f"reference{k}")[:-1] for k in range(2)]
    assert refs == [list(r) for r in zip(*official_refs)] and ter == "eval_py"
    assert eval_py_lines("a\nb") == ["a", "b"] and eval_py_lines("a\n\n") == ["a", ""]


# -- (2) empty reference groups -------------------------------------------------------------------------

@pytest.mark.parametrize("text, line", [("a\n\n\nb\n", 3), ("\na\n\nb\n", 1), ("a\n\nb\n\n\n", 5),
                                        ("a\n\n \t\nb\n", 3)])
def test_an_empty_reference_group_is_refused_with_its_line(tmp_path, text, line, capsys):
    import eval_nlg

    ref, hyp = tmp_path / "ref.txt", tmp_path / "pred.txt"
    ref.write_text(text, encoding="utf-8")
    hyp.write_text("x\ny\n", encoding="utf-8")
    assert [] in official_read_lines(ref, multi_ref=True)  # the official script's empty group
    with pytest.raises(ValueError):
        official_load(ref, hyp)
    with pytest.raises(DataFormatError, match=rf"ref\.txt:{line}: .*empty reference group"):
        parse_e2e_references(text, str(ref))
    out = tmp_path / "run"
    assert eval_nlg.main(["--task", "e2e", "--ref_file", str(ref), "--pred_file", str(hyp),
                          "--output_dir", str(out)]) == 2
    assert f"ref.txt:{line}:" in capsys.readouterr().err and not out.exists()
    # one blank line between groups, and one at the end, are the format
    ref.write_text("a\n\nb\n\n", encoding="utf-8")
    assert parse_e2e_references(ref.read_text(), str(ref)) == official_read_lines(ref, True) == [["a"], ["b"]]


# -- (3) the prediction a group keeps ----------------------------------------------------------------------

def original_samples(records, sample_lines, bpe):
    """The original gpt2_decode.py's loop: each sample line, in file order, (re)sets its group's sample."""
    refer = {}
    for r in records:
        refer.setdefault(r["context"], {})
    for line in sample_lines:
        items = json.loads(line.strip())
        refer[records[items["id"]]["context"]]["sample"] = \
            bpe.decode(items["predict"]).split("<|endoftext|>")[0].split("\n\n")[0].strip()
    return [v["sample"] for v in refer.values()]


@needs_bpe
def test_the_last_prediction_in_the_sample_file_wins(tmp_path):
    import gpt2_decode

    bpe = GPT2BPE.from_path(TIKTOKEN_FILE)
    records = [{"context": "name : A", "completion": "A one.", "id": 0},
               {"context": "name : B", "completion": "B one.", "id": 1},
               {"context": "name : A", "completion": "A two.", "id": 0}]
    write_jsonl(records, tmp_path / "in.jsonl")
    lines = [json.dumps({"id": i, "predict": bpe.encode(text)})
             for i, text in [(2, " from line 2"), (1, " B"), (0, " from line 0, last in the file")]]
    again = lines + [json.dumps({"id": 2, "predict": bpe.encode(" line 2 again")})]
    for sample in (lines, again):
        (tmp_path / "p.jsonl").write_text("\n".join(sample) + "\n", encoding="utf-8")
        gpt2_decode.run(["--vocab", str(TIKTOKEN_FILE), "--sample_file", str(tmp_path / "p.jsonl"), "--input_file",
                 str(tmp_path / "in.jsonl"), "--output_ref_file", str(tmp_path / "r.txt"), "--output_pred_file",
                 str(tmp_path / "h.txt")])
        want = original_samples(records, sample, bpe)
        assert (tmp_path / "h.txt").read_text(encoding="utf-8").splitlines() == want
    assert want[0] == "line 2 again" and original_samples(records, lines, bpe)[0] == "from line 0, last in the file"
    # a prediction the scorer would read as two lines is written as the original wrote it, with a warning
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": 1, "predict": bpe.encode(" B\u2028b")}) + "\n" + lines[2] + "\n",
                                      encoding="utf-8")
    with pytest.warns(UserWarning, match=r"input line 2: its prediction holds U\+2028, a line break to the e2e"):
        gpt2_decode.run(["--vocab", str(TIKTOKEN_FILE), "--sample_file", str(tmp_path / "p.jsonl"), "--input_file",
                 str(tmp_path / "in.jsonl"), "--output_ref_file", str(tmp_path / "r.txt"), "--output_pred_file",
                 str(tmp_path / "h.txt")])
    assert (tmp_path / "h.txt").read_text(encoding="utf-8") == "from line 0, last in the file\nB\u2028b\n"


# -- (5) TER as eval.py computes it ------------------------------------------------------------------------

def _levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_bit_parallel_distance_is_levenshtein():
    rng = random.Random(0)
    for _ in range(400):
        vocab = "abcdef"[:rng.randint(1, 6)]
        a = [rng.choice(vocab) for _ in range(rng.randint(0, 90))]
        b = [rng.choice(vocab) for _ in range(rng.randint(1, 90))]   # > 64 words: several machine words
        dist = ReferenceDistance(b)
        assert dist.distance(a) == _levenshtein(a, b)
        states, k = dist.prefix_states(a), rng.randint(0, len(a))
        assert dist.distance(a, states, k) == _levenshtein(a, b)


def test_pyter_ter_by_hand():
    # pyter's documented example: 0.308 (4 edits / 13 words)
    ref = "SAUDI ARABIA denied THIS WEEK information published in the AMERICAN new york times".split()
    hyp = "THIS WEEK THE SAUDIS denied information published in the new york times".split()
    assert pyter_ter(hyp, ref) == pytest.approx(4 / 13)
    assert pyter_ter("c d a b".split(), "a b c d".split()) == pytest.approx(1 / 4)   # one block shift
    assert pyter_ter("a b c d".split(), "a c d".split()) == pytest.approx(1 / 3)     # one deletion
    assert pyter_ter([], "a b".split()) == 1.0 and pyter_ter("A b".split(), "a b".split()) == 0.5
    # where pyter and tercom part: "e a b c" -> "a c b". tercom: delete e, shift b: 2/3. pyter: shifts whose
    # gain is 1 (its gain leaves out the shift's own cost) tie, the larger word list wins: c to 1 (e c a b),
    # then a to 0 (a e c b), then delete e: 3/3.
    assert pyter_ter("e a b c".split(), "a c b".split()) == 1.0
    from sacrebleu.metrics import TER
    assert TER(case_sensitive=True).sentence_score("e a b c", ["a c b"]).score == pytest.approx(200 / 3)
    with pytest.raises(ZeroDivisionError):
        pyter_ter(["a"], [])
    assert eval_py_sentence_ter("a b", ["", "   ", "a x"]) == 0.5 and eval_py_sentence_ter("a", ["", " "]) == 1.0


def _webnlg_pairs():
    """(hypothesis, references) pairs from WebNLG dev's lexicalisations: one text against the others of its
    entry, tokenised as eval.py tokenises (nltk.word_tokenize)."""
    from loralib.tasks.nlg.metrics import nltk_word_tokenize

    path = SHARED / "lora-nlg" / "webnlg_challenge_2017" / "dev.json"
    if not path.is_file():
        pytest.skip(f"{path} missing (the shared real data)")
    groups = {}
    for r in read_raw("webnlg", path):
        groups.setdefault(r["id"], []).append(" ".join(nltk_word_tokenize(r["completion"])))
    return [(texts[0], texts[1:]) for texts in groups.values() if len(texts) > 1][:150]


def test_pyter_ter_equals_pyter3():
    pyter = pytest.importorskip("pyter", reason="pyter3 not installed (pip install pyter3==0.3)")
    rng = random.Random(1)
    for _ in range(300):
        vocab = "a b c d e f the of".split()[:rng.randint(2, 8)]
        h = [rng.choice(vocab) for _ in range(rng.randint(0, 14))]
        r = [rng.choice(vocab) for _ in range(rng.randint(1, 14))]
        assert pyter_ter(h, r) == pyter.ter(h, r)
    for hyp, refs in _webnlg_pairs()[:60]:
        for ref in refs:
            assert pyter_ter(hyp.split(), ref.split()) == pyter.ter(hyp.split(), ref.split())


def test_mean_sentence_ter_definitions_on_webnlg_text():
    from loralib.tasks.nlg import metrics as M

    pairs = _webnlg_pairs()
    hyps, refs = [h for h, _ in pairs], [M._padded([refs], 6)[0] for _, refs in pairs]
    eval_py = M.mean_sentence_ter(hyps, refs)
    assert eval_py == pytest.approx(sum(eval_py_sentence_ter(h, r) for h, r in zip(hyps, refs)) / len(hyps))
    sacre = M.mean_sentence_ter(hyps, refs, "sacrebleu")
    assert 0 < abs(eval_py - sacre) < 0.05  # the two definitions part, by a few thousandths
    with pytest.raises(ValueError, match="TER definition 'tercom'"):
        M.mean_sentence_ter(hyps, refs, "tercom")


def test_eval_nlg_records_the_ter_definition(tmp_path, recorded):
    import eval_nlg

    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "reference0").write_text("a b\n", encoding="utf-8")
    (tmp_path / "hyp").write_text("a b\n", encoding="utf-8")
    for flag, key in ((), "ter"), (("--ter", "sacrebleu"), "ter_sacrebleu"):
        out = tmp_path / key
        assert eval_nlg.main(["--task", "webnlg", "--ref_file", str(tmp_path / "refs"), "--pred_file",
                              str(tmp_path / "hyp"), "--output_dir", str(out), *flag]) == 0
        record = json.loads((out / "eval_results.json").read_text())
        assert key in record and ({"ter", "ter_sacrebleu"} - {key}).isdisjoint(record)
        assert recorded["ter"] == ("sacrebleu" if flag else "eval_py")


# -- issue 13 §6: bad input named by file and line, nothing written -------------------------------------

BAD = b"caf\xe9"  # Latin-1, not UTF-8


@pytest.mark.parametrize("name, content, line, read", [
    ("train.txt", b"name : A||fine\nname : B||" + BAD + b"\n", 2, lambda p: read_raw("e2e", p)),
    ("devset.csv", b"mr,ref\nname[A],fine\nname[B]," + BAD + b"\n", 3, lambda p: read_raw("e2e", p)),
    ("dev.json", b'{"entries": [\n{"1": "' + BAD + b'"}]}', 2, lambda p: read_raw("webnlg", p)),
    ("dart.json", b'[\n\n"' + BAD + b'"]', 3, lambda p: read_raw("dart", p)),
    ("test.jsonl", b'{"context": [1], "completion": [2]}\n{"context": [' + BAD + b"]}\n", 2, read_encoded),
    ("ref.txt", b"a\n\n" + BAD + b"\n", 3, lambda p: ev.evaluate_files("e2e", p, p)),
    ("encoder.json", b'{"a": 0,\n"' + BAD + b'": 1}', 2, lambda p: (p.with_name("vocab.bpe").write_text("#version\n"),
                                                                GPT2BPE.from_path(p.parent))),
])
def test_bytes_that_are_not_utf8_are_named_by_file_and_line(tmp_path, name, content, line, read):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=rf"{name}:{line}: not UTF-8 text \(byte 0xe9 at column \d+\)"):
        read(path)
    # WebNLG XML without an encoding declaration is UTF-8 to the XML parser, which names the line too
    (tmp_path / "bad.xml").write_bytes(b'<benchmark>\n<entries>\n<entry category="City">' + BAD + b"</entry>\n")
    with pytest.raises(DataFormatError, match=r"bad\.xml:3: not well-formed XML"):
        read_raw("webnlg", tmp_path / "bad.xml")


@pytest.mark.parametrize("text, line", [
    ('mr,ref\nname[A],fine\n"name[B],no closing quote\nname[C],fine\n', 3),   # runs over the next lines
    ('mr,ref\nname[A],fine\nname[B],"no closing quote\n', 3),                  # the last row: csv's EOF
    ('mr,ref\nname[A],"closed" then text\n', 2),
    ('mr,ref\nname[A],"a field\nover two lines"\nname[B],fine\n', 2),      # balanced, but E2E has no such field
])
def test_an_unbalanced_quote_in_an_e2e_csv_is_refused(tmp_path, text, line, capsys):
    import prepare_nlg

    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("trainset.csv", "devset.csv"):
        (raw / name).write_text("mr,ref\nname[A],fine\n", encoding="utf-8")
    (raw / "testset_w_refs.csv").write_text(text, encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"testset_w_refs\.csv:{line}: .*quote"):
        read_raw("e2e", raw / "testset_w_refs.csv")
    out = tmp_path / "out"
    assert prepare_nlg.main(["--task", "e2e", "--raw_dir", str(raw), "--out_dir", str(out),
                             "--vocab", str(TIKTOKEN_FILE)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"testset_w_refs.csv:{line}:" in err and "\n" not in err and not out.exists()


@needs_bpe
def test_decode_and_eval_scripts_print_one_line_and_write_nothing(tmp_path, capsys):
    import eval_nlg
    import gpt2_decode

    content = b'{"context": "name : A", "completion": "' + BAD + b'"}\n'
    (tmp_path / "in.jsonl").write_bytes(content)
    (tmp_path / "p.jsonl").write_text('{"id": 0, "predict": [40]}\n', encoding="utf-8")
    assert gpt2_decode.main(["--vocab", str(TIKTOKEN_FILE), "--sample_file", str(tmp_path / "p.jsonl"),
                             "--input_file", str(tmp_path / "in.jsonl"), "--output_ref_file", str(tmp_path / "r.txt"),
                             "--output_pred_file", str(tmp_path / "h.txt")]) == 2
    assert capsys.readouterr().err == (f"gpt2_decode.py: error: {tmp_path / 'in.jsonl'}:1: not UTF-8 text (byte "
                                       f"0xe9 at column {content.index(0xe9) + 1}); re-save the file as UTF-8\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "p.jsonl"]

    (tmp_path / "ref.txt").write_text("a\n\n\nb\n", encoding="utf-8")
    (tmp_path / "h.txt").write_text("x\ny\n", encoding="utf-8")
    assert eval_nlg.main(["--task", "e2e", "--ref_file", str(tmp_path / "ref.txt"), "--pred_file",
                          str(tmp_path / "h.txt"), "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eval_nlg.py: error: {tmp_path / 'ref.txt'}:3: two blank lines") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    # a webnlg reference folder given as a file, an output folder that is a file: named, nothing written
    assert gpt2_decode.main(["--vocab", str(TIKTOKEN_FILE), "--sample_file", str(tmp_path / "p.jsonl"),
                             "--input_file", str(tmp_path / "in.jsonl"), "--ref_type", "webnlg",
                             "--output_ref_file", str(tmp_path / "h.txt"), "--output_pred_file",
                             str(tmp_path / "new.txt")]) == 2
    assert "--output_ref_file" in capsys.readouterr().err and not (tmp_path / "new.txt").exists()
