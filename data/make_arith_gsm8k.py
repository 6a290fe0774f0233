"""Templated arithmetic word problems in the MetaMathQA (train) and GSM8K (test) file formats (issue 7 §5).

    python data/make_arith_gsm8k.py --output_dir data/arith-gsm8k

writes
    data/arith-gsm8k/metamath.json     [{"query", "response", "type": "GSM_Templated"}, ...]  MetaMathQA's layout
    data/arith-gsm8k/gsm8k_test.jsonl  {"question", "answer"} lines, the answer ending "#### <number>"  GSM8K's

Offline stand-ins for MetaMathQA -> GSM8K: the LoRA-Pro pipeline (loaders, prompt masking, training,
left-padded generation, answer extraction, exact match) runs end to end on them, and a fine-tune that learns
the solution format and the arithmetic raises the accuracy measured by the same code that scores GSM8K.
Solutions are written step by step in GSM8K's style, with its `<<a+b=c>>` calculator annotations. Train and
test draw from the same templates with different random numbers and names; nothing comes from GSM8K itself.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam", "Maya",
         "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq")
ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "cards", "coins")


def _buy_and_give(r: random.Random):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(5, 60), r.randint(2, 40)
    c = r.randint(1, a + b - 1)
    q = (f"{name} has {a} {item}. {name} buys {b} more {item} and then gives {c} {item} to a friend. "
         f"How many {item} does {name} have now?")
    s1, s2 = a + b, a + b - c
    sol = (f"After buying, {name} has {a} + {b} = <<{a}+{b}={s1}>>{s1} {item}.\n"
           f"After giving some away, {name} has {s1} - {c} = <<{s1}-{c}={s2}>>{s2} {item}.")
    return q, sol, s2


def _price(r: random.Random):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    n, price, paid_extra = r.randint(2, 12), r.randint(2, 15), r.randint(1, 20)
    total = n * price
    paid = total + paid_extra
    q = (f"{name} buys {n} packs of {item}. Each pack costs ${price}. {name} pays with ${paid}. "
         f"How much change does {name} get, in dollars?")
    sol = (f"The packs cost {n} * {price} = <<{n}*{price}={total}>>{total} dollars.\n"
           f"The change is {paid} - {total} = <<{paid}-{total}={paid_extra}>>{paid_extra} dollars.")
    return q, sol, paid_extra


def _share(r: random.Random):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    friends, each, left = r.randint(2, 9), r.randint(2, 12), r.randint(0, 9)
    total = friends * each + left
    q = (f"{name} has {total} {item} and shares them equally among {friends} friends, keeping the {left} "
         f"that are left over. How many {item} does each friend get?")
    shared = total - left
    sol = (f"{name} shares {total} - {left} = <<{total}-{left}={shared}>>{shared} {item}.\n"
           f"Each friend gets {shared} / {friends} = <<{shared}/{friends}={each}>>{each} {item}.")
    return q, sol, each


def _weekly(r: random.Random):
    name = r.choice(NAMES)
    per_day, days, weeks = r.randint(2, 30), r.randint(2, 7), r.randint(2, 6)
    week = per_day * days
    total = week * weeks
    q = (f"{name} reads {per_day} pages a day, {days} days a week. How many pages does {name} read in "
         f"{weeks} weeks?")
    sol = (f"In one week {name} reads {per_day} * {days} = <<{per_day}*{days}={week}>>{week} pages.\n"
           f"In {weeks} weeks that is {week} * {weeks} = <<{week}*{weeks}={total}>>{total} pages.")
    return q, sol, total


def _difference(r: random.Random):
    a, b = r.sample(NAMES, 2)
    item = r.choice(ITEMS)
    x, more = r.randint(3, 50), r.randint(1, 30)
    y = x + more
    total = x + y
    q = (f"{a} has {x} {item}. {b} has {more} more {item} than {a}. How many {item} do they have together?")
    sol = (f"{b} has {x} + {more} = <<{x}+{more}={y}>>{y} {item}.\n"
           f"Together they have {x} + {y} = <<{x}+{y}={total}>>{total} {item}.")
    return q, sol, total


TEMPLATES = (_buy_and_give, _price, _share, _weekly, _difference)


def problems(n: int, seed: int) -> list[tuple[str, str, int]]:
    """n (question, solution text without the final line, answer) triples, templates drawn round-robin."""
    r = random.Random(seed)
    return [TEMPLATES[i % len(TEMPLATES)](r) for i in range(n)]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="data/arith-gsm8k")
    parser.add_argument("--num_train", type=int, default=2000)
    parser.add_argument("--num_test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_test < 1:
        parser.error("--num_train and --num_test must be positive")
    out = Path(args.output_dir)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        parser.error(f"--output_dir {out}: {blocker} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    train = [{"query": q, "response": f"{sol}\nThe answer is: {ans}", "type": "GSM_Templated"}
             for q, sol, ans in problems(args.num_train, args.seed)]
    # the test problems come from another random stream: no (question, numbers) pair is shared with train
    test = [{"question": q, "answer": f"{sol}\n#### {ans}"} for q, sol, ans in problems(args.num_test, args.seed + 10_007)]
    seen = {row["query"] for row in train}
    test = [row for row in test if row["question"] not in seen]
    _atomic_write(out / "metamath.json", json.dumps(train, indent=1) + "\n")
    _atomic_write(out / "gsm8k_test.jsonl", "".join(json.dumps(row) + "\n" for row in test))
    print(f"{out / 'metamath.json'}: {len(train)} problems; {out / 'gsm8k_test.jsonl'}: {len(test)} problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
