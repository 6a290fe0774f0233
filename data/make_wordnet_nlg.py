"""Build a real, offline data-to-text set in the E2E challenge's file format from WordNet 3.0 (issue 6 §5).

    apt-get install -y wordnet-base wordnet-sense-index     # -> /usr/share/wordnet/data.noun
    python data/make_wordnet_nlg.py --output_dir data/wordnet-nlg
    python data/prepare_nlg.py --task e2e --raw_dir data/wordnet-nlg ...   # the E2E converter, unchanged

writes data/wordnet-nlg/{trainset,devset,testset_w_refs}.csv with the E2E header `mr,ref`, one row a
reference. A meaning representation describes one noun synset in E2E's `key[value], key[value]` syntax:

    mr:  name[dog], type[canine], field[animal], alias[domestic dog]
    ref: A dog is a canine: a member of the genus Canis (probably descended from the common wolf) that ...

The reference opens with what the MR says (the sentence a data-to-text model can learn to realise) and ends
with the synset's gloss, real English written by WordNet's lexicographers that the MR only names. A synset
with a second hypernym gets a second reference naming it, so some MRs have several references, as E2E's do.
Synsets are drawn with a fixed seed from the given lexicographer categories and split between train, dev and
test, so no synset (and no gloss) is in two splits.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_wordnet_glue import APT_PACKAGES, Synset, read_wordnet  # noqa: E402

FIELDS = ("animal", "artifact", "food", "plant", "person", "body", "substance", "location")
MAX_GLOSS_WORDS = 24          # short glosses keep the completions within a few dozen tokens
SPLITS = ("trainset", "devset", "testset_w_refs")


def _article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def _usable(synset: Synset, by_id: dict) -> bool:
    """A noun synset of one of FIELDS with a hypernym, a short gloss and lemmas that fit E2E's MR syntax."""
    return (synset.id.startswith("n") and synset.category.split(".", 1)[1] in FIELDS and bool(synset.hypernyms)
            and all(h in by_id for h in synset.hypernyms) and 3 <= len(synset.definition.split()) <= MAX_GLOSS_WORDS
            and not any(c in w for w in synset.words for c in "[],")
            and "[" not in synset.definition)


def meaning_representation(synset: Synset, by_id: dict) -> str:
    name, hypernym = synset.words[0], by_id[synset.hypernyms[0]].words[0]
    parts = [f"name[{name}]", f"type[{hypernym}]", f"field[{synset.category.split('.', 1)[1]}]"]
    if len(synset.words) > 1:
        parts.append(f"alias[{synset.words[1]}]")
    return ", ".join(parts)


def references(synset: Synset, by_id: dict) -> list[str]:
    name = synset.words[0]
    alias = f", also called {synset.words[1]}," if len(synset.words) > 1 else ""
    out = []
    for h in synset.hypernyms[:2]:
        hypernym = by_id[h].words[0]
        out.append(f"{_article(name)} {name}{alias} is {_article(hypernym).lower()} {hypernym}: {synset.definition}.")
    return out


def build(wordnet_dir: Path, sizes=(1500, 100, 100), seed: int = 0) -> dict:
    """{split: [(mr, ref), ...]} for the three E2E splits, sizes counted in synsets (MRs)."""
    synsets = read_wordnet(wordnet_dir, parts=("noun",))
    by_id = {s.id: s for s in synsets}
    pool = sorted((s for s in synsets if _usable(s, by_id)), key=lambda s: s.id)
    if len(pool) < sum(sizes):
        raise ValueError(f"{wordnet_dir}: only {len(pool)} usable noun synsets, {sum(sizes)} asked for")
    random.Random(seed).shuffle(pool)
    rows, start = {}, 0
    for split, n in zip(SPLITS, sizes):
        chosen = pool[start:start + n]
        start += n
        rows[split] = [(meaning_representation(s, by_id), ref) for s in chosen for ref in references(s, by_id)]
    return rows


def write_csv(rows, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mr", "ref"])
        writer.writerows(rows)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet_dir", default="/usr/share/wordnet", help=f"wndb files (apt-get install {APT_PACKAGES})")
    parser.add_argument("--output_dir", default="data/wordnet-nlg")
    parser.add_argument("--sizes", default="1500,100,100", help="train,dev,test synset counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        sizes = tuple(int(x) for x in args.sizes.split(","))
        if len(sizes) != 3 or min(sizes) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: expected three positive integers, e.g. 1500,100,100")
    try:
        rows = build(Path(args.wordnet_dir), sizes, args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"make_wordnet_nlg.py: {e}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        write_csv(rows[split], out / f"{split}.csv")
        print(f"{out / (split + '.csv')}: {len(rows[split])} references, {len({mr for mr, _ in rows[split]})} MRs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
