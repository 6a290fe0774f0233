"""Tiny GLUE folders in the official file layouts, tiny offline tokenizers, and a tiny WordNet (wndb) file.

    root = write_glue_tsv(tmp_path)          # tmp_path/CoLA/train.tsv ... tmp_path/WNLI/test.tsv
    expected = expected_examples("mnli", "dev")  # [(text_a, text_b, label id)] that load_glue must return

The column layouts are those of the GLUE distribution (CoLA train/dev without a header; MNLI with 12 columns in
train and 16 in dev; STS-B with 10 ...). Other tests (smoke runs of the GLUE scripts) can use these too.
"""
from __future__ import annotations

from pathlib import Path

WORDS = ("the a cat dog man woman sat ran on mat is was good bad not very film movie a plot "
         "what why how did does question answer paris capital of france it rains today").split()
SENTENCES = [
    "the cat sat on the mat", "a dog ran", "the film was very good", "the movie is not bad",
    "a man sat", "the woman ran on the mat", "what is the capital of france", "paris is the capital",
    "why did the dog run", "it rains today", "how good is the plot", "the plot was bad",
]
N_ROWS = 6  # rows per split

MNLI_LABELS = ("entailment", "neutral", "contradiction")
NLI2_LABELS = ("entailment", "not_entailment")


def _s(i: int) -> str:
    return SENTENCES[i % len(SENTENCES)]


def _rows(task: str, split: str):
    """(text_a, text_b, raw TSV label, label id) for each row of a split; label None for test."""
    rows = []
    salt = {"train": 0, "dev": 3, "dev_matched": 3, "dev_mismatched": 5, "test": 7,
            "test_matched": 7, "test_mismatched": 9}[split]
    for i in range(N_ROWS):
        a, b = _s(i + salt), (_s(i + salt + 4) if task not in ("cola", "sst2") else None)
        if split.startswith("test"):
            rows.append((a, b, None, None))
        elif task in ("mnli",):
            raw = MNLI_LABELS[i % 3]
            rows.append((a, b, raw, MNLI_LABELS.index(raw)))
        elif task in ("qnli", "rte"):
            raw = NLI2_LABELS[i % 2]
            rows.append((a, b, raw, NLI2_LABELS.index(raw)))
        elif task == "stsb":
            score = round(5.0 * i / (N_ROWS - 1), 3)
            rows.append((a, b, f"{score:.3f}", score))
        else:
            rows.append((a, b, str(i % 2), i % 2))
    return rows


