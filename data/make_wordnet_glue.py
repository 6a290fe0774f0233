"""Build two real, offline GLUE-format tasks from WordNet 3.0 (for `make demo`, issue 5 §6).

    apt-get install -y wordnet-base wordnet-sense-index     # -> /usr/share/wordnet/data.{noun,verb,adj,adv}
    python data/make_wordnet_glue.py --output_dir data/wordnet

writes
    data/wordnet/WN-LEX/{train,dev}.tsv, labels.txt   gloss -> lexicographer category (noun.animal, ...), SST-2
                                                      layout ("sentence<TAB>label", label = line of labels.txt)
    data/wordnet/WN-PAIR/{train,dev}.tsv              (gloss, example sentence) -> 1 if the example uses the word
                                                      in that gloss's sense, MRPC layout
read by load_glue("wn-lex" | "wn-pair", "data/wordnet", split).

The lexicographer task keeps the most frequent categories with the same number of synsets each. The pair task
takes a word with two senses s and t: (gloss of s, example of s) is a positive, (gloss of s, example of t) a
negative, so the example contains the word either way and only its sense tells them apart. Synsets are split
between train and dev before pairing, so no gloss or example is in both. Everything is drawn with a fixed seed.

wndb(5WN) line:  offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt [sym offset pos src/tgt]...
                 [f_cnt [+ f_num w_num]...  (verbs)]  | definition; "example"; "example"
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

APT_PACKAGES = "wordnet-base wordnet-sense-index"
PARTS = ("noun", "verb", "adj", "adv")
# lexnames(5WN): the lexicographer file of each lex_filenum
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity "
    "noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition "
    "verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
_QUOTED = re.compile(r'"([^"]*)"')


@dataclass(frozen=True)
class Synset:
    id: str                    # pos letter + offset, e.g. "n02084071"
    category: str              # lexicographer file name, e.g. "noun.animal"
    words: tuple[str, ...]     # lower-case lemmas, spaces for underscores, adjective markers removed
    definition: str            # the gloss without its examples
    examples: tuple[str, ...]  # the quoted example sentences of the gloss
    hypernyms: tuple[str, ...] = ()  # ids of the hypernym and instance-hypernym synsets (pointers "@", "@i")


def parse_data_file(path: Path) -> list[Synset]:
    """Every synset of one wndb data file. All malformed lines are reported together as path:line."""
    synsets, errors = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if line.startswith("  ") or not line.strip():  # license header lines start with two spaces
                continue
            try:
                synsets.append(_parse_line(line.rstrip("\n")))
            except ValueError as e:
                errors.append(f"{path}:{line_no}: {e}")
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"{len(errors)} malformed line(s) in {path}:\n  " + "\n  ".join(errors[:20]) + more)
    return synsets


def _parse_line(line: str) -> Synset:
    head, sep, gloss = line.partition(" | ")
    if not sep:
        raise ValueError("no ' | ' before the gloss")
    tokens = head.split()
    if len(tokens) < 6:
        raise ValueError(f"only {len(tokens)} fields before the gloss")
    offset, lex, ss_type = tokens[0], tokens[1], tokens[2]
    if not (len(offset) == 8 and offset.isdigit()):
        raise ValueError(f"synset offset {offset!r} is not 8 digits")
    if not (lex.isdigit() and int(lex) < len(LEXNAMES)):
        raise ValueError(f"lex_filenum {lex!r} is not a number below {len(LEXNAMES)}")
    if ss_type not in ("n", "v", "a", "s", "r"):
        raise ValueError(f"ss_type {ss_type!r} is not one of n v a s r")
    try:
        w_cnt = int(tokens[3], 16)
        at = 4 + 2 * w_cnt
        words = tokens[4:at:2]
        p_cnt = int(tokens[at])
        pointers = [tokens[at + 1 + 4 * i: at + 5 + 4 * i] for i in range(p_cnt)]
        at += 1 + 4 * p_cnt
        if ss_type == "v":  # verb frames: f_cnt then "+ f_num w_num" each
            f_cnt = int(tokens[at])
            at += 1 + 3 * f_cnt
    except (ValueError, IndexError):
        raise ValueError("word, pointer or frame counts do not match the fields") from None
    if at != len(tokens) or len(words) != w_cnt or w_cnt == 0:
        raise ValueError(f"{len(tokens)} fields before the gloss, the counts in the line imply {at}")
    words = tuple(_ADJ_MARKER.sub("", w).replace("_", " ").lower() for w in words)
    gloss = gloss.strip()
    examples = tuple(e.strip() for e in _QUOTED.findall(gloss) if e.strip())
    definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
    hypernyms = tuple(pos + target for symbol, target, pos, _ in pointers if symbol in ("@", "@i"))
    return Synset(("a" if ss_type == "s" else ss_type) + offset, LEXNAMES[int(lex)], words, definition, examples,
                  hypernyms)


def read_wordnet(wordnet_dir: Path, parts=PARTS) -> list[Synset]:
    wordnet_dir = Path(wordnet_dir)
    synsets = []
    for part in parts:
        path = wordnet_dir / f"data.{part}"
        if not path.is_file():
            raise FileNotFoundError(f"WordNet data file not found: {path} "
                                    f"(Debian/Ubuntu: apt-get install {APT_PACKAGES})")
        synsets += parse_data_file(path)
    return synsets


def _clean(text: str) -> str:
    return " ".join(text.split())  # no tabs or newlines may reach a TSV field


def make_lex_task(synsets, num_categories=6, per_category=500, dev_fraction=0.2, seed=0, pos="noun"):
    """Balanced (definition, category id) rows of the most frequent categories of one part of speech
    ("noun", "verb", ... or None for all); returns (train, dev, category names in id order)."""
    by_category = defaultdict(list)
    seen = set()
    for s in sorted(synsets, key=lambda s: s.id):
        if pos is not None and not s.category.startswith(pos + "."):
            continue
        text = _clean(s.definition)
        # a definition shared by two synsets would be ambiguous; a one- or two-word one says too little
        if len(text.split()) >= 3 and text.lower() not in seen:
            seen.add(text.lower())
            by_category[s.category].append(text)
    counts = Counter({c: len(v) for c, v in by_category.items()})
    chosen = sorted(c for c, _ in counts.most_common(num_categories))
    if len(chosen) < 2:
        raise ValueError(f"need at least 2 lexicographer categories, found {len(chosen)}")
    per_category = min(per_category, min(counts[c] for c in chosen))
    rng = random.Random(seed)
    train, dev = [], []
    for label, category in enumerate(chosen):
        picked = rng.sample(by_category[category], per_category)
        n_dev = max(1, round(per_category * dev_fraction))
        dev += [(text, label) for text in picked[:n_dev]]
        train += [(text, label) for text in picked[n_dev:]]
    rng.shuffle(train)
    rng.shuffle(dev)
    return train, dev, chosen


def make_pair_task(synsets, num_pairs=4000, dev_fraction=0.2, seed=0):
    """(definition, example, 1|0) rows, half positive; returns (train, dev)."""
    rng = random.Random(seed)
    usable = sorted((s for s in synsets if s.definition and s.examples), key=lambda s: s.id)
    rng.shuffle(usable)
    n_dev_synsets = round(len(usable) * dev_fraction)
    split_of = {s.id: ("dev" if i < n_dev_synsets else "train") for i, s in enumerate(usable)}
    targets = {"train": num_pairs - round(num_pairs * dev_fraction), "dev": round(num_pairs * dev_fraction)}
    out = {}
    for split in ("train", "dev"):
        senses = defaultdict(list)  # word -> its senses (synsets of this split) that have examples
        for s in usable:
            if split_of[s.id] == split:
                for w in set(s.words):  # a lemma listed twice in one synset must not pair it with itself
                    senses[w].append(s)
        words = sorted(w for w, ss in senses.items() if len(ss) >= 2)
        rng.shuffle(words)
        rows, used_glosses = [], set()
        for w in words:
            if len(rows) >= targets[split]:
                break
            s, t = rng.sample(senses[w], 2)
            positives = [e for e in s.examples if _mentions(e, w)]
            negatives = [e for e in t.examples if _mentions(e, w) and e not in s.examples]
            # each gloss once (its positive and its negative); both examples must show the shared word
            if s.id in used_glosses or not positives or not negatives:
                continue
            used_glosses.add(s.id)
            rows.append((_clean(s.definition), _clean(rng.choice(positives)), 1))
            rows.append((_clean(s.definition), _clean(rng.choice(negatives)), 0))
        rng.shuffle(rows)
        out[split] = rows
    return out["train"], out["dev"]


def _mentions(example: str, word: str) -> bool:
    """Does the example use the word? A crude stem (the word less its last two letters) lets inflected
    forms count: "breathed" for "breathe", "ran" does not count for "run"."""
    stem = word if len(word) <= 4 else word[:-2]
    return stem in example.lower()


def _write_task(out_dir: Path, name: str, files: dict[str, str]):
    """Write the files into a temporary folder and move it into place: no half-written task is left behind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for file_name, text in files.items():
            (tmp / file_name).write_text(text, encoding="utf-8")
        final = out_dir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_tasks(wordnet_dir, output_dir, seed=0, num_categories=6, per_category=500, num_pairs=4000,
                dev_fraction=0.2, lex_pos="noun") -> dict[str, dict[str, int]]:
    """Build both tasks and write them under output_dir; returns the row count of each split."""
    synsets = read_wordnet(wordnet_dir)
    lex_train, lex_dev, names = make_lex_task(synsets, num_categories, per_category, dev_fraction, seed, lex_pos)
    pair_train, pair_dev = make_pair_task(synsets, num_pairs, dev_fraction, seed)
    if not pair_train or not pair_dev:
        raise ValueError(f"too few words with two senses with examples in {wordnet_dir} for the pair task")

    def sst2(rows):
        return "sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows)

    def mrpc(rows):  # ids are running numbers: a shared id would give the label away
        return "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(
            f"{label}\t{2 * i}\t{2 * i + 1}\t{gloss}\t{example}\n" for i, (gloss, example, label) in enumerate(rows))

    output_dir = Path(output_dir)
    _write_task(output_dir, "WN-LEX", {"train.tsv": sst2(lex_train), "dev.tsv": sst2(lex_dev),
                                       "labels.txt": "".join(n + "\n" for n in names)})
    _write_task(output_dir, "WN-PAIR", {"train.tsv": mrpc(pair_train), "dev.tsv": mrpc(pair_dev)})
    return {"WN-LEX": {"train": len(lex_train), "dev": len(lex_dev), "labels": len(names)},
            "WN-PAIR": {"train": len(pair_train), "dev": len(pair_dev)}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet_dir", default="/usr/share/wordnet")
    parser.add_argument("--output_dir", default="data/wordnet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_categories", type=int, default=6)
    parser.add_argument("--per_category", type=int, default=500, help="synsets per category (both splits)")
    parser.add_argument("--num_pairs", type=int, default=4000, help="pairs in both splits together")
    parser.add_argument("--dev_fraction", type=float, default=0.2)
    parser.add_argument("--lex_pos", default="noun", choices=["noun", "verb", "adj", "adv", "all"],
                        help="part of speech whose categories the WN-LEX task classifies")
    args = parser.parse_args(argv)
    if not 0 < args.dev_fraction < 1:
        parser.error(f"--dev_fraction must be between 0 and 1, got {args.dev_fraction}")
    out = Path(args.output_dir)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:  # before anything is read or written
        parser.error(f"--output_dir {out}: {blocker} is a file, not a folder")
    try:
        counts = write_tasks(args.wordnet_dir, args.output_dir, args.seed, args.num_categories,
                             args.per_category, args.num_pairs, args.dev_fraction,
                             None if args.lex_pos == "all" else args.lex_pos)
    except (FileNotFoundError, ValueError) as e:
        print(f"make_wordnet_glue: {e}", file=sys.stderr)
        return 1
    for task, c in counts.items():
        print(f"{Path(args.output_dir) / task}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
