"""NLG data: raw E2E / WebNLG / DART -> formatted JSONL (expected lines written by hand), GPT-2 BPE against
transformers' GPT-2 tokenizer, encoding, prepare_nlg.py, and the refusals of malformed input."""
import json
import shutil
import sys
from pathlib import Path

import pytest

from loralib.tasks.nlg import bpe as bpe_mod
from loralib.tasks.nlg.bpe import GPT2BPE, VocabularyError
from loralib.tasks.nlg.data import (DataFormatError, encode_record, read_e2e_csv, read_encoded, read_formatted,
                                    read_raw, write_jsonl)

ROOT = Path(__file__).resolve().parents[1]
TIKTOKEN_FILE = ROOT / ".cache" / "gpt2-bpe" / "gpt2.tiktoken"
needs_bpe = pytest.mark.skipif(not TIKTOKEN_FILE.is_file(), reason=f"{TIKTOKEN_FILE} missing (make fetches it)")

sys.path.insert(0, str(ROOT / "data"))
import prepare_nlg  # noqa: E402


def lines_of(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# -- raw formats -> formatted records -----------------------------------------------------------------

E2E_CSV = '''mr,ref
"name[The Vaults], eatType[pub], priceRange[more than £30], customer rating[5 out of 5], near[Café Adriatic]","The Vaults pub near Café Adriatic has a 5 star rating.  Prices start at £30."
"name[The Vaults], eatType[pub], priceRange[more than £30], customer rating[5 out of 5], near[Café Adriatic]","Close to Café Adriatic, The Vaults pub is pricey, rated 5 out of 5."
"name[Blue Spice], eatType[coffee shop], food[Chinese], area[riverside], familyFriendly[yes]",Blue Spice is a coffee shop.
'''


def test_e2e_csv_to_formatted(tmp_path):
    raw = tmp_path / "trainset.csv"
    raw.write_text(E2E_CSV, encoding="utf-8")
    out = write_jsonl(read_raw("e2e", raw), tmp_path / "train_formatted.jsonl")
    vaults = "name : The Vaults | Type : pub | price : more than £30 | customer rating : 5 out of 5 | near : Café Adriatic"
    assert lines_of(out) == [
        {"context": vaults, "completion": "The Vaults pub near Café Adriatic has a 5 star rating.  Prices start at £30.",
         "id": 0},
        {"context": vaults, "completion": "Close to Café Adriatic, The Vaults pub is pricey, rated 5 out of 5.", "id": 0},
        {"context": "name : Blue Spice | Type : coffee shop | food : Chinese | area : riverside | family friendly : yes",
         "completion": "Blue Spice is a coffee shop.", "id": 1},
    ]
    # non-ASCII stays readable in the file (the pound sign and the accent are not \u-escaped)
    assert "£30" in out.read_text(encoding="utf-8")


def test_e2e_csv_keeps_unknown_slots_in_order(tmp_path):
    # data/make_wordnet_nlg.py writes E2E-syntax MRs with its own slots
    raw = tmp_path / "devset.csv"
    raw.write_text('mr,ref\n"name[dog], type[canine], field[animal]",A dog is a canine.\n', encoding="utf-8")
    assert read_e2e_csv(raw) == [{"context": "name : dog | type : canine | field : animal",
                                  "completion": "A dog is a canine."}]


def test_e2e_txt_lines(tmp_path):
    raw = tmp_path / "test.txt"
    raw.write_text("name : Blue Spice | Type : pub||Blue Spice is a pub .\n"
                   "name : Blue Spice | Type : pub||It 's a pub .\n\n"
                   "name : Aromi | area : riverside||Aromi is by the river .\n", encoding="utf-8")
    assert read_raw("e2e", raw) == [
        {"context": "name : Blue Spice | Type : pub", "completion": "Blue Spice is a pub .", "id": 0},
        {"context": "name : Blue Spice | Type : pub", "completion": "It 's a pub .", "id": 0},
        {"context": "name : Aromi | area : riverside", "completion": "Aromi is by the river .", "id": 1},
    ]


WEBNLG_XML = """<?xml version="1.0" ?>
<benchmark>
  <entries>
    <entry category="Airport" eid="Id1" size="2">
      <originaltripleset>
        <otriple>Aarhus_Airport | cityServed | "Aarhus, Denmark"@en</otriple>
      </originaltripleset>
      <modifiedtripleset>
        <mtriple>Aarhus_Airport | cityServed | "Aarhus, Denmark"</mtriple>
        <mtriple>Aarhus | leaderName | Jacob_Bundsgaard</mtriple>
      </modifiedtripleset>
      <lex comment="good" lid="Id1">The Aarhus is the airport of Aarhus, Denmark.</lex>
      <lex comment="bad" lid="Id2">Not this one.</lex>
      <lex comment="good" lid="Id3">
        Aarhus Airport serves Aarhus, led by Jacob Bundsgaard.
      </lex>
    </entry>
    <entry category="Athlete" eid="Id2" size="1">
      <modifiedtripleset>
        <mtriple>Aaron_Boogaard | height | 1.905</mtriple>
      </modifiedtripleset>
      <lex comment="good" lid="Id1"><text>Aaron Boogaard is 1.905 m tall.</text></lex>
    </entry>
  </entries>
</benchmark>
"""


def test_webnlg_xml_to_formatted(tmp_path):
    raw = tmp_path / "test.xml"
    raw.write_text(WEBNLG_XML, encoding="utf-8")
    ctx = 'Aarhus_Airport : cityServed : "Aarhus, Denmark" | Aarhus : leaderName : Jacob_Bundsgaard'
    assert read_raw("webnlg", raw) == [
        {"context": ctx, "completion": "The Aarhus is the airport of Aarhus, Denmark.", "category": "Airport",
         "id": 0},
        {"context": ctx, "completion": "Aarhus Airport serves Aarhus, led by Jacob Bundsgaard.",
         "category": "Airport", "id": 0},
        {"context": "Aaron_Boogaard : height : 1.905", "completion": "Aaron Boogaard is 1.905 m tall.",
         "category": "Athlete", "id": 1},
    ]
    # a folder of XML files (the challenge's train/1triples/*.xml layout) is read file by file
    (tmp_path / "train" / "1triples").mkdir(parents=True)
    (tmp_path / "train" / "1triples" / "Airport.xml").write_text(WEBNLG_XML, encoding="utf-8")
    assert len(read_raw("webnlg", tmp_path / "train")) == 3


def test_webnlg_lora_repo_json(tmp_path):
    raw = tmp_path / "dev.json"
    raw.write_text(json.dumps({"entries": [
        {"1": {"category": "Airport", "lexicalisations": [
            {"comment": "good", "lang": "", "lex": "The leader of Aarhus is Jacob Bundsgaard.", "xml_id": "Id1"},
            {"comment": "bad", "lang": "", "lex": "skip", "xml_id": "Id2"}],
            "modifiedtripleset": [{"object": "Jacob_Bundsgaard", "property": "leaderName", "subject": "Aarhus"}]}},
    ]}), encoding="utf-8")
    assert read_raw("webnlg", raw) == [{"context": "Aarhus : leaderName : Jacob_Bundsgaard",
                                        "completion": "The leader of Aarhus is Jacob Bundsgaard.",
                                        "category": "Airport", "id": 0}]


def test_dart_json_lowercases_the_property(tmp_path):
    raw = tmp_path / "dart-v1.1.1-full-test.json"
    raw.write_text(json.dumps([
        {"tripleset": [["Mars Hill College", "JOINED", "1973"], ["Mars Hill College", "LOCATION", "Mars Hill, NC"]],
         "subtree_was_extended": True,
         "annotations": [{"source": "WikiSQL_decl_sents", "text": "A school from Mars Hill, NC, joined in 1973."},
                         {"source": "x", "text": "Mars Hill College joined in 1973."}]},
        {"tripleset": [["Newberry College", "NICKNAME", "Wolves"]],
         "annotations": [{"source": "y", "text": "Newberry College's nickname is the wolves."}]},
    ]), encoding="utf-8")
    ctx = "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, NC"
    assert read_raw("dart", raw) == [
        {"context": ctx, "completion": "A school from Mars Hill, NC, joined in 1973.", "id": 0},
        {"context": ctx, "completion": "Mars Hill College joined in 1973.", "id": 0},
        {"context": "Newberry College : nickname : Wolves", "completion": "Newberry College's nickname is the wolves.",
         "id": 1},
    ]


# -- malformed raw data: one clear error naming file:line ---------------------------------------------

@pytest.mark.parametrize("name, text, task, where", [
    ("trainset.csv", 'mr,ref\n"name[A], eatType[pub]",ok\n"name[B] eatType pub",bad mr\n', "e2e", ":3:"),
    ("trainset.csv", 'mr,ref\n"name[A], name[B]",twice\n', "e2e", ":2:"),
    ("testset.csv", 'MR\n"name[A]"\n', "e2e", ":1:"),
    ("train.txt", "name : A||fine\nname : B without separator\n", "e2e", ":2:"),
    ("test.xml", WEBNLG_XML.replace("</lex>\n    </entry>\n    <entry", "</lex>\n    <entry", 1), "webnlg", ":"),
    ("test.xml", WEBNLG_XML.replace("Aarhus | leaderName | Jacob_Bundsgaard", "Aarhus leaderName"), "webnlg",
     ":10:"),
    ("dart.json", json.dumps([{"tripleset": [["a", "B", "c"]], "annotations": [{"text": "t"}]},
                              {"tripleset": [["a", "B"]], "annotations": [{"text": "t"}]}]), "dart", "entry 2"),
    ("dart.json", '[{"tripleset": [["a", "B", "c"]],\n "annotations": [}]', "dart", ":2:"),
])
def test_malformed_raw_data_names_file_and_line(tmp_path, name, text, task, where):
    raw = tmp_path / name
    raw.write_text(text, encoding="utf-8")
    with pytest.raises(DataFormatError) as e:
        read_raw(task, raw)
    assert str(e.value).startswith(str(raw)) and where in str(e.value)


def test_malformed_xml_reports_its_line(tmp_path):
    raw = tmp_path / "test.xml"
    raw.write_text(WEBNLG_XML.replace("</modifiedtripleset>\n      <lex comment=\"good\" lid=\"Id1\"><text>",
                                      "<lex comment=\"good\" lid=\"Id1\"><text>"), encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"test\.xml:\d+: not well-formed XML"):
        read_raw("webnlg", raw)


def test_formatted_and_encoded_readers_refuse_bad_lines(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"context": "a", "completion": "b"}\n{"context": "a"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"x\.jsonl:2: 'completion' must be a string"):
        read_formatted(f)
    for extra, message in (('"category": 5', "'category' must be a string"), ('"cate": "yes"', "'cate'")):
        f.write_text('{"context": "a", "completion": "b", %s}\n' % extra, encoding="utf-8")
        with pytest.raises(DataFormatError, match=rf"x\.jsonl:1: {message}"):
            read_formatted(f)
    f.write_text('{"context": [1, 2], "completion": [3, 50256]}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"x\.jsonl:2: not valid JSON"):
        read_encoded(f)
    f.write_text('{"context": [1, 2], "completion": [3, 50256]}\n{"context": [50257], "completion": [3]}\n',
                 encoding="utf-8")
    assert len(read_encoded(f)) == 2                                  # no vocabulary given: ids not checked
    with pytest.raises(VocabularyError, match=r"x\.jsonl:2: context: token id 50257 is outside"):
        read_encoded(f, vocab_size=50257)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_encoded(tmp_path / "nope.jsonl")
    with pytest.raises(DataFormatError, match="a folder, expected a file"):
        read_encoded(tmp_path)


# -- GPT-2 BPE ----------------------------------------------------------------------------------------

def _recover_merges(ranks):
    """The merge that makes each multi-byte token: byte-pair merging of its bytes restricted to lower ranks
    stops at exactly two parts."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if rank < 256:
            continue
        parts = [bytes([b]) for b in token]
        while True:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        assert len(parts) == 2, token
        merges.append(tuple(parts))
    return merges


@pytest.fixture(scope="module")
def gpt2_vocab_folder(tmp_path_factory):
    """The original vocab/ folder (encoder.json + vocab.bpe) rebuilt from the tiktoken file."""
    if not TIKTOKEN_FILE.is_file():
        pytest.skip(f"{TIKTOKEN_FILE} missing")
    ranks = bpe_mod._ranks_from_tiktoken(TIKTOKEN_FILE)
    to_uni = bpe_mod._byte_to_unicode()
    uni = lambda b: "".join(to_uni[x] for x in b)  # noqa: E731
    folder = tmp_path_factory.mktemp("vocab")
    encoder = {uni(t): r for t, r in ranks.items()}
    encoder["<|endoftext|>"] = 50256
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    merges = _recover_merges(ranks)
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{uni(a)} {uni(b)}\n" for a, b in merges),
                                      encoding="utf-8")
    return folder


SAMPLES = ["Hello world", "name : The Vaults | Type : pub | price : more than £ 30 | near : Café Adriatic",
           " The Vaults is a pub. It's rated 5 out of 5, isn't it?", "Aarhus_Airport : cityServed : \"Aarhus, Denmark\"",
           "  multiple   spaces\tand\ttabs\n\nnew lines  ", "numbers 1234567 and 3.14159; émojis 🙂 and 日本語",
           "<|endoftext|> is plain text here", "I'll we've they're he'd she'S"]


@needs_bpe
def test_bpe_matches_transformers_gpt2_tokenizer(gpt2_vocab_folder, tmp_path):
    from transformers import GPT2TokenizerFast

    # the same two files under Hugging Face's names (vocab.json, merges.txt), loaded the standard way
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(gpt2_vocab_folder / "encoder.json", hf / "vocab.json")
    shutil.copy(gpt2_vocab_folder / "vocab.bpe", hf / "merges.txt")
    reference = GPT2TokenizerFast.from_pretrained(str(hf))
    assert len(reference) == 50257
    from_tiktoken = GPT2BPE.from_path(TIKTOKEN_FILE)
    from_folder = GPT2BPE.from_path(gpt2_vocab_folder)
    reference.save_pretrained(tmp_path / "saved")
    from_tokenizer_json = GPT2BPE.from_path(tmp_path / "saved")
    assert from_tiktoken.encode("Hello world") == [15496, 995]
    for text in SAMPLES:
        # "<|endoftext|>" inside text is ordinary text for us; transformers would map it to the special id
        expected = reference(text.replace("<|endoftext|>", "<|endof text|>"), add_special_tokens=False)["input_ids"]
        ours = from_tiktoken.encode(text.replace("<|endoftext|>", "<|endof text|>"))
        assert ours == expected, text
        assert from_folder.encode(text) == from_tiktoken.encode(text) == from_tokenizer_json.encode(text)
        assert from_tiktoken.decode(from_tiktoken.encode(text)) == text
    for bpe in (from_tiktoken, from_folder, from_tokenizer_json):
        assert (bpe.vocab_size, bpe.eos_id) == (50257, 50256)
    assert from_tiktoken.decode([15496, 50256]) == "Hello<|endoftext|>"
    assert from_tiktoken.encode("<|endoftext|>") != [50256]


@needs_bpe
def test_vocabularies_that_do_not_fit_are_refused(gpt2_vocab_folder, tmp_path):
    bpe = GPT2BPE.from_path(TIKTOKEN_FILE)
    bpe.check_model(50257)
    with pytest.raises(VocabularyError, match="vocab_size 50260"):
        bpe.check_model(50260)
    with pytest.raises(VocabularyError, match="outside"):
        bpe.decode([50257])
    # an encoder.json with a token missing: merges no longer line up with ids
    small = tmp_path / "small"
    small.mkdir()
    encoder = json.loads((gpt2_vocab_folder / "encoder.json").read_text(encoding="utf-8"))
    encoder = {k: v for k, v in encoder.items() if v < 50000}
    (small / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (small / "vocab.bpe").write_text((gpt2_vocab_folder / "vocab.bpe").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(VocabularyError, match="do not match"):
        GPT2BPE.from_path(small)
    # a self-consistent but smaller vocabulary: <|endoftext|> would not be 50256
    lines = (gpt2_vocab_folder / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    (small / "vocab.bpe").write_text("\n".join(lines[:50000 - 256 + 1]) + "\n", encoding="utf-8")
    with pytest.raises(VocabularyError, match="50000 ordinary tokens"):
        GPT2BPE.from_path(small)
    with pytest.raises(FileNotFoundError, match="no encoder.json"):
        GPT2BPE.from_path(tmp_path)
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64\n", encoding="utf-8")
    with pytest.raises(VocabularyError, match=r"bad\.tiktoken:2:"):
        GPT2BPE.from_path(bad)


@needs_bpe
def test_encoding_follows_the_paper():
    bpe = GPT2BPE.from_path(TIKTOKEN_FILE)
    record = {"context": "name : The Vaults | Type : pub", "completion": "Hello world"}
    assert encode_record(record, bpe) == {"context": [3672, 1058, 383, 21314, 930, 5994, 1058, 2240],
                                          "completion": [18435, 995, 50256]}


# -- prepare_nlg.py -----------------------------------------------------------------------------------

@needs_bpe
def test_prepare_nlg_writes_formatted_and_encoded_splits(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("trainset.csv", "devset.csv", "testset_w_refs.csv"):
        (raw / name).write_text(E2E_CSV, encoding="utf-8")
    out = tmp_path / "nlg" / "e2e"
    assert prepare_nlg.main(["--task", "e2e", "--raw_dir", str(raw), "--out_dir", str(out),
                             "--vocab", str(TIKTOKEN_FILE)]) == 0
    bpe = GPT2BPE.from_path(TIKTOKEN_FILE)
    for split in ("train", "valid", "test"):
        formatted = read_formatted(out / f"{split}_formatted.jsonl")
        assert [r["completion"] for r in formatted] == [r["completion"] for r in read_e2e_csv(raw / "trainset.csv")]
        assert read_encoded(out / f"{split}.jsonl", 50257) == [encode_record(r, bpe) for r in formatted]


@needs_bpe
def test_prepare_nlg_writes_nothing_when_a_split_is_malformed(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.txt").write_text("name : A||fine\n", encoding="utf-8")
    (raw / "valid.txt").write_text("name : A||fine\n", encoding="utf-8")
    (raw / "test.txt").write_text("name : A||fine\nbroken line\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(DataFormatError, match=r"test\.txt:2:"):
        prepare_nlg.prepare("e2e", raw, out, TIKTOKEN_FILE)
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(FileNotFoundError, match="no test file for e2e"):
        (raw / "test.txt").unlink()
        prepare_nlg.prepare("e2e", raw, out, TIKTOKEN_FILE)


def test_download_fetches_then_says_plainly_when_offline(tmp_path):
    source = tmp_path / "remote.txt"
    source.write_text("name : A||fine\n", encoding="utf-8")
    raw = tmp_path / "raw"
    paths = prepare_nlg.download("e2e", raw, urls={"train.txt": source.as_uri()})
    assert paths == [raw / "train.txt"] and (raw / "train.txt").read_text(encoding="utf-8") == "name : A||fine\n"
    with pytest.raises(prepare_nlg.Offline, match=r"could not fetch http://127\.0\.0\.1:9/test\.txt"):
        prepare_nlg.download("e2e", raw, urls={"test.txt": "http://127.0.0.1:9/test.txt"}, timeout=5)
    assert sorted(p.name for p in raw.iterdir()) == ["train.txt"]   # no partial file left
    # a --raw_dir the download made, with nothing fetched into it, is not left behind
    with pytest.raises(prepare_nlg.Offline):
        prepare_nlg.download("e2e", tmp_path / "new" / "raw", urls={"test.txt": "http://127.0.0.1:9/test.txt"},
                             timeout=5)
    assert not (tmp_path / "new" / "raw").exists()