def _lines(task: str, split: str) -> list[str]:
    rows = _rows(task, split)
    test = split.startswith("test")
    out = []
    if task == "cola":
        if test:
            out.append("index\tsentence")
            out += [f"{i}\t{a}" for i, (a, _, _, _) in enumerate(rows)]
        else:  # no header: source, label, original mark, sentence
            out += [f"gj04\t{raw}\t{'' if raw == '1' else '*'}\t{a}" for a, _, raw, _ in rows]
    elif task == "sst2":
        out.append("index\tsentence" if test else "sentence\tlabel")
        out += [f"{i}\t{a}" if test else f"{a}\t{raw}" for i, (a, _, raw, _) in enumerate(rows)]
    elif task == "mrpc":
        out.append(("index" if test else "Quality") + "\t#1 ID\t#2 ID\t#1 String\t#2 String")
        out += [f"{i if test else raw}\t{1000 + i}\t{2000 + i}\t{a}\t{b}" for i, (a, b, raw, _) in enumerate(rows)]
    elif task == "stsb":
        head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
        out.append(head if test else head + "\tscore")
        for i, (a, b, raw, _) in enumerate(rows):
            line = f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}"
            out.append(line if test else f"{line}\t{raw}")
    elif task == "qqp":
        out.append("id\tquestion1\tquestion2" if test else "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate")
        out += [f"{i}\t{a}\t{b}" if test else f"{i}\t{2 * i + 1}\t{2 * i + 2}\t{a}\t{b}\t{raw}"
                for i, (a, b, raw, _) in enumerate(rows)]
    elif task == "mnli":
        head = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                "sentence1_parse\tsentence2_parse\tsentence1\tsentence2")
        if test:
            out.append(head)
        elif split == "train":
            out.append(head + "\tlabel1\tgold_label")
        else:
            out.append(head + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")
        for i, (a, b, raw, _) in enumerate(rows):
            line = f"{i}\t{100 + i}\t{100 + i}e\tfiction\t( {a} )\t( {b} )\t(ROOT {a})\t(ROOT {b})\t{a}\t{b}"
            if split == "train":
                line += f"\t{raw}\t{raw}"
            elif not test:
                line += f"\t{raw}" * 5 + f"\t{raw}"
            out.append(line)
    elif task == "qnli":
        out.append("index\tquestion\tsentence" + ("" if test else "\tlabel"))
        out += [f"{i}\t{a}\t{b}" + ("" if test else f"\t{raw}") for i, (a, b, raw, _) in enumerate(rows)]
    elif task in ("rte", "wnli"):
        out.append("index\tsentence1\tsentence2" + ("" if test else "\tlabel"))
        out += [f"{i}\t{a}\t{b}" + ("" if test else f"\t{raw}") for i, (a, b, raw, _) in enumerate(rows)]
    else:
        raise KeyError(task)
    return out


FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
           "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}


def _files(task: str) -> dict[str, str]:
    if task == "mnli":
        return {s: f"{s}.tsv" for s in ("train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched")}
    return {s: f"{s}.tsv" for s in ("train", "dev", "test")}


def write_glue_tsv(root: Path, tasks=tuple(FOLDERS)) -> Path:
    """Write every split of each task in the official layout under root/<GLUE folder>/; returns root."""
    root = Path(root)
    for task in tasks:
        folder = root / FOLDERS[task]
        folder.mkdir(parents=True, exist_ok=True)
        for split, name in _files(task).items():
            (folder / name).write_text("\n".join(_lines(task, split)) + "\n", encoding="utf-8")
    return root


def expected_examples(task: str, split: str) -> list[tuple]:
    """What load_glue(task, root, split) must return for the files write_glue_tsv wrote.
    task "mnli-mm" reads the mismatched files; split "dev"/"test" as load_glue names them."""
    base, file_split = task, split
    if task in ("mnli", "mnli-mm"):
        base = "mnli"
        if split != "train":
            file_split = f"{split}_{'mismatched' if task == 'mnli-mm' else 'matched'}"
    return [(a, b, label) for a, b, _, label in _rows(base, file_split)]


# ---------------------------------------------------------------- tokenizers built offline

def make_tokenizer(kind: str):
    """A tiny tokenizer of the real transformers class for `kind` (bert, roberta, deberta, gpt2, llama), with a
    vocabulary built here: word-level for BERT/DeBERTa, byte-level characters for RoBERTa/GPT-2/Llama."""
    import transformers as tf
    words = sorted(set(WORDS) | {w for s in SENTENCES for w in s.split()})
    chars = sorted(set("".join(words)))
    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        return tf.BertTokenizer(vocab={t: i for i, t in enumerate(specials + words)})
    if kind == "deberta":
        specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
        return tf.DebertaV2Tokenizer(vocab=[(t, 0.0) for t in specials + ["\u2581" + w for w in words]], unk_id=3)
    if kind == "roberta":
        tokens = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + chars + ["\u0120" + c for c in chars]
        return tf.RobertaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    if kind == "gpt2":
        tokens = chars + ["\u0120" + c for c in chars] + ["<|endoftext|>"]
        return tf.GPT2Tokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<|endoftext|>",
                                bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    if kind == "llama":
        tokens = ["<unk>", "<s>", "</s>"] + chars + ["\u2581" + c for c in chars]
        return tf.LlamaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    raise KeyError(kind)


# ---------------------------------------------------------------- a tiny WordNet in the wndb(5WN) format

WNDB_LICENSE = ["  1 This software and database is being provided to you, the LICENSEE, by  ",
                "  2 Princeton University under the following license.  "]
# lex_filenum -> (category word stem, how many synsets)
SYNTHETIC_CATEGORIES = {5: ("animal", 14), 6: ("artifact", 12), 18: ("person", 10), 13: ("food", 4)}


def synthetic_synsets():
    """(ss_type, lex_filenum, words, pointers, gloss) rows. Synsets i of animal, artifact and person share the word
    'thing{i}', so the pair task has polysemous words; every synset has one or two example sentences."""
    rows = []
    for lex, (stem, count) in SYNTHETIC_CATEGORIES.items():
        for i in range(count):
            words = [f"{stem}{i}", f"thing{i}"] if lex != 13 else [f"{stem}{i}"]
            examples = [f'"the {stem}{i} did {stem} thing number {i}"']
            if i % 2:
                examples.append(f'"another {stem} sentence {i}"')
            gloss = f"a {stem} of kind {i} (with parentheses); " + "; ".join(examples)
            rows.append(("n", lex, words, [("@", 0, "n", "0000")], gloss))
    # a verb synset with a frames field, as data.verb has
    rows.append(("v", 29, ["breathe", "respire"], [], 'draw air into the lungs; "she breathed deeply"'))
    return rows


def write_wndb(folder: Path) -> Path:
    """Write data.noun and data.verb (offsets are the byte offsets, as in the real files); returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_pos = {"n": [], "v": []}
    for row in synthetic_synsets():
        by_pos[row[0]].append(row)
    for pos, name in (("n", "noun"), ("v", "verb")):
        text = "".join(line + "\n" for line in WNDB_LICENSE)
        for ss_type, lex, words, pointers, gloss in by_pos[pos]:
            offset = len(text.encode("utf-8"))
            word_part = " ".join(f"{w} 0" for w in words)
            ptr_part = " ".join(f"{sym} {off:08d} {p} {st}" for sym, off, p, st in pointers)
            frames = " 01 + 02 00" if ss_type == "v" else ""
            line = (f"{offset:08d} {lex:02d} {ss_type} {len(words):02x} {word_part} {len(pointers):03d}"
                    f"{' ' + ptr_part if ptr_part else ''}{frames} | {gloss}  ")
            text += line + "\n"
        (folder / f"data.{name}").write_text(text, encoding="utf-8")
    return folder
